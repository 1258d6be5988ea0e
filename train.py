"""train.py: pretrain the MoE + multi-token-prediction model. A script, read top to bottom.

    python train.py                                   # CPU or one GPU, default corpus (Python stdlib)
    python train.py --max_iters=50 --n_embd=64        # override any constant below (or ModelConfig field)
    python train.py --config=configs/gpt2_small_moe.conf   # a file of `name = value` lines
    torchrun --standalone --nproc_per_node=8 train.py --config=configs/gpt2_small_moe.conf
    torchrun --standalone --nproc_per_node=8 train.py --config=... --fsdp=True   # shard past one GPU's memory
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 train.py --config=...    # the same on node 1 with --node_rank=1

One optimizer step minimizes sum_k w_k * (sum over micro-batches and ranks of head k's summed loss) / N_k
(+ the routers' aux loss), N_k being head k's valid targets in the whole step, counted before the first forward
and all-reduced once: the gradient does not depend on micro-batching, ranks or padding (DESIGN.md).

Checkpoints and the out_dir's rules live in checkpoint.py, `--name=value` parsing in settings.py.
"""
import inspect
import math
import os
import random
import secrets
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import checkpoint
import muon
from data import GPT2_VOCAB, PackedLoader, token_counts
from loss import ModelWithLoss, count_targets, head_agreement, mtp_targets, objective, step_coefficients
from model import Model, ModelConfig
from report import Metrics, announce, eta_s, eval_record, memory_report, peak_flops, per_head, train_record
from settings import check_attention_memory, lr_at, parse_config, parse_schedule, resolve_device, stage_at

# ----------------------------------------------------------------------------- hyperparameters
# The model's shape: every field of model.ModelConfig is a setting too (--n_embd=256, --n_predict=1); its
# defaults, set once there, are the model of `python train.py`.
# data
data = None  # None: the Python standard library; or a text file, a folder, a .jsonl, or a glob of files or .bin shards
val_fraction = 0.01  # fraction of documents held out for evaluation (at least one)
cache_dir = ""  # token cache folder for text sources; "" means data_cache/ beside data.py
# multi-token prediction: stages split by ';', each the head weights w_1,..,w_n, optionally '@' the fraction of
# max_iters it lasts (stages without one share the rest equally); a head of weight 0 (or not listed) is not
# computed. Default: head 1 alone for 90% of the run, then the 3 sequential depths too, detached (ModelConfig's
# mtp_detach: the trunk learns exactly as with 1 head) at 1/16 of the positions: 3.4% more time than 1 head buys
# drafters (README "What the extra heads buy")
mtp_schedule = "1@0.9;1,1,1,1"
mtp_sample = 0.0625  # fraction of each row's positions where heads 2..n learn (loss.sampled_columns); head 1 at all
mtp_own_lr = True  # heads 2..n: their own warmup and decay from the first stage that trains one (lr_at), not the tail
# optimizer
optimizer = "muon"  # "muon": Muon for the weight matrices (each expert its own), AdamW for the rest; or "adamw"
# (README "Muon or AdamW": 0.53 nats lower held-out loss than AdamW, each at its best of a sweep, same 240 steps)
learning_rate = 2.4e-2  # peak; Muon's best here (AdamW's was 6e-3: pass it with --optimizer=adamw)
min_lr_ratio = 0.1  # the schedule's floor, as a fraction of learning_rate
weight_decay = 0.1  # decoupled decay, on matrices only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 = off
bias_update_rate = 0.0  # DeepSeek-V3 aux-loss-free balancing step (0.001 in the paper); 0 = off
# schedule
max_iters = 240  # optimizer steps
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
overwrite = False  # let this run replace the checkpoints already in out_dir (another run's, or newer ones)
allow_world_size_change = False  # resume on another world size (the data stream is world-size invariant)
keep_last = 2  # checkpoints of this run kept besides the best by held-out next-token loss; 0 keeps all
max_skips = 3  # consecutive non-finite steps tolerated before stopping
stop_after = 0  # save and exit after this many steps of this process (for time-limited jobs); 0 = off
seed = 0
# system
device = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1"
dtype = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU; "float32"; "float64" for exactness tests
compile = torch.cuda.is_available()  # compile each block; off on CPU, where bench.py measured 1.00-1.08x
fsdp = False  # under torchrun: FSDP2 (shard parameters, gradients, optimizer state) instead of DDP

