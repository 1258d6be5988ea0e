"""train.py: pretrain the MoE + multi-token-prediction model. A script, read top to bottom.

    python train.py                                   # CPU or one GPU, default corpus (Python stdlib)
    python train.py --max_iters=50 --n_embd=64        # override any constant below as --name=value
    python train.py --config=configs/gpt2_small_moe.conf   # a file of `name = value` lines
    torchrun --standalone --nproc_per_node=8 train.py --config=configs/gpt2_small_moe.conf
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 train.py --config=...    # the same on node 1 with --node_rank=1

The objective of one optimizer step over all micro-batches m of all ranks r (DESIGN.md):

    loss = sum_k w_k * (sum_{m,r} sums_k(m, r)) / N_k + mean over micro-batches of the aux loss

N_k, the number of valid head-k targets in the whole step, is counted from the batches before the first
forward and all-reduced once, so every micro-batch backpropagates world_size * sum_k w_k sums_k / N_k
(DDP averages gradients over ranks). The gradient then does not depend on how the global batch is cut
into micro-batches or ranks, nor on padding. What is logged is this objective, reduced over the step.
"""
import ast
import difflib
import hashlib
import inspect
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import PackedLoader
from loss import count_targets, mtp_loss, mtp_targets, objective, step_coefficients
from model import Model, ModelConfig

# ----------------------------------------------------------------------------- hyperparameters
# data
data = None  # None: the Python standard library; or a text file, a folder, a .jsonl, or a glob of .bin shards
val_fraction = 0.01  # fraction of documents held out for evaluation (at least one)
cache_dir = ""  # token cache folder for text sources; "" means data_cache/ beside data.py
# model (ModelConfig fields)
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
seq_len = 256  # tokens per row
n_layer = 2  # trunk blocks
n_head = 4  # attention heads
n_kv_head = 0  # key/value heads for grouped-query attention; 0 means n_head
n_embd = 128  # model width
n_experts = 4  # routed experts per MoE layer
top_k = 2  # routed experts per token
n_shared_experts = 1  # always-on experts
expert_hidden = 0  # hidden size of one expert; 0 derives 4 * n_embd / (top_k + n_shared_experts), rounded up to 16
n_dense_layers = 0  # leading trunk blocks with a dense FFN
n_predict = 4  # multi-token-prediction heads; head k predicts token t + k
tie_embeddings = True  # share the token embedding and the unembedding
rope_base = 10000.0  # rotary embedding base
dropout = 0.0  # residual dropout
router_noise = 0.0  # std of noise on router logits during training
aux_loss_coef = 0.01  # Switch load-balancing loss weight
z_loss_coef = 0.001  # router z-loss weight
bias_update_rate = 0.0  # DeepSeek-V3 aux-loss-free balancing step (0.001 in the paper); 0 = off
attn_backend = "auto"  # "sdpa", "flex", or "auto": flex on CUDA, sdpa on CPU
moe_backend = "auto"  # "loop", "grouped", or "auto": grouped matmul on CUDA in bf16
mtp_weight = 1.0  # loss weight w_k of heads k >= 2 (head 1 always has weight 1)
# optimizer
learning_rate = 3e-3  # peak learning rate
min_lr_ratio = 0.1  # the schedule's floor, as a fraction of learning_rate
weight_decay = 0.1  # AdamW decay, on matrices only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 = off
# schedule
max_iters = 200  # optimizer steps
warmup_iters = 10  # linear warmup steps
lr_schedule = "cosine"  # "cosine" (warmup, cosine decay to the floor) or "wsd" (warmup, stable, decay)
decay_frac = 0.2  # wsd: fraction of max_iters spent in the final linear decay
# run
batch_size = 8  # rows per micro-batch per rank; global batch = batch_size * grad_accum_steps * world size
grad_accum_steps = 1  # micro-batches per optimizer step
eval_interval = 50  # evaluate (and checkpoint) every this many steps, and at the end
eval_iters = 4  # held-out global batches per evaluation (the same rows whatever the world size)
log_interval = 10  # steps between log lines
out_dir = "out"  # checkpoints and metrics.jsonl
init_from = "scratch"  # "scratch" or "resume"
resume_path = ""  # resume: a checkpoint file; "" means the newest good one in out_dir
allow_world_size_change = False  # resume on another world size (the data stream is world-size invariant)
keep_last = 2  # checkpoints kept besides the best by eval loss
max_skips = 3  # consecutive non-finite steps tolerated before stopping
stop_after = 0  # save and exit after this many steps of this process (for time-limited jobs); 0 = off
seed = 0
# system
device = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
dtype = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU; "float64" for exactness tests
compile = torch.cuda.is_available()  # compile each block; off on CPU, where bench.py measured no gain (1.00-1.01x)
debug_nan_step = -1  # tests: make the loss NaN at this step ...
debug_nan_rank = 0  # ... on this rank only
debug_starve_rank = -1  # tests: this rank never routes to the upper half of the experts

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, bool, str, type(None)))}
MODEL_FIELDS = [f.name for f in fields(ModelConfig)]
# What must match to resume: the model's shape, and what fixes the data stream and per-rank RNG.
RESUME_MUST_MATCH = MODEL_FIELDS + ["data", "val_fraction", "seed", "world_size"]


