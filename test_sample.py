"""Tests of sample.py and of the model's decoding entry point: KV-cache decoding equals recomputing the sequence
(head blocks that fall behind catch up exactly; sequential depths drafting on tokens not fed yet equal the
teacher-forced forward); greedy speculative decoding is token-for-token plain greedy decoding (on models of
parallel heads and of sequential depths trained until they agree, so drafts are accepted); a verify pass
computes only the logits it needs; on a model whose drafts fail, drafting stops; speculative sampling keeps
head 1's distribution; shared logits decode plainly and say so; the bench for every style; fixed seeds
reproduce; a fixed number of drafts and the policy's cost figure; study.py's repeated n-grams by hand; the command
line end to end, and its user errors."""
import copy
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from loss import ModelWithLoss
from model import ONEDNN, KVCache, Model, ModelConfig
from sample import DraftPolicy, generate, probs_from

V = 16
HERE = Path(__file__).parent


def tiny(seed=0, style="parallel"):
    torch.manual_seed(seed)
    return Model(ModelConfig(vocab_size=V, seq_len=64, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                             n_predict=4, mtp_style=style)).double()


@pytest.fixture(scope="module")
def cyclic_model():
    return train_cyclic("parallel")


@pytest.fixture(scope="module")
def cyclic_sequential():
    return train_cyclic("sequential")


def train_cyclic(style):
    """A tiny model trained on a repeating pattern: its MTP heads learn the future, so drafts get accepted."""
    model = tiny(style=style)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        offsets = torch.randint(0, 16, (8,))
        ids = torch.stack([pattern.roll(-int(o)).repeat(4) for o in offsets])  # (8, 64)
        doc = torch.zeros_like(ids, dtype=torch.int32)
        out = ModelWithLoss(model)(dict(input_ids=ids, doc_ids=doc))
        ((out.sums / out.counts).sum() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), pattern


def test_kv_cache_equals_recomputing():
    model = tiny().eval()
    ids = torch.randint(0, V, (1, 20))
    full = model(ids).hidden[:, 0]  # (n_predict, T, D)
    cache = KVCache(model, 64)
    parts = [model(ids[:, :7], kv_cache=cache).hidden[:, 0]]  # prompt, then one token at a time, then a chunk
    for t in range(7, 12):
        parts.append(model(ids[:, t:t + 1], kv_cache=cache).hidden[:, 0])
    parts.append(model(ids[:, 12:20], kv_cache=cache).hidden[:, 0])
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    cache.truncate(10)  # roll back and feed other tokens: must equal the recomputed other sequence
    other = ids.clone()
    other[:, 10:] = (other[:, 10:] + 3) % V
    h = model(other[:, 10:], kv_cache=cache).hidden[:, 0]
    torch.testing.assert_close(h, model(other).hidden[:, 0, 10:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="sequence length 9 > the KV cache 8"):  # said, not a shape error
        model(ids[:, :9], kv_cache=KVCache(model, 8))


def test_skipped_heads_catch_up_exactly():
    # plain decoding runs head 1 only; when drafting resumes, heads 2..4 must first see what they missed
    model = tiny().eval()
    ids = torch.randint(0, V, (1, 24))
    full = model(ids).hidden[:, 0]
    cache = KVCache(model, 64)
    model(ids[:, :5], kv_cache=cache)
    for t in range(5, 12):
        h1 = model(ids[:, t:t + 1], kv_cache=cache, heads=[0]).hidden[:, 0]
        torch.testing.assert_close(h1, full[:1, t:t + 1], rtol=1e-10, atol=1e-10)
    assert cache.head_pos == [12, 5, 5, 5]
    h = model(ids[:, 12:15], kv_cache=cache, heads=[0, 2]).hidden[:, 0]  # head 3 catches up, head 2 still behind
    torch.testing.assert_close(h, full[[0, 2], 12:15], rtol=1e-10, atol=1e-10)
    cache.truncate(13)  # a rollback also rolls back the heads that were ahead of it
    h = model(ids[:, 13:24], kv_cache=cache).hidden[:, 0]
    torch.testing.assert_close(h, full[:, 13:24], rtol=1e-10, atol=1e-10)


def test_sequential_depths_decode_as_the_teacher_forced_forward():
    # depth i at the last fed position p reads tokens p+1..p+i not fed yet (the next token, drafts): its state must be
    # that of the forward over the whole sequence, after any mix of feeds, drafts and rollbacks
    model = tiny(style="sequential").eval()
    ids = torch.randint(0, V, (1, 30))
    full = model(ids).hidden[:, 0]  # (n_predict, T, D), teacher-forced
    cache = KVCache(model, 64)

    def depths_at(p):
        for i in range(1, model.cfg.n_predict):
            h = model.decode_depth(i, ids[:, p + 1:p + 1 + i], cache)
            torch.testing.assert_close(h[0], full[i, p], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"heads=\[0, 1\]: a sequential model computes head 1"):
        model(ids[:, :10], kv_cache=cache, heads=[0, 1])
    h = model(ids[:, :10], kv_cache=cache).hidden[:, 0]  # head 1 only, whatever the heads' default
    torch.testing.assert_close(h, full[:1, :10], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="decode_depth\\(2\\): depth 1 has not run at the last fed position 9"):
        model.decode_depth(2, ids[:, 10:12], cache)
    depths_at(9)
    assert cache.head_pos == [10, 9, 8, 7]  # depth i holds the positions whose token i ahead is fed
    model(ids[:, 10:13], kv_cache=cache)  # the next token and two drafts, all accepted
    depths_at(12)
    cache.truncate(11)  # the second draft rejected: depth i keeps n - i positions
    assert cache.head_pos == [11, 10, 9, 8]
    depths_at(10)
    for t in range(11, 20):  # plain decoding for a while: the depths fall behind, then catch up in one forward
        model(ids[:, t:t + 1], kv_cache=cache)
    depths_at(19)
    # a rollback past tokens the depths had read: they must not keep what depended on the replaced tokens
    cache.truncate(15)
    other = ids.clone()
    other[:, 15:] = (other[:, 15:] + 3) % V
    full_other = model(other).hidden[:, 0]
    model(other[:, 15:18], kv_cache=cache)
    for i in range(1, model.cfg.n_predict):
        h = model.decode_depth(i, other[:, 18:18 + i], cache)
        torch.testing.assert_close(h[0], full_other[i, 17], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="decode_depth\\(1\\): depths 1..n_predict-1 = 3 of a sequential model"):
        tiny().decode_depth(1, ids[:, :1], KVCache(tiny(), 64))


@pytest.mark.parametrize("trained", ["cyclic_model", "cyclic_sequential"])
def test_greedy_speculative_equals_plain(trained, request, monkeypatch):
    model, pattern = request.getfixturevalue(trained)
    for prompt in ([3, 1, 4], [9, 2], [7], torch.randint(0, V, (5,)).tolist()):
        plain, s_plain = generate(model, prompt, 40, temperature=0.0)
        spec, s_spec = generate(model, prompt, 40, temperature=0.0, speculative=True)  # the policy's choices
        assert spec == plain
        assert s_plain["tokens_per_forward"] <= 1.0
    # in the pattern, drafts are accepted: the accept path is exercised (every draft computed, whatever the clock)
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.n)
    spec, s_spec = generate(model, [3, 1, 4], 40, temperature=0.0, speculative=True)
    assert spec == generate(model, [3, 1, 4], 40, temperature=0.0)[0]
    assert s_spec["tokens_per_forward"] > 2.5 and s_spec["drafts_accepted"] > 0.8 * s_spec["drafts_fed"], s_spec
    random_model = tiny(seed=1, style=model.cfg.mtp_style).eval()  # mostly rejected drafts: the rollback path
    prompt = [1, 2, 3]
    assert generate(random_model, prompt, 30, speculative=True)[0] == generate(random_model, prompt, 30)[0]


