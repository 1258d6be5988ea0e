"""Tests of train.py, end to end in subprocesses with timeouts (a hang fails instead of stalling):
the smoke run, DDP on gloo versus one process, starved experts, compile versus eager, bit-exact resume,
crash-safe saves, corrupted checkpoints, preemption, the non-finite guard, incompatible resume, and
a checkpoint crafted to run code when unpickled."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train

HERE = Path(__file__).parent
TINY = ["--seq_len=32", "--n_embd=32", "--n_head=2", "--n_layer=1", "--batch_size=2", "--eval_iters=1",
        "--log_interval=1", "--eval_interval=100", "--warmup_iters=2"]


def launch(out, *args, nproc=1):
    cmd = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd + TINY + [f"--out_dir={out}", *args], cwd=HERE, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def train_run(out, *args, nproc=1, timeout=240, ok=True):
    p = launch(out, *args, nproc=nproc)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert (p.returncode == 0) == ok, log[-3000:]
    return log


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def losses(out):
    return [r["loss"] for r in metrics(out) if "loss" in r]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_smoke_run(tmp_path):
    log = train_run(tmp_path, "--max_iters=3", "--eval_interval=3")
    rows = metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    first = train_rows[0]
    for key in ["loss", "nt_loss", "loss_h1", "loss_h4", "lr", "grad_norm", "tokens_per_s", "expert_load"]:
        assert key in first and math.isfinite(first[key]), key
    assert abs(first["nt_loss"] - math.log(50257)) < 1.0  # about ln(vocab) at initialization
    assert first["loss"] == pytest.approx(sum(first[f"loss_h{k}"] for k in range(1, 5)))  # mtp_weight = 1
    assert any("val_loss" in r and "val_nt_loss" in r for r in rows)
    assert (tmp_path / "ckpt_0000003.pt").exists() and "parameters:" in log


def test_ddp_equals_one_process_with_double_accumulation(tmp_path):
    # float64, aux coefficients 0: the load-balancing loss is a per-micro-batch statistic, not invariant
    args = ["--max_iters=3", "--eval_interval=3", "--dtype=float64", "--aux_loss_coef=0", "--z_loss_coef=0"]
    train_run(tmp_path / "one", *args, "--grad_accum_steps=2")
    log = train_run(tmp_path / "two", *args, nproc=2)
    assert "replicas identical: True" in log
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-12)
    a, b = weights(tmp_path / "one" / "ckpt_0000003.pt"), weights(tmp_path / "two" / "ckpt_0000003.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


def test_ddp_with_experts_starved_on_one_rank(tmp_path):
    log = train_run(tmp_path, "--max_iters=3", "--n_experts=4", "--debug_starve_rank=1", nproc=2)
    assert "replicas identical: True" in log


def test_compiled_equals_eager(tmp_path):
    train_run(tmp_path / "eager", "--max_iters=3")
    train_run(tmp_path / "compiled", "--max_iters=3", "--compile=True", timeout=400)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


RESUME = ["--max_iters=8", "--grad_accum_steps=2", "--dropout=0.1", "--router_noise=0.1", "--eval_interval=4"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_is_bit_exact(tmp_path, nproc):
    train_run(tmp_path / "full", *RESUME, nproc=nproc)
    train_run(tmp_path / "split", *RESUME, "--stop_after=4", nproc=nproc)
    train_run(tmp_path / "split", *RESUME, "--init_from=resume", nproc=nproc)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")  # identical floats, not approximately
    a, b = weights(tmp_path / "full" / "ckpt_0000008.pt"), weights(tmp_path / "split" / "ckpt_0000008.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_one_rank_saves_once_and_exits_zero(tmp_path):
    p = launch(tmp_path, "--max_iters=100000", nproc=2)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists() and metrics(tmp_path)):
            time.sleep(0.2)
        ranks = {}  # the workers: descendants of torchrun with a LOCAL_RANK in their environment
        while time.time() < deadline and 1 not in ranks:
            parent = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
            family, grew = {p.pid}, True
            while grew:
                new = {pid for pid, pp in parent.items() if pp in family} - family
                family, grew = family | new, bool(new)
            for pid in family - {p.pid}:
                try:
                    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                rank = [e.split(b"=")[1] for e in env if e.startswith(b"LOCAL_RANK=")]
                if rank:
                    ranks[int(rank[0])] = pid
        os.kill(ranks[1], signal.SIGTERM)
        log, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, log[-3000:]
    ckpts = list(tmp_path.glob("ckpt_*.pt"))
    assert len(ckpts) == 1 and log.count("\nsaved ") == 1 and "stop requested: saved step" in log
    step = int(ckpts[0].stem.split("_")[1])
    assert f"stop requested: saved step {step}," in log


def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path):
    train_run(tmp_path / "ref", "--max_iters=1", nproc=2)
    log = train_run(tmp_path / "nan", "--max_iters=2", "--debug_nan_step=1", "--debug_nan_rank=1", nproc=2)
    assert "warning: step 1: non-finite" in log and "replicas identical: True" in log
    a = torch.load(tmp_path / "ref" / "ckpt_0000001.pt", weights_only=True)
    b = torch.load(tmp_path / "nan" / "ckpt_0000002.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the pre-step values
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_consecutive_nans_stop_the_run(tmp_path):
    train_run(tmp_path, "--max_iters=2", "--eval_interval=1")
    log = train_run(tmp_path, "--max_iters=5", "--init_from=resume", "--debug_nan_step=2", "--max_skips=1",
                    "--eval_interval=1", ok=False)
    assert "stopping: 1 consecutive non-finite steps; the last good checkpoint is 2" in log
    train.load_checkpoint(tmp_path / "ckpt_0000002.pt")  # intact


def test_changed_model_shape_is_refused(tmp_path):
    train_run(tmp_path, "--max_iters=1")
    log = train_run(tmp_path, "--max_iters=2", "--init_from=resume", "--n_embd=64", "--seq_len=16", ok=False)
    assert "n_embd: 32 -> 64" in log and "seq_len: 32 -> 16" in log
    train_run(tmp_path, "--max_iters=2", "--init_from=resume", "--log_interval=5")  # allowed changes


def state(step):
    return dict(model={"w": torch.full((1000,), float(step))}, step=step)


def test_save_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train.save_checkpoint(tmp_path, 1, state(1), 1.0, keep=2)

    def half_then_fail(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        train.save_checkpoint(tmp_path, 2, state(2), 0.5, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints.json", "ckpt_0000001.pt", "ckpt_0000001.pt.sha256"]
    path, ckpt = train.find_resume(tmp_path, "")
    assert ckpt["step"] == 1


def test_save_killed_midway_keeps_the_previous_checkpoint(tmp_path):
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(HERE)!r})
import train
from test_train import state
train.save_checkpoint({str(tmp_path)!r}, 1, state(1), 1.0, keep=2)
def slow(obj, f):
    f.write(b"x" * 1000); f.flush(); print("writing", flush=True); time.sleep(60)
torch.save = slow
train.save_checkpoint({str(tmp_path)!r}, 2, state(2), 0.5, keep=2)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()  # kill -9 in the middle of the write
    p.wait(timeout=30)
    path, ckpt = train.find_resume(tmp_path, "")
    assert ckpt["step"] == 1 and path.name == "ckpt_0000001.pt"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corruption_is_detected_and_resume_falls_back(tmp_path, damage, capsys):
    train.save_checkpoint(tmp_path, 1, state(1), 1.0, keep=3)
    train.save_checkpoint(tmp_path, 2, state(2), 0.5, keep=3)
    bad = tmp_path / "ckpt_0000002.pt"
    raw = bytearray(bad.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = raw[:len(raw) // 2]
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="ckpt_0000002.pt: sha256 .* expected"):
        train.load_checkpoint(bad)
    with pytest.raises(ValueError, match="ckpt_0000002.pt"):
        train.find_resume(tmp_path, str(bad))  # an explicit bad path is an error, not a fallback
    path, ckpt = train.find_resume(tmp_path, "")
    assert ckpt["step"] == 1 and "skipping checkpoint" in capsys.readouterr().err


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = ""


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    global SENTINEL
    SENTINEL = str(tmp_path / "pwned")
    path = tmp_path / "ckpt_0000001.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    (tmp_path / "ckpt_0000001.pt.sha256").write_text(f"{train.sha256_file(path)}  {path.name}\n")  # checksum ok
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        train.load_checkpoint(path)
    assert not Path(SENTINEL).exists()


def test_overrides_are_typed():
    cfg = train.parse_config(["--n_embd=64", "--learning_rate=1", "--data=some/dir", "--compile=True"])
    assert cfg["n_embd"] == 64 and cfg["learning_rate"] == 1.0 and cfg["data"] == "some/dir" and cfg["compile"] is True
    with pytest.raises(ValueError, match="unknown setting 'n_emb'; did you mean n_embd"):
        train.parse_config(["--n_emb=64"])
    with pytest.raises(ValueError, match="n_embd='big' is str, expected int"):
        train.parse_config(["--n_embd=big"])
    with pytest.raises(ValueError, match="expected --name=value"):
        train.parse_config(["n_embd=3"])


def test_gpu_preset_parses_and_trains_on_shards(tmp_path):
    # the preset's file format and the shard path end to end, shrunk to CPU size by later overrides
    from data import EOT, write_shard
    rng = torch.Generator().manual_seed(0)
    docs = [[EOT] + torch.randint(0, 50000, (int(n),), generator=rng).tolist() for n in torch.randint(5, 200, (300,))]
    write_shard(tmp_path / "fineweb_train_000001.bin", [t for d in docs for t in d])
    cfg = train.parse_config(["--config=configs/gpt2_small_moe.conf"])
    assert cfg["n_embd"] == 768 and cfg["seq_len"] == 1024 and cfg["data"].endswith("*.bin")
    train_run(tmp_path / "out", "--config=configs/gpt2_small_moe.conf", f"--data={tmp_path}/fineweb_train_*.bin",
              "--val_fraction=0.05", "--n_layer=1", "--n_head=2", "--n_embd=32", "--seq_len=64", "--batch_size=2",
              "--grad_accum_steps=1", "--max_iters=2", "--warmup_iters=1", "--compile=False", "--eval_iters=1",
              "--log_interval=1",
              f"--out_dir={tmp_path / 'out'}")
    assert [r["step"] for r in metrics(tmp_path / "out") if "loss" in r] == [1, 2]