DEFAULTS = {**{k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
               and isinstance(v, (int, float, bool, str, type(None)))}, **asdict(ModelConfig())}
# What must match to resume: the model's shape, and what fixes the data stream and per-rank RNG.
RESUME_MUST_MATCH = checkpoint.MODEL_FIELDS + ["data_fingerprint", "val_fraction", "seed", "world_size", "optimizer"]


class UserError(Exception):
    """Something the user can fix (a setting, the data, out_dir, a checkpoint): one line, exit code 2."""


# ----------------------------------------------------------------------------- the run

def main(cfg):
    """cfg: the settings as a dict (settings.parse_config over DEFAULTS) -> exit code."""
    c = SimpleNamespace(**cfg)  # the settings, read-only from here on
    env, loader, raw_model, fwd, opt, ckpt = prepare(c)
    log, stages = env.log, env.stages
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum_steps * env.world
    stage_flops = [raw_model.flops_per_token(heads=[k for k, w in enumerate(ws) if w > 0], draft_rate=c.mtp_sample)
                   * tokens_per_step / env.world for _, ws in stages]  # model FLOPs of one step on one device each
    peak = peak_flops(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
    announce(c, env, raw_model, tokens_per_step)
    stop_requested = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: a closed terminal or ssh session
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))  # finish the step, save, exit 0
    metrics = Metrics(Path(c.out_dir) / "metrics.jsonl" if env.master else None, env.run_id, log)
    step = ckpt["step"] if ckpt else 0
    # the run's clock: elapsed_s continues the resumed run's (saved in its checkpoints)
    t_start = time.time() - (float(ckpt.get("elapsed_s", 0.0)) if ckpt else 0.0)
    metrics.emit(dict(event="resume" if step else "start", step=step, time=time.time(), world_size=env.world,
                      elapsed_s=time.time() - t_start), f"run {env.run_id}: "
                 + (f"resuming at step {step}" if step else "starting"))
    first_step, skips, last_saved, stage, eval_s = step, 0, step or None, None, None
    interval = dict(train_s=0.0, steps=0, tokens=0.0, flops=0.0)  # training since the last log line
    while step < c.max_iters:
        t0 = time.time()
        if stage != stage_at(step, stages):  # a new stage of the head schedule
            stage, model, heads, head_w = enter_stage(step, stage_at(step, stages), stage, fwd, c, env)
        lr, lr_drafters = lr_at(step, c), lr_at(step, c, env.drafters_from)
        for g in opt.param_groups:
            g["lr"] = (lr_drafters if g.get("drafters") else lr) * g["lr_ratio"]

        # 1. the step's batches, and N_k over the whole step (all micro-batches, all ranks) before any forward
        batches = [loader.next_batch() for _ in range(c.grad_accum_steps)]
        n_k = sum(count_targets(b, c.n_predict, c.mtp_sample) for b in batches)[heads].to(env.device)
        if env.distributed:
            dist.all_reduce(n_k)
        coef = step_coefficients(n_k, head_w, env.world)
        # 2. forward and backward of each micro-batch
        step_sums = forward_backward(model, batches, heads, coef, env.autocast)
        # 3. reduce (one small collective), then step, or skip the step on every rank alike
        grad_norm = clip_gradients(raw_model, c)
        step_sums["aux"] = step_sums["aux"] / env.world  # logged as the mean over micro-batches and ranks
        # a rank whose gradient is not finite (its norm) makes every rank skip: the replicas stay equal
        flags = dict(stop=torch.tensor([float(bool(stop_requested))], device=env.device),
                     bad=(~grad_norm.isfinite())[None])
        s = all_reduce_named(dict(**step_sums, **flags), env.distributed)
        loss = objective(s["sums"], s["counts"], head_w)
        finite, stop, any_target = torch.stack([torch.isfinite(loss) & (s["bad"][0] == 0), s["stop"][0] > 0,
                                                n_k.sum() > 0]).tolist()  # the step's one host sync
        stop = stop or step + 1 - first_step == c.stop_after
        skips = 0 if finite or not any_target else skips + 1
        if not any_target:
            log(f"step {step}: no valid target in the whole step, no optimizer step taken")
        elif not finite:
            log(f"warning: step {step}: non-finite loss {loss.item()} or grad norm {grad_norm.item()}, "
                f"optimizer step skipped ({skips}/{c.max_skips} consecutive)")
            if skips >= c.max_skips:
                log(f"stopping: {skips} consecutive non-finite steps; the last good checkpoint is {last_saved}")
                return 1
        else:
            opt.step()
            if c.bias_update_rate > 0:
                raw_model.update_expert_bias(s["load"].view(-1, c.n_experts), c.bias_update_rate)
        opt.zero_grad(set_to_none=True)
        step += 1
        if step - first_step == 1:
            log(memory_report(raw_model, opt))
        t_end = time.time()
        if not (c.compile and step - first_step == 1):  # a first compiled step's time is compiling: not a rate
            interval["tokens"] += s["real"]  # a tensor: read at log time, no extra sync per step
            interval["flops"] += stage_flops[stage]  # per device
            interval["steps"] += 1
            interval["train_s"] += t_end - t0

        # 4. log, evaluate, save
        if step % c.log_interval == 0 or step == c.max_iters:
            if env.device.type == "cuda":
                torch.cuda.synchronize()  # queued work belongs to this interval, not the next
                interval["train_s"] += time.time() - t_end
            eta = eta_s(step, interval, eval_s, c, stages, stage_flops, stage)
            metrics.emit(*train_record(step, stage, s, loss, grad_norm, lr, heads, interval,
                                       time.time() - t_start, eta, c, peak, tokens_per_step))
            interval.update(train_s=0.0, steps=0, tokens=0.0, flops=0.0)
        due = step % c.eval_interval == 0 or step == c.max_iters
        if due or stop:
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            t_eval, val = time.time(), None
            if due:
                val = evaluate(fwd, c, env, loader.corpus, stages[stage][1])
                metrics.emit(*eval_record(step, val, time.time() - t_start, c))
            try:
                if save(step, val, raw_model, opt, loader, c, env, time.time() - t_start):
                    last_saved = step
            except OSError as e:
                raise OSError(f"{e}; the last good checkpoint is {last_saved}") from None
            if due:
                eval_s = time.time() - t_eval
        if stop:
            log(f"stop requested: saved step {step}, exiting")
            break
    metrics.close()
    log(f"done: {step} steps in {time.time() - t_start:.0f}s of this run")
    return check_replicas(raw_model, c, env)