@pytest.mark.parametrize("trained", ["cyclic_model", "cyclic_sequential"])
def test_verify_pass_computes_only_the_logits_it_needs(trained, request, monkeypatch):
    model, _ = request.getfixturevalue(trained)
    rows = []
    real = Model.logits
    monkeypatch.setattr(Model, "logits", lambda self, h, cache=None: rows.append(h.shape[:-1].numel())
                        or real(self, h, cache))
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.n)  # always all drafts
    _, stats = generate(model, [3, 1, 4], 40, speculative=True)
    n, forwards, failed = model.cfg.n_predict, stats["forwards"], stats["drafts_fed"] - stats["drafts_accepted"]
    # per forward: head 1 at the fed token and its drafts (1 + d rows) and the drafting heads at the last fed position
    # (d rows), in one call; after a rejection, the drafting heads again at the last kept position. Sequential depths
    # draft one row at a time after the forward.
    assert max(rows) <= 2 * n - 1 and sum(rows) <= forwards * (2 * n - 1) + failed * (n - 1)
    assert sum(rows) < forwards * n * n  # the old way: every head at every fed position
    if model.cfg.mtp_style == "parallel":  # one pass over the unembedding per forward while the drafts hold
        assert failed < forwards / 4 and len(rows) <= forwards + failed, (len(rows), stats)


def test_batched_drafting_heads_equal_their_modules(monkeypatch):
    # parallel heads decode heads 2..d+1 as one batched block on weights stacked per KV cache; each head's own module
    # (catch-up, a subset of heads) reads and writes the same keys and values: any mix of the two paths must give
    # what each module alone gives, in float32 within 1e-5 and with the same drafts
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=64, seq_len=64, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                              n_predict=4, mtp_style="parallel")).eval()
    ids = torch.randint(0, 64, (1, 40))
    batched_calls = []
    real = Model._decode_drafters
    monkeypatch.setattr(Model, "_decode_drafters", lambda self, *a: batched_calls.append(a[1]) or real(self, *a))
    # (tokens fed, heads): plain feeds leave the drafting heads behind, heads [0, 1] leave 3 and 4 further behind,
    # [0, 2] is not a prefix (module by module); the batched path starts where the furthest behind is
    steps = [(10, range(4)), (2, [0]), (3, [0, 1]), (4, range(4)), (1, range(3)), (3, [0, 2]), (1, [0]), (4, range(4))]
    caches = {"batched": KVCache(model, 64), "modules": KVCache(model, 64)}
    caches["modules"].drafters = None
    out = {k: [] for k in caches}
    with torch.no_grad():
        for name, cache in caches.items():
            t = 0
            for T, heads in steps:
                out[name].append((list(heads), model(ids[:, t:t + T], kv_cache=cache, heads=heads).hidden[:, 0]))
                t += T
        full = model(ids[:, :t]).hidden[:, 0]
    assert batched_calls == [3, 3, 2, 3]  # d of each batched call: the prefixes of two heads or more
    t = 0
    for (heads, h_b), (_, h_m), (T, _) in zip(out["batched"], out["modules"], steps):
        torch.testing.assert_close(h_b, h_m, rtol=0, atol=1e-5)
        torch.testing.assert_close(h_b, full[heads, t:t + T], rtol=0, atol=1e-5)
        drafts = [model.logits(h[:, -1], caches[k]).argmax(-1).tolist() for k, h in zip(caches, (h_b, h_m))]
        assert drafts[0] == drafts[1]
        t += T
    # a negative control: the batched block on another head's stacked weights is not the modules' computation
    cache = KVCache(model, 64)
    cache.drafters = {k: w.flip(0) if w.dim() == 3 else w for k, w in cache.drafters.items()}
    with torch.no_grad():
        h = model(ids[:, :10], kv_cache=cache).hidden[:, 0]
    assert (h[1:] - full[1:, :10]).abs().max() > 1e-3  # 100 times the tolerance above


