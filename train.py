"""train.py: pretrain the MoE + multi-token-prediction model. A script, read top to bottom.

    python train.py                                   # CPU or one GPU, default corpus (Python stdlib)
    python train.py --max_iters=50 --n_embd=64        # override any constant below (or ModelConfig field)
    python train.py --config=configs/gpt2_small_moe.conf   # a file of `name = value` lines
    torchrun --standalone --nproc_per_node=8 train.py --config=configs/gpt2_small_moe.conf
    torchrun --standalone --nproc_per_node=8 train.py --config=... --fsdp=True   # shard past one GPU's memory
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 train.py --config=...    # the same on node 1 with --node_rank=1

The objective of one optimizer step over all micro-batches m of all ranks r (DESIGN.md):

    loss = sum_k w_k * (sum_{m,r} sums_k(m, r)) / N_k + mean over micro-batches of the aux loss

N_k, the number of valid head-k targets in the whole step, is counted from the batches before the first
forward and all-reduced once, so every micro-batch backpropagates world_size * sum_k w_k sums_k / N_k
(DDP and FSDP average gradients over ranks). The gradient then does not depend on how the global batch is
cut into micro-batches or ranks, nor on padding. w_k come from the head schedule (mtp_schedule); a head of
weight 0 is not computed. What is logged is this objective, reduced over the step.

out_dir belongs to one run (README, "Checkpoints and faults"): a lock for the life of the run; a scratch
run refuses a folder holding checkpoints, and a resume one holding another run's or newer checkpoints,
unless --overwrite=True; pruning removes only this run's older checkpoints, never the newest or the best.
"""
import ast
import difflib
import errno
import fcntl
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from data import GPT2_VOCAB, PackedLoader
from loss import ModelWithLoss, count_targets, head_agreement, mtp_targets, objective, step_coefficients
from model import Model, ModelConfig

# ----------------------------------------------------------------------------- hyperparameters
# The model's shape: every field of model.ModelConfig is a setting too (--n_embd=256, --n_predict=1); its
# defaults, set once there, are the model of `python train.py`.
# data
data = None  # None: the Python standard library; or a text file, a folder, a .jsonl, or a glob of files or .bin shards
val_fraction = 0.01  # fraction of documents held out for evaluation (at least one)
cache_dir = ""  # token cache folder for text sources; "" means data_cache/ beside data.py
# multi-token prediction
# head weights w_1,..,w_n of each stage; stages split by ';' share max_iters equally; a head of weight 0 (or not
# listed) is not computed. Default: 4 heads with halving weights for the first tenth of the run, then head 1 alone
# (README "What the extra heads buy": at this size the heads cost next-token loss; this keeps the drafters)
mtp_schedule = "1,.5,.25,.125;1;1;1;1;1;1;1;1;1"
# optimizer
learning_rate = 3e-3  # peak learning rate
min_lr_ratio = 0.1  # the schedule's floor, as a fraction of learning_rate
weight_decay = 0.1  # AdamW decay, on matrices only
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

MODEL_FIELDS = [f.name for f in fields(ModelConfig)]
DEFAULTS = {**{k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
               and isinstance(v, (int, float, bool, str, type(None)))}, **asdict(ModelConfig())}
# What must match to resume: the model's shape, and what fixes the data stream and per-rank RNG.
RESUME_MUST_MATCH = MODEL_FIELDS + ["data_fingerprint", "val_fraction", "seed", "world_size"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12}  # dense bf16 FLOP/s of one device


# ----------------------------------------------------------------------------- settings

def parse_value(name, text, where, defaults):
    """Parse an override as a Python literal and check it against the default's type. Nothing is eval'd."""
    if name not in defaults:
        close = [k for k in defaults if k.startswith(name)][:3] or difflib.get_close_matches(name, defaults, n=3)
        raise ValueError(f"{where}: unknown setting {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    default = defaults[name]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # a string setting takes the text as written: --mtp_schedule=1,.5 is "1,.5", not a tuple
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
            try:
                lines = Path(text).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"--config={text}: cannot read it ({e.strerror or e})") from None
            for i, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    key, _, val = line.partition("=")
                    cfg[key.strip()] = parse_value(key.strip(), val.strip(), f"{text}:{i}", defaults)
        else:
            cfg[name] = parse_value(name, text, "command line", defaults)
    return cfg


