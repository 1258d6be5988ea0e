"""sample.py: generate from a checkpoint, with a KV cache and self-speculative decoding from the MTP heads.

    python sample.py --out_dir=out --prompt="def main(" --max_new_tokens=200
    python sample.py --prompt=FILE:prompt.txt --temperature=0.8 --top_k=50 --num_samples=3
    echo "import os" | python sample.py --prompt=- --speculative=False
    python sample.py --bench=True        # plain vs speculative greedy on 20 held-out prompts, side by side

Self-speculative decoding (Stern et al. 2018 blockwise parallel decoding; Gloeckle et al. 2024): one
forward at the last accepted position gives head 1's next token and heads 2..d+1's drafts of the tokens
after it. The next forward feeds [next, drafts...]; head 1 at each fed position judges the draft after it,
the longest agreeing prefix is kept (the KV cache is rolled back past the rest), and the heads at the last
kept position draft again. A verify pass computes only the logits it needs, in one pass over the unembedding while
the drafts hold: head 1 at the fed positions, the drafting heads at the last fed one (a second pass at the last
kept one after a rejection); the model runs the drafting heads as one batched block (Model._decode_drafters), so
with parallel heads on the default model's shape such a forward costs about 1.3-1.4x a plain one when its drafts
hold, 1.6-1.7x when the first fails (bench.py --decode; 3.8x with each head alone and the BLAS GEMM). Greedy
output is token-for-token that of plain greedy decoding; with sampling, drafts pass the speculative-sampling test
(Leviathan et al. 2023), so the output keeps head 1's distribution. How many drafts to compute (0 is plain
decoding) is decided as it goes (DraftPolicy): from this sample's acceptance and the measured time of each kind of
forward, so that a model whose drafts fail costs no more than plain decoding. Text goes to stdout as it comes;
statistics go to stderr.

By the model's mtp_style: parallel heads draft from the verify forward itself (heads 2..d+1 at the last kept
position); sequential depths draft one after another after it (Model.decode_depth: depth j reads the next
token and the drafts of depths 1..j-1, each depth with its own KV cache and its weights folded once per cache,
Model._depth_fast; 1.6-1.7x a plain forward with 3 drafts over the shortlist); shared logits have nothing to draft
with (head k scores head 1's own logits), so speculative decoding is plain decoding there, said once on stderr.
"""
import codecs
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from checkpoint import load_model
from data import EOT, GPT2_VOCAB, Corpus, get_tokenizer, token_counts
from model import KVCache
from settings import parse_config, resolve_device

DEFAULTS = dict(
    out_dir="out",  # where train.py wrote its checkpoints
    ckpt="",  # a checkpoint file; "" means the newest good one in out_dir
    prompt="def ",  # text, FILE:path to read a file, or - to read stdin
    max_new_tokens=200,  # stops earlier at EOT or at the model's context length
    num_samples=1,
    temperature=0.8,  # 0 means greedy
    top_k=0,  # keep the k most likely tokens; 0 = off
    top_p=1.0,  # nucleus sampling; 1.0 = off
    seed=1337,
    speculative=True,  # draft with heads 2..n; also times plain decoding on the same prompt for the speedup
    bench=False,  # measure plain vs speculative greedy decoding on held-out prompts instead of sampling
    bench_prompts=20,  # bench: prompts, the first tokens of this many held-out documents
    draft_vocab=4096,  # sequential depths draft over the draft_vocab most frequent training ids only; 0 = all
    device="auto",
)


def probs_from(logits, temperature, top_k, top_p):
    """Logits (..., V) -> sampling distribution (float32) at temperature > 0 (greedy decoding reads the logits'
    argmax instead); ids >= 50257 (vocabulary padding) never come out. A temperature so small that logits /
    temperature would overflow (1e-45) gives its limit, greedy: all mass on the largest logit (shared among exact
    ties). So the largest logit is subtracted first (the quotients are then <= 0, never inf - inf = NaN), in
    float64, where a temperature that is > 0 as a Python float is > 0 too (in float32 1e-50 would be 0, and 0 / 0)."""
    logits = logits.double()  # a copy: the caller's logits stay as they are
    logits[..., GPT2_VOCAB:] = float("-inf")
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs.float()