@pytest.mark.parametrize("batch", [1, 2])
def test_depth_fast_path_equals_the_depth_modules(monkeypatch, batch):
    # sequential depths decode on weights folded per KV cache (Model._depth_fast: norms folded into the matrices, rope
    # as two tables, keys and values in one tensor, the last depth's block at p alone); each Depth module computes the
    # same: after feeds, drafts, rollbacks and catch-ups the states, keys, values and shortlist drafts of the two
    # paths agree in float32 within 1e-5, with grouped-query attention, one sequence (as sample.py) and two at once
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=64, seq_len=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, n_experts=4,
                              top_k=2, n_predict=4, mtp_style="sequential")).eval()
    ids = torch.randint(0, 64, (2, 40))[:batch]
    fast_calls = []
    real = Model._depth_fast
    monkeypatch.setattr(Model, "_depth_fast", lambda self, i, *a: fast_calls.append(i) or real(self, i, *a))
    caches = {name: KVCache(model, 64, batch=batch, shortlist=range(0, 64, 3)) for name in ("fast", "modules")}
    caches["modules"].depths = None
    # (tokens fed before drafting, position to roll back to first or None)
    # (a 2-token prompt first: depth 3 at p = 1 reads only drafts, from the second one on)
    steps = [(2, None), (8, None), (4, None), (1, 12), (3, None), (1, None), (6, 17), (2, None)]
    out = {k: [] for k in caches}
    with torch.no_grad():
        full = model(ids).hidden  # (n_predict, B, T, D), teacher-forced
        for name, cache in caches.items():
            for T, back in steps:
                if back is not None:
                    cache.truncate(back)
                model(ids[:, cache.pos:cache.pos + T], kv_cache=cache)
                p = cache.pos - 1
                for i in range(1, 4):
                    h = model.decode_depth(i, ids[:, p + 1:p + 1 + i], cache)
                    torch.testing.assert_close(h, full[i, :, p], rtol=0, atol=1e-5)
                    logits, shortlist = cache.draft_logits(h)
                    out[name].append((h, shortlist[logits.argmax(-1)]))
    assert len(fast_calls) == 3 * len(steps) and fast_calls[:3] == [1, 2, 3]  # the modules' cache never took it
    for (h_f, d_f), (h_m, d_m) in zip(out["fast"], out["modules"]):
        torch.testing.assert_close(h_f, h_m, rtol=0, atol=1e-5)
        assert d_f.tolist() == d_m.tolist()
    fast, modules = caches["fast"], caches["modules"]
    for i, depth in enumerate(model.heads[1:], 1):  # the keys and values of every position a depth holds
        for k_f, k_m in zip(fast.kv[depth.block.attn], modules.kv[depth.block.attn]):
            torch.testing.assert_close(k_f[:, :, :fast.pos - i], k_m[:, :, :fast.pos - i], rtol=0, atol=1e-5)
        if i < 3:  # the states the next depth reads (the last depth's: at p alone)
            torch.testing.assert_close(fast.states[i, :, :fast.pos], modules.states[i, :, :fast.pos], rtol=0,
                                       atol=1e-5)
    # a negative control: depth 1 on depth 2's folded weights is not the modules' computation
    cache = KVCache(model, 64, batch=batch)
    cache.depths = cache.depths[1:2] + cache.depths[1:]
    with torch.no_grad():
        model(ids[:, :10], kv_cache=cache)
        h = model.decode_depth(1, ids[:, 10:11], cache)
    assert (h - full[1, :, 9]).abs().max() > 1e-3  # 100 times the tolerance above


def test_unembedding_of_a_few_rows_is_the_matmul(cyclic_model):
    # decoding scores several rows with oneDNN's packed float32 matmul (one row: the matrix-vector product); the same
    # logits as the plain product, and greedy speculative decoding of a float32 model is still plain greedy decoding
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=1000, seq_len=64, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                              n_predict=4, mtp_style="parallel")).eval()
    cache = KVCache(model, 64, vocab=999)
    w = model.lm_head.weight[:999].detach()
    for rows in (1, 2, 4, 7, 16):
        h = torch.randn(rows, 32)
        torch.testing.assert_close(model.logits(h, cache), h @ w.t(), rtol=1e-5, atol=1e-6)
    h = torch.randn(3, 5, 32)[:, 2]  # a strided view, as generate() passes the drafting heads' rows
    torch.testing.assert_close(model.logits(h, cache), h @ w.t(), rtol=1e-5, atol=1e-6)
    assert (cache.unembed_packed is not None) == ONEDNN  # the packed path ran where it exists
    f32 = copy.deepcopy(cyclic_model[0]).float()
    for prompt in ([3, 1, 4], [9, 2]):
        spec, stats = generate(f32, prompt, 40, speculative=True)
        assert spec == generate(f32, prompt, 40)[0]
        assert stats["drafts_accepted"] > 0


