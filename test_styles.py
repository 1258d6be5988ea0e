"""train.py end to end for the styles of multi-token prediction beside the default (parallel heads, which
test_train.py and test_fsdp.py run): sequential depths and shared logits, on tiny float64 models. For each, one
torchrun DDP run equals one process with twice the accumulation, FSDP2 gives the same math, and (sequential,
whose depths are the new parameters) a resume is bit-exact and sample.py decodes the FSDP checkpoint. The head
schedule changes stage halfway; the sequential one's second stage computes heads 1 and 3 only, so depth 1 runs
without being scored and must still be trained (its gradient comes through depth 2)."""
import subprocess
import sys

import pytest
import torch

from test_train import HERE, losses, metrics, train_run, weights

# float64 and no router losses: the load-balancing loss is a per-micro-batch statistic, not split-invariant
EXACT = ["--max_iters=4", "--eval_interval=4", "--dtype=float64", "--aux_loss_coef=0", "--z_loss_coef=0"]
SCHEDULE = "1,.5,.25,.125@0.5;1,0,.5"  # stage 2: heads 1 and 3


@pytest.mark.parametrize("style", ["sequential", "shared"])
def test_style_trains_the_same_under_ddp_fsdp_and_resume(tmp_path, style):
    args = [*EXACT, f"--mtp_style={style}", f"--mtp_schedule={SCHEDULE}"]
    train_run(tmp_path / "one", *args, "--grad_accum_steps=2")
    log = train_run(tmp_path / "ddp", *args, nproc=2)
    assert "replicas identical: True" in log
    fsdp = train_run(tmp_path / "fsdp", *args, "--fsdp=True", nproc=2)
    assert "FSDP2" in fsdp and "replicas identical: True" in fsdp
    one = losses(tmp_path / "one")
    assert len(one) == 4 and losses(tmp_path / "ddp") == pytest.approx(one, rel=1e-12)
    assert losses(tmp_path / "fsdp") == pytest.approx(one, rel=1e-10)
    rows = [r for r in metrics(tmp_path / "one") if "loss" in r]
    scored = [[r[f"loss_h{k}"] is not None for k in range(1, 5)] for r in rows]
    assert scored == [[True] * 4] * 2 + [[True, False, True, False]] * 2  # the schedule's heads
    ref = weights(tmp_path / "one" / "ckpt_0000004.pt")
    for run in ("ddp", "fsdp"):
        got = weights(tmp_path / run / "ckpt_0000004.pt")
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{run} {k}: {m}")
    if style == "sequential":
        train_run(tmp_path / "split", *args, "--grad_accum_steps=2", "--stop_after=2")
        train_run(tmp_path / "split", *args, "--grad_accum_steps=2", "--init_from=resume")
        assert losses(tmp_path / "split") == one  # identical floats
        split = weights(tmp_path / "split" / "ckpt_0000004.pt")
        assert all(torch.equal(split[k], ref[k]) for k in ref)
        # depth 1 runs under depth 2 in stage 2 without a loss of its own, and is trained there (DDP too, above)
        at_2 = weights(tmp_path / "split" / "ckpt_0000002.pt")
        assert not torch.equal(at_2["heads.1.merge.weight"], ref["heads.1.merge.weight"])
        r = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'fsdp'}", "--prompt=def f(",
                            "--max_new_tokens=6", "--temperature=0"], cwd=HERE, capture_output=True, text=True,
                           timeout=300)  # shared logits decode plainly: test_sample.py
        assert r.returncode == 0 and r.stdout.startswith("def f("), r.stderr
        assert "identical to plain greedy: True" in r.stderr, r.stderr


def test_detached_drafters_train_like_one_head_under_ddp_fsdp_and_resume(tmp_path):
    """mtp_detach with sampled positions (the default's drafters): the next-token losses are a 1-head run's, step
    for step, through the stage where the depths join (trunk and head 1 start the same and get the same gradient and
    step: the depths are clipped on their own); DDP = 1 process x 2 accumulation, FSDP2 the same math, a resume
    across the stage change bit-exact."""
    common = [*EXACT, "--mtp_style=sequential", "--grad_accum_steps=2"]
    args = [*common, "--mtp_detach=True", "--mtp_sample=0.5", "--mtp_schedule=1@0.5;1,1,1,1", "--grad_clip=0.05"]
    train_run(tmp_path / "one_head", *common, "--n_predict=1", "--mtp_schedule=1", "--grad_clip=0.05")
    train_run(tmp_path / "one", *args)
    nt = lambda out: [(r["step"], r["nt_loss"]) for r in metrics(out) if "loss" in r]  # noqa: E731
    assert nt(tmp_path / "one") == nt(tmp_path / "one_head")  # identical floats, drafters or not
    drafted = [r["loss_h2"] for r in metrics(tmp_path / "one") if "loss" in r]
    assert drafted[:2] == [None, None] and None not in drafted[2:]  # the depths join at step 2
    train_run(tmp_path / "ddp", *[a for a in args if a != "--grad_accum_steps=2"], nproc=2)
    train_run(tmp_path / "fsdp", *[a for a in args if a != "--grad_accum_steps=2"], "--fsdp=True", nproc=2)
    one = losses(tmp_path / "one")
    assert losses(tmp_path / "ddp") == pytest.approx(one, rel=1e-12)
    assert losses(tmp_path / "fsdp") == pytest.approx(one, rel=1e-10)
    train_run(tmp_path / "split", *args, "--stop_after=2")
    train_run(tmp_path / "split", *args, "--init_from=resume")
    assert losses(tmp_path / "split") == one
    ref, split = weights(tmp_path / "one" / "ckpt_0000004.pt"), weights(tmp_path / "split" / "ckpt_0000004.pt")
    assert all(torch.equal(split[k], ref[k]) for k in ref)
    at_2 = weights(tmp_path / "split" / "ckpt_0000002.pt")
    assert not torch.equal(at_2["heads.1.merge.weight"], ref["heads.1.merge.weight"])  # the depths learned