def parse_schedule(text, n_predict):
    """mtp_schedule -> list of stages, each a tuple of n_predict head weights (0 for a head not listed; weights of
    heads beyond n_predict are dropped, so --n_predict=1 works with any schedule: main() says so)."""
    stages = []
    for stage in text.split(";"):
        try:
            w = [float(x) for x in stage.split(",")]
        except ValueError:
            w = []
        if not w or not all(math.isfinite(x) and x >= 0 for x in w) or w[0] <= 0:
            raise ValueError(f"mtp_schedule={text!r}: stage {stage!r}, expected comma-separated head weights >= 0, "
                             f"head 1's > 0 (e.g. '1,1,1,1;1,.5;1')")
        stages.append((tuple(w) + (0.0,) * n_predict)[:n_predict])
    return stages


def check_config(cfg):
    """Every setting a user can get wrong, checked before anything runs: ValueError naming it."""
    positive = ["batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "log_interval", "max_skips"]
    non_negative = ["max_iters", "warmup_iters", "keep_last", "stop_after", "grad_clip", "weight_decay",
                    "bias_update_rate"]
    for k in positive:
        if cfg[k] < 1:
            raise ValueError(f"{k}={cfg[k]}, expected >= 1")
    for k in non_negative:
        if not cfg[k] >= 0:
            raise ValueError(f"{k}={cfg[k]}, expected >= 0")
    for k, lo, hi in (("val_fraction", 0, 1), ("learning_rate", 0, math.inf)):
        if not lo < cfg[k] < hi:
            raise ValueError(f"{k}={cfg[k]}, expected {lo} < {k} < {hi}")
    for k in ("min_lr_ratio", "decay_frac", "beta1", "beta2"):
        if not 0 <= cfg[k] <= 1:
            raise ValueError(f"{k}={cfg[k]}, expected 0 <= {k} <= 1")
    choices = dict(lr_schedule=("cosine", "wsd"), init_from=("scratch", "resume"), dtype=("auto", "float32", "float64"))
    for k, allowed in choices.items():
        if cfg[k] not in allowed:
            raise ValueError(f"{k}={cfg[k]!r}, expected one of {', '.join(map(repr, allowed))}")
    if cfg["resume_path"] and cfg["init_from"] != "resume":
        raise ValueError(f"resume_path={cfg['resume_path']!r} given with init_from={cfg['init_from']!r}: "
                         "add --init_from=resume to continue from it (a scratch run would overwrite it)")
    if cfg["vocab_size"] < GPT2_VOCAB:
        raise ValueError(f"vocab_size={cfg['vocab_size']}, expected >= {GPT2_VOCAB} (GPT-2's tokens)")
    if cfg["data"] == "":
        raise ValueError("data='': expected a path, a glob, or None for the default corpus")
    ModelConfig(**{k: cfg[k] for k in MODEL_FIELDS})  # the model's own checks
    parse_schedule(cfg["mtp_schedule"], cfg["n_predict"])
    resolve_device(cfg["device"])


def resolve_device(name):
    """'auto', 'cpu', 'cuda', 'cuda:N' -> torch.device, or ValueError when this machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}, expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def attention_bytes(batch_size, seq_len, n_head, device, backend):
    """Memory the dense-mask attention path needs at once: the (B, 1, T, T) boolean mask and, in case SDPA
    falls back to its math kernel, the (B, H, T, T) float32 scores. FlexAttention's BlockMask is small."""
    if backend == "flex" or (backend == "auto" and device.type == "cuda"):
        return 0
    return batch_size * seq_len ** 2 * (1 + 4 * n_head)


def peak_flops(device_name):
    """Dense bf16 FLOP/s of one device, by whole words of its name ("NVIDIA L40S" is not an "L4"), or None."""
    return next((v for k, v in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0]))
                 if re.search(rf"(?<![\w-]){re.escape(k)}(?![\w])", device_name)), None)


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return math.inf