def test_bench_decoding_rows():
    # bench.py times sample.py's own decoding steps on the default model's shape, parallel heads and sequential
    # depths: every case present, in milliseconds
    import bench
    n = ModelConfig().n_predict - 1
    by_d = {f"{d}_{k}" for d in range(1, n + 1) for k in ("held", "first_fails")}
    for style, extra in (("parallel", {f"{n}_held_heads_one_by_one"}), ("sequential", {f"{n}_held_full_vocab"})):
        r = bench.decode_bench(style, reps=2)
        assert r["style"] == style and set(r["ms"]) == {"plain"} | by_d | extra
        assert all(v > 0 for v in r["ms"].values()) and r["ratio"]["plain"] == 1.0


def timed(policy, d, seconds, times=DraftPolicy.TRUSTED):
    """`times` steady forwards with d drafts: each feeds d drafts and drafts d, `seconds` in all (half and half)."""
    for _ in range(times):
        policy.timed(d, seconds / 2 if d else seconds, d, seconds / 2)


def test_drafting_stops_when_drafts_fail(cyclic_model):
    policy = DraftPolicy(3)
    assert policy.choose() == 3
    timed(policy, 3, 2.0, times=DraftPolicy.TRUSTED - 1)
    assert policy.choose() == 3  # not trusted yet: still measuring
    timed(policy, 3, 2.0, times=1)
    assert policy.choose() == 0 and policy.sec[3] == 2.0
    timed(policy, 0, 1.0)
    for _ in range(20):
        policy.record(0, False)  # the first draft always fails: 1 token per forward at twice the cost
    choices = [policy.choose() for _ in range(40)]
    assert choices.count(0) >= 34 and 0 < sum(1 for d in choices if d) <= 6  # plain, with rare probes (2 forwards each)
    good = DraftPolicy(3)
    timed(good, 3, 2.0)
    timed(good, 0, 1.0)
    for j in range(3):
        for _ in range(20):
            good.record(j, True)
    assert good.choose() == 3  # drafts that hold: about 4 tokens for twice the cost
    # one hiccup of the machine (a 10x slow plain forward) must not make drafts that rarely hold look cheaper;
    # a running mean (0.8 old + 0.2 new) would cost plain 2.8 and pick d = 1 (1.3 tokens for 1.5)
    noisy = DraftPolicy(3)
    for d, sec in [(3, 2.0), (1, 1.5)] + [(0, 1.0)] * 6 + [(0, 10.0)]:
        timed(noisy, d, sec, times=1 if d == 0 else DraftPolicy.TRUSTED)
    for _ in range(20):
        noisy.record(0, False), noisy.record(0, True), noisy.record(0, False)  # a third of first drafts hold
    assert noisy.choose() == 0
    # nor one slow drafting forward among three make drafts that hold look dear for the rest of a sample
    hiccup = DraftPolicy(3)
    for sec in (1.6, 20.0, 1.6):
        timed(hiccup, 3, sec, times=1)
    timed(hiccup, 0, 1.0)
    for j in range(3):
        for _ in range(20):
            hiccup.record(j, True)
    assert hiccup.sec[3] == 1.6 and hiccup.choose() == 3
    # which readings count: where the depths or heads a forward runs had fallen behind (after fewer drafts), they
    # caught up first, so that part is left out; parallel heads run in the verify forward, which they key
    seq, par = DraftPolicy(3, style="sequential"), DraftPolicy(3, style="parallel")
    seq.timed(0, 1.0, 3, 0.9), par.timed(0, 2.0, 3, 0.1)  # a probe after plain forwards
    assert seq.verify[0] == [1.0] and seq.draft[3] == [] and par.verify == [[]] * 4 and par.draft[3] == [0.1]
    seq.timed(3, 1.2, 0, 0.0), par.timed(3, 1.1, 0, 0.0)  # the forward after it, back to plain
    assert seq.verify[3] == [1.2] and par.verify[0] == [1.1] and par.verify[3] == []
    # three forwards whose verifying, or drafting, was slow (a hiccup) make drafting look dear; fewer drafts win,
    # and probes (two forwards with all drafts: the second times both parts) bring drafting back; driven in
    # generate()'s order: d chosen, the drafts fed judged, the forward timed
    def decode(policy, forwards):
        fed, chosen = 0, []
        for _ in range(forwards):
            d = policy.choose()
            for i in range(fed):
                policy.record(i, True)  # every draft holds
            policy.timed(fed, 1.0 + 0.03 * max(fed, d), d, 0.15 * d)
            fed = d
            chosen.append(d)
        return chosen
    for style in ("sequential", "parallel"):
        for stale in ((7.5, 0.5), (0.5, 7.5)):  # (verify, draft) seconds of the slow readings
            for probes in (True, False):
                slow = DraftPolicy(3, style=style)
                for _ in range(DraftPolicy.TRUSTED):
                    slow.timed(3, stale[0], 3, stale[1])
                timed(slow, 0, 1.0)
                assert slow.sec[3] == 8.0 and slow.choose() < 3
                if not probes:  # a negative control: no probes, and the stale cost keeps fewer drafts to the end
                    slow.probe_after = 10**9
                chosen = decode(slow, 200)
                assert (chosen[-20:] == [3] * 20) == probes, (style, stale, chosen)
    # end to end: heads 2..4 re-initialized, so drafts are random guesses: they fail, the sample decodes plainly
    # (sampling: the policy's costs are then fixed, not measured, so the test does not depend on the clock)
    model = copy.deepcopy(cyclic_model[0])
    torch.manual_seed(5)
    for head in model.heads[1:]:
        for p in head.parameters():
            torch.nn.init.normal_(p, 0.0, 1.0)
    run = lambda m: generate(m, [3, 1, 4], 60, temperature=0.5, gen=torch.Generator().manual_seed(0),
                             speculative=True)[1]
    stats, good = run(model), run(cyclic_model[0])
    assert stats["drafts_accepted"] < 0.2 * stats["drafts_fed"] and good["drafts_accepted"] > 0.5 * good["drafts_fed"]
    # 3 per forward (some 170) if it never stopped drafting; it drafts the first few forwards (the Beta(1, 1) prior
    # says half the drafts hold), then plainly but for the probes (2 forwards of 3 drafts after 4, 8, 16, 32)
    assert stats["drafts_fed"] < 0.6 * stats["tokens"], stats