def parse_value(name, text, where, defaults):
    """Parse an override as a Python literal and check it against the default's type. Nothing is eval'd."""
    if name not in defaults:
        close = difflib.get_close_matches(name, defaults, n=3)
        raise ValueError(f"{where}: unknown setting {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    default = defaults[name]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = (value is None or isinstance(value, str)) if default is None else type(value) is type(default)
    if not ok:
        raise ValueError(f"{where}: {name}={value!r} is {type(value).__name__}, expected "
                         f"{'None or str' if default is None else type(default).__name__} like the default {default!r}")
    return value


def parse_config(argv, defaults=DEFAULTS):
    """--name=value arguments (and --config=FILE of `name = value` lines) over the defaults -> dict."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --name=value")
        name, text = arg[2:].split("=", 1)
        if name == "config":
            for i, line in enumerate(Path(text).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    key, _, val = line.partition("=")
                    cfg[key.strip()] = parse_value(key.strip(), val.strip(), f"{text}:{i}", defaults)
        else:
            cfg[name] = parse_value(name, text, "command line", defaults)
    return cfg


# ----------------------------------------------------------------------------- checkpoints

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, write):
    """write(f) into a temporary file in the same folder, fsync, rename: a crash leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out, step, state, val_loss, keep):
    """Write ckpt_{step}.pt and its .sha256, then point `latest` at it; prune to the last `keep` + best."""
    out = Path(out)
    path = out / f"ckpt_{step:07d}.pt"
    write_atomic(path, lambda f: torch.save(state, f))
    digest = sha256_file(path)
    write_atomic(path.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    index_path = out / "checkpoints.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"best": None, "best_val_loss": None}
    if val_loss is not None and math.isfinite(val_loss) and (
            index["best_val_loss"] is None or val_loss < index["best_val_loss"]):
        index["best"], index["best_val_loss"] = path.name, val_loss
    index["latest"] = path.name
    write_atomic(index_path, lambda f: f.write(json.dumps(index, indent=1).encode()))
    ckpts = sorted(out.glob("ckpt_*.pt"))
    for old in ckpts[:-keep] if keep > 0 else []:
        if old.name != index["best"]:
            old.unlink()
            old.with_suffix(".pt.sha256").unlink(missing_ok=True)
    return path


def verify_checkpoint(path):
    """Raise ValueError naming the file if it is missing, truncated or corrupted (sha256 mismatch)."""
    path = Path(path)
    side = path.with_suffix(".pt.sha256")
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    if not side.is_file():
        raise ValueError(f"checkpoint {path}: no checksum file {side.name}; refusing an unverified checkpoint")
    expected, actual = side.read_text().split()[0], sha256_file(path)
    if expected != actual:
        raise ValueError(f"checkpoint {path}: sha256 {actual}, expected {expected} (truncated or corrupted)")


def load_checkpoint(path):
    verify_checkpoint(path)
    try:  # weights_only: tensors and plain containers only, no code can run while loading
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path}: cannot be loaded safely ({type(e).__name__}: {e})") from None


