"""sample.py: generate from a checkpoint, with a KV cache and self-speculative decoding from the MTP heads.

    python sample.py --out_dir=out --prompt="def main(" --max_new_tokens=200
    python sample.py --prompt=FILE:prompt.txt --temperature=0.8 --top_k=50 --num_samples=3
    echo "import os" | python sample.py --prompt=- --speculative=False

Self-speculative decoding (Stern et al. 2018 blockwise parallel decoding; Gloeckle et al. 2024): one
forward at the last accepted position gives head 1's next token and heads 2..n's drafts of the tokens
after it. The next forward feeds [next, drafts...] and checks each draft against head 1 at the position
before it; the longest agreeing prefix is kept (the KV cache is rolled back past the rest), and the
heads at the last kept position draft again. Greedy output is token-for-token that of plain greedy
decoding; with sampling, drafts pass the standard speculative-sampling test (Leviathan et al. 2023), so
the output keeps head 1's distribution. Text goes to stdout as it comes; statistics go to stderr.
"""
import codecs
import sys
import time

import torch

from data import EOT, GPT2_VOCAB, get_tokenizer
from model import Model, ModelConfig
from train import MODEL_FIELDS, find_resume, parse_config

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
    device="auto",
)


class KVCache:
    """Keys and values of every attention module (trunk and heads), preallocated to max_len positions.
    `pos` is the number of valid positions; rolling back is setting pos lower."""

    def __init__(self, model, batch, max_len):
        cfg = model.cfg
        kv, hd = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        p = next(model.parameters())
        self.store = {}
        for block in list(model.blocks) + list(model.heads):
            self.store[block.attn] = (p.new_zeros(batch, kv, max_len, hd), p.new_zeros(batch, kv, max_len, hd))
        self.pos = 0

    def update(self, attn, k, v):
        K, V = self.store[attn]
        T = k.shape[2]
        K[:, :, self.pos:self.pos + T], V[:, :, self.pos:self.pos + T] = k, v
        return K[:, :, :self.pos + T], V[:, :, :self.pos + T]


@torch.no_grad()
def decode(model, ids, cache):
    """Feed new tokens (B, T) at positions cache.pos, ...; -> hidden (n_predict, B, T, D). One document."""
    T = ids.shape[1]
    pos = cache.pos + torch.arange(T, device=ids.device)
    mask = (torch.arange(cache.pos + T, device=ids.device)[None, :] <= pos[:, None])[None, None]  # (1, 1, T, L)
    cos, sin = model.rope_cos[pos][None, None], model.rope_sin[pos][None, None]
    out = model.blocks_and_heads(model.tok_emb(ids), cos, sin, mask, torch.ones_like(ids, dtype=torch.bool), cache)
    cache.pos += T
    return out.hidden


