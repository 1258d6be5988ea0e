"""bench.py: the performance report, measured side by side in one run on the current machine.

    python bench.py            # a table (about 3 minutes on 2 CPU cores at 274 GFLOP/s; 5 at 170)
    python bench.py --json     # the same figures as one JSON object
    python bench.py --quick    # fewer repetitions, smaller sizes (a smoke run)
    python bench.py --decode   # the decoding rows alone (about a minute): a forward with drafts / a plain one

Medians over repetitions after warm-up; where two things are compared, the ratio is measured in the same
run, since these machines are shared and absolute times drift. Peak memory of the loss variants is the
peak resident set size (Linux VmHWM) of a fresh subprocess, and that minus the same subprocess stopped
before the step.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

import data
import muon
import sample
import train
from loss import CHUNK_ELEMS, ModelWithLoss, count_targets, mtp_loss, step_coefficients
from model import (
    KVCache,
    Model,
    ModelConfig,
    doc_mask,
    experts_dense,
    experts_grouped,
    experts_loop,
    flex_attention,
    flex_block_mask,
)

QUICK = "--quick" in sys.argv
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPS = 2 if QUICK else 3
BATCH = train.DEFAULTS["batch_size"]  # the model of `python train.py` is ModelConfig() with train.py's batch


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=REPS, warmup=1):
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak():
    """FLOP/s of a large float32 (and on CUDA bf16) matrix multiply: this machine's own limit."""
    n = 2048 if DEV.type == "cpu" else 8192
    out = {}
    for dt in ([torch.float32] + ([torch.bfloat16] if DEV.type == "cuda" else [])):
        a, b = torch.randn(n, n, device=DEV, dtype=dt), torch.randn(n, n, device=DEV, dtype=dt)
        out[str(dt).split(".")[1]] = 2 * n**3 / timed(lambda: a @ b)
    return out


def train_step_bench(cfg, compiled, loader, heads=None, reps=REPS, optimizer="adamw"):
    torch.manual_seed(0)
    model = Model(cfg).to(DEV)
    if compiled:
        model.compile_blocks()
    d = train.DEFAULTS  # the drafting heads learn at train.py's mtp_sample of the positions, as in a run
    fwd, heads = ModelWithLoss(model, d["mtp_sample"]), list(range(cfg.n_predict) if heads is None else heads)
    opt = muon.build_optimizer(model, optimizer, 1e-4, d["weight_decay"], (d["beta1"], d["beta2"]))
    batches = [{k: v.to(DEV) for k, v in loader.next_batch().items()} for _ in range(3)]
    ac = torch.autocast("cuda", torch.bfloat16) if DEV.type == "cuda" else nullcontext()
    head_w, i = torch.ones(len(heads), dtype=torch.float64, device=DEV), [0]

    def forward_backward():
        b = batches[i[0] % 3]
        i[0] += 1
        coef = step_coefficients(count_targets(b, cfg.n_predict, d["mtp_sample"])[heads].to(DEV), head_w)
        train.forward_backward(fwd, [b], heads, coef, ac)

    def step():  # train.py's step on one rank, one micro-batch
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    step()  # the first step (compiles when compiled); eager, it is also the warm-up
    first = time.perf_counter() - t0
    sec = timed(step, warmup=int(compiled), reps=reps)
    forward_backward()  # gradients in place: the optimizer's step alone, timed on them
    opt_s = timed(opt.step, warmup=0, reps=reps)
    opt.zero_grad(set_to_none=True)
    real = sum(int(b["attention_mask"].sum()) for b in batches) / 3
    fpt = model.flops_per_token(n_heads=len(heads), draft_rate=d["mtp_sample"])
    return dict(seconds=sec, first_step_s=first, real_tokens_per_s=real / sec,
                flops_per_s=fpt * BATCH * cfg.seq_len / sec, optimizer_s=opt_s, optimizer_share=opt_s / sec)