# ----------------------------------------------------------------------------- checkpoints

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, write, before_rename=None):
    """write(f) into a temporary file in the same folder, fsync, (before_rename(tmp)), rename: a crash or a full
    disk leaves the old file and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename:
            before_rename(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(path.parent).free < 2**20:
            raise OSError(errno.ENOSPC, f"disk full writing {path} (the previous files are intact)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path):
    """Raise ValueError naming the file if it is missing, truncated or corrupted (sha256 mismatch)."""
    path = Path(path)
    side = path.with_suffix(".pt.sha256")
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    if not side.is_file():
        raise ValueError(f"checkpoint {path}: no checksum file {side.name}; refusing an unverified checkpoint")
    words = side.read_text(errors="replace").split()
    if not words or not re.fullmatch(r"[0-9a-f]{64}", words[0]):
        raise ValueError(f"checkpoint {path}: checksum file {side.name} is empty or garbled; refusing it")
    actual = sha256_file(path)
    if words[0] != actual:
        raise ValueError(f"checkpoint {path}: sha256 {actual}, expected {words[0]} (truncated or corrupted)")


def load_checkpoint(path, mmap=False):
    verify_checkpoint(path)
    try:  # weights_only: tensors and plain containers only, no code can run while loading
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:  # not MemoryError, OSError
        raise ValueError(f"checkpoint {path}: cannot be loaded safely ({type(e).__name__}: {e})") from None


def set_aside(path, why):
    """A checkpoint that fails verification leaves the index and the ckpt_* names, kept for inspection."""
    for p in (path, path.with_suffix(".pt.sha256")):
        if p.exists():
            os.replace(p, p.with_name(p.name + ".damaged"))
    print(f"warning: {why}; renamed to {path.name}.damaged", file=sys.stderr)


def read_index(out):
    """checkpoints.json: {file: {step, run, val_nt_loss}} of the good checkpoints of out. A cache of what is on
    disk: entries whose file is gone are dropped, files it does not list are verified and added (or set aside),
    and a garbled index is rebuilt from the verified files (said once)."""
    out, note = Path(out), None
    try:
        entries = json.loads((out / "checkpoints.json").read_text())["checkpoints"]
        assert all(isinstance(e["step"], int) and isinstance(e["run"], str) for e in entries.values())
    except FileNotFoundError:
        entries = {}
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError, OSError):
        entries, note = {}, f"note: {out / 'checkpoints.json'} is damaged; rebuilding it from the verified checkpoints"
    entries = {name: e for name, e in entries.items() if (out / name).is_file()}
    for path in sorted(out.glob("ckpt_*.pt")):
        if path.name not in entries:
            try:
                ckpt = load_checkpoint(path, mmap=True)
                entries[path.name] = dict(step=int(ckpt["step"]), run=str(ckpt.get("run", "")),
                                          val_nt_loss=ckpt.get("val_nt_loss"))
            except (ValueError, KeyError, TypeError) as e:
                set_aside(path, e)
    if note:
        print(note, file=sys.stderr)
    return entries


def write_index(out, entries):
    best = min((n for n, e in entries.items() if e.get("val_nt_loss") is not None), default=None,
               key=lambda n: entries[n]["val_nt_loss"])
    latest = max(entries, default=None, key=lambda n: entries[n]["step"])
    index = dict(latest=latest, best=best, checkpoints=entries)
    write_atomic(Path(out) / "checkpoints.json", lambda f: f.write(json.dumps(index, indent=1).encode()))


def save_checkpoint(out, step, state, keep):
    """Write ckpt_{step}.pt and its .sha256, index it, then prune this run's older checkpoints to the newest
    `keep` (0: all) plus the best by val_nt_loss. Never removes a file the index does not vouch for."""
    out, run = Path(out), state["run"]
    path = out / f"ckpt_{step:07d}.pt"

    def checksum(tmp):  # the sidecar first: a file named ckpt_* always has one (a kill between leaves an orphan sidecar)
        digest = sha256_file(tmp)
        write_atomic(path.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    write_atomic(path, lambda f: torch.save(state, f), before_rename=checksum)
    entries = read_index(out)
    entries[path.name] = dict(step=step, run=run, val_nt_loss=state.get("val_nt_loss"))
    mine = sorted((n for n, e in entries.items() if e["run"] == run), key=lambda n: entries[n]["step"])
    best = min((n for n in mine if entries[n]["val_nt_loss"] is not None), default=None,
               key=lambda n: entries[n]["val_nt_loss"])
    doomed = [n for n in mine[:-keep] if n not in (best, path.name)] if keep > 0 else []
    for name in doomed:
        del entries[name]
    write_index(out, entries)  # before deleting: the index never names a missing file
    for name in doomed:
        (out / name).unlink(missing_ok=True)
        (out / name).with_suffix(".pt.sha256").unlink(missing_ok=True)
    return path


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


def lock_out_dir(out, run):
    """An exclusive lock on out_dir for the life of this process (released by the OS when it ends)."""
    fd = os.open(out / "train.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"out_dir {out} is in use by {holder}; wait for it, or use another out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"run {run}, pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
    return fd


def claim_out_dir(c, run):
    """Rank 0, before anything is written: lock out_dir and apply the rules that keep checkpoints safe.
    -> (lock fd, path of the checkpoint to resume or None, that checkpoint loaded or None)."""
    out = Path(c.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={c.out_dir!r} is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    fd = lock_out_dir(out, run)
    for tmp in out.glob(".tmp-*"):  # left by a save killed midway (kill -9): nobody else writes here now
        if tmp.is_file():
            tmp.unlink()
    entries, files = read_index(out), sorted(out.glob("ckpt_*.pt"))
    if c.init_from == "scratch":
        doomed, why = files, "holds checkpoints of an earlier run"
        resume, ckpt = None, None
    else:
        resume, ckpt = find_resume(out, c.resume_path)
        mine, step = str(ckpt.get("run", "")), int(ckpt["step"])
        doomed, why = [], f"holds checkpoints of another run or newer than {resume.name} (step {step})"
        for name, e in list(entries.items()):
            if (e["run"] != mine or e["step"] > step) and (out / name).resolve() != resume.resolve():
                try:  # only a good checkpoint stands in the way; a damaged one leaves the index
                    verify_checkpoint(out / name)
                    doomed.append(out / name)
                except ValueError as err:
                    set_aside(out / name, err)
                    del entries[name]
    write_index(out, entries)  # the index as the disk is now (damaged files set aside)
    if doomed and not c.overwrite:
        raise ValueError(f"out_dir {out} {why} ({', '.join(p.name for p in doomed[:4])}"
                         f"{', ...' if len(doomed) > 4 else ''}): this run would overwrite them. "
                         "Use another out_dir, or --overwrite=True to replace them")
    if doomed:
        for p in doomed:
            entries.pop(p.name, None)
        write_index(out, entries)  # before deleting: the index never names a missing file
        for p in doomed:
            p.unlink(missing_ok=True)
            p.with_suffix(".pt.sha256").unlink(missing_ok=True)
        print(f"overwrite: removed {len(doomed)} checkpoint(s) from {out}", file=sys.stderr)
    return fd, resume, ckpt


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


# ----------------------------------------------------------------------------- the step's pieces

def lr_at(step, c):
    """Linear warmup, then cosine (or warmup-stable-decay) down to learning_rate * min_lr_ratio, which the
    last step (max_iters - 1) reaches exactly."""
    if step < c.warmup_iters:
        return c.learning_rate * (step + 1) / c.warmup_iters
    floor = c.learning_rate * c.min_lr_ratio
    if c.lr_schedule == "wsd":  # decay over the steps decay_start .. max_iters - 1
        decay_start = max(c.warmup_iters, round(c.max_iters * (1 - c.decay_frac)))
        frac = max(0.0, (step + 1 - decay_start) / max(1, c.max_iters - decay_start))
        return c.learning_rate - (c.learning_rate - floor) * min(frac, 1.0)
    frac = (step + 1 - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters)
    return floor + 0.5 * (c.learning_rate - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


def stage_at(step, stages, max_iters):
    return min(len(stages) - 1, step * len(stages) // max(1, max_iters))


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


def all_reduce_named(pieces, distributed):
    """Sum named tensors over ranks in one collective -> the same names, float64 (STYLE 15)."""
    flat = torch.cat([v.double().flatten() for v in pieces.values()])
    if distributed:
        dist.all_reduce(flat)
    return dict(zip(pieces, flat.split([v.numel() for v in pieces.values()])))


def full(t):
    """A DTensor (FSDP2's gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def per_head(sums, counts, heads, n):
    """[loss of head k or None] for k = 1..n: None where the head did not run or had no target."""
    out = [None] * n
    for h, s, cnt in zip(heads, sums.tolist(), counts.tolist()):
        out[h] = s / cnt if cnt else None
    return out


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
    ratio = lambda a, b: [x / y if y else None for x, y in zip(s[a].tolist(), s[b].tolist())]
    losses = per_head(s["sums"], s["counts"], range(n), n)
    weights = torch.tensor(weights, dtype=torch.float64, device=s["sums"].device)
    rec = dict(val_loss=objective(s["sums"], s["counts"], weights).item(),
               val_nt_loss=losses[0], **{f"val_loss_h{k + 1}": v for k, v in enumerate(losses)},
               **{f"val_acc_h{k + 1}": v for k, v in enumerate(ratio("correct", "valid"))},
               **{f"val_accept_h{k + 2}": v for k, v in enumerate(ratio("accepted", "judged"))},
               val_tokens_per_forward=ratio("run", "positions")[0])
    return rec


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------- the run's pieces

def setup(cfg):
    """Settings checked, device chosen, process group joined -> (c, env). env holds what every piece of the run
    reads: rank, world, local_rank, device, distributed, master, log, autocast."""
    check_config(cfg)
    c = SimpleNamespace(**cfg)  # attribute access: c.learning_rate
    distributed = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = resolve_device(c.device)
    if distributed and device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
    if c.fsdp and not distributed:
        raise ValueError("fsdp=True needs several processes: launch with torchrun --nproc_per_node=N")
    need, have = attention_bytes(c.batch_size, c.seq_len, c.n_head, device, c.attn_backend), available_bytes(device)
    if need > have:  # checked before the mask is allocated
        raise ValueError(f"seq_len={c.seq_len} with batch_size={c.batch_size} needs {need / 2**30:.1f} GiB for the "
                         f"dense attention mask and scores, and {device} has {have / 2**30:.1f} GiB available: "
                         "lower seq_len or batch_size")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    cfg["world_size"] = world
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and c.dtype == "auto" else nullcontext()
    return c, SimpleNamespace(rank=rank, world=world, local_rank=local_rank, device=device, distributed=distributed,
                              master=rank == 0, log=log, autocast=autocast)


def claim(c, env):
    """Rank 0 locks out_dir and applies its rules (claim_out_dir); every rank learns the outcome and loads the
    checkpoint to resume (a shared filesystem) -> (run id, checkpoint or None, its path, the lock)."""
    run, lock, ckpt, decided = secrets.token_hex(4), None, None, [None, None]  # [error, checkpoint path]
    if env.master:
        try:
            lock, resume, ckpt = claim_out_dir(c, run)  # rank 0 has loaded the checkpoint already
            decided[1] = str(resume) if resume else None
        except ValueError as e:
            decided[0] = str(e)
    if env.distributed:
        dist.broadcast_object_list(decided, src=0)
    if decided[0]:
        raise ValueError(decided[0])
    if decided[1] and ckpt is None:
        ckpt = load_checkpoint(decided[1])
    return (str(ckpt.get("run", run)) if ckpt else run), ckpt, decided[1], lock


def build(c, cfg, env):
    """The model (the same initial weights on every rank; blocks compiled; FSDP-sharded when asked), the module
    a step calls (model and loss: loss.ModelWithLoss) and AdamW, built after sharding -> (raw_model, fwd, opt)."""
    torch.manual_seed(c.seed)
    raw_model = Model(ModelConfig(**{k: cfg[k] for k in MODEL_FIELDS}))
    raw_model.to(env.device, torch.float64 if c.dtype == "float64" else torch.float32)
    torch.manual_seed(c.seed + env.rank)  # dropout / router noise differ per rank
    if c.compile:
        raw_model.compile_blocks()
    fwd = ModelWithLoss(raw_model)
    if c.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in list(raw_model.blocks) + list(raw_model.heads):
            fully_shard(block)  # each block its own unit; the root (embedding, norm, unembedding) last
        fully_shard(fwd)
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.learning_rate, betas=(c.beta1, c.beta2), fused=True)  # fused: no host sync
    return raw_model, fwd, opt