def probs_from(logits, temperature, top_k, top_p):
    """Logits (..., V) -> sampling distribution; ids >= 50257 (vocabulary padding) never come out."""
    logits = logits.float().clone()
    logits[..., GPT2_VOCAB:] = float("-inf")
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(probs, gen):
    if gen is None:  # greedy (temperature 0): probs is one-hot
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[..., 0]


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, gen=None,
             speculative=False, on_token=None):
    """prompt: list of ids (starting with EOT) -> (new ids, stats). Stops at EOT or the context length."""
    model.eval()
    seq_len, n = model.cfg.seq_len, model.cfg.n_predict
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    if len(prompt) >= seq_len:
        raise ValueError(f"prompt has {len(prompt)} tokens, the model's context is seq_len={seq_len}")
    budget = min(max_new_tokens, seq_len - len(prompt))
    dist = lambda logits: probs_from(logits, temperature, top_k, top_p)
    gen = None if temperature == 0 else (gen or torch.Generator().manual_seed(0))
    dev = next(model.parameters()).device
    cache = KVCache(model, 1, seq_len + n)
    heads = n if speculative else 1  # plain decoding needs head 1 only
    # logits of the heads at the last position; the unembedding is the costliest read of a small model,
    # so each forward computes every logit it may need in one matmul
    logits = model.logits(decode(model, torch.tensor([prompt], device=dev), cache)[:heads, 0, -1])
    out, forwards, t0 = [], 1, time.time()

    def emit(tok):
        out.append(tok)
        if on_token and tok != EOT:
            on_token(tok)
        return tok == EOT or len(out) >= budget

    forced = None  # after a rejected draft (sampling): the token drawn from the residual distribution
    while True:
        q = dist(logits)  # (heads, V): head 1's next token, heads 2..n's drafts of the tokens after it
        nxt = forced if forced is not None else int(pick(q[0], gen))
        forced = None
        if emit(nxt):
            break
        if heads == 1:
            logits = model.logits(decode(model, torch.tensor([[nxt]], device=dev), cache)[:1, 0, -1])
            forwards += 1
            continue
        drafts = [int(pick(q[k], gen)) for k in range(1, n)][:budget - len(out)]
        start = cache.pos
        all_logits = model.logits(decode(model, torch.tensor([[nxt] + drafts], device=dev), cache)[:, 0])  # (n, 1+d, V)
        forwards += 1
        p = dist(all_logits[0])  # p[i]: head 1 after fed position i, the judge of drafts[i]
        kept, stop = 0, False
        for i, d in enumerate(drafts):
            if temperature == 0:
                ok = bool(p[i, d] == 1.0)
            else:
                ok = torch.rand((), generator=gen).item() * q[i + 1, d].item() < p[i, d].item()  # min(1, p/q)
            if not ok:
                if temperature > 0:
                    residual = (p[i] - q[i + 1]).clamp(min=0)
                    forced = int(pick(residual / residual.sum() if residual.sum() > 0 else p[i], gen))
                break
            kept += 1
            if emit(d):
                stop = True
                break
        if stop:
            break
        cache.pos = start + 1 + kept  # drop the cache entries of rejected drafts
        logits = all_logits[:, kept]  # the heads at the last kept position draft again
    dt = time.time() - t0
    return out, dict(tokens=len(out), seconds=dt, forwards=forwards, tokens_per_s=len(out) / max(dt, 1e-9),
                     tokens_per_forward=len(out) / forwards)


def load_model(out_dir, ckpt, device):
    path, state = find_resume(out_dir, ckpt)
    try:
        model = Model(ModelConfig(**{k: state["config"][k] for k in MODEL_FIELDS if k in state["config"]}))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: not a model checkpoint of this train.py ({type(e).__name__}: {e})")
    return model.to(device).eval(), path, state["step"]


def main(c):
    device = c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, path, step = load_model(c["out_dir"], c["ckpt"], device)
    text = c["prompt"]
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("FILE:"):
        text = open(text[5:], encoding="utf-8").read()
    if not text:
        raise ValueError("empty prompt: pass --prompt=TEXT, --prompt=FILE:path or --prompt=- with text on stdin")
    enc = get_tokenizer()
    prompt = [EOT] + enc.encode_ordinary(text)  # EOT begins every document, as in training
    print(f"loaded {path} (step {step}); prompt {len(prompt)} tokens", file=sys.stderr)
    gen = torch.Generator(device="cpu").manual_seed(c["seed"])
    for s in range(c["num_samples"]):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(text)
        stream = lambda tok: (sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(tok))), sys.stdout.flush())
        args = (model, prompt, c["max_new_tokens"], c["temperature"], c["top_k"], c["top_p"])
        ids, stats = generate(*args, gen=gen, speculative=c["speculative"], on_token=stream)
        sys.stdout.write(utf8.decode(b"", final=True) + "\n" + ("-" * 40 + "\n" if s + 1 < c["num_samples"] else ""))
        msg = f"sample {s + 1}: {stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s"
        if c["speculative"]:
            plain_ids, plain = generate(*args, gen=torch.Generator().manual_seed(c["seed"] + s), speculative=False)
            msg += (f", {stats['tokens_per_forward']:.2f} tokens per forward; plain decoding "
                    f"{plain['tokens_per_s']:.1f} tokens/s: speedup {stats['tokens_per_s'] / plain['tokens_per_s']:.2f}x")
            if c["temperature"] == 0:
                msg += f"; identical to plain greedy: {plain_ids == ids}"
        print(msg, file=sys.stderr)


if __name__ == "__main__":
    try:
        main(parse_config(sys.argv[1:], DEFAULTS))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