LOSS_CHILD = r"""
import sys, time, torch
from model import Model, ModelConfig
from loss import ModelWithLoss, count_targets, mtp_loss_reference, mtp_targets, step_coefficients
import bench, data
n_predict, fused = int(sys.argv[1]), sys.argv[2] == "fused"
cfg = ModelConfig(n_predict=n_predict)
model = Model(cfg)
b = data.PackedLoader(batch_size=bench.BATCH, seq_len=cfg.seq_len, quiet=True).next_batch()
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak
hwm = lambda: int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
before = hwm()  # the process stopped before the step: the baseline of "of which the step"
t0 = time.perf_counter()  # one step: the peak is the first step's; its time includes the allocator's first requests
coef = step_coefficients(count_targets(b, n_predict), torch.ones(n_predict, dtype=torch.float64))
if fused:  # train.py's path
    out = ModelWithLoss(model)(b, grad_scale=coef)
    sums = out.sums
else:  # every head's logits materialized
    out = model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"])
    tgt = mtp_targets(b["input_ids"], b["doc_ids"], n_predict)
    sums, _ = mtp_loss_reference(out.hidden, model.lm_head.weight, tgt)
((coef * sums).sum() + out.aux_loss).backward()
t, peak = time.perf_counter() - t0, hwm()
print(peak, peak - before, t)
"""


def loss_memory(reps=2):
    """Peak memory of a training step (forward, loss, backward) with 1 and 4 heads, fused vs materialized:
    peak RSS (VmHWM) of a fresh process, and how much of it the step added (VmHWM before the step read in
    the same process). Fused: medians of `reps` processes, as the allocator makes single readings vary by
    about 5%; materialized: one process."""
    out = {}
    for n_predict in (1, 4):
        for fused in ("fused", "materialized"):
            n = 1 if QUICK or fused == "materialized" else reps  # the reference is 3-4x off: one reading says it
            rows = [subprocess.run([sys.executable, "-c", LOSS_CHILD, str(n_predict), fused], capture_output=True,
                                   text=True, check=True).stdout.split() for _ in range(n)]
            peak, step, sec = (statistics.median(float(r[i]) for r in rows) for i in range(3))
            out[f"{n_predict}_heads_{fused}"] = dict(peak_gib=peak / 2**30, step_gib=step / 2**30, seconds=sec)
    return out


def chunk_bench():
    """The chunked cross-entropy's forward + backward at the default training shape, for several chunk sizes
    (logits held at once): why CHUNK_ELEMS is what it is on this device."""
    cfg = ModelConfig()
    torch.manual_seed(0)
    h = torch.randn(cfg.n_predict, BATCH, cfg.seq_len, cfg.n_embd, device=DEV, requires_grad=True)
    w = (0.02 * torch.randn(cfg.vocab_size, cfg.n_embd, device=DEV)).requires_grad_()
    tgt = torch.randint(0, data.GPT2_VOCAB, (cfg.n_predict, BATCH, cfg.seq_len), device=DEV)
    scale = torch.ones(cfg.n_predict, device=DEV)
    out = {}
    for elems in ((2**21, 2**23, 2**25) if DEV.type == "cpu" else (2**23, 2**25, 2**27)):
        rows = max(1, elems // cfg.vocab_size)
        out[elems] = timed(lambda: torch.autograd.grad(
            (scale * mtp_loss(h, w, tgt, rows, grad_scale=scale)[0]).sum(), (h, w)), reps=1)
    return out


def moe_bench():
    """Forward + backward of the routed experts at 8 experts top-2: loop (production on CPU) vs grouped
    matmul vs computing every expert on every token."""
    N, D, Fh, E, K = (1024 if QUICK else 4096), 256, 512, 8, 2
    torch.manual_seed(0)
    x = torch.randn(N, D, device=DEV, requires_grad=True)
    w = [torch.randn(E, Fh, D, device=DEV, requires_grad=True) * 0.02 for _ in range(2)] + \
        [torch.randn(E, D, Fh, device=DEV, requires_grad=True) * 0.02]
    w = [t.detach().requires_grad_() for t in w]
    scores = torch.randn(N, E, device=DEV).softmax(-1)
    gate, idx = torch.topk(scores, K, dim=-1)

    out = {}
    for name, fn in (("loop", lambda: experts_loop(x, idx, gate, *w)),
                     ("grouped", lambda: experts_grouped(x, idx, gate, *w)),
                     ("dense", lambda: experts_dense(x, idx, gate, *w))):
        out[name] = timed(lambda: fn().square().sum().backward())
    return out


def attention_bench():
    out = {}
    for T in ((256,) if QUICK else (256, 1024)):
        B, H, hd = 4, 4, 32
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, hd, device=DEV, requires_grad=True) for _ in range(3))
        lengths = torch.randint(T // 8, T // 2, (64,))
        doc = torch.repeat_interleave(torch.arange(64), lengths)[:T].expand(B, T).contiguous().to(DEV)
        mask = doc_mask(doc)
        r = dict(masked_sdpa=timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()),
                 causal_sdpa=timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()))
        bm = flex_block_mask(doc)
        if DEV.type == "cuda":
            r["flex"] = timed(lambda: flex_attention(q, k, v, bm).sum().backward())
        else:  # no FlexAttention backward on CPU; compare forwards
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            r["masked_sdpa_forward"] = timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask))
            r["flex_forward_eager"] = timed(lambda: flex_attention(qd, kd, vd, bm), reps=2)
        out[T] = r
    return out


