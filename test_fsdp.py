"""FSDP2 (--fsdp=True) on 2 CPU ranks with gloo, tiny models: the same math as DDP (every step's loss), less
memory per rank (measured on the local shards), bit-exact resume, one checkpoint format (an FSDP checkpoint
resumes under DDP and samples), and the same faults (SIGTERM to one rank, NaN on one rank)."""
import re
import signal
import subprocess
import sys

import pytest
import torch

from test_train import HERE, losses, metrics, nan_at, short_docs, stop_with_signal, train_run, weights

FSDP = "--fsdp=True"


def memory(log):
    """MiB of parameters + optimizer state on rank 0, as train.py prints them."""
    p, o = re.search(r"memory per rank: parameters ([\d.]+) MiB \+ optimizer state ([\d.]+) MiB", log).groups()
    return float(p) + float(o)


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("float64", 1e-10)])
def test_fsdp_equals_ddp_and_halves_memory(tmp_path, dtype, rel):
    data = short_docs(tmp_path / "short.jsonl")
    args = ["--max_iters=4", "--grad_accum_steps=2", "--eval_interval=4", f"--dtype={dtype}", f"--data={data}",
            "--val_fraction=0.05", f"--cache_dir={tmp_path / 'cache'}", "--learning_rate=1e-2"]
    ddp = train_run(tmp_path / "ddp", *args, nproc=2)
    fsdp = train_run(tmp_path / "fsdp", *args, FSDP, nproc=2)
    assert "FSDP2" in fsdp and "replicas identical: True" in fsdp
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=rel, abs=0)
    a, b = weights(tmp_path / "ddp" / "ckpt_0000004.pt"), weights(tmp_path / "fsdp" / "ckpt_0000004.pt")
    assert a.keys() == b.keys()  # one checkpoint format: full state dicts with the same names
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=100 * rel, atol=100 * rel)
    if dtype == "float32":
        assert memory(fsdp) <= 0.6 * memory(ddp), (memory(fsdp), memory(ddp))


def test_fsdp_resume_is_bit_exact_and_its_checkpoint_serves_ddp_and_sampling(tmp_path):
    args = ["--max_iters=8", "--grad_accum_steps=2", "--dropout=0.1", "--router_noise=0.1", "--eval_interval=4",
            "--mtp_schedule=1,1,1,1;1,.5", "--keep_last=0"]  # heads 3, 4 stop at step 4: their units stop running
    train_run(tmp_path / "full", *args, FSDP, nproc=2)
    assert [r["loss_h3"] is None for r in metrics(tmp_path / "full") if "loss" in r] == [False] * 4 + [True] * 4
    train_run(tmp_path / "split", *args, FSDP, "--stop_after=3", nproc=2)  # resumes inside stage 1
    train_run(tmp_path / "split", *args, FSDP, "--init_from=resume", nproc=2)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")  # identical floats
    a, b = weights(tmp_path / "full" / "ckpt_0000008.pt"), weights(tmp_path / "split" / "ckpt_0000008.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the FSDP checkpoint of step 4, resumed under DDP: the same math, other reduction order
    train_run(tmp_path / "ddp", *args, f"--resume_path={tmp_path / 'split' / 'ckpt_0000004.pt'}",
              "--init_from=resume", nproc=2)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "full")[4:], rel=1e-5)
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'full'}", "--prompt=def f(",
                        "--max_new_tokens=5", "--temperature=0"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("def f("), r.stderr
    assert "identical to plain greedy: True" in r.stderr, r.stderr


def test_fsdp_faults_behave_as_under_ddp(tmp_path):
    stop_with_signal(tmp_path / "term", signal.SIGTERM, 2, FSDP)
    train_run(tmp_path / "ref", "--max_iters=1", FSDP, nproc=2)
    log = train_run(tmp_path / "nan", "--max_iters=2", FSDP, nproc=2, patch=nan_at(1, 1))
    assert "warning: step 1: non-finite" in log and "replicas identical: True" in log
    a = torch.load(tmp_path / "ref" / "ckpt_0000001.pt", weights_only=True)
    b = torch.load(tmp_path / "nan" / "ckpt_0000002.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the step was skipped on both ranks


def test_muon_is_exact_under_ddp_fsdp_and_resume(tmp_path):
    """--optimizer=muon keeps the guarantees of AdamW: 2 ranks equal 1 process with twice the accumulation
    (float64, Newton-Schulz in float64), FSDP2 equals DDP per step (float32, 1e-5: the sharded matrices are
    gathered and orthogonalized whole), a resume is bit-exact, and a resume with another optimizer is refused."""
    muon = ["--optimizer=muon", "--max_iters=3", "--eval_interval=3"]
    f64 = muon + ["--dtype=float64", "--aux_loss_coef=0", "--z_loss_coef=0"]
    train_run(tmp_path / "one", *f64, "--grad_accum_steps=2")
    train_run(tmp_path / "two", *f64, nproc=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-9)
    train_run(tmp_path / "ddp", *muon, "--grad_accum_steps=2", nproc=2)
    log = train_run(tmp_path / "fsdp", *muon, "--grad_accum_steps=2", FSDP, nproc=2)
    assert "replicas identical: True" in log
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5, abs=0)
    resume = muon[:1] + ["--max_iters=6", "--eval_interval=3"]
    train_run(tmp_path / "full", *resume)
    train_run(tmp_path / "split", *resume, "--stop_after=3")
    train_run(tmp_path / "split", *resume, "--init_from=resume")
    assert losses(tmp_path / "full") == losses(tmp_path / "split")  # identical floats
    log = train_run(tmp_path / "split", "--max_iters=9", "--init_from=resume", ok=False, code=2)  # AdamW now
    assert "optimizer: 'muon' -> 'adamw'" in log, log[-2000:]