# ----------------------------------------------------------------------------- the step's pieces

def enter_stage(step, stage, old, fwd, c, env):
    """The module a step calls and its heads for a stage of the head schedule -> (stage, module, heads, head_w).
    DDP is rebuilt only when the set of heads changes (it needs every trainable parameter to get a gradient)."""
    weights = env.stages[stage][1]
    heads = [k for k, w in enumerate(weights) if w > 0]
    if old is None or heads != [k for k, w in enumerate(env.stages[old][1]) if w > 0]:
        env.module = parallel(fwd, heads, c, env)
    if len(env.stages) > 1:
        names = [k + 1 for k in heads]
        env.log(f"step {step}: stage {stage + 1}/{len(env.stages)} of the head schedule, heads {names}")
    head_w = torch.tensor([weights[k] for k in heads], device=env.device, dtype=torch.float64)
    return stage, env.module, heads, head_w


def grad_sync(model, last):
    """Reduce gradients on the last micro-batch only: DDP's no_sync(), FSDP2's set_requires_gradient_sync()."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def forward_backward(model, batches, heads, coef, autocast):
    """Forward and backward of every micro-batch of one step, with the step's coefficients -> the named sums
    of the step on this rank. No host sync (test_train.py counts them)."""
    tot = None
    for i, batch in enumerate(batches):
        with grad_sync(model, i == len(batches) - 1):
            with autocast:
                out = model(batch, heads=heads, grad_scale=coef)
            ((coef * out.sums).sum() + out.aux_loss / len(batches)).backward()
        piece = dict(sums=out.sums.detach(), counts=out.counts, aux=out.aux_loss.detach()[None] / len(batches),
                     real=batch["attention_mask"].sum()[None], load=out.expert_counts.detach().flatten())
        tot = piece if tot is None else {k: tot[k] + v for k, v in piece.items()}
    return tot


def clip_gradients(raw_model, c):
    """Clip the global gradient norm to grad_clip -> the norm before clipping. With mtp_detach the drafting heads
    (2..n) are clipped on their own: the trunk and head 1 then take exactly a 1-head model's step."""
    drafters = {id(p) for p in raw_model.drafter_parameters()} if c.mtp_detach else set()
    # parameters without a gradient (drafters before their stage) left out: torch's norm of none is a CPU tensor
    with_grad = [p for p in raw_model.parameters() if p.grad is not None]
    groups = [g for g in ([p for p in with_grad if (id(p) in drafters) == d] for d in (0, 1)) if g]
    norms = [full(torch.nn.utils.clip_grad_norm_(g, c.grad_clip or float("inf"))) for g in groups]
    return norms[0] if len(norms) == 1 else torch.stack(norms).norm()