def loader_bench(train_tokens_per_s):
    """Rows and real tokens per second of next_batch() from a fresh loader, window packing included."""
    corpus = data.Corpus(quiet=True)
    loader = data.PackedLoader(batch_size=8, seq_len=256, corpus=corpus)
    n = 100 if QUICK else 1000
    t0 = time.perf_counter()
    real = sum(int(loader.next_batch()["attention_mask"].sum()) for _ in range(n))
    sec = time.perf_counter() - t0
    return dict(rows_per_s=n * 8 / sec, tokens_per_s=real / sec, ratio_to_training=real / sec / train_tokens_per_s)


def decode_bench(style=None, reps=15 if QUICK else 60, prompt=64):
    """Milliseconds of one decoding forward of the default model, or of its `style` of heads (random weights: times do
    not depend on them), as sample.py's generate() computes it (bench.py imports sample.py on purpose, to time its
    own steps): plain, 1 token fed, head 1 and its logits; with d drafts, the next token and d drafts fed, verified
    (verify_logits()), the cache rolled back to the kept ones, and the next d drafted (make_drafts()), when every
    draft holds (parallel heads: one pass over the unembedding) and when the first fails (a second pass, at the
    position before it); parallel heads also with each drafting head on its own module (the batched block's
    saving). The KV cache is rolled back to a prompt of `prompt` tokens before each; the cases are interleaved rep
    by rep and the medians compared, so the ratios hold on a busy machine. Each timed forward follows an untimed one
    of its own case, as a decoding forward follows one like it: timed right after another case (the full-vocabulary
    drafts' passes leave the caches cold), the plain forward read 0.4 ms slower and every ratio some 0.15 lower."""
    torch.manual_seed(0)
    cfg = ModelConfig() if style is None else replace(ModelConfig(), mtp_style=style)
    model = Model(cfg).to(DEV).eval()
    n, parallel = cfg.n_predict - 1, cfg.mtp_style == "parallel"
    N = 0 if parallel else sample.DEFAULTS["draft_vocab"]  # sequential: drafts over N ids (any N: times only)
    shortlist = torch.randperm(data.GPT2_VOCAB)[:N] if 0 < N < data.GPT2_VOCAB else None
    cache = KVCache(model, cfg.seq_len, vocab=data.GPT2_VOCAB, shortlist=shortlist)
    with torch.no_grad():
        model(torch.randint(0, data.GPT2_VOCAB, (1, prompt), device=DEV), kv_cache=cache)

    def forward(d, kept=None, batched=True, full_vocab=False):
        cache.truncate(prompt)
        drafters, cache.drafters = cache.drafters, cache.drafters if batched else None
        draft_DV, cache.draft_DV = cache.draft_DV, None if full_vocab else cache.draft_DV
        heads = range(d + 1) if parallel else [0]
        hidden = model(torch.arange(1, d + 2, device=DEV)[None], kv_cache=cache, heads=heads).hidden[:, 0]
        cache.drafters = drafters
        head1, ahead = sample.verify_logits(model, cache, hidden, 0)
        best = head1.argmax(-1).tolist()  # the host reads the tokens, as generate() does
        if d:
            kept = d if kept is None else kept
            cache.truncate(prompt + kept + 1)
            sample.make_drafts(model, cache, hidden[1:, kept], best[kept], d, None, None, ahead if kept == d else None)
        cache.draft_DV = draft_DV
    cases = {"plain": lambda: forward(0)}
    for d in range(1, n + 1):
        cases[f"{d}_held"], cases[f"{d}_first_fails"] = (lambda d=d: forward(d)), (lambda d=d: forward(d, kept=0))
    if parallel:
        cases[f"{n}_held_heads_one_by_one"] = lambda: forward(n, batched=False)
    if cache.draft_DV is not None:
        cases[f"{n}_held_full_vocab"] = lambda: forward(n, full_vocab=True)
    times = {k: [] for k in cases}
    with torch.no_grad():
        for f in cases.values():
            f()
        for _ in range(reps):
            for k, f in cases.items():
                f()  # untimed: the timed forward follows one of its own kind, as in generation
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return dict(style=cfg.mtp_style, ms=ms, ratio={k: v / ms["plain"] for k, v in ms.items()}, reps=reps, n_drafts=n,
                draft_vocab=N)


