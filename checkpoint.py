"""checkpoint.py: checkpoint files and the out_dir they live in.

A checkpoint is one torch.save file `ckpt_{step:07d}.pt` with a sha256 sidecar `ckpt_{step:07d}.pt.sha256`,
written atomically (a temporary file, fsync, rename), loaded only after its checksum matches and only with
`weights_only=True` (tensors and plain containers: no code runs while loading).

An out_dir belongs to one run (README, "Checkpoints and faults"): `claim_out_dir` locks the folder itself for the
life of the process (deleting `train.lock` does not undo it); a scratch run refuses a folder holding checkpoints,
and a resume refuses one holding another run's or newer checkpoints, unless overwrite is asked; a claim that
refuses leaves nothing it made behind. Pruning removes only this run's older checkpoints, never the newest or
the best.

`checkpoints.json` (the index) is a cache of what is on disk: it nominates (which files are this run's, which is
best), the file decides. Before a file is deleted, renamed or called best, its name must be a checkpoint's name
inside out_dir, its sha256 must match, and its own step, run id and val_nt_loss (read from the file, with
mmap=True so the tensors stay on disk) replace what the index said; a val_nt_loss that is not a finite number
is stored as null and is never best. So a saving run hashes the few files it acts on (with keep_last=2: the
newest kept, the one to delete, the best), never every file of the folder.

Everything here reads plain arguments and acts in this process: the collectives around it (rank 0 acts, the
others learn the outcome) are train.py's.
"""
import errno
import fcntl
import hashlib
import itertools
import json
import math
import numbers
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
# what a checkpoint written before these fields existed was (their defaults have changed since)
PREDATED = dict(mtp_style="parallel", mtp_detach=False)


def model_config(saved):
    """A checkpoint's config dict -> its ModelConfig (fields it predates: PREDATED, else today's default)."""
    return ModelConfig(**{**PREDATED, **{k: saved[k] for k in MODEL_FIELDS if k in saved}})


def regroup_optimizer(saved, opt, names):
    """An optimizer state dict (full: parameters by name) -> the same state with opt's parameter groups: each group
    takes the settings of the saved group that held its parameters (its own name and drafters flag kept), so a
    checkpoint from before the drafters had groups of their own (muon.build_optimizer's drafters) still resumes,
    and one of theirs resumes with mtp_own_lr off. names: parameter -> its name in the state dict."""
    held = {name: g for g in saved["param_groups"] for name in g["params"]}
    groups = []
    for g in opt.param_groups:
        params = [names[p] for p in g["params"]]
        src = next((held[n] for n in params if n in held), g)  # a group the checkpoint never had: its own settings
        own = {k: g[k] for k in ("name", "drafters") if k in g}
        groups.append({**{k: v for k, v in src.items() if k not in ("name", "drafters")}, **own, "params": params})
    return {**saved, "param_groups": groups}


LOCK_NOTE = "this file is the lock of a running train.py; it is released when the process ends; do not delete it"


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


def step_of(name):
    """The step a checkpoint's file name states, or None for any name save_checkpoint does not write (a path,
    `../x`, `ckpt_5.pt`): only such names are ever deleted or renamed. Seven digits or more: a run of ten
    million steps or more writes eight."""
    m = re.fullmatch(r"ckpt_(\d{7,})\.pt", name)
    return int(m.group(1)) if m and name == f"ckpt_{int(m.group(1)):07d}.pt" else None


def checkpoint_files(out):
    """The files of out named like checkpoints, by step (not by name: ckpt_10000000.pt sorts before ckpt_9999999.pt)."""
    return sorted((p for p in Path(out).glob("ckpt_*.pt") if step_of(p.name) is not None and p.is_file()),
                  key=lambda p: step_of(p.name))