def pick(probs, gen):
    """A token from probs (V,). Random draws happen on the CPU, on purpose: the token is read by the host
    anyway, one CPU generator serves every device, and a seed gives the same draws on a CPU and a GPU."""
    probs = probs.to("cpu", torch.float32)
    if not (torch.isfinite(probs).all() and probs.min() >= 0 and probs.sum() > 0):  # multinomial's traceback instead
        raise ValueError("the sampling distribution holds NaN, inf or no mass: the model's logits are not finite "
                         "(a damaged checkpoint?)")
    return int(torch.multinomial(probs, 1, generator=gen))


NO_CLOCK_COST = {"parallel": (0.38, 0.06), "sequential": (0.17, 0.15)}  # plain forwards: fixed, per draft


class DraftPolicy:
    """How many drafts the next forward computes, d in 0..n_drafts (0: plain decoding, head 1 only). It picks the d
    with the most expected tokens per second: expected tokens 1 + sum_i prod_{j<=i} a_j from this sample's
    acceptance a_j of draft j given the ones before it (recent drafts weigh more: a text's easy and hard stretches
    alternate; Beta(1, 1) prior), over the seconds of a forward with d drafts. That cost is timed in two parts, each
    the median of its last 8 readings and trusted from its third, so that one reading (a shared machine's hiccup of
    several milliseconds) cannot make drafting look dearer than plain decoding for the rest of a sample: verifying
    (the forward that feeds drafts and judges them: sequential depths, keyed by how many it fed; parallel heads,
    which run in that forward, by how many heads it ran) and drafting (by how many it drafted). A reading is left
    out where the heads or depths a forward runs had fallen behind, as after plain forwards (they first catch up on
    every position they missed). Unmeasured costs are interpolated between d = 0 and d = n_drafts, which are
    measured first. While fewer drafts win, a probe runs after 4, 8, 16, ... (at most 64) forwards: two forwards
    with all n_drafts (in the first the heads or depths catch up, the second times both parts again), so a stretch
    of text where drafts hold is noticed and a stale cost of drafting recovers. With sampling the drafts change
    which random numbers are drawn, so there the decisions must not depend on the clock, or a seed would not
    reproduce a sample: the cost of d >= 1 drafts is then taken as 1 + fixed + per_draft * d plain forwards
    (NO_CLOCK_COST by style), about what `bench.py --decode` measures on a CPU for the default model's shape,
    halfway between every draft holding and the first failing (for 1, 2, 3 drafts, each forward timed after one of
    its kind: parallel heads 1.27/1.62x, 1.30/1.61x, 1.41/1.73x; sequential depths drafting over the draft_vocab
    shortlist 1.33/1.30x, 1.49/1.47x, 1.66/1.60x; in real greedy decoding the clock read 1.61-1.70x for 3 sequential
    drafts)."""

    TRUSTED = 3  # readings of a part before its median is used

    def __init__(self, n_drafts, clock=True, style="parallel", fixed=None):
        self.n, self.hits, self.tries, self.clock = n_drafts, [0] * n_drafts, [0] * n_drafts, clock
        self.fixed = fixed  # that many drafts every time instead of choosing (study.py --decode)
        self.parallel = style == "parallel"
        # the last seconds read per count (clock only): verify[j], a forward feeding j drafts (parallel heads: running
        # j drafting heads); draft[d], drafting d
        self.verify, self.draft = [[] for _ in range(n_drafts + 1)], [[] for _ in range(n_drafts + 1)]
        fixed, per_draft = NO_CLOCK_COST[style]
        self.sec = [None] * (n_drafts + 1) if clock else [1 + (fixed + per_draft * d if d else 0)
                                                         for d in range(n_drafts + 1)]
        self.since_all, self.probe_after = 0, 4  # forwards since all n_drafts were drafted; the next probe's
        self.probe_left = 0  # forwards of a probe still to run

    def cost_all_drafts(self):
        """The timings' cost of a forward with every draft (verify, then draft) over a plain one's; None until both
        are measured, or without a clock."""
        measured = self.clock and self.n and None not in (self.sec[0], self.sec[self.n])
        return self.sec[self.n] / self.sec[0] if measured else None

    def record(self, depth, accepted):
        self.tries[depth] = 0.9 * self.tries[depth] + 1
        self.hits[depth] = 0.9 * self.hits[depth] + accepted

    def timed(self, fed, verify_s, drafted, draft_s):
        """A forward that fed `fed` drafts and judged them in verify_s seconds, then drafted `drafted` in draft_s."""
        if not self.clock:
            return
        behind = drafted > fed  # the heads or depths beyond the previous forward's caught up first
        if not (self.parallel and behind):  # parallel heads run in the verify forward, sequential depths after it
            key = drafted if self.parallel else fed
            self.verify[key] = self.verify[key][-7:] + [verify_s]
        if drafted and (self.parallel or not behind):
            self.draft[drafted] = self.draft[drafted][-7:] + [draft_s]
        for d in {fed, drafted}:
            parts = [self.verify[d]] + ([self.draft[d]] if d else [])
            if all(len(p) >= self.TRUSTED for p in parts):
                self.sec[d] = sum(statistics.median(p) for p in parts)

    def expected_tokens(self, d):
        p, e = 1.0, 1.0
        for j in range(d):
            p *= (self.hits[j] + 1) / (self.tries[j] + 2)
            e += p
        return e

    def choose(self):
        if self.n == 0 or self.fixed is not None:
            return self.fixed or 0
        for d in (self.n, 0):  # measure both ends first
            if self.sec[d] is None:
                return d
        if self.probe_left:
            self.probe_left -= 1
            return self.n
        lo, hi = self.sec[0], self.sec[self.n]
        cost = [s if s is not None else lo + (hi - lo) * d / self.n for d, s in enumerate(self.sec)]
        best = max(range(self.n + 1), key=lambda d: self.expected_tokens(d) / cost[d])
        if best == self.n:
            self.since_all, self.probe_after = 0, 4
            return best
        self.since_all += 1
        if self.since_all >= self.probe_after:  # a probe: every draft, twice
            self.since_all, self.probe_after, self.probe_left = 0, min(2 * self.probe_after, 64), 1
            return self.n
        return best