def test_sampling_is_reproducible(cyclic_model):
    for model in (cyclic_model[0], tiny(seed=2).eval()):  # a trained and a random (flat) model
        run = lambda seed, spec: generate(model, [3, 1], 30, temperature=1.5, top_k=8, top_p=0.95,
                                          gen=torch.Generator().manual_seed(seed), speculative=spec)[0]
        for spec in (False, True):
            assert run(5, spec) == run(5, spec)
    assert run(5, True) != run(6, True)  # the random model: the seed matters


def test_generate_times_each_forward_by_what_it_fed_and_drafted(cyclic_sequential, monkeypatch):
    """generate() hands the policy every forward but the first two (the prompt, warming up) and the last (it
    ends the sample before drafting): the drafts it fed, which the forward before drafted, and what it drafted,
    with the seconds of each part."""
    calls, real = [], DraftPolicy.timed

    def spy(self, fed, verify_s, drafted, draft_s):
        calls.append((fed, verify_s, drafted, draft_s))
        real(self, fed, verify_s, drafted, draft_s)
    monkeypatch.setattr(DraftPolicy, "timed", spy)
    model, pattern = cyclic_sequential
    _, stats = generate(model, pattern[:5].tolist(), 48, speculative=True)
    assert stats["forwards"] >= 6 and len(calls) == stats["forwards"] - 3
    assert all(b[0] == a[2] for a, b in zip(calls, calls[1:]))  # fed = what the forward before drafted
    assert any(c[2] for c in calls) and all(v > 0 and s >= 0 and (s > 0 or not d) for _, v, d, s in calls)
    assert sum(c[0] for c in calls) <= stats["drafts_fed"]


@pytest.mark.parametrize("trained", ["cyclic_model", "cyclic_sequential"])
def test_fixed_drafts_replace_the_policys_choice(trained, request):
    """generate(fixed_drafts=d): d drafts on every forward whatever the policy would choose (study.py --decode); output
    still plain greedy's; with sampling, the seed's sample; refused without drafting heads."""
    model, pattern = request.getfixturevalue(trained)
    prompt, plain = pattern[:5].tolist(), generate(model, pattern[:5].tolist(), 40)[0]
    for d in range(model.cfg.n_predict):
        ids, stats = generate(model, prompt, 40, speculative=True, fixed_drafts=d)
        assert ids == plain
        # the cyclic pattern: every draft holds, so each forward but the first (the prompt) yields d + 1 tokens
        assert stats["forwards"] == 1 + math.ceil((40 - 1) / (d + 1)), (d, stats)
        assert stats["drafts_fed"] == stats["drafts_accepted"] >= 40 - stats["forwards"]
    draw = lambda: generate(model, prompt, 30, temperature=1.0, speculative=True, fixed_drafts=2,
                            gen=torch.Generator().manual_seed(3))
    (a, sa), (b, _) = draw(), draw()
    assert a == b and sa["drafts_fed"] > 0
    with pytest.raises(ValueError, match="fixed_drafts=4, expected 0..3"):
        generate(model, prompt, 5, speculative=True, fixed_drafts=4)
    with pytest.raises(ValueError, match="fixed_drafts=1, expected 0..3 while drafting .speculative=False"):
        generate(model, prompt, 5, fixed_drafts=1)


def test_repeated_ngrams_by_hand():
    import study
    # 4-grams ending at each new token: (2,3,4,1) (3,4,1,2) (4,1,2,3) new, (1,2,3,4) seen in the prompt, (2,3,4,5) new
    assert study.repeated_ngrams([1, 2, 3, 4], [1, 2, 3, 4, 5]) == pytest.approx(1 / 5)
    assert study.repeated_ngrams([7], [7, 7, 7, 7, 7]) == pytest.approx(2 / 5)  # (7,7,7,7) first ends at the 3rd
    assert study.repeated_ngrams([1, 2], []) == 0.0


def test_generate_reports_the_policys_cost_of_all_drafts(cyclic_sequential, monkeypatch):
    """stats["cost_all_drafts"]: the policy's own timings of a forward with every draft (verify + draft medians) over
    a plain one's, the figure sample.py --bench prints; None where they were not both timed or without a clock."""
    policies, init = [], DraftPolicy.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        policies.append(self)
    monkeypatch.setattr(DraftPolicy, "__init__", spy)
    model, pattern = cyclic_sequential
    _, stats = generate(model, pattern[:5].tolist(), 60, speculative=True)
    pol = policies[-1]
    n = pol.n
    assert pol.sec[0] is not None and pol.sec[n] is not None  # both ends are measured first
    expected = (statistics.median(pol.verify[n]) + statistics.median(pol.draft[n])) / statistics.median(pol.verify[0])
    assert stats["cost_all_drafts"] == pytest.approx(expected, rel=1e-12)
    assert generate(model, pattern[:5].tolist(), 20)[1]["cost_all_drafts"] is None  # plain: no policy timings
    sampled = generate(model, pattern[:5].tolist(), 20, temperature=1.0, speculative=True)[1]
    assert sampled["cost_all_drafts"] is None  # sampling decides without the clock
    fixed = generate(model, pattern[:5].tolist(), 20, speculative=True, fixed_drafts=n)[1]
    assert fixed["cost_all_drafts"] is None  # no plain forward was timed


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_draws_happen_on_the_cpu_generator(monkeypatch, device):
    # on a GPU the probabilities live there; the draw must use a generator of the same device: we draw on the CPU,
    # in float32 whatever the probabilities' device and dtype (float64 here: a draw that skipped the copy shows)
    seen = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n, generator: seen.append((p.device, p.dtype, generator.device))
                        or real(p, n, generator=generator))
    probs = torch.softmax(torch.randn(V, dtype=torch.float64, device=device), -1)
    assert 0 <= sample.pick(probs, torch.Generator().manual_seed(0)) < V
    assert seen == [(torch.device("cpu"), torch.float32, torch.device("cpu"))]