def finite_loss(v):
    """A val_nt_loss as the index stores it: a finite float, or None (absent, NaN, inf, a string, a bool)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def verify_checkpoint(path):
    """Raise ValueError naming the file if it is missing, truncated or corrupted (sha256 mismatch). The hex digest
    compares case-insensitively (another tool may write it in upper case)."""
    path = Path(path)
    side = path.with_suffix(".pt.sha256")
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    if not side.is_file():
        raise ValueError(f"checkpoint {path}: no checksum file {side.name}; refusing an unverified checkpoint")
    words = side.read_text(errors="replace").split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        raise ValueError(f"checkpoint {path}: checksum file {side.name} is empty or garbled; refusing it")
    actual = sha256_file(path)
    if words[0].lower() != actual:
        raise ValueError(f"checkpoint {path}: sha256 {actual}, expected {words[0]} (truncated or corrupted)")


def load_checkpoint(path, mmap=False):
    verify_checkpoint(path)
    return load_unverified(path, mmap)


def load_unverified(path, mmap=False):
    try:  # weights_only: tensors and plain containers only, no code can run while loading
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:  # not MemoryError, OSError
        raise ValueError(f"checkpoint {path}: cannot be loaded safely ({type(e).__name__}: {e})") from None


def set_aside(path, why):
    """A checkpoint that fails verification leaves the index and the ckpt_* names, kept for inspection: renamed
    `*.damaged` (`*.2.damaged`, ... beside an earlier one of the same name), never deleted."""
    pair = [p for p in (path, path.with_suffix(".pt.sha256")) if p.exists()]
    if not pair:
        return
    tag = next(t for t in (".damaged" if i == 1 else f".{i}.damaged" for i in itertools.count(1))
               if not any(p.with_name(p.name + t).exists() for p in pair))
    for p in pair:
        os.replace(p, p.with_name(p.name + tag))
    print(f"warning: {why}; renamed to {path.name}{tag}", file=sys.stderr)


def index_entry(name, e):
    """One entry of checkpoints.json as this module writes it, or ValueError: the index is then not trusted."""
    step = step_of(name)
    if step is None or not isinstance(e, dict) or type(e.get("step")) is not int or e["step"] != step \
            or not isinstance(e.get("run"), str):
        raise ValueError(f"entry {name!r}")
    val = e.get("val_nt_loss")
    if val is not None and finite_loss(val) is None:  # NaN, a string: written by hand or by an older train.py
        raise ValueError(f"entry {name!r}: val_nt_loss {val!r}")
    return dict(step=step, run=e["run"], val_nt_loss=finite_loss(val))


def confirm(out, entries, name, confirmed):
    """Let the file `name` decide its entry: sha256, then its own step, run id and val_nt_loss (loaded with mmap,
    the tensors stay on disk) replace what entries said. A damaged file, or one whose own step is not its name's,
    is set aside and leaves entries. Each name is confirmed once per `confirmed` set."""
    confirmed.add(name)
    path = Path(out) / name
    try:
        ckpt = load_checkpoint(path, mmap=True)
        step = ckpt.get("step") if isinstance(ckpt, dict) else None
        if type(step) is not int or step != step_of(name):
            raise ValueError(f"checkpoint {path}: holds step {step!r}, its name says {step_of(name)}")
        entries[name] = dict(step=step, run=str(ckpt.get("run", "")), val_nt_loss=finite_loss(ckpt.get("val_nt_loss")))
    except ValueError as e:
        entries.pop(name, None)
        set_aside(path, e)


def read_index(out):
    """checkpoints.json: {file: {step, run, val_nt_loss}} of the good checkpoints of out, as a cache. Entries
    whose file is gone are dropped, files it does not list are confirmed and added (or set aside), and an index
    that is garbled or holds an entry this module would not write (a name that is not a checkpoint's, a
    val_nt_loss that is not a finite number) is rebuilt from the confirmed files, said once."""
    out, note = Path(out), None
    try:
        raw = json.loads((out / "checkpoints.json").read_text())["checkpoints"]
        entries = {name: index_entry(name, e) for name, e in raw.items()}
    except FileNotFoundError:
        entries = {}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):  # a bad entry: ValueError from index_entry
        entries, note = {}, f"note: {out / 'checkpoints.json'} is damaged; rebuilding it from the verified checkpoints"
    entries = {name: e for name, e in entries.items() if (out / name).is_file()}
    confirmed = set()
    for path in checkpoint_files(out):
        if path.name not in entries:
            confirm(out, entries, path.name, confirmed)
    if note:
        print(note, file=sys.stderr)
    return entries


def by_loss(entries, names):
    """The name of the lowest finite val_nt_loss among names (the older on a tie), or None."""
    return min((n for n in names if entries[n]["val_nt_loss"] is not None), default=None,
               key=lambda n: (entries[n]["val_nt_loss"], entries[n]["step"]))


def write_index(out, entries, confirmed=None):
    """Write checkpoints.json; its `best` is confirmed by the file first (the next best if that one fails).
    Always strict JSON: a non-finite number cannot get in (finite_loss stored null)."""
    confirmed = set() if confirmed is None else confirmed
    while (best := by_loss(entries, entries)) is not None and best not in confirmed:
        confirm(out, entries, best, confirmed)
    latest = max(entries, default=None, key=lambda n: entries[n]["step"])
    index = dict(latest=latest, best=best, checkpoints=entries)
    text = json.dumps(index, indent=1, allow_nan=False)
    write_atomic(Path(out) / "checkpoints.json", lambda f: f.write(text.encode()))


def prune_plan(out, entries, run, keep, confirmed):
    """Names of this run's checkpoints to delete: all but the newest `keep` (0: none deleted) and the best. The
    index nominates, the files decide: every file the decision rests on (the kept newest, the best, each to be
    deleted) is confirmed first, so a damaged one frees its slot (set aside, never deleted) and another run's
    file under one of our names is not ours. Confirmation may change entries: plan again until it holds."""
    if keep <= 0:
        return []
    while True:
        mine = sorted((n for n, e in entries.items() if e["run"] == run), key=lambda n: entries[n]["step"])
        best = by_loss(entries, mine)
        doomed = [n for n in mine[:-keep] if n != best]
        pending = [n for n in [*mine[-keep:], best, *doomed] if n and n not in confirmed] if doomed else []
        if not pending:
            return doomed
        for name in pending:
            confirm(out, entries, name, confirmed)


def save_checkpoint(out, step, state, keep):
    """Write ckpt_{step}.pt and its .sha256, index it, then prune this run's older checkpoints to the newest
    `keep` (0: all) plus the best by val_nt_loss (prune_plan: each confirmed by the file itself)."""
    out, run = Path(out), str(state["run"])
    path = out / f"ckpt_{step:07d}.pt"
    entries = read_index(out)  # before writing: the new file needs no confirmation, it is hashed as it is written

    def checksum(tmp):  # the sidecar first: a file named ckpt_* always has one (a kill between: an orphan sidecar)
        digest = sha256_file(tmp)
        write_atomic(path.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    write_atomic(path, lambda f: torch.save(state, f), before_rename=checksum)
    entries[path.name] = dict(step=step, run=run, val_nt_loss=finite_loss(state.get("val_nt_loss")))
    confirmed = {path.name}
    doomed = prune_plan(out, entries, run, keep, confirmed)
    for name in doomed:
        del entries[name]
    write_index(out, entries, confirmed)  # before deleting: the index never names a missing file
    for name in doomed:
        (out / name).unlink(missing_ok=True)
        (out / name).with_suffix(".pt.sha256").unlink(missing_ok=True)
    return path


def find_resume(out, explicit):
    """An explicit path must be good; otherwise the newest good checkpoint of out, saying which were bad."""
    if explicit:
        return Path(explicit), load_checkpoint(explicit)
    for path in reversed(checkpoint_files(out)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    raise ValueError(f"no good checkpoint in {out}")


HELD = {}  # fd returned by claim_out_dir -> what the claim holds and made (for release_out_dir)


def lock_out_dir(out):
    """Exclusive locks for the life of this process (the OS releases them when it ends) -> dict of what is held.

    The lock that matters is a flock on the folder itself: deleting train.lock (a "stale lock" reflex) does not
    undo it. train.lock is locked too (a train.py of before this change locks only that file) and says who holds
    the folder. A filesystem that refuses a lock on a folder (NFS allows an exclusive flock only on a file open
    for writing) leaves train.lock alone guarding it, said once."""
    def refuse(lock_fd):
        try:
            text = (out / "train.lock").read_text(errors="replace")
            holder = next((ln for ln in text.splitlines() if ln.startswith("run ")), text.strip()[:400])
        except OSError:
            holder = ""
        holder = holder or "another train.py (its train.lock was deleted)"
        for fd in (lock_fd, held["dir_fd"]):
            if fd is not None:
                os.close(fd)
        raise ValueError(f"out_dir {out} is in use by {holder}; wait for it, or use another out_dir") from None

    held = dict(dir_fd=os.open(out, os.O_RDONLY | os.O_DIRECTORY))
    try:
        fcntl.flock(held["dir_fd"], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        refuse(None)
    except OSError as e:
        os.close(held.pop("dir_fd"))
        held["dir_fd"] = None
        print(f"warning: cannot lock the folder {out} itself here ({e.strerror}): train.lock alone guards it, "
              "do not delete it while a run is using this folder", file=sys.stderr)
    lock = out / "train.lock"
    held["created"] = not lock.exists()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        refuse(fd)
    held["file_fd"] = fd
    return held


def release_out_dir(fd):
    """Undo a claim whose run then failed to start (a user error found after claim_out_dir): unlock, and remove
    train.lock and the folders the claim created, as long as nothing else was written there."""
    held = HELD.pop(fd, None)
    if held is not None:
        undo_claim(held)


def undo_claim(held):
    for f in (held["file_fd"], held["dir_fd"]):
        if f is not None:
            os.close(f)
    if held["created"]:
        (held["out"] / "train.lock").unlink(missing_ok=True)
    for d in held["new_dirs"]:  # the deepest first; a folder is removed only if empty
        try:
            d.rmdir()
        except OSError:
            break


def claim_out_dir(out_dir, init_from, resume_path, overwrite, run):
    """Rank 0, before anything is written: lock out_dir and apply the rules that keep checkpoints safe.
    -> (lock fd, path of the checkpoint to resume or None, that checkpoint loaded or None).

    A claim that refuses leaves nothing it made: no new folder, no train.lock, no index (a damaged checkpoint
    it met is still set aside). train.lock names the run id the run logs under: the resumed checkpoint's when
    resuming, else `run`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={out_dir!r} is a file, expected a folder")
    if init_from == "resume" and not resume_path and not out.is_dir():
        raise ValueError(f"out_dir={out_dir!r}: no such folder; init_from=resume continues from the checkpoints "
                         "in out_dir (a typo?)")
    new_dirs = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    held = dict(out=out, new_dirs=new_dirs, created=False, file_fd=None, dir_fd=None)
    try:
        held.update(lock_out_dir(out))
        resume, ckpt = claim_rules(out, init_from, resume_path, overwrite)
    except BaseException:  # a refusal (or Ctrl-C) leaves nothing this claim made
        undo_claim(held)
        raise
    logged = str(ckpt.get("run", run)) if ckpt else run  # what train.py logs under (train.claim)
    text = f"{LOCK_NOTE}\nrun {logged}, pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n"
    os.ftruncate(held["file_fd"], 0)
    os.pwrite(held["file_fd"], text.encode(), 0)
    fd = held["dir_fd"] if held["dir_fd"] is not None else held["file_fd"]
    HELD[fd] = held
    return fd, resume, ckpt