_told = set()


def tell_once(msg):
    """A note on stderr once per process (generate() runs once per sample and per bench prompt)."""
    if msg not in _told:
        _told.add(msg)
        print(msg, file=sys.stderr)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, gen=None,
             speculative=False, on_token=None, shortlist=None, fixed_drafts=None):
    """prompt: list of ids (starting with EOT) -> (new ids, stats). Stops at EOT or the context length. shortlist:
    ids the sequential depths draft over (shortlist_of()); None, the full vocabulary. fixed_drafts: that many drafts
    on every forward instead of the policy's choice (speculative decoding only; study.py --decode)."""
    model.eval()
    seq_len, n, style = model.cfg.seq_len, model.cfg.n_predict, model.cfg.mtp_style
    if speculative and style == "shared" and n > 1:
        tell_once("note: mtp_style='shared' has no drafts (every head scores head 1's logits): decoding plainly")
    speculative = speculative and style != "shared"
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    if len(prompt) >= seq_len:
        raise ValueError(f"prompt has {len(prompt)} tokens, the model's context is seq_len={seq_len}")
    budget = min(max_new_tokens, seq_len - len(prompt))
    dist = lambda logits: probs_from(logits, temperature, top_k, top_p)
    gen = None if temperature == 0 else (gen or torch.Generator().manual_seed(0))
    dev = next(model.parameters()).device
    cache = KVCache(model, seq_len, vocab=GPT2_VOCAB,  # logits over GPT-2's ids only: padding ids never come out
                    shortlist=shortlist if speculative and style == "sequential" else None)
    if fixed_drafts is not None and not (speculative and 0 <= fixed_drafts < n):
        raise ValueError(f"fixed_drafts={fixed_drafts}, expected 0..{n - 1} while drafting ({speculative=}, {style=})")
    policy = DraftPolicy(n - 1 if speculative else 0, clock=gen is None, style=style if speculative else "parallel",
                         fixed=fixed_drafts)
    out, feed, drafts, q = [], list(prompt), [], None  # q: the drafting heads' distributions of the drafts
    d, forwards, fed, accepted, t0 = policy.choose(), 0, 0, 0, time.time()

    def emit(tok):
        out.append(tok)
        if on_token and tok != EOT:
            on_token(tok)
        return tok == EOT or len(out) >= budget

    while True:
        t_fwd, start = time.perf_counter(), cache.pos
        heads = range(1 + d) if style == "parallel" else [0]  # sequential depths draft after this forward
        hidden = model(torch.tensor([feed], device=dev), kv_cache=cache, heads=heads).hidden[:, 0]  # (heads, T, D)
        forwards += 1
        base = len(feed) - 1 - len(drafts)  # fed index of the token before the first draft
        head1, ahead = verify_logits(model, cache, hidden, base)  # head1 row i judges drafts[i]
        if gen is None:  # greedy: token ids straight from the logits, no distributions
            best = head1.argmax(-1).tolist()
        else:  # one copy to the host per forward: the acceptance tests and draws below read it there
            p = dist(head1).cpu()
        kept, forced, done = 0, None, False
        for i, draft in enumerate(drafts):  # q[i]: the distribution drafts[i] was drawn from
            if gen is None:
                ok = best[i] == draft
            else:
                ok = torch.rand((), generator=gen).item() * q[i, draft].item() < p[i, draft].item()  # min(1, p/q)
            policy.record(i, ok)
            if not ok:
                if gen is not None:
                    residual = (p[i] - q[i]).clamp(min=0)
                    forced = pick(residual / residual.sum() if residual.sum() > 0 else p[i], gen)
                break
            kept += 1
            if emit(draft):
                done = True
                break
        fed, accepted = fed + len(drafts), accepted + kept
        nxt = forced if forced is not None else best[kept] if gen is None else pick(p[kept], gen)
        if done or emit(nxt):
            break
        cache.truncate(start + len(feed) - len(drafts) + kept)  # drop the rejected drafts' keys and values
        # drafts fed next must fit the budget (each may become a token of out) and the context (after out[-1])
        room = min(budget - len(out), seq_len - cache.pos - 1)
        n_fed, all_held, drafts, q, t_draft = len(drafts), kept == len(drafts), [], None, time.perf_counter()
        if d > 0 and room > 0:  # at the last kept position: the last fed one if every draft held, scored already
            n_next = min(d, room)
            drafts, q = make_drafts(model, cache, hidden[1:1 + n_next, base + kept], out[-1], n_next, dist, gen,
                                    ahead[:n_next] if all_held else None)
        feed = [out[-1]] + drafts
        if forwards > 2:  # not the first two: they feed the prompt and pay for warming up
            policy.timed(n_fed, t_draft - t_fwd, len(drafts), time.perf_counter() - t_draft)
        d = policy.choose()
    dt = time.time() - t0
    return out, dict(tokens=len(out), seconds=dt, forwards=forwards, tokens_per_s=len(out) / max(dt, 1e-9),
                     tokens_per_forward=len(out) / forwards, drafts_fed=fed, drafts_accepted=accepted,
                     cost_all_drafts=policy.cost_all_drafts())


