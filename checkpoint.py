"""checkpoint.py: checkpoint files and the out_dir they live in.

A checkpoint is one torch.save file `ckpt_{step:07d}.pt` with a sha256 sidecar `ckpt_{step:07d}.pt.sha256`,
written atomically (a temporary file, fsync, rename), loaded only after its checksum matches and only with
`weights_only=True` (tensors and plain containers: no code runs while loading).

An out_dir belongs to one run (README, "Checkpoints and faults"): `claim_out_dir` takes an exclusive lock for
the life of the process; a scratch run refuses a folder holding checkpoints, and a resume refuses one holding
another run's or newer checkpoints, unless overwrite is asked; pruning removes only this run's older
checkpoints, never the newest or the best. `checkpoints.json` (the index) is a cache of what is on disk.

Everything here reads plain arguments and acts in this process: the collectives around it (rank 0 acts, the
others learn the outcome) are train.py's.
"""
import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from model import Model, ModelConfig

MODEL_FIELDS = [f.name for f in fields(ModelConfig)]


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

    def checksum(tmp):  # the sidecar first: a file named ckpt_* always has one (a kill between: an orphan sidecar)
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
    raise ValueError(f"no good checkpoint in {out}")


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


def claim_out_dir(out_dir, init_from, resume_path, overwrite, run):
    """Rank 0, before anything is written: lock out_dir and apply the rules that keep checkpoints safe.
    -> (lock fd, path of the checkpoint to resume or None, that checkpoint loaded or None)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={out_dir!r} is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    fd = lock_out_dir(out, run)
    for tmp in out.glob(".tmp-*"):  # left by a save killed midway (kill -9): nobody else writes here now
        if tmp.is_file():
            tmp.unlink()
    entries, files = read_index(out), sorted(out.glob("ckpt_*.pt"))
    if init_from == "scratch":
        doomed, why = files, "holds checkpoints of an earlier run"
        resume, ckpt = None, None
    else:
        resume, ckpt = find_resume(out, resume_path)
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
    if doomed and not overwrite:
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


def load_model(out_dir, ckpt, device):
    """A model for inference from the checkpoint `ckpt` (or the newest good one of out_dir) -> (model in eval
    mode on device, the checkpoint's path, the loaded checkpoint dict)."""
    if not ckpt and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r}: no such folder (where train.py wrote its checkpoints)")
    path, state = find_resume(out_dir, ckpt)
    try:
        model = Model(ModelConfig(**{k: state["config"][k] for k in MODEL_FIELDS if k in state["config"]}))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: not a model checkpoint of this train.py ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    return model.to(device).eval(), path, state