@pytest.mark.parametrize("trained", ["cyclic_model", "cyclic_sequential"])
def test_speculative_sampling_keeps_head_1_distribution(trained, request, monkeypatch):
    model, _ = request.getfixturevalue(trained)
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.n)  # always draft: the test is about acceptance
    prompt, temp, n = [3, 1, 4], 2.0, 3000
    with torch.no_grad():  # exact distribution of the 2nd generated token under head 1 alone
        p1 = probs_from(model.logits(model(torch.tensor([prompt])).hidden[0, 0, -1]), temp, 0, 1.0)
        seqs = torch.tensor([prompt + [x] for x in range(V)])
        p2_given = probs_from(model.logits(model(seqs).hidden[0, :, -1]), temp, 0, 1.0)  # (V, V)
        exact = p1 @ p2_given
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(n):
        ids, _ = generate(model, prompt, 2, temperature=temp, gen=gen, speculative=True)
        counts[ids[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.05, (tv, exact, counts / n)


SHORTLIST = [0, 1, 3, 4, 5, 9, 12]  # the pattern's 3, 1, 4, 5, 9 and two ids it never has; not its 2, 6, 7, 8


def test_shortlist_greedy_speculative_equals_plain(cyclic_sequential, monkeypatch):
    model, _ = cyclic_sequential
    seen = []
    real = KVCache.draft_logits
    monkeypatch.setattr(KVCache, "draft_logits", lambda self, h: seen.append(self.draft_DV.shape) or real(self, h))
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.n)  # always all drafts
    for prompt in ([3, 1, 4], [9, 2], [7]):
        spec, stats = generate(model, prompt, 40, speculative=True, shortlist=SHORTLIST)
        assert spec == generate(model, prompt, 40)[0]
    assert seen and set(seen) == {(32, len(SHORTLIST))}  # the depths drafted over the shortlist's copy
    assert 0 < stats["drafts_accepted"] < stats["drafts_fed"], stats  # drafts outside the shortlist are never made


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shortlist_drafts_are_the_restricted_argmax_and_q(cyclic_sequential, temperature):
    model, _ = cyclic_sequential
    short, full = KVCache(model, 64, shortlist=[12, 4, 0, 9, 3, 1, 5, 4]), KVCache(model, 64)  # any order, repeats
    assert short.shortlist.tolist() == SHORTLIST and short.draft_DV.is_contiguous()
    prompt, nxt = torch.tensor([[7, 9, 3, 1, 4]]), 1
    with torch.no_grad():
        for cache in (short, full):
            model(prompt, kv_cache=cache, heads=[0])
        dist = lambda logits: probs_from(logits, max(temperature, 1e-3), 0, 1.0)
        gen = torch.Generator().manual_seed(0) if temperature else None
        drafts, q = sample.make_drafts(model, short, None, nxt, 3, dist, gen)
        ids, ids_list = torch.tensor([[nxt]]), torch.tensor(SHORTLIST)
        for j, draft in enumerate(drafts, 1):  # the same depths over the full vocabulary, restricted afterwards
            logits = model.logits(model.decode_depth(j, ids, full), full)[0]
            if gen is None:
                assert draft == SHORTLIST[int(logits[ids_list].argmax())]
            else:
                assert draft in SHORTLIST and q[j - 1].sum().item() == pytest.approx(1.0, abs=1e-6)
                outside = torch.ones(V, dtype=torch.bool)
                outside[ids_list] = False
                assert (q[j - 1][outside] == 0).all()
                torch.testing.assert_close(q[j - 1][ids_list], dist(logits[ids_list]))
            ids = torch.cat([ids, torch.tensor([[draft]])], dim=1)
    assert (q is None) == (gen is None)
    assert KVCache(model, 64, shortlist=range(V)).draft_DV is None  # the whole vocabulary: no copy
    with pytest.raises(ValueError, match="shortlist ids in"):
        KVCache(model, 64, shortlist=[3, V])


def test_speculative_sampling_with_a_shortlist_keeps_head_1_distribution(cyclic_sequential, monkeypatch):
    # drafts from q over the shortlist only (zero elsewhere): the residual max(0, p - q) must supply the rest
    model, _ = cyclic_sequential
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.n)
    prompt, temp, n = [3, 1, 4], 2.0, 3000
    with torch.no_grad():
        p1 = probs_from(model.logits(model(torch.tensor([prompt])).hidden[0, 0, -1]), temp, 0, 1.0)
        seqs = torch.tensor([prompt + [x] for x in range(V)])
        exact = p1 @ probs_from(model.logits(model(seqs).hidden[0, :, -1]), temp, 0, 1.0)
    gen, counts, fed = torch.Generator().manual_seed(0), torch.zeros(V), 0
    for _ in range(n):
        ids, stats = generate(model, prompt, 2, temperature=temp, gen=gen, speculative=True, shortlist=SHORTLIST)
        counts[ids[1]] += 1
        fed += stats["drafts_fed"]
    assert fed > 0
    outside = exact[[2, 6, 7, 8]].sum().item()  # mass outside the shortlist, which only the residual can give
    assert outside > 0.02 and abs(counts[[2, 6, 7, 8]].sum().item() / n - outside) < 0.015  # ~100 of 3000 samples
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.05, (tv, exact, counts / n)