def verify_logits(model, cache, hidden, base):
    """A decoding forward's logits, from one pass over the unembedding -> (head 1's at fed positions base.. (the
    position before the first draft, then each draft), the drafting heads' at the last fed position). hidden: (heads,
    T, D) from the forward. The drafting heads draft at the last kept position, known only once head 1's rows are
    compared: the last fed one when every draft holds (or none was fed), whose rows ride along here nearly free (a
    pass's time is reading the 50k x D unembedding; a few more rows add little); after a rejection make_drafts
    pays a second pass. Scoring the drafting heads at every fed position instead (16 rows for 3 drafts) costs as
    much as that second pass: 2.9 ms against 1.4 + 1.5 ms for 4 and 3 rows on one busy AMD EPYC core."""
    logits = model.logits(torch.cat([hidden[0, base:], hidden[1:, -1]]), cache)
    return logits[:hidden.shape[1] - base], logits[hidden.shape[1] - base:]


def make_drafts(model, cache, heads_nD, nxt, n, dist, gen, logits=None):
    """n drafts of the tokens after nxt (the next token, fed next) at the last kept position -> (drafts, q): q (n, V)
    the distributions they were drawn from when sampling, None when greedy. Parallel heads: heads_nD, the drafting
    heads' states there, from the verify forward, or their logits when verify_logits() scored them already.
    Sequential depths: one after another (heads_nD is empty), depth j reading nxt and the drafts of depths
    1..j-1, so a sampled draft feeds the depths after it."""
    if model.cfg.mtp_style == "sequential":
        ids, qs = torch.tensor([[nxt] + [0] * n], device=cache.trunk.device), []  # nxt, then the drafts as they come
        for j in range(1, n + 1):  # the ids are the model's own: no range check (a read back per depth)
            logits, shortlist = cache.draft_logits(model.decode_depth(j, ids[:, :j], cache, check_ids=False))
            if gen is None:  # greedy drafts stay on the device until the last one: one read back for all of them
                best = logits.argmax(-1)  # (1,) over the shortlist's ids
                ids[:, j] = best if shortlist is None else shortlist[best]
            else:  # q: the shortlist's softmax, zero outside it (the residual max(0, p - q) covers the rest)
                q_short = dist(logits[0]).cpu()
                q_full = q_short if shortlist is None else q_short.new_zeros(cache.unembed_DV.shape[1]).index_copy_(
                    0, shortlist.cpu(), q_short)
                qs.append(q_full)
                ids[:, j] = pick(q_full, gen)
        return ids[0, 1:].tolist(), torch.stack(qs) if qs else None
    logits = model.logits(heads_nD, cache) if logits is None else logits
    if gen is None:
        return logits.argmax(-1).tolist(), None
    q = dist(logits).cpu()
    return [pick(q[j], gen) for j in range(len(q))], q