def find_resume(out, explicit):
    """An explicit path must be good; otherwise the newest good checkpoint of out, saying which were bad."""
    if explicit:
        return Path(explicit), load_checkpoint(explicit)
    for path in sorted(Path(out).glob("ckpt_*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    raise ValueError(f"init_from=resume: no good checkpoint in {out}")


def rng_state():
    """Every RNG of this process as plain lists (all_gather_object-safe, weights_only-loadable)."""
    np_state = np.random.get_state()
    return dict(python=random.getstate(), numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                torch=torch.get_rng_state().tolist(),
                cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(x, dtype=torch.uint8) for x in s["cuda"]])


def lr_at(step, c):
    """Linear warmup, then cosine (or warmup-stable-decay) down to learning_rate * min_lr_ratio."""
    if step < c.warmup_iters:
        return c.learning_rate * (step + 1) / c.warmup_iters
    floor = c.learning_rate * c.min_lr_ratio
    if c.lr_schedule == "wsd":
        decay_start = c.max_iters * (1 - c.decay_frac)
        frac = max(0.0, (step - decay_start) / max(1, c.max_iters - decay_start))
        return c.learning_rate - (c.learning_rate - floor) * frac
    frac = (step - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters)
    return floor + 0.5 * (c.learning_rate - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense TFLOP/s


def main(cfg):
    c = type("Config", (), dict(cfg))  # attribute access: c.learning_rate
    if c.lr_schedule not in ("cosine", "wsd"):
        raise ValueError(f"lr_schedule={c.lr_schedule!r}, expected 'cosine' or 'wsd'")
    if c.init_from not in ("scratch", "resume"):
        raise ValueError(f"init_from={c.init_from!r}, expected 'scratch' or 'resume'")

    # ------------------------------------------------------------------------- setup: device, DDP
    ddp = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
    device = torch.device(dev)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    master = rank == 0
    cfg["world_size"] = world
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    random.seed(c.seed + rank)
    np.random.seed(c.seed + rank)
    torch.manual_seed(c.seed + rank)  # dropout / router noise differ per rank; weights are broadcast by DDP
    if c.dtype not in ("auto", "float32", "float64"):
        raise ValueError(f"dtype={c.dtype!r}, expected 'auto', 'float32' or 'float64'")
    use_bf16 = device.type == "cuda" and c.dtype == "auto"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    def all_reduce(t):
        if ddp:
            dist.all_reduce(t)
        return t

    # ------------------------------------------------------------------------- model
    mcfg = ModelConfig(**{k: cfg[k] for k in MODEL_FIELDS})
    torch.manual_seed(c.seed)  # the same initial weights on every rank
    raw_model = Model(mcfg).to(device, torch.float64 if c.dtype == "float64" else torch.float32)
    torch.manual_seed(c.seed + rank)
    if rank == c.debug_starve_rank:  # a selection-only bias: the starved experts still get (zero) grads
        for m in raw_model.modules():
            if hasattr(m, "expert_bias"):
                m.expert_bias[c.n_experts // 2:] = -1e4
    n_total, n_active = raw_model.param_counts()
    flops_per_token = raw_model.flops_per_token()
    head_w = torch.tensor([1.0] + [c.mtp_weight] * (c.n_predict - 1), device=device)

    # ------------------------------------------------------------------------- optimizer
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.learning_rate, betas=(c.beta1, c.beta2), fused=device.type == "cuda")

    # ------------------------------------------------------------------------- data
    loader = PackedLoader(c.data, "train", c.batch_size, c.seq_len, rank, world, c.seed, device, c.val_fraction,
                          c.cache_dir or None, quiet=not master)

    # ------------------------------------------------------------------------- resume
    step, out = 0, Path(c.out_dir)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    if c.init_from == "resume":
        path, ckpt = find_resume(out, c.resume_path)
        old = ckpt["config"]
        allowed = {"world_size"} if c.allow_world_size_change else set()
        diff = [f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in RESUME_MUST_MATCH
                if k not in allowed and old.get(k) != cfg.get(k)]
        if diff:
            raise ValueError(f"checkpoint {path} does not match this run: " + "; ".join(diff))
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        loader.load_state_dict(ckpt["loader"][rank % len(ckpt["loader"])])
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        log(f"resumed from {path} at step {step}")
    model = raw_model
    if c.compile:
        raw_model.compile_blocks()
    if ddp:
        # Buffers are not broadcast: the expert biases are updated identically on every rank from
        # all-reduced counts (the keyword was renamed in torch 2.13).
        DDP = torch.nn.parallel.DistributedDataParallel
        no_sync_buffers = {("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                            else "broadcast_buffers"): False}
        model = DDP(raw_model, device_ids=[local_rank] if device.type == "cuda" else None, **no_sync_buffers)

    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum_steps * world
    log(f"config: {json.dumps(cfg)}")
    log(f"parameters: {n_total / 1e6:.2f}M total, {n_active / 1e6:.2f}M active per token; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token (training)")
    log(f"tokens per step: {tokens_per_step} = batch_size {c.batch_size} x seq_len {c.seq_len} x "
        f"grad_accum_steps {c.grad_accum_steps} x world_size {world}; device {device}, compile {c.compile}")

    # ------------------------------------------------------------------------- stop signals
    stop_requested = [False]

    def on_signal(signum, frame):  # finish the step, then save and exit 0 on every rank together
        stop_requested[0] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def run_micro(batch, coef=None):
        """-> (per-head loss sums, counts, aux loss, expert counts) of one micro-batch. coef: the per-head
        factors of the backward, so the loss keeps one weight-gradient buffer, not one per head."""
        with autocast:
            o = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
            targets = mtp_targets(batch["input_ids"], batch["doc_ids"], c.n_predict)
            sums, counts = mtp_loss(o.hidden, raw_model.lm_head.weight, targets, grad_scale=coef)
        return sums, counts, o.aux_loss, o.expert_counts

    @torch.no_grad()
    def evaluate():
        model.eval()
        val = PackedLoader(c.data, "val", c.batch_size, c.seq_len, rank, world, 0, device, c.val_fraction,
                           corpus=loader.corpus)  # a fresh loader: the same held-out rows every time
        acc = torch.zeros(2 * c.n_predict, device=device, dtype=torch.float64)
        for _ in range(c.eval_iters * c.grad_accum_steps):
            sums, counts, _, _ = run_micro(val.next_batch())
            acc += torch.cat([sums.double(), counts.double()])
        all_reduce(acc)
        model.train()
        sums, counts = acc[:c.n_predict], acc[c.n_predict:].clamp(min=1)
        return objective(sums, counts, head_w.double()).item(), (sums / counts).tolist()

    def checkpoint(step, val_loss):
        loader_states = [None] * world
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(loader_states, loader.state_dict())
            dist.all_gather_object(rngs, rng_state())
            dist.barrier()
        else:
            loader_states, rngs = [loader.state_dict()], [rng_state()]
        if master:
            if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
                log(f"step {step}: non-finite weights, checkpoint NOT written")
            else:
                state = dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), step=step, config=cfg,
                             loader=loader_states, rng=rngs, val_loss=val_loss)
                log(f"saved {save_checkpoint(out, step, state, val_loss, c.keep_last)}")
        if ddp:
            dist.barrier()

    # ------------------------------------------------------------------------- the loop
    metrics = open(out / "metrics.jsonl", "a") if master else None

    def emit(record, line):
        log(line)
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    n_moe = sum(1 for i in range(c.n_layer) if i >= c.n_dense_layers)
    t_start, t_last, skips, val_loss, last_saved = time.time(), time.time(), 0, None, step or None
    tok_since, first_step, last_logged = 0.0, step, step
    while step < c.max_iters:
        lr = lr_at(step, c)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [loader.next_batch() for _ in range(c.grad_accum_steps)]
        # N_k over the whole step (all micro-batches, all ranks), counted before any forward.
        n_k = all_reduce(sum(count_targets(b, c.n_predict) for b in batches).to(device))
        coef = step_coefficients(n_k, head_w, world)
        stats = torch.zeros(2 * c.n_predict + 3 + n_moe * c.n_experts, device=device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            sync = nullcontext() if not ddp or i == c.grad_accum_steps - 1 else model.no_sync()
            with sync:
                sums, counts, aux, expert_counts = run_micro(batch, coef)
                if step == c.debug_nan_step and rank == c.debug_nan_rank:
                    sums = sums * float("nan")
                micro_loss = (coef * sums).sum() + aux / c.grad_accum_steps
                micro_loss.backward()
            stats[:c.n_predict] += sums.detach().double()
            stats[c.n_predict:2 * c.n_predict] += counts.double()
            stats[2 * c.n_predict] += aux.detach().double() / (c.grad_accum_steps * world)
            stats[2 * c.n_predict + 1] += batch["attention_mask"].sum()
            stats[2 * c.n_predict + 3:] += expert_counts.detach().flatten().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
        stats[2 * c.n_predict + 2] = float(stop_requested[0] or step + 1 - first_step == c.stop_after)
        all_reduce(stats)  # one small collective per step: logging values, guards, stop flag
        head_sums, head_counts = stats[:c.n_predict], stats[c.n_predict:2 * c.n_predict]
        loss = objective(head_sums, head_counts, head_w.double())
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))  # the same on every rank
        if n_k.sum() == 0:
            log(f"step {step}: no valid target in the whole step, no optimizer step taken")
        elif not finite:
            skips += 1
            log(f"warning: step {step}: non-finite loss {loss.item()} or grad norm {grad_norm.item()}, "
                f"optimizer step skipped ({skips}/{c.max_skips} consecutive)")
            if skips >= c.max_skips:
                log(f"stopping: {skips} consecutive non-finite steps; the last good checkpoint is {last_saved}")
                if ddp:
                    dist.destroy_process_group()
                sys.exit(1)
        else:
            skips = 0
            opt.step()
            if c.bias_update_rate > 0:
                raw_model.update_expert_bias(stats[2 * c.n_predict + 3:].view(n_moe, c.n_experts), c.bias_update_rate)
        opt.zero_grad(set_to_none=True)
        step += 1
        tok_since += stats[2 * c.n_predict + 1]  # a tensor: read at log time, no extra sync per step

        if step % c.log_interval == 0 or step == c.max_iters:
            now = time.time()
            dt, elapsed = now - t_last, now - t_start
            load = stats[2 * c.n_predict + 3:].view(max(n_moe, 1), -1) if n_moe else torch.ones(1, 1)
            per_head = (head_sums / head_counts.clamp(min=1)).tolist()
            achieved = flops_per_token * tokens_per_step * (step - last_logged) / dt if dt > 0 else 0.0
            peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
            rec = dict(step=step, loss=loss.item(), nt_loss=per_head[0],
                       **{f"loss_h{k + 1}": v for k, v in enumerate(per_head)},
                       aux_loss=stats[2 * c.n_predict].item(), grad_norm=grad_norm.item(), lr=lr,
                       tokens_per_s=float(tok_since) / dt, pad_frac=1 - stats[2 * c.n_predict + 1].item() / (tokens_per_step),
                       flops_per_s=achieved, mfu=achieved / peak if peak else None,
                       expert_load=(load.max(1).values / load.mean(1).clamp(min=1)).max().item(),
                       elapsed_s=elapsed, eta_s=elapsed / step * (c.max_iters - step) if step else None)
            heads = " ".join(f"h{k + 1} {v:.3f}" for k, v in enumerate(per_head))
            emit(rec, f"step {step:5d} | loss {rec['loss']:.4f} | nt_loss {rec['nt_loss']:.4f} ({heads}) | "
                      f"aux {rec['aux_loss']:.4f} | gnorm {rec['grad_norm']:.2f} | lr {lr:.2e} | "
                      f"{rec['tokens_per_s']:.0f} tok/s | {achieved / 1e9:.1f} GFLOP/s"
                      + (f" ({100 * rec['mfu']:.1f}% MFU)" if peak else "")
                      + f" | load {rec['expert_load']:.2f} | pad {100 * rec['pad_frac']:.2f}% | "
                      f"{elapsed:.0f}s, ETA {rec['eta_s']:.0f}s")
            t_last, tok_since, last_logged = now, 0.0, step
        stop = stats[2 * c.n_predict + 2].item() > 0
        due = step % c.eval_interval == 0 or step == c.max_iters
        if due:
            val_loss, val_heads = evaluate()
            emit(dict(step=step, val_loss=val_loss, val_nt_loss=val_heads[0],
                      **{f"val_loss_h{k + 1}": v for k, v in enumerate(val_heads)}),
                 f"step {step:5d} | val_loss {val_loss:.4f} | val_nt_loss {val_heads[0]:.4f}")
        if due or stop:
            checkpoint(step, val_loss if due else None)
            last_saved = step
        if stop:
            log(f"stop requested: saved step {step}, exiting")
            break

    if metrics:
        metrics.close()
    log(f"done: {step} steps in {time.time() - t_start:.0f}s")
    if ddp:  # a cheap end-of-run check that DDP kept every replica identical
        fingerprint = torch.stack([sum(p.double().sum() for p in raw_model.parameters()),
                                   sum(p.double().square().sum() for p in raw_model.parameters())])
        gathered = [torch.zeros_like(fingerprint) for _ in range(world)]
        dist.all_gather(gathered, fingerprint)
        log(f"replicas identical: {all(torch.equal(g, gathered[0]) for g in gathered)}")
        dist.barrier()
        dist.destroy_process_group()
    return ddp


if __name__ == "__main__":
    try:
        distributed = main(parse_config(sys.argv[1:]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if distributed:  # skip interpreter teardown: gloo worker threads can abort it (pytorch PR 179291)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