def decode_styles():
    """The decoding rows for parallel heads (the style whose drafts come with the verify forward) and for the default
    style when it is another."""
    styles = ["parallel"] + ([ModelConfig().mtp_style] if ModelConfig().mtp_style not in ("parallel", "shared") else [])
    return [decode_bench(s) for s in styles]


def report_decode(rows):
    for r in rows:
        n, ms, ratio = r["n_drafts"], r["ms"], r["ratio"]
        default = " (the default)" if r["style"] == ModelConfig().mtp_style else ""
        print(f"\ndecoding forward, default model with {r['style']} heads{default}, median of {r['reps']} "
              "interleaved reps (sample.py's steps)")
        print(f"  plain (1 token, head 1, its logits): {ms['plain']:.2f} ms; with {n} drafts (verify them, draft the "
              f"next {n}): {ms[f'{n}_held']:.2f} ms = {ratio[f'{n}_held']:.2f}x plain when every draft holds, "
              f"{ms[f'{n}_first_fails']:.2f} ms = {ratio[f'{n}_first_fails']:.2f}x when the first fails")
        one_by_one = f"{n}_held_heads_one_by_one"
        print("  by drafts, x plain, every draft holds / the first fails: " + ", ".join(
            f"{d}: {ratio[f'{d}_held']:.2f} / {ratio[f'{d}_first_fails']:.2f}" for d in range(1, n + 1))
            + (f"; {n} drafts with each drafting head on its own module: {ratio[one_by_one]:.2f}x"
               if one_by_one in ratio else "")
            + (f"; drafts over a shortlist of {r['draft_vocab']} ids, {n} drafts over the full vocabulary: "
               f"{ratio[f'{n}_held_full_vocab']:.2f}x" if f"{n}_held_full_vocab" in ratio else ""))


def main():
    if "--decode" in sys.argv:
        print(f"float32 matmul {matmul_peak()['float32'] / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads")
        report_decode(decode_styles())
        return
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        # a fresh compile cache, so that "first step" of the compiled case is what a fresh machine pays
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        report(measure())


def measure():
    t_start = time.time()
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res = dict(device=name, torch=torch.__version__)
    res["matmul_flops_per_s"] = peak = matmul_peak()
    cfg = ModelConfig()  # the model of `python train.py`
    loader = data.PackedLoader(batch_size=BATCH, seq_len=cfg.seq_len, quiet=True)
    larger = ModelConfig(n_embd=256, n_layer=4, n_head=8)
    cases = [("default", cfg, False, None, REPS, "adamw"), ("default_1_head", cfg, False, [0], REPS, "adamw"),
             ("default_muon", cfg, False, None, REPS, "muon"), ("default_compiled", cfg, True, None, 2, "adamw"),
             ("larger", larger, False, None, 2, "adamw"), ("larger_muon", larger, False, None, 2, "muon")]
    cases += [(f"default_{s}", replace(cfg, mtp_style=s), False, None, REPS, "adamw") for s in ("parallel", "shared")]
    res["train_step"] = {}
    for name, c, compiled, heads, reps, optimizer in cases:
        if QUICK and compiled:
            continue
        r = train_step_bench(c, compiled, loader, heads, reps, optimizer)
        r["utilization_vs_fp32_matmul"] = r["flops_per_s"] / peak["float32"]
        if "bfloat16" in peak:
            r["utilization_vs_bf16_matmul"] = r["flops_per_s"] / peak["bfloat16"]
        res["train_step"][name] = r
    res["packing"] = {str(T): v for T, v in data.packing_report().items()}
    res["loader"] = loader_bench(res["train_step"]["default"]["real_tokens_per_s"])
    res["loss_memory"] = loss_memory() if DEV.type == "cpu" else "CPU only (peak RSS)"
    res["loss_chunk_s"] = chunk_bench()
    res["moe_dispatch_s"] = moe_bench()
    res["attention_s"] = attention_bench()
    res["decode"] = decode_styles()
    res["seconds"] = time.time() - t_start
    return res