def claim_rules(out, init_from, resume_path, overwrite):
    """The rules of an out_dir, applied under its lock -> (resume path or None, that checkpoint or None)."""
    for tmp in out.glob(".tmp-*"):  # left by a save killed midway (kill -9): nobody else writes here now
        if tmp.is_file():
            tmp.unlink()
    had_index = (out / "checkpoints.json").exists()
    entries, confirmed = read_index(out), set()
    if init_from == "scratch":
        doomed, why = [p.name for p in checkpoint_files(out)], "holds checkpoints of an earlier run"
        resume, ckpt = None, None
    else:
        resume, ckpt = find_resume(out, resume_path)
        mine, step = str(ckpt.get("run", "")), int(ckpt["step"])
        if (out / resume.name).resolve() == resume.resolve():  # the file resumed from never stands in the way
            confirmed.add(resume.name)
            if step_of(resume.name) == step:  # verified as it was loaded: its entry is what it says
                entries[resume.name] = dict(step=step, run=mine, val_nt_loss=finite_loss(ckpt.get("val_nt_loss")))
        in_way = lambda n: n in entries and (entries[n]["run"] != mine or entries[n]["step"] > step)  # noqa: E731
        doomed, why = [], f"holds checkpoints of another run or newer than {resume.name} (step {step})"
        for name in [n for n in entries if in_way(n) and n not in confirmed]:
            confirm(out, entries, name, confirmed)  # only a good checkpoint, by its own run and step, stands in the way
            if in_way(name):
                doomed.append(name)
    if doomed and not overwrite:
        raise ValueError(f"out_dir {out} {why} ({', '.join(doomed[:4])}{', ...' if len(doomed) > 4 else ''}): "
                         "this run would overwrite them. Use another out_dir, or --overwrite=True to replace them")
    for name in doomed:
        if name not in confirmed:
            confirm(out, entries, name, confirmed)  # a damaged one is set aside, not deleted
    doomed = [n for n in doomed if n in entries]
    for name in doomed:
        del entries[name]
    if entries or had_index:
        write_index(out, entries, confirmed)  # before deleting: the index never names a missing file
    for name in doomed:
        (out / name).unlink(missing_ok=True)
        (out / name).with_suffix(".pt.sha256").unlink(missing_ok=True)
    if doomed:
        print(f"overwrite: removed {len(doomed)} checkpoint(s) from {out}", file=sys.stderr)
    return resume, ckpt


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
        model = Model(model_config(state["config"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: not a model checkpoint of this train.py ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    return model.to(device).eval(), path, state