def all_reduce_named(pieces, distributed):
    """Sum named tensors over ranks in one collective -> the same names, float64 (packed and split by name)."""
    flat = torch.cat([v.double().flatten() for v in pieces.values()])
    if distributed:
        dist.all_reduce(flat)
    return dict(zip(pieces, flat.split([v.numel() for v in pieces.values()])))


def full(t):
    """A DTensor (FSDP2's gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def evaluate(fwd, c, env, corpus, weights):
    """Held-out losses of every head, their accuracy and acceptance (loss.head_agreement), exact over the
    global evaluation set: sums and counts all-reduced, like the training losses."""
    fwd.eval()
    val = PackedLoader(c.data, "val", c.batch_size, c.seq_len, env.rank, env.world, 0, env.device, c.val_fraction,
                       corpus=corpus)  # a fresh loader: the same held-out rows every time
    n, tot = c.n_predict, None
    for _ in range(c.eval_iters * c.grad_accum_steps):
        batch = val.next_batch()
        with env.autocast:
            out = fwd(batch, predict=True)
        pieces = dict(sums=out.sums, counts=out.counts,
                      **head_agreement(out.preds, mtp_targets(batch["input_ids"], batch["doc_ids"], n)))
        tot = pieces if tot is None else {k: tot[k] + v for k, v in pieces.items()}
    fwd.train()
    s = all_reduce_named(tot, env.distributed)
    ratio = lambda a, b: [x / y if y else None for x, y in zip(s[a].tolist(), s[b].tolist())]  # noqa: E731
    losses = per_head(s["sums"], s["counts"], range(n), n)
    drafts = c.mtp_style != "shared"  # shared logits: every head's greedy token is head 1's, nothing drafts
    weights = torch.tensor(weights, dtype=torch.float64, device=s["sums"].device)
    return dict(val_loss=objective(s["sums"], s["counts"], weights).item(),
                val_nt_loss=losses[0], **{f"val_loss_h{k + 1}": v for k, v in enumerate(losses)},
                **{f"val_acc_h{k + 1}": v for k, v in enumerate(ratio("correct", "valid"))},
                **{f"val_accept_h{k + 2}": v if drafts else None for k, v in enumerate(ratio("accepted", "judged"))},
                val_tokens_per_forward=ratio("run", "positions")[0] if drafts else 1.0)


# ----------------------------------------------------------------------------- the end of the run

def check_replicas(raw_model, c, env):
    """A cheap end-of-run check that every replica holds the same weights (FSDP: the same expert biases; its
    weights are shards) -> exit code: diverged replicas are an error."""
    if not env.distributed:
        return 0
    tensors = list(raw_model.buffers() if c.fsdp else raw_model.parameters())
    fingerprint = torch.stack([sum(t.double().sum() for t in tensors), sum(t.double().square().sum() for t in tensors)])
    gathered = [torch.zeros_like(fingerprint) for _ in range(env.world)]
    dist.all_gather(gathered, fingerprint)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    env.log(f"replicas identical: {same}")
    if not same:
        env.log("error: the ranks' weights diverged; the checkpoints hold rank 0's")
    return 0 if same else 1


# ----------------------------------------------------------------------------- setting up

def prepare(c):
    """Everything a user can get wrong, in this order: settings, device, out_dir, data, checkpoint. A ValueError
    raised here is the user's (UserError); past this point a ValueError is a bug and keeps its traceback.
    -> (env, loader, raw_model, fwd, opt, checkpoint or None)"""
    env, started = None, False
    try:
        env = setup(c)
        ckpt = claim(c, env)
        random.seed(c.seed + env.rank)
        np.random.seed(c.seed + env.rank)
        loader = PackedLoader(c.data, "train", c.batch_size, c.seq_len, env.rank, env.world, c.seed, env.device,
                              c.val_fraction, c.cache_dir or None, quiet=not env.master)
        env.fingerprint = loader.corpus.fingerprint
        env.token_counts = token_counts(loader.corpus, loader.docs)  # saved in checkpoints: sample.py's shortlist
        longest = int(min(c.seq_len, loader.corpus.length[loader.docs].max()))
        for k in range(longest, c.n_predict + 1):
            env.log(f"warning: head {k} has no target: the longest training document has {longest} tokens "
                    "(with its EOTs)")
        raw_model, fwd, opt = build(c, env)
        if ckpt:
            restore(ckpt, raw_model, opt, loader, c, env)
        started = True
    except ValueError as e:
        raise UserError(str(e)) from None
    finally:
        if not started and getattr(env, "lock", None) is not None:  # a failed start leaves nothing its claim made
            checkpoint.release_out_dir(env.lock)
    return env, loader, raw_model, fwd, opt, ckpt


def check_config(c):
    """Every setting a user can get wrong, checked before anything runs or is written: ValueError naming it."""
    def need(ok, name, expected):
        if not ok:
            raise ValueError(f"{name}={getattr(c, name)!r}, expected {expected}")
    for k in ("batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "log_interval", "max_skips"):
        need(getattr(c, k) >= 1, k, ">= 1")
    for k in ("max_iters", "warmup_iters", "keep_last", "stop_after"):
        need(getattr(c, k) >= 0, k, ">= 0")
    need(c.max_iters < 10**9, "max_iters", "< 1e9")
    for k in ("grad_clip", "weight_decay", "aux_loss_coef", "z_loss_coef", "router_noise"):
        need(0 <= getattr(c, k) < math.inf, k, f"a finite {k} >= 0")
    need(0 <= c.bias_update_rate <= 1, "bias_update_rate", "0 <= bias_update_rate <= 1 (0.001 in DeepSeek-V3)")
    need(0 < c.learning_rate < math.inf, "learning_rate", "a finite learning_rate > 0")
    need(0 < c.val_fraction < 1, "val_fraction", "0 < val_fraction < 1")
    need(0 < c.rope_base < math.inf, "rope_base", "a finite rope_base > 0 (10000.0 by default)")
    need(0 <= c.seed < 2**32, "seed", "0 <= seed < 2**32")
    for k in ("min_lr_ratio", "decay_frac"):
        need(0 <= getattr(c, k) <= 1, k, f"0 <= {k} <= 1")
    for k in ("beta1", "beta2"):
        need(0 <= getattr(c, k) < 1, k, f"0 <= {k} < 1")
    choices = dict(lr_schedule=("cosine", "wsd"), init_from=("scratch", "resume"), dtype=("auto", "float32", "float64"),
                   optimizer=("adamw", "muon"))
    for k, allowed in choices.items():
        need(getattr(c, k) in allowed, k, f"one of {', '.join(map(repr, allowed))}")
    if c.resume_path and c.init_from != "resume":
        raise ValueError(f"resume_path={c.resume_path!r} given with init_from={c.init_from!r}: "
                         "add --init_from=resume to continue from it (a scratch run would overwrite it)")
    need(c.vocab_size >= GPT2_VOCAB, "vocab_size", f">= {GPT2_VOCAB} (GPT-2's tokens)")
    need(c.data != "", "data", "a path, a glob, or None for the default corpus")
    need(c.out_dir.strip() != "", "out_dir", "a folder name (an empty one would write into the current folder)")
    ModelConfig(**{k: getattr(c, k) for k in checkpoint.MODEL_FIELDS})  # the model's own checks
    parse_schedule(c.mtp_schedule, c.n_predict, c.max_iters)
    need(0 < c.mtp_sample <= 1, "mtp_sample", "0 < mtp_sample <= 1 (the fraction of positions where heads 2..n learn)")
    dev = resolve_device(c.device)
    need(not (c.attn_backend == "flex" and dev.type != "cuda"), "attn_backend",
         "'sdpa' or 'auto' on a CPU (FlexAttention runs on CUDA here)")


def setup(c):
    """Settings checked, device chosen, process group joined -> env: what every piece of the run reads (rank,
    world, local_rank, device, distributed, master, log, autocast, the head schedule)."""
    check_config(c)
    distributed = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                      ("LOCAL_RANK", 0)))
    device = resolve_device(c.device)
    if distributed and device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
    if c.fsdp and not distributed:
        raise ValueError("fsdp=True needs several processes: launch with torchrun --nproc_per_node=N")
    check_attention_memory(c.batch_size, c.seq_len, c.n_head, device, c.attn_backend)  # before the mask exists
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    bf16, stages = device.type == "cuda" and c.dtype == "auto", parse_schedule(c.mtp_schedule, c.n_predict, c.max_iters)
    # mtp_own_lr: the drafters' schedule starts at the first step that trains one of them
    drafters_from = min([start for start, ws in stages if any(ws[1:])] or [0]) if c.mtp_own_lr else 0
    return SimpleNamespace(rank=rank, world=world, local_rank=local_rank, device=device, distributed=distributed,
                           master=rank == 0, log=log, stages=stages, drafters_from=drafters_from,
                           autocast=torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext(),
                           run_id=secrets.token_hex(4), fingerprint=None, module=None)


def on_rank0(env, act):
    """act() on rank 0 only; every rank gets its result, or raises the ValueError / OSError it raised. The
    result must be small (it is pickled and broadcast)."""
    box = [None, None]  # [result, (error type, message)]
    if env.master:
        try:
            box[0] = act()
        except OSError as e:
            box[1] = ("OSError", e.strerror or str(e))
        except ValueError as e:
            box[1] = ("ValueError", str(e))
    if env.distributed:
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise (OSError if box[1][0] == "OSError" else ValueError)(box[1][1])
    return box[0]


def claim(c, env):
    """Rank 0 locks out_dir and applies its rules (checkpoint.claim_out_dir); every rank learns the outcome and
    loads the checkpoint to resume (a shared filesystem) -> that checkpoint or None. Sets env.run_id."""
    held = {}

    def act():
        held["lock"], resume, held["ckpt"] = checkpoint.claim_out_dir(c.out_dir, c.init_from, c.resume_path,
                                                                      c.overwrite, env.run_id)
        return str(resume) if resume else None
    path = on_rank0(env, act)
    env.lock = held.get("lock")  # held for the life of the process
    ckpt = held.get("ckpt") or (checkpoint.load_checkpoint(path) if path else None)
    if ckpt:
        env.run_id, env.resume_path = str(ckpt.get("run", env.run_id)), path
    return ckpt


def build(c, env):
    """The model (the same initial weights on every rank; blocks compiled; FSDP-sharded when asked), the module a
    step calls (model and loss: loss.ModelWithLoss) and the optimizer, built after sharding -> (raw_model, fwd, opt)."""
    torch.manual_seed(c.seed)
    raw_model = Model(ModelConfig(**{k: getattr(c, k) for k in checkpoint.MODEL_FIELDS}))
    raw_model.to(env.device, torch.float64 if c.dtype == "float64" else torch.float32)
    torch.manual_seed(c.seed + env.rank)  # dropout / router noise differ per rank
    if c.compile:
        raw_model.compile_blocks()
    fwd = ModelWithLoss(raw_model, c.mtp_sample)
    if c.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in list(raw_model.blocks) + list(raw_model.heads):
            fully_shard(block)  # each block its own unit; the root (embedding, norm, unembedding) last
        fully_shard(fwd)
    opt = muon.build_optimizer(raw_model, c.optimizer, c.learning_rate, c.weight_decay, (c.beta1, c.beta2),
                               ns_dtype="float64" if c.dtype == "float64" else "bfloat16",  # fused AdamW: no host sync
                               drafters=raw_model.drafter_parameters() if c.mtp_own_lr else ())
    return raw_model, fwd, opt


def parallel(fwd, heads, c, env):
    """The module a training step calls: DDP over the running heads' parameters, FSDP's root, or fwd itself."""
    if not env.distributed or c.fsdp:
        return fwd  # FSDP2 needs nothing per stage: a unit that does not run gathers and reduces nothing
    run = fwd.model.head_modules_run(heads)  # sequential: a depth runs, and learns, under every head above it
    for i, head in enumerate(fwd.model.heads):  # DDP requires every registered parameter to get a gradient
        head.requires_grad_(i in run)
    # Buffers are not broadcast: the expert biases are updated identically on every rank from all-reduced
    # counts (DDP still copies rank 0's once, here; they are equal anyway).
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync_buffers = {("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                        else "broadcast_buffers"): False}  # the keyword was renamed in torch 2.13
    return DDP(fwd, device_ids=[env.local_rank] if env.device.type == "cuda" else None, **no_sync_buffers)


def run_facts(c, env):
    """The settings and what this run adds to them: what a checkpoint records as its config."""
    return dict(vars(c), run=env.run_id, world_size=env.world, data_fingerprint=env.fingerprint)


def restore(ckpt, raw_model, opt, loader, c, env):
    """Refuse a checkpoint of another shape, data or seed (the differing fields named), then load it."""
    # a model field the checkpoint predates has the default, which keeps the behaviour of before it existed
    old = {"optimizer": "adamw", **asdict(checkpoint.model_config(ckpt["config"])), **ckpt["config"]}
    new, path = run_facts(c, env), env.resume_path
    allowed = {"world_size"} if c.allow_world_size_change else set()
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_MUST_MATCH
            if k not in allowed and old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"checkpoint {path} does not match this run: " + "; ".join(diff))
    # heads the schedule has not run yet have no optimizer state (drafters that join late); nothing else may lack it
    ran = set().union(*(raw_model.head_modules_run([k for k, w in enumerate(ws) if w > 0])
                        for start, ws in env.stages if start < ckpt["step"]))
    fresh = {n: p for n, p in raw_model.named_parameters() if n not in ckpt["optimizer"]["state"]}
    stateless = [n for n in fresh if not (n.startswith("heads.") and int(n.split(".")[1]) not in ran)]
    try:  # full state dicts: the same file serves one process, DDP and FSDP (each rank takes its shard)
        if stateless:
            raise KeyError(f"no optimizer state for {', '.join(stateless[:5])}")
        set_model_state_dict(raw_model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        names = {p: n for n, p in raw_model.named_parameters()}
        set_optimizer_state_dict(raw_model, opt, checkpoint.regroup_optimizer(ckpt["optimizer"], opt, names),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        for p in fresh.values():  # the loader gave them a state (a zero-lr step: AdamW's step count 1): none again
            opt.state.pop(p, None)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: its model or optimizer state does not fit "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    loader.load_state_dict(ckpt["loader"][env.rank % len(ckpt["loader"])])
    if len(ckpt["rng"]) == env.world:
        checkpoint.set_rng_state(ckpt["rng"][env.rank])
    env.log(f"resumed from {path} at step {ckpt['step']}")


def save(step, val, raw_model, opt, loader, c, env, elapsed):
    """Gather (a collective under FSDP) and write on rank 0 -> True if written, the same on every rank. Non-finite
    weights are never written; a fault of the machine (disk full) raises OSError on every rank."""
    full_sd = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(raw_model, options=full_sd)
    optim_sd = get_optimizer_state_dict(raw_model, opt, options=full_sd)
    loaders, rngs = [loader.state_dict()], [checkpoint.rng_state()]
    if env.distributed:
        loaders, rngs = [None] * env.world, [None] * env.world
        dist.all_gather_object(loaders, loader.state_dict())
        dist.all_gather_object(rngs, checkpoint.rng_state())

    def act():
        if not all(torch.isfinite(t).all() for t in model_sd.values() if t.is_floating_point()):
            env.log(f"step {step}: non-finite weights, checkpoint NOT written")
            return False
        state = dict(model=model_sd, optimizer=optim_sd, step=step, config=run_facts(c, env), run=env.run_id,
                     loader=loaders, rng=rngs, elapsed_s=elapsed, val_loss=val and val["val_loss"],
                     val_nt_loss=val and val["val_nt_loss"],
                     token_counts=getattr(env, "token_counts", None))  # unigram counts of the training split: sample.py
        env.log(f"saved {checkpoint.save_checkpoint(c.out_dir, step, state, c.keep_last)}")
        return True
    return on_rank0(env, act)


def cli(argv):
    """The command line: user errors are one line on stderr and exit code 2; machine faults (disk full) exit 1;
    anything else is a bug and shows its traceback."""
    code = 0
    try:
        try:
            cfg = parse_config(argv, DEFAULTS)
        except ValueError as e:
            raise UserError(str(e)) from None
        code = main(cfg)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank has it: said once
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:  # a fault of the machine, not of the user: exit 1
        print(f"error: {e.strerror + (f': {e.filename}' if e.filename else '') if e.strerror else e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:  # Ctrl-C before the loop's own handler is set (the token cache, a checkpoint load)
        if int(os.environ.get("RANK", 0)) == 0:  # every rank gets it: said once
            print(str(e) or "interrupted", file=sys.stderr)
        code = 130
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
        # skip interpreter teardown: gloo worker threads can abort it (pytorch PR 179291)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli(sys.argv[1:])