def parallel(fwd, heads, c, env):
    """The module a training step calls: DDP over the running heads' parameters, FSDP's root, or fwd itself."""
    if not env.distributed or c.fsdp:
        return fwd  # FSDP2 needs nothing per stage: a unit that does not run gathers and reduces nothing
    for i, head in enumerate(fwd.model.heads):  # DDP requires every registered parameter to get a gradient
        head.requires_grad_(i in heads)
    # Buffers are not broadcast: the expert biases are updated identically on every rank from all-reduced
    # counts (DDP still copies rank 0's once, here; they are equal anyway).
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync_buffers = {("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                        else "broadcast_buffers"): False}  # the keyword was renamed in torch 2.13
    return DDP(fwd, device_ids=[env.local_rank] if env.device.type == "cuda" else None, **no_sync_buffers)


def restore(ckpt, path, raw_model, opt, loader, cfg, c, env):
    """Refuse a checkpoint of another shape, data or seed (the differing fields named), then load it -> step."""
    old = ckpt["config"]
    allowed = {"world_size"} if c.allow_world_size_change else set()
    diff = [f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in RESUME_MUST_MATCH if k not in allowed and old.get(k) != cfg.get(k)]
    if diff:
        raise ValueError(f"checkpoint {path} does not match this run: " + "; ".join(diff))
    try:  # full state dicts: the same file serves one process, DDP and FSDP (each rank takes its shard)
        set_model_state_dict(raw_model, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(raw_model, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: its model or optimizer state does not fit "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    loader.load_state_dict(ckpt["loader"][env.rank % len(ckpt["loader"])])
    if len(ckpt["rng"]) == env.world:
        set_rng_state(ckpt["rng"][env.rank])
    env.log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def save(step, val, raw_model, opt, loader, cfg, c, env):
    """Gather (a collective under FSDP) and write on rank 0 -> True if written, the same on every rank. Non-finite
    weights are never written; a fault of the machine (disk full) raises OSError on every rank."""
    full_sd = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(raw_model, options=full_sd)
    optim_sd = get_optimizer_state_dict(raw_model, opt, options=full_sd)
    loaders, rngs = [loader.state_dict()], [rng_state()]
    if env.distributed:
        loaders, rngs = [None] * env.world, [None] * env.world
        dist.all_gather_object(loaders, loader.state_dict())
        dist.all_gather_object(rngs, rng_state())
    result = [False, None]  # [written, error]
    if env.master:
        if not all(torch.isfinite(t).all() for t in model_sd.values() if t.is_floating_point()):
            env.log(f"step {step}: non-finite weights, checkpoint NOT written")
        else:
            state = dict(model=model_sd, optimizer=optim_sd, step=step, config=cfg, run=cfg["run"], loader=loaders,
                         rng=rngs, val_loss=val and val["val_loss"], val_nt_loss=val and val["val_nt_loss"])
            try:
                env.log(f"saved {save_checkpoint(c.out_dir, step, state, c.keep_last)}")
                result[0] = True
            except OSError as e:
                result[1] = e.strerror or str(e)
    if env.distributed:
        dist.broadcast_object_list(result, src=0)
    if result[1]:
        raise OSError(result[1])
    return result[0]


def train_record(step, stage, s, loss, grad_norm, lr, heads, interval, elapsed, eta, c, peak, tokens_per_step):
    """The log line of a step and its metrics.jsonl record, from the step's reduced sums (read here: a sync)."""
    dt = max(interval["train_s"], 1e-9)  # training time only: evaluations and checkpoints excluded
    load = s["load"].view(-1, c.n_experts)
    losses = per_head(s["sums"], s["counts"], heads, c.n_predict)
    flops = interval["flops"] / dt
    rec = dict(step=step, stage=stage + 1, loss=loss.item(), nt_loss=losses[0],
               **{f"loss_h{k + 1}": v for k, v in enumerate(losses)}, aux_loss=s["aux"].item(), grad_norm=grad_norm.item(),
               lr=lr, tokens_per_s=float(interval["tokens"]) / dt, flops_per_s=flops, mfu=flops / peak if peak else None,
               pad_frac=1 - s["real"].item() / tokens_per_step,
               expert_load=(load.max(1).values / load.mean(1).clamp(min=1)).max().item() if len(load) else 1.0,
               elapsed_s=elapsed, eta_s=eta)
    heads_txt = " ".join(f"h{k + 1} {v:.3f}" for k, v in enumerate(losses) if v is not None)
    line = (f"step {step:5d} | loss {rec['loss']:.4f} | nt_loss {fmt(losses[0], '.4f')} ({heads_txt}) | "
            f"aux {rec['aux_loss']:.4f} | gnorm {rec['grad_norm']:.2f} | lr {lr:.2e} | {rec['tokens_per_s']:.0f} tok/s | "
            f"{flops / 1e9:.1f} GFLOP/s per device" + (f" ({100 * rec['mfu']:.1f}% MFU)" if peak else "")
            + f" | load {rec['expert_load']:.2f} | pad {100 * rec['pad_frac']:.2f}% | {rec['elapsed_s']:.0f}s, ETA {eta:.0f}s")
    return rec, line


def local_bytes(t):
    """Bytes this rank holds for t: the local shard of a DTensor."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- the run

class UserError(Exception):
    """Something the user can fix (a setting, the data, out_dir, a checkpoint): one line, exit code 2."""


def prepare(cfg):
    """Everything a user can get wrong, in this order: settings, device, out_dir, data, checkpoint. A ValueError
    raised here is the user's (UserError); past this point a ValueError is a bug and keeps its traceback.
    -> (c, env, run, lock, loader, raw_model, fwd, opt, step)"""
    try:
        c, env = setup(cfg)
        run, ckpt, ckpt_path, lock = claim(c, env)
        cfg["run"] = run
        random.seed(c.seed + env.rank)
        np.random.seed(c.seed + env.rank)
        loader = PackedLoader(c.data, "train", c.batch_size, c.seq_len, env.rank, env.world, c.seed, env.device,
                              c.val_fraction, c.cache_dir or None, quiet=not env.master)
        cfg["data_fingerprint"] = loader.corpus.fingerprint
        longest = int(min(c.seq_len, loader.corpus.length[loader.docs].max()))
        for k in range(longest, c.n_predict + 1):
            env.log(f"warning: head {k} has no target: the longest training document has {longest} tokens (with its EOTs)")
        raw_model, fwd, opt = build(c, cfg, env)
        step = restore(ckpt, ckpt_path, raw_model, opt, loader, cfg, c, env) if ckpt else 0
    except ValueError as e:
        raise UserError(str(e)) from None
    return c, env, run, lock, loader, raw_model, fwd, opt, step


def main(cfg):
    c, env, run, lock, loader, raw_model, fwd, opt, step = prepare(cfg)
    stages, log = parse_schedule(c.mtp_schedule, c.n_predict), env.log
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum_steps * env.world
    stage_flops = [raw_model.flops_per_token(n_heads=sum(w > 0 for w in ws)) * tokens_per_step / env.world
                   for ws in stages]  # model FLOPs of one step on one device, per stage
    # an evaluation, for the ETA until one is timed: eval_iters global batches forward only, every head, priced at
    # 2/3 of a training step, not 1/3: the loss's softmax pass, not its FLOPs, dominates a forward (measured on the
    # CPU: 7.1-7.7 s per evaluation of the default run, 0.7-0.8 of 4 training steps with every head)
    eval_flops = raw_model.flops_per_token() * 2 / 3 * c.eval_iters * tokens_per_step / env.world
    listed = max(len(stage.split(",")) for stage in c.mtp_schedule.split(";"))
    if listed > c.n_predict:
        log(f"note: mtp_schedule={c.mtp_schedule!r} weighs {listed} heads; the model has n_predict={c.n_predict}, "
            f"so the weights of heads {c.n_predict + 1}..{listed} are not used")
    peak = peak_flops(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
    n_total, n_active = raw_model.param_counts()
    log(f"config: {json.dumps(cfg)}")
    log(f"parameters: {n_total / 1e6:.2f}M total, {n_active / 1e6:.2f}M active per token; "
        f"{raw_model.flops_per_token() / 1e6:.1f} MFLOP per token (training, all heads)")
    log(f"tokens per step: {tokens_per_step} = batch_size {c.batch_size} x seq_len {c.seq_len} x grad_accum_steps "
        f"{c.grad_accum_steps} x world_size {env.world}; device {env.device}, compile {c.compile}, "
        f"{'FSDP2' if c.fsdp else 'DDP' if env.distributed else 'one process'}")
    if len(stages) > 1 or any(w != 1 for w in stages[0]):
        log("head schedule: " + "; ".join(f"steps {math.ceil(i * c.max_iters / len(stages))}+: w = {list(w)}"
                                          for i, w in enumerate(stages)))
    stop_requested = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: a closed terminal or ssh session
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))  # finish the step, save, exit 0
    metrics = open(Path(c.out_dir) / "metrics.jsonl", "a") if env.master else None

    def emit(record, line):
        log(line)
        if metrics:
            metrics.write(json.dumps(dict(run=run, **record)) + "\n")
            metrics.flush()

    emit(dict(event="resume" if step else "start", step=step, time=time.time(), world_size=env.world),
         f"run {run}: {'resuming at step ' + str(step) if step else 'starting'}")
    first_step, skips, last_saved, stage, eval_s = step, 0, step or None, None, []
    t_start, interval = time.time(), dict(train_s=0.0, tokens=0.0, flops=0.0)  # training since the last log
    while step < c.max_iters:
        t0 = time.time()
        if stage != stage_at(step, stages, c.max_iters):  # a new stage of the head schedule
            stage = stage_at(step, stages, c.max_iters)
            heads = [k for k, w in enumerate(stages[stage]) if w > 0]
            model = parallel(fwd, heads, c, env)
            head_w = torch.tensor([stages[stage][k] for k in heads], device=env.device, dtype=torch.float64)
            if len(stages) > 1:
                log(f"step {step}: stage {stage + 1}/{len(stages)} of the head schedule, heads {[k + 1 for k in heads]}")
        lr = lr_at(step, c)
        for g in opt.param_groups:
            g["lr"] = lr

        # 1. the step's batches, and N_k over the whole step (all micro-batches, all ranks) before any forward
        batches = [loader.next_batch() for _ in range(c.grad_accum_steps)]
        n_k = sum(count_targets(b, c.n_predict) for b in batches)[heads].to(env.device)
        if env.distributed:
            dist.all_reduce(n_k)
        coef = step_coefficients(n_k, head_w, env.world)
        # 2. forward and backward of each micro-batch
        step_sums = forward_backward(model, batches, heads, coef, env.autocast)
        # 3. reduce (one small collective), then step, or skip the step on every rank alike
        grad_norm = full(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip or float("inf")))
        step_sums["aux"] = step_sums["aux"] / env.world  # logged as the mean over micro-batches and ranks
        s = all_reduce_named(dict(**step_sums, stop=torch.tensor([float(bool(stop_requested))], device=env.device)), env.distributed)
        loss = objective(s["sums"], s["counts"], head_w)
        finite, stop, any_target = torch.stack([torch.isfinite(loss) & torch.isfinite(grad_norm), s["stop"][0] > 0,
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
        if step - first_step == 1:  # measured on this rank's tensors (FSDP: the local shards)
            pb = sum(local_bytes(p) for p in raw_model.parameters())
            ob = sum(local_bytes(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
            log(f"memory per rank: parameters {pb / 2**20:.2f} MiB + optimizer state {ob / 2**20:.2f} MiB")
        interval["tokens"] += s["real"]  # tensors: read at log time, no extra sync per step
        interval["flops"] += stage_flops[stage]  # per device
        t_end = time.time()
        interval["train_s"] += t_end - t0

        # 4. log, evaluate, save
        if step % c.log_interval == 0 or step == c.max_iters:
            if env.device.type == "cuda":
                torch.cuda.synchronize()  # queued work belongs to this interval, not the next
                interval["train_s"] += time.time() - t_end
            # ETA: the FLOPs left (the stages of a head schedule cost differently) at this process's own FLOP/s,
            # plus the evaluations left at the measured cost of one (before the first, its FLOPs at that rate)
            sec_per_flop = interval["train_s"] / interval["flops"]
            flops_left = sum(stage_flops[stage_at(t, stages, c.max_iters)] for t in range(step, c.max_iters))
            evals_left = sum(1 for t in range(step, c.max_iters + 1) if t % c.eval_interval == 0 or t == c.max_iters)
            eta = (flops_left * sec_per_flop
                   + evals_left * (sum(eval_s) / len(eval_s) if eval_s else eval_flops * sec_per_flop))
            emit(*train_record(step, stage, s, loss, grad_norm, lr, heads, interval, time.time() - t_start, eta, c, peak,
                               tokens_per_step))
            interval.update(train_s=0.0, tokens=0.0, flops=0.0)
        due = step % c.eval_interval == 0 or step == c.max_iters
        if due or stop:
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            t_eval, val = time.time(), None
            if due:
                val = evaluate(fwd, c, env, loader.corpus, stages[stage])
                acc_txt = " ".join(f"h{k + 1} {fmt(val[f'val_acc_h{k + 1}'])}" for k in range(c.n_predict))
                emit(dict(step=step, **val, elapsed_s=time.time() - t_start),
                     f"step {step:5d} | val_loss {val['val_loss']:.4f} | val_nt_loss {fmt(val['val_nt_loss'], '.4f')} | "
                     f"acc {acc_txt} | tokens/forward {fmt(val['val_tokens_per_forward'], '.2f')}")
            try:
                last_saved = step if save(step, val, raw_model, opt, loader, cfg, c, env) else last_saved
            except OSError as e:
                raise OSError(f"{e}; the last good checkpoint is {last_saved}") from None
            if due:
                eval_s.append(time.time() - t_eval)
        if stop:
            log(f"stop requested: saved step {step}, exiting")
            break
    if metrics:
        metrics.close()
    log(f"done: {step} steps in {time.time() - t_start:.0f}s")
    if env.distributed:  # a cheap end-of-run check that every replica holds the same weights (FSDP: the same expert
        tensors = list(raw_model.buffers() if c.fsdp else raw_model.parameters())  # biases; its weights are shards)
        fingerprint = torch.stack([sum(t.double().sum() for t in tensors), sum(t.double().square().sum() for t in tensors)])
        gathered = [torch.zeros_like(fingerprint) for _ in range(env.world)]
        dist.all_gather(gathered, fingerprint)
        log(f"replicas identical: {all(torch.equal(g, gathered[0]) for g in gathered)}")
    return 0


def cli(argv):
    """The command line: user errors are one line on stderr and exit code 2; machine faults (disk full) exit 1;
    anything else is a bug and shows its traceback."""
    code = 0
    try:
        try:
            cfg = parse_config(argv)
        except ValueError as e:
            raise UserError(str(e)) from None
        code = main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:  # a fault of the machine, not of the user: exit 1
        print(f"error: {e.strerror + (f': {e.filename}' if e.filename else '') if e.strerror else e}", file=sys.stderr)
        code = 1
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