def test_tiny_temperature_is_greedy_and_nan_never_reaches_multinomial(cyclic_model):
    # logits / 1e-45 overflow float32: the naive softmax gives NaN (the negative control), which multinomial refused
    # with a traceback; the distribution must be its limit, all mass on the argmax
    logits = torch.tensor([[1.0, 3.0, 2.5, -1.0], [0.5, 0.25, 0.5 + 2e-7, 0.0]])
    assert torch.isnan((logits / 1e-45).softmax(-1)).any()
    for t in (1e-45, 1e-50, 1e-320):  # 1e-50 and 1e-320 are 0 in float32
        p = probs_from(logits, t, 0, 1.0)
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(probs_from(logits, 1.0, 0, 1.0), logits.softmax(-1))  # usual temperatures unchanged
    model, _ = cyclic_model
    greedy = generate(model, [9, 2], 30)[0]
    for spec in (False, True):
        assert generate(model, [9, 2], 30, temperature=1e-45, gen=torch.Generator().manual_seed(0),
                        speculative=spec)[0] == greedy
    for bad in (torch.tensor([0.5, float("nan")]), torch.zeros(2), torch.tensor([float("inf"), 1.0])):
        with pytest.raises(ValueError, match="sampling distribution holds NaN, inf or no mass"):
            sample.pick(bad, torch.Generator().manual_seed(0))


def test_shared_logits_decode_plainly_and_say_so_once(capsys):
    model = tiny(style="shared").eval()
    for _ in range(2):
        plain, _ = generate(model, [1, 2, 3], 20)
        spec, stats = generate(model, [1, 2, 3], 20, speculative=True)
        assert spec == plain and stats["drafts_fed"] == 0 and stats["tokens_per_forward"] == 1.0
    assert capsys.readouterr().err.count("mtp_style='shared' has no drafts") <= 1  # once per process


def test_bench_runs_for_every_style(trained_dir, capsys):
    # random models of each style on the trained run's held-out prompts: speculative greedy equals plain greedy
    import checkpoint
    _, state = checkpoint.find_resume(str(trained_dir), "")
    fields = {k: state["config"][k] for k in checkpoint.MODEL_FIELDS if k in state["config"]}
    for style in ("parallel", "sequential", "shared"):
        torch.manual_seed(0)
        # shared logits have no drafters to detach: the run's mtp_detach does not carry over to them
        detach = fields.get("mtp_detach", False) and style != "shared"
        model = Model(ModelConfig(**{**fields, "mtp_style": style, "mtp_detach": detach})).eval()
        r = sample.bench(model, state, dict(bench_prompts=2, max_new_tokens=6, draft_vocab=4096))
        assert r["speedup_median"] > 0 and r["tokens_per_forward"] >= 1.0
        if style == "shared":
            assert r["tokens_per_forward"] == 1.0
    assert capsys.readouterr().err.count("speculative output identical to plain on every prompt") == 3
    # seq_len 32: bench's prompts are half the context (16 tokens); 32-token prompts left no room and were refused
    # as if the user had given "a prompt of 32 tokens"
    torch.manual_seed(0)
    model = Model(ModelConfig(**{**fields, "seq_len": 32})).eval()
    r = sample.bench(model, state, dict(bench_prompts=2, max_new_tokens=6, draft_vocab=4096))
    assert r["mismatches"] == [] and "2 held-out prompts of 16 tokens" in capsys.readouterr().err


def test_bench_counts_speculative_differences_instead_of_failing(trained_dir, capsys, monkeypatch):
    # a float32 near-tie can flip an argmax between a one-token and a several-token forward: one prompt's
    # difference must be reported with where it is, not abort the bench (it raised RuntimeError)
    import checkpoint
    _, state = checkpoint.find_resume(str(trained_dir), "")
    model = checkpoint.load_model(str(trained_dir), "", "cpu")[0]
    real, calls, first = sample.generate, [], []

    def flaky(model, prompt, n, speculative=False, **kw):
        ids, stats = real(model, prompt, n, speculative=speculative, **kw)
        calls.append(speculative)
        if speculative and len(calls) == 5:  # the second prompt's speculative run (after the warm-up)
            first.append(min(3, len(ids)))  # an EOT may end the output before its 4th token
            ids = ids[:3] + [-1]
        return ids, stats
    monkeypatch.setattr(sample, "generate", flaky)
    r = sample.bench(model, state, dict(bench_prompts=3, max_new_tokens=6, draft_vocab=4096))
    assert len(r["mismatches"]) == 1 and r["mismatches"][0][2] == first[0], (r["mismatches"], first)
    d, o, i = r["mismatches"][0]
    assert "differs from plain on 1 of 3 prompts" in (err := capsys.readouterr().err) and f"({d}, {o}, {i})" in err


def test_bench_checks_the_data_fingerprint(trained_dir, capsys):
    # the held-out split is rebuilt from the checkpoint's `data`: other data would give other (maybe training) docs
    import checkpoint
    _, state = checkpoint.find_resume(str(trained_dir), "")
    model = checkpoint.load_model(str(trained_dir), "", "cpu")[0]
    assert state["config"]["data_fingerprint"]
    other = copy.deepcopy(state)
    other["config"]["data_fingerprint"] = "0123456789abcdef"
    with pytest.raises(ValueError, match="has fingerprint [0-9a-f]+, the checkpoint was trained on 0123456789abcdef"):
        sample.bench(model, other, dict(bench_prompts=1, max_new_tokens=2))
    del other["config"]["data_fingerprint"]  # an older checkpoint: said, and the bench goes on
    sample.bench(model, other, dict(bench_prompts=1, max_new_tokens=2))
    assert "warning: the checkpoint has no data_fingerprint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--max_iters=2", "--seq_len=64", "--n_embd=32",
                    "--n_layer=1", "--batch_size=2", "--eval_iters=1"], cwd=HERE, check=True, capture_output=True,
                   timeout=300)
    return out