def check_settings(c):
    for k, ok, expected in (("max_new_tokens", c["max_new_tokens"] >= 1, ">= 1"),
                            ("num_samples", c["num_samples"] >= 1, ">= 1"),
                            ("temperature", 0 <= c["temperature"] < math.inf, "finite and >= 0 (0 is greedy)"),
                            ("top_k", c["top_k"] >= 0, ">= 0"), ("top_p", 0 < c["top_p"] <= 1, "in (0, 1]"),
                            ("bench_prompts", c["bench_prompts"] >= 1, ">= 1"),
                            ("draft_vocab", c["draft_vocab"] >= 0, ">= 0 (0: the full vocabulary)"),
                            # torch.Generator takes seeds below 2**64; sample s draws plainly from seed + s
                            ("seed", 0 <= c["seed"] < 2**63, "0 <= seed < 2**63")):
        if not ok:
            raise ValueError(f"{k}={c[k]}, expected {expected}")


def read_prompt(text):
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("FILE:"):
        try:
            text = Path(text[5:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise ValueError(f"--prompt=FILE:{text[5:]}: cannot read it ({why})") from None
    if not text:
        raise ValueError("empty prompt: pass --prompt=TEXT, --prompt=FILE:path or --prompt=- with text on stdin")
    return text


def held_out(state):
    """The checkpoint's held-out documents -> (corpus, their ids), rebuilt from its `data` and checked against the
    data fingerprint it was trained on: the split of other data (another Python's standard library for the
    default corpus, a folder that changed since) may hold other documents, training ones among them."""
    cfg = state["config"]
    corpus = Corpus(cfg["data"], cache_dir=cfg.get("cache_dir") or None, quiet=True)
    trained_on = cfg.get("data_fingerprint")
    if trained_on is None:
        print(f"warning: the checkpoint has no data_fingerprint: cannot check that data={cfg['data']!r} still holds "
              f"the documents it was trained on; going on", file=sys.stderr)
    elif corpus.fingerprint != trained_on:
        raise ValueError(f"data={cfg['data']!r} (the checkpoint's) has fingerprint {corpus.fingerprint}, the "
                         f"checkpoint was trained on {trained_on}: its held-out split would be other documents")
    return corpus, corpus.split("val", cfg["val_fraction"])


def shortlist_of(model, state, n):
    """The n most frequent training ids (ascending) from a checkpoint's `token_counts`, for the sequential depths'
    drafts; a checkpoint without them (older ones) gets them from its corpus' training split when that loads and
    is the data it was trained on. None (draft over the full vocabulary, said once on stderr) when n is 0, covers
    the vocabulary, or no counts can be had."""
    cfg = state.get("config") or {}
    if n <= 0 or n >= GPT2_VOCAB or model.cfg.mtp_style != "sequential":
        return None
    counts = state.get("token_counts")
    if counts is None:
        try:
            corpus, _ = held_out(state)  # the checkpoint's corpus, checked against its fingerprint
            counts = token_counts(corpus, corpus.split("train", cfg["val_fraction"]))
        except (ValueError, KeyError, OSError) as e:
            tell_once(f"note: the checkpoint has no token_counts and its training data cannot be read ({e}): the "
                      f"depths draft over the full vocabulary")
            return None
    counts = torch.as_tensor(counts, dtype=torch.long)[:GPT2_VOCAB]
    return torch.topk(counts, n, sorted=False).indices.sort().values


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_prompts(model, state, count, prompt_len=32, stride=1024):
    """count prompts of prompt_len tokens from the checkpoint's own held-out documents (the same set every time:
    each document's start, then a prompt every `stride` tokens, taken round-robin over the documents), each
    starting with EOT as a document does -> [(document, offset, ids)]. Prompts take at most half the model's
    context, so a small model gets shorter ones, and leaves room to decode."""
    prompt_len = min(prompt_len, model.cfg.seq_len // 2)
    corpus, docs = held_out(state)
    starts = [(d, o) for o in range(0, int(corpus.length[docs].max()), stride) for d in docs
              if o + prompt_len < corpus.length[d]][:count]  # o = 0: the document's own EOT leads
    if len(starts) < count:
        raise ValueError(f"the held-out documents give {len(starts)} prompts of {prompt_len} tokens, "
                         f"{count} asked (bench_prompts)")
    return [(int(d), o, corpus.tokens(d, o, prompt_len).tolist() if o == 0
             else [EOT] + corpus.tokens(d, o, prompt_len - 1).tolist()) for d, o in starts]


def bench(model, state, c):
    """Plain vs speculative greedy decoding on bench_prompts(), one after the other per prompt, so drift hits both
    alike. Speculative greedy output should be plain greedy's, but float32 near-ties (1.8e-7 apart measured) can
    flip an argmax between a one-token and a several-token forward: a difference is counted and shown, not
    fatal."""
    prompts = bench_prompts(model, state, c["bench_prompts"])
    prompt_len = len(prompts[0][2])
    shortlist = shortlist_of(model, state, c.get("draft_vocab", DEFAULTS["draft_vocab"]))
    generate(model, prompts[0][2], 8, speculative=True, shortlist=shortlist)
    rows, mismatches, costs = [], [], []  # mismatches: (document, offset, first differing position of the new tokens)
    for d, o, prompt in prompts:
        plain_ids, plain = generate(model, prompt, c["max_new_tokens"])
        spec_ids, spec = generate(model, prompt, c["max_new_tokens"], speculative=True, shortlist=shortlist)
        if spec_ids != plain_ids:
            mismatches.append((d, o, first_difference(spec_ids, plain_ids)))
        rows.append((plain["tokens_per_s"], spec["tokens_per_s"], spec["tokens_per_forward"]))
        costs += [spec["cost_all_drafts"]] if spec["cost_all_drafts"] is not None else []
    q = lambda xs: statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    speedups = [s / p for p, s, _ in rows]
    lo, med, hi = q(speedups)
    same = ("speculative output identical to plain on every prompt" if not mismatches else
            f"speculative output differs from plain on {len(mismatches)} of {len(rows)} prompts (float near-ties in "
            f"an argmax), at (document, offset, first differing new token): "
            + ", ".join(f"({d}, {o}, {i})" for d, o, i in mismatches))
    print(f"{len(rows)} held-out prompts of {prompt_len} tokens, up to {c['max_new_tokens']} new tokens, greedy; "
          f"{same}", file=sys.stderr)
    print(f"plain decoding: {statistics.median(r[0] for r in rows):.1f} tokens/s (median); speculative: "
          f"{statistics.median(r[1] for r in rows):.1f} tokens/s, {statistics.median(r[2] for r in rows):.2f} tokens "
          f"per forward (median)", file=sys.stderr)
    print(f"speedup: median {med:.2f}x, quartiles {lo:.2f}-{hi:.2f}x, range {min(speedups):.2f}-{max(speedups):.2f}x",
          file=sys.stderr)
    cost = statistics.median(costs) if costs else None
    if cost is not None:
        print(f"a forward with all {model.cfg.n_predict - 1} drafts cost {cost:.2f}x a plain one (the draft policy's "
              f"timings, median over the {len(costs)} prompts that timed both)", file=sys.stderr)
    return dict(speedup_median=med, speedup_quartiles=(lo, hi), mismatches=mismatches,
                tokens_per_forward=statistics.median(r[2] for r in rows), cost_all_drafts=cost)


def main(c):
    check_settings(c)
    device = resolve_device(c["device"])
    text = None if c["bench"] else read_prompt(c["prompt"])  # user errors first, before the model loads
    model, path, state = load_model(c["out_dir"], c["ckpt"], device)
    print(f"loaded {path} (step {state['step']})", file=sys.stderr)
    if c["bench"]:
        return bench(model, state, c)
    enc = get_tokenizer()
    prompt = [EOT] + enc.encode_ordinary(text)  # EOT begins every document, as in training
    if len(prompt) >= model.cfg.seq_len:  # said before the prompt is echoed to stdout
        where = "" if c["prompt"] in ("-", text) else f" ({c['prompt']})"
        raise ValueError(f"prompt{where} has {len(prompt)} tokens with the leading EOT, the model's context is "
                         f"seq_len={model.cfg.seq_len}: give fewer than {model.cfg.seq_len - 1} tokens of text")
    print(f"prompt {len(prompt)} tokens", file=sys.stderr)
    gen = torch.Generator().manual_seed(c["seed"])
    shortlist = shortlist_of(model, state, c["draft_vocab"]) if c["speculative"] else None
    for s in range(c["num_samples"]):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(text)
        stream = lambda tok: (sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(tok))), sys.stdout.flush())
        args = (model, prompt, c["max_new_tokens"], c["temperature"], c["top_k"], c["top_p"])
        ids, stats = generate(*args, gen=gen, speculative=c["speculative"], on_token=stream, shortlist=shortlist)
        sys.stdout.write(utf8.decode(b"", final=True) + "\n" + ("-" * 40 + "\n" if s + 1 < c["num_samples"] else ""))
        msg = f"sample {s + 1}: {stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s"
        if c["speculative"]:
            plain_ids, plain = generate(*args, gen=torch.Generator().manual_seed(c["seed"] + s), speculative=False)
            msg += (f", {stats['tokens_per_forward']:.2f} tokens per forward ({stats['drafts_accepted']} of "
                    f"{stats['drafts_fed']} drafts accepted); plain decoding {plain['tokens_per_s']:.1f} tokens/s: "
                    f"speedup {stats['tokens_per_s'] / plain['tokens_per_s']:.2f}x")
            if c["temperature"] == 0:
                msg += f"; identical to plain greedy: {plain_ids == ids}"
        print(msg, file=sys.stderr)


if __name__ == "__main__":
    try:
        main(parse_config(sys.argv[1:], DEFAULTS))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