def report(res):
    peak = res["matmul_flops_per_s"]
    if "--json" in sys.argv:
        print(json.dumps(res, indent=1))
        return
    print(f"device: {res['device']}, torch {res['torch']}; float32 matmul {peak['float32'] / 1e9:.0f} GFLOP/s"
          + (f", bf16 matmul {peak['bfloat16'] / 1e12:.0f} TFLOP/s" if "bfloat16" in peak else ""))
    print("\ntraining step (forward, loss, backward, optimizer)  real tok/s  GFLOP/s  vs matmul  first step  optimizer")
    for k, r in res["train_step"].items():
        print(f"  {k:45s} {r['real_tokens_per_s']:10.0f} {r['flops_per_s'] / 1e9:9.1f} "
              f"{100 * r['utilization_vs_fp32_matmul']:9.1f}%  {r['first_step_s']:8.1f}s  "
              f"{100 * r['optimizer_share']:7.1f}%")
    ts = res["train_step"]
    print(f"  4 heads (the default's drafting stage) / 1 head, time per step: "
          f"{ts['default']['seconds'] / ts['default_1_head']['seconds']:.2f}x")
    for s in ("parallel", "shared"):
        if f"default_{s}" in ts:
            print(f"  {s} (4 heads) / 1 head, time per step: "
                  f"{ts[f'default_{s}']['seconds'] / ts['default_1_head']['seconds']:.2f}x")
    if "default_compiled" in ts:
        print(f"  compiled / eager speed: {ts['default']['seconds'] / ts['default_compiled']['seconds']:.2f}x")
    print("\npacking, real-token fraction (default corpus, one epoch)   packed   one document chunk per row")
    for T, r in res["packing"].items():
        print(f"  seq_len {T:5s} {100 * r['packed']:47.2f}% {100 * r['padded']:10.2f}%")
    ld = res["loader"]
    print(f"loader: {ld['rows_per_s']:.0f} rows/s, {ld['tokens_per_s']:.0f} tokens/s = "
          f"{ld['ratio_to_training']:.0f}x what the default training step consumes")
    if isinstance(res["loss_memory"], dict):
        lm = res["loss_memory"]
        print("\nMTP loss, one training step at the default config   peak RSS   of which the step   time")
        for k, r in lm.items():
            print(f"  {k:45s} {r['peak_gib']:6.2f} GiB {r['step_gib']:10.2f} GiB {r['seconds']:9.2f}s")
        for kind in ("fused", "materialized"):
            a, b = lm[f"4_heads_{kind}"], lm[f"1_heads_{kind}"]
            print(f"  4 heads / 1 head, {kind}: peak {a['peak_gib'] / b['peak_gib']:.2f}x, "
                  f"step {a['step_gib'] / b['step_gib']:.2f}x, time {a['seconds'] / b['seconds']:.2f}x")
    ch = res["loss_chunk_s"]
    print("\nMTP loss forward + backward by chunk (logits held at once; "
          f"CHUNK_ELEMS here: {CHUNK_ELEMS.get(DEV.type)}): "
          + ", ".join(f"2^{int(math.log2(e))} {1e3 * t:.0f} ms" for e, t in ch.items()))
    m = res["moe_dispatch_s"]
    print(f"\nMoE dispatch, 8 experts top-2, forward+backward: loop {1e3 * m['loop']:.1f} ms, grouped "
          f"{m['grouped'] / m['loop']:.2f}x loop's time, every expert on every token {m['dense'] / m['loop']:.2f}x")
    for T, r in res["attention_s"].items():
        print(f"attention T={T}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r.items())
              + f"; masked / causal {r['masked_sdpa'] / r['causal_sdpa']:.2f}x")
    report_decode(res["decode"])
    print(f"\n({res['seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