def test_checkpoint_token_counts_and_the_shortlist(trained_dir, capsys):
    import numpy as np

    import checkpoint
    from data import GPT2_VOCAB, Corpus
    model, _, state = checkpoint.load_model(str(trained_dir), "", "cpu")
    cfg = state["config"]
    corpus = Corpus(cfg["data"], cache_dir=cfg.get("cache_dir") or None, quiet=True)
    docs = corpus.split("train", cfg["val_fraction"])
    expected = np.bincount(np.concatenate([np.asarray(corpus.tokens(d), dtype=np.int64) for d in docs]),
                           minlength=GPT2_VOCAB)
    counts = state["token_counts"]
    assert counts.dtype == torch.int64 and counts.shape == (GPT2_VOCAB,) and counts.tolist() == expected.tolist()
    assert model.cfg.mtp_style == "sequential"
    short = sample.shortlist_of(model, state, 300)
    assert short.tolist() == sorted(short.tolist()) and len(short) == 300
    assert counts[short].min() >= counts[~torch.isin(torch.arange(GPT2_VOCAB), short)].max()  # the most frequent
    older = {k: v for k, v in state.items() if k != "token_counts"}  # an older checkpoint: from its corpus
    assert sample.shortlist_of(model, older, 300).tolist() == short.tolist()
    older["config"] = dict(cfg, data="/nonexistent/corpus/*.txt")  # and when that cannot be read: the full vocabulary
    assert sample.shortlist_of(model, older, 300) is None
    assert "the depths draft over the full vocabulary" in capsys.readouterr().err
    assert sample.shortlist_of(model, state, 0) is None and sample.shortlist_of(model, state, GPT2_VOCAB) is None
    prompt = [50256] + corpus.tokens(docs[0], 1, 5).tolist()
    plain = generate(model, prompt, 12)[0]
    for shortlist in (None, short):  # both decode, token for token plain greedy
        assert generate(model, prompt, 12, speculative=True, shortlist=shortlist)[0] == plain


def sample_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(trained_dir):
    greedy = r = sample_cli(f"--out_dir={trained_dir}", "--prompt=import os", "--max_new_tokens=20", "--temperature=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import os") and "tokens/s" in r.stderr and "identical to plain greedy: True" in r.stderr
    r = sample_cli(f"--out_dir={trained_dir}", "--prompt=")
    assert r.returncode == 2 and "empty prompt" in r.stderr
    r = sample_cli(f"--out_dir={trained_dir}", "--prompt=" + "x " * 80)
    assert r.returncode == 2 and "the model's context is seq_len=64" in r.stderr
    nothing = trained_dir / "nothing"
    r = sample_cli(f"--out_dir={nothing}")  # a sample.py setting named, not train.py's init_from
    assert r.returncode == 2 and r.stderr == f"error: out_dir={str(nothing)!r}: no such folder (where train.py wrote " \
        "its checkpoints)\n", r.stderr
    r = sample_cli(f"--out_dir={trained_dir}", "--prompt=import os", "--max_new_tokens=20", "--temperature=1e-45")
    assert r.returncode == 0 and r.stdout == greedy.stdout, r.stderr  # its limit: greedy, not multinomial's traceback


def test_cli_too_long_file_prompt_is_refused_before_stdout(trained_dir, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("x " * 80)
    r = sample_cli(f"--out_dir={trained_dir}", f"--prompt=FILE:{long}")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("error:") == 1, (r.stdout, r.stderr)
    assert f"error: prompt (FILE:{long}) has 82 tokens with the leading EOT" in r.stderr and "seq_len=64" in r.stderr


@pytest.mark.parametrize("arg, message", [
    ("--temperature=-1", "temperature=-1.0, expected finite and >= 0"),
    ("--top_p=-0.5", "top_p=-0.5, expected in (0, 1]"),
    ("--max_new_tokens=0", "max_new_tokens=0, expected >= 1"), ("--num_samples=0", "num_samples=0, expected >= 1"),
    ("--top_k=-3", "top_k=-3, expected >= 0"), ("--temperature=1e999", "temperature=inf, expected finite and >= 0"),
    ("--seed=-1", "seed=-1, expected 0 <= seed < 2**63"), ("--seed=1e23", "seed=1e+23 is float"),
    (f"--seed={2**63}", f"seed={2**63}, expected 0 <= seed < 2**63"),
    ("--prompt=FILE:/nonexistent/p.txt", "FILE:/nonexistent/p.txt: cannot read"),
    ("--device=foo", "device='foo', expected"), ("--device=mps", "device='mps', expected"),
    ("--temp=1", "unknown setting 'temp'; did you mean temperature")])
def test_cli_user_errors_are_one_line(trained_dir, arg, message):
    r = sample_cli(f"--out_dir={trained_dir}", arg)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_incompatible_checkpoint(tmp_path):
    import checkpoint
    state = dict(model={"w": torch.zeros(3)}, step=1, config={"n_embd": 8}, run="x")
    checkpoint.save_checkpoint(tmp_path, 1, state, keep=1)
    r = sample_cli(f"--out_dir={tmp_path}")
    assert r.returncode == 2 and "not a model checkpoint of this train.py" in r.stderr
