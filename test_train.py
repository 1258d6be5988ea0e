"""Tests of train.py, end to end in subprocesses with timeouts (a hang fails instead of stalling): the smoke
run against an independent computation of its first loss, exact averaging whatever the accumulation (with
the mean-of-means mutant shown to fail), DDP on gloo versus one process, starved experts, compile versus
eager, bit-exact resume, crash-safe saves, corrupted checkpoints, preemption (SIGTERM, SIGHUP), the
non-finite guard, incompatible resume, metrics that stay true on several ranks and after a resume, the
learning-rate schedule's floor, the host syncs of a step, and a checkpoint crafted to run code.

Faults are injected from outside, as a user's tools would: `launch(..., patch=CODE)` runs train.py through a
small launcher that executes CODE (which may patch train, loss or model) before train.cli()."""
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import report
import settings
import train
from settings import parse_config

HERE = Path(__file__).parent
TINY = ["--optimizer=adamw", "--learning_rate=3e-3",  # the tests' optimizer (test_fsdp.py tests Muon's guarantees)
        "--seq_len=32", "--n_embd=32", "--n_head=2", "--n_layer=1", "--batch_size=2", "--eval_iters=1",
        "--log_interval=1", "--eval_interval=100", "--warmup_iters=2", "--mtp_schedule=1,1,1,1",  # 4 heads throughout
        "--mtp_style=parallel", "--mtp_detach=False", "--mtp_sample=1"]  # attached parallel heads
LAUNCHER = """import os, sys
sys.path.insert(0, {here!r})
import torch, train, loss, model
RANK = int(os.environ.get("RANK", 0))
{patch}
train.cli(sys.argv[1:])
"""


def launch(out, *args, nproc=1, patch=None, tiny=True):
    script = ["train.py"]
    if patch:
        launcher = Path(out).with_name(Path(out).name + "_launch.py")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text(LAUNCHER.format(here=str(HERE), patch=patch))
        script = [str(launcher)]
    cmd = [sys.executable] + script if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + script
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd + (TINY if tiny else []) + [f"--out_dir={out}", *args], cwd=HERE, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def train_run(out, *args, nproc=1, timeout=240, ok=True, patch=None, tiny=True, code=None):
    p = launch(out, *args, nproc=nproc, patch=patch, tiny=tiny)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert (p.returncode == 0) == ok, log[-3000:]
    assert code is None or p.returncode == code, (p.returncode, log[-3000:])
    return log


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def losses(out):
    return [r["loss"] for r in metrics(out) if "loss" in r]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def short_docs(path, n=300, seed=0):
    """A .jsonl of short documents of uneven length: rows hold different numbers of documents, so the rows'
    target counts differ (count = real tokens - k * documents), and a mean of per-row means is not the mean."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", "x", "=", "1", "\\n"]
    lines = [json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, len(words), (int(m),), generator=g))})
             for m in torch.randint(2, 30, (n,), generator=g)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_smoke_run_and_its_first_loss_computed_apart(tmp_path):
    log = train_run(tmp_path, "--max_iters=3", "--eval_interval=3")
    rows = metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    first = train_rows[0]
    for key in ["loss", "nt_loss", "loss_h1", "loss_h4", "lr", "grad_norm", "tokens_per_s", "expert_load"]:
        assert key in first and math.isfinite(first[key]), key
    assert any("val_loss" in r and "val_nt_loss" in r and "val_accept_h2" in r for r in rows)
    assert (tmp_path / "ckpt_0000003.pt").exists() and "parameters:" in log
    # step 1's losses, computed apart: the same initial weights and the same first batch, materialized logits
    from data import PackedLoader
    from loss import mtp_loss_reference, mtp_targets
    from model import Model, ModelConfig
    cfg = parse_config(TINY, train.DEFAULTS)
    torch.manual_seed(0)
    model = Model(ModelConfig(**{k: cfg[k] for k in checkpoint.MODEL_FIELDS}))
    b = PackedLoader(None, "train", 2, 32, 0, 1, 0, "cpu", 0.01).next_batch()
    with torch.no_grad():
        hidden = model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]).hidden
        sums, counts = mtp_loss_reference(hidden, model.lm_head.weight, mtp_targets(b["input_ids"], b["doc_ids"], 4))
    expected = (sums / counts).tolist()
    assert [first[f"loss_h{k}"] for k in range(1, 5)] == pytest.approx(expected, rel=1e-5)
    assert first["loss"] == pytest.approx(sum(expected), rel=1e-5)  # the default schedule: 4 heads of weight 1
    assert abs(first["nt_loss"] - math.log(50257)) < 1.0  # about ln(vocab) at initialization


MEAN_OF_MEANS = """
real = loss.mtp_loss
ACCUM = int([a for a in sys.argv if a.startswith("--grad_accum_steps=")][0].split("=")[1])
def mutant(hidden, weight, targets, chunk_rows=None, grad_scale=None):
    sums, counts = real(hidden, weight, targets, chunk_rows)  # one gradient buffer per head: any weighting works
    if grad_scale is None:
        return sums, counts
    # the same values, but the gradient of a mean of per-micro-batch means (w_k = 1, one rank)
    factor = 1.0 / (grad_scale * counts.clamp(min=1) * ACCUM)
    return sums.detach() + (sums - sums.detach()) * factor, counts
loss.mtp_loss = mutant
"""


def test_accumulation_is_exact_and_a_mean_of_means_is_not(tmp_path):
    data = short_docs(tmp_path / "short.jsonl")
    args = ["--max_iters=4", "--eval_interval=4", "--dtype=float64", "--aux_loss_coef=0", "--z_loss_coef=0",
            f"--data={data}", "--val_fraction=0.05", f"--cache_dir={tmp_path / 'cache'}", "--learning_rate=1e-2"]
    runs = {}
    for b, a in ((4, 1), (2, 2), (1, 4)):
        train_run(tmp_path / f"b{b}a{a}", *args, f"--batch_size={b}", f"--grad_accum_steps={a}")
        runs[b, a] = losses(tmp_path / f"b{b}a{a}")
    for split in ((2, 2), (1, 4)):
        assert runs[split] == pytest.approx(runs[4, 1], rel=1e-9, abs=0)
    train_run(tmp_path / "mutant", *args, "--batch_size=1", "--grad_accum_steps=4", patch=MEAN_OF_MEANS)
    wrong = losses(tmp_path / "mutant")
    assert wrong[0] == pytest.approx(runs[4, 1][0], rel=1e-9)  # the same first step: the mutant changes gradients only
    assert wrong[1:] != pytest.approx(runs[4, 1][1:], rel=1e-9)  # ... and the test sees it from step 2 on


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
    # FLOP/s are per device: per step of one rank, flops_per_token * tokens_per_step / world_size
    from model import Model, ModelConfig
    cfg = parse_config(TINY, train.DEFAULTS)
    fpt = Model(ModelConfig(**{k: cfg[k] for k in checkpoint.MODEL_FIELDS})).flops_per_token()
    for r in (r for r in metrics(tmp_path / "two") if "loss" in r):
        real_tokens_per_step = 2 * 32 * 2 * (1 - r["pad_frac"])
        expected = fpt * 2 * 32 * 2 / 2 / real_tokens_per_step
        assert r["flops_per_s"] / r["tokens_per_s"] == pytest.approx(expected, rel=1e-6)


STARVE = """
DDP = torch.nn.parallel.DistributedDataParallel
init = DDP.__init__
def starve_after_ddp(self, module, *a, **kw):  # after DDP's one-time copy of rank 0's buffers
    init(self, module, *a, **kw)
    if RANK == 1:
        for m in module.modules():
            if isinstance(m, model.MoE):
                m.expert_bias[m.cfg.n_experts // 2:] = -1e4
DDP.__init__ = starve_after_ddp
forward = model.MoE.forward
seen = []
def record(self, x, valid):
    y, aux, counts = forward(self, x, valid)
    seen.append(counts.tolist())
    open(os.environ["COUNTS_FILE"] + str(RANK), "w").write(json.dumps(seen))
    return y, aux, counts
import json
model.MoE.forward = record
"""


def test_ddp_with_experts_starved_on_one_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("COUNTS_FILE", str(tmp_path / "counts"))
    log = train_run(tmp_path / "out", "--max_iters=3", "--n_experts=4", nproc=2, patch=STARVE)
    assert "replicas identical: True" in log  # the parameters, though rank 1 routes differently
    starved = json.loads((tmp_path / "counts1").read_text())
    fed = json.loads((tmp_path / "counts0").read_text())
    assert all(c[2] == 0 and c[3] == 0 and c[0] + c[1] > 0 for c in starved)  # rank 1: experts 2, 3 get nothing
    assert sum(c[2] + c[3] for c in fed) > 0  # rank 0 uses them


def test_compiled_equals_eager(tmp_path):
    train_run(tmp_path / "eager", "--max_iters=3")
    train_run(tmp_path / "compiled", "--max_iters=3", "--compile=True", timeout=400)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    first, second = [r for r in metrics(tmp_path / "compiled") if "loss" in r][:2]
    # the first compiled step's time is compiling: no rate and no ETA from it; the next step has them
    assert first["tokens_per_s"] is None and first["eta_s"] is None and second["tokens_per_s"] > 0, (first, second)


RESUME = ["--max_iters=8", "--grad_accum_steps=2", "--dropout=0.1", "--router_noise=0.1", "--eval_interval=4"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_is_bit_exact(tmp_path, nproc):
    train_run(tmp_path / "full", *RESUME, nproc=nproc)
    train_run(tmp_path / "split", *RESUME, "--stop_after=4", nproc=nproc)
    train_run(tmp_path / "split", *RESUME, "--init_from=resume", nproc=nproc)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")  # identical floats, not approximately
    a, b = weights(tmp_path / "full" / "ckpt_0000008.pt"), weights(tmp_path / "split" / "ckpt_0000008.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [r for r in metrics(tmp_path / "split") if "event" in r]
    assert [e["event"] for e in events] == ["start", "resume"] and events[1]["step"] == 4
    assert len({r["run"] for r in metrics(tmp_path / "split")}) == 1  # one run, resumed


def workers(launcher_pid, deadline):
    """{LOCAL_RANK: pid} of torchrun's workers: descendants with a LOCAL_RANK in their environment."""
    ranks = {}
    while time.time() < deadline and 1 not in ranks:
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
        family, grew = {launcher_pid}, True
        while grew:
            new = {pid for pid, pp in parent.items() if pp in family} - family
            family, grew = family | new, bool(new)
        for pid in family - {launcher_pid}:
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            rank = [e.split(b"=")[1] for e in env if e.startswith(b"LOCAL_RANK=")]
            if rank:
                ranks[int(rank[0])] = pid
    return ranks


def wait_for_steps(out, deadline):
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and losses(out)):
        time.sleep(0.2)


def stop_with_signal(out, sig, nproc, *args):
    p = launch(out, "--max_iters=100000", *args, nproc=nproc)
    try:
        deadline = time.time() + 120
        wait_for_steps(out, deadline)
        os.kill(workers(p.pid, deadline)[1] if nproc > 1 else p.pid, sig)
        log, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, log[-3000:]
    ckpts = list(out.glob("ckpt_*.pt"))
    assert len(ckpts) == 1 and log.count("\nsaved ") == 1 and "stop requested: saved step" in log
    assert f"stop requested: saved step {int(ckpts[0].stem.split('_')[1])}," in log
    return log


def test_sigterm_to_one_rank_saves_once_and_exits_zero(tmp_path):
    stop_with_signal(tmp_path, signal.SIGTERM, 2)


def test_sighup_saves_and_exits_zero(tmp_path):
    stop_with_signal(tmp_path, signal.SIGHUP, 1)  # a closed terminal or ssh session


def nan_at(step, rank):
    """Launcher code: the training loss is NaN at `step` on `rank` (the eval path, mtp_eval, is untouched)."""
    return f"""
real, calls = loss.mtp_loss, [0]
def poisoned(*a, **kw):
    sums, counts = real(*a, **kw)
    calls[0] += 1
    if RANK == {rank} and calls[0] == {step} + 1:
        sums = sums * float("nan")
    return sums, counts
loss.mtp_loss = poisoned
"""


def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path):
    train_run(tmp_path / "ref", "--max_iters=1", nproc=2)
    log = train_run(tmp_path / "nan", "--max_iters=2", nproc=2, patch=nan_at(1, 1))
    assert "warning: step 1: non-finite" in log and "replicas identical: True" in log
    a = torch.load(tmp_path / "ref" / "ckpt_0000001.pt", weights_only=True)
    b = torch.load(tmp_path / "nan" / "ckpt_0000002.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the pre-step values
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


GRAD_NAN_AFTER_REDUCE = '''
real_clip, calls = torch.nn.utils.clip_grad_norm_, [0]
def clip(params, *a, **kw):  # rank 1's gradient turns NaN after DDP's all-reduce, at step 1 (bad memory, a bug)
    params = list(params)
    calls[0] += 1
    if RANK == 1 and calls[0] == 2:
        params[0].grad.fill_(float("nan"))
    return real_clip(params, *a, **kw)
torch.nn.utils.clip_grad_norm_ = clip
'''


def test_a_gradient_nan_on_one_rank_after_the_reduce_skips_everywhere(tmp_path):
    # the loss is the same on every rank (reduced sums); only rank 1's gradient norm sees the NaN. Before the
    # decision was shared, rank 1 alone skipped and the replicas diverged silently.
    log = train_run(tmp_path, "--max_iters=3", nproc=2, patch=GRAD_NAN_AFTER_REDUCE)
    assert "warning: step 1: non-finite" in log and "replicas identical: True" in log, log[-2000:]


def test_consecutive_nans_stop_the_run(tmp_path):
    train_run(tmp_path, "--max_iters=2", "--eval_interval=1")
    log = train_run(tmp_path, "--max_iters=5", "--init_from=resume", "--max_skips=1", "--eval_interval=1",
                    ok=False, patch=nan_at(0, 0))  # the first step of the resumed process: step 2
    assert "stopping: 1 consecutive non-finite steps; the last good checkpoint is 2" in log
    checkpoint.load_checkpoint(tmp_path / "ckpt_0000002.pt")  # intact


POISON_WEIGHTS = """
step = torch.optim.AdamW.step
calls = [0]
def poisoned(self, *a, **kw):  # after the 4th update, a weight is NaN (a bug elsewhere, or bad hardware)
    out = step(self, *a, **kw)
    calls[0] += 1
    if calls[0] == 4:
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
    return out
torch.optim.AdamW.step = poisoned
"""


def test_the_last_good_checkpoint_is_one_that_was_written(tmp_path):
    log = train_run(tmp_path, "--max_iters=8", "--eval_interval=2", "--max_skips=1", ok=False, patch=POISON_WEIGHTS)
    assert "step 4: non-finite weights, checkpoint NOT written" in log
    assert "the last good checkpoint is 2" in log and not (tmp_path / "ckpt_0000004.pt").exists()


def test_changed_model_shape_is_refused(tmp_path):
    train_run(tmp_path, "--max_iters=1")
    log = train_run(tmp_path, "--max_iters=2", "--init_from=resume", "--n_embd=64", "--seq_len=16", ok=False)
    assert "n_embd: 32 -> 64" in log and "seq_len: 32 -> 16" in log
    train_run(tmp_path, "--max_iters=2", "--init_from=resume", "--log_interval=5")  # allowed changes


def test_metrics_exclude_evaluation_and_eta_counts_this_process(tmp_path):
    slow_eval = ("real = train.evaluate\ndef slow(*a):\n    import time; time.sleep(1.0)\n    return real(*a)\n"
                 "train.evaluate = slow\n")
    train_run(tmp_path, "--max_iters=12", "--eval_interval=4", "--log_interval=2", patch=slow_eval)
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    rate = [r["tokens_per_s"] for r in rows]
    assert max(rate) < 3 * min(rate), rate  # an interval after an evaluation (1 s) is not slower
    # the log line of step 12 comes before step 12's evaluation: the ETA counts it, at the 1 s measured twice
    assert rows[-1]["step"] == 12 and rows[-1]["eta_s"] >= 1.0, rows[-1]
    train_run(tmp_path / "eta", "--max_iters=40", "--stop_after=36", "--eval_interval=100")
    train_run(tmp_path / "eta", "--max_iters=40", "--init_from=resume", "--eval_interval=100")
    rows = [r for r in metrics(tmp_path / "eta") if "loss" in r and r["step"] > 36]
    before = [r for r in metrics(tmp_path / "eta") if "loss" in r and r["step"] <= 36]
    resume = [r for r in metrics(tmp_path / "eta") if r.get("event") == "resume"]
    # the run's clock continues across the resume (saved in the checkpoint), in the log and metrics.jsonl
    assert before[-1]["elapsed_s"] <= resume[0]["elapsed_s"] <= rows[0]["elapsed_s"], (before[-1], resume, rows[0])
    per_step = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])
    # after the resume at 36, step 37 has 3 steps left: about 3 * per_step (the old way: elapsed / 37 * 3)
    assert rows[0]["eta_s"] > 0.3 * 3 * per_step, (rows[0], per_step)


def test_lr_schedules_end_at_the_floor():
    for sched in ("cosine", "wsd"):
        c = SimpleNamespace(**dict(train.DEFAULTS, lr_schedule=sched, max_iters=100, warmup_iters=10))
        lrs = [train.lr_at(s, c) for s in range(100)]
        assert lrs[9] == c.learning_rate and lrs[-1] == pytest.approx(c.learning_rate * c.min_lr_ratio, rel=1e-12)
        assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    c = SimpleNamespace(**dict(train.DEFAULTS, lr_schedule="wsd", max_iters=100, warmup_iters=10, decay_frac=0.2))
    assert train.lr_at(79, c) == c.learning_rate and train.lr_at(80, c) < c.learning_rate  # stable, then 20 decay steps


def test_drafters_joining_late_learn_on_their_own_schedule(tmp_path):
    c = SimpleNamespace(**dict(train.DEFAULTS, max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr_ratio=0.1))
    own = [train.lr_at(s, c, 84) for s in range(84, 100)]  # 16 steps: a warmup of 16 // 8 = 2, then 14 of cosine
    assert own[:3] == [0.5, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 14))] and own[-1] == pytest.approx(0.1)
    assert train.lr_at(84, c) < 0.2 and train.lr_at(82, c, 84) == 0.0  # the run's near its floor; none before
    args = ["--max_iters=8", "--mtp_schedule=1@0.5;1,1", "--n_predict=2", "--eval_interval=6", "--warmup_iters=4"]
    for own_lr in (True, False):
        out = tmp_path / str(own_lr)
        train_run(out, *args, f"--mtp_own_lr={own_lr}")
        groups = torch.load(out / "ckpt_0000006.pt", weights_only=False)["optimizer"]["param_groups"]
        c = SimpleNamespace(**dict(train.DEFAULTS, learning_rate=3e-3, max_iters=8, warmup_iters=4))  # TINY's, args'
        trunk, drafters = train.lr_at(5, c), train.lr_at(5, c, 4 if own_lr else 0)  # step 5 wrote the lr saved
        assert [(bool(g.get("drafters")), g["lr"]) for g in groups] == (
            [(False, trunk), (False, trunk), (True, drafters), (True, drafters)] if own_lr else
            [(False, trunk), (False, trunk)])
        assert own_lr == (drafters != trunk)


def test_clipping_each_group_and_drafters_without_gradients():
    """With mtp_detach the trunk (and head 1) and the drafters are clipped each on its own; the norm returned is
    both together. Before their stage the drafters have no gradient, and torch's norm of no gradients is a CPU
    tensor: stacked with the trunk's on a GPU it failed. The meta device stands in for a GPU (any device but the
    CPU's fails the same way); the values are checked on the CPU by hand."""
    from model import Model, ModelConfig
    c = SimpleNamespace(mtp_detach=True, grad_clip=1.0)
    for device in ("meta", "cpu"):
        model = Model(ModelConfig(n_embd=32, n_head=2, seq_len=16)).to(device)
        drafters = {id(p) for p in model.drafter_parameters()}
        trunk = [p for p in model.parameters() if id(p) not in drafters]
        for p in trunk:
            p.grad = torch.ones_like(p)
        norm = train.clip_gradients(model, c)
        assert norm.device.type == device
    n_trunk, n_drafters = sum(p.numel() for p in trunk), sum(p.numel() for p in model.drafter_parameters())
    assert math.isclose(norm.item(), math.sqrt(n_trunk), rel_tol=1e-5)
    assert math.isclose(trunk[0].grad[0].flatten()[0].item(), 1 / math.sqrt(n_trunk), rel_tol=1e-4)  # clipped to 1
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0 if id(p) in drafters else 1.0)
    norm = train.clip_gradients(model, c)
    assert math.isclose(norm.item(), math.sqrt(n_trunk + 4 * n_drafters), rel_tol=1e-5)
    drafter = model.drafter_parameters()[0]
    assert math.isclose(drafter.grad.flatten()[0].item(), 1 / math.sqrt(n_drafters), rel_tol=1e-4)  # on its own
    assert math.isclose(trunk[0].grad.flatten()[0].item(), 1 / math.sqrt(n_trunk), rel_tol=1e-4)


def test_head_schedule_stages_as_fractions():
    p = settings.parse_schedule
    assert p("1,.5@0.1;1", 2, 240) == [(0, (1.0, 0.5)), (24, (1.0, 0.0))]  # the first tenth with two heads
    assert p("1;1;1", 1, 10) == [(0, (1.0,)), (4, (1.0,)), (7, (1.0,))]  # equal shares: ceil(10/3), ceil(20/3)
    assert p("1@0.2;1;1", 1, 10) == [(0, (1.0,)), (2, (1.0,)), (6, (1.0,))]  # the rest shared: 0.4 each
    assert p("1,1,1,1@0.5;1@0.5", 2, 7) == [(0, (1.0, 1.0)), (4, (1.0, 0.0))]  # heads beyond n_predict dropped
    assert [settings.stage_at(s, p("1@0.2;1;1", 1, 10)) for s in range(10)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    for bad, says in (("1@0.6;1@0.6", "add up to 1.2"), ("1@0.5;1@0.4", "add up to 0.9"), ("1@0", "@ the fraction"),
                      ("1;0,1", "head 1's > 0"), ("1@x", "'1,.5,.25@0.1;1'")):
        with pytest.raises(ValueError, match=re.escape(says)):
            p(bad, 2, 10)


def test_peak_flops_match_whole_names():
    assert report.peak_flops("NVIDIA L40S") == 362e12 and report.peak_flops("NVIDIA L4") == 121e12
    assert report.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and report.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert report.peak_flops("NVIDIA A10") == 125e12 and report.peak_flops("Tesla T4") is None
    assert report.peak_flops("NVIDIA H100 PCIe") == 756e12 and report.peak_flops("NVIDIA H100 NVL") == 835e12


def test_eta_in_closed_form():
    c = SimpleNamespace(max_iters=3_000_000, eval_interval=1000, eval_iters=4)
    stages = [(0, (1.0, 1.0)), (300_000, (1.0, 0.0))]  # the first tenth costs twice a step of the rest
    eta = report.eta_s(10, dict(train_s=20.0, steps=10), None, c, stages, [2.0, 1.0], 0)  # a formula per stage
    # 299,990 steps at 2 s, 2,700,000 at 1 s (half the FLOPs), 3,000 evaluations at eval_iters = 4 steps of 2 s
    assert eta == pytest.approx(299_990 * 2.0 + 2_700_000 * 1.0 + 3000 * 4 * 2.0)
    assert report.eta_s(10, dict(train_s=0.0, steps=0), None, c, stages, [2.0, 1.0], 0) is None


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts operations that make the host wait for the device on a GPU: reading a value back, and ops whose
    output size depends on values (nonzero, bincount, boolean indexing)."""
    SYNCING = ("_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name.startswith("index") and any(
            isinstance(a, (list, tuple)) and any(torch.is_tensor(t) and t.dtype == torch.bool for t in a) for a in args)
        if name in self.SYNCING or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class ToListCounter(torch.overrides.TorchFunctionMode):
    def __init__(self, into):
        super().__init__()
        self.into = into

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.numpy):
            self.into.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_syncs(fn):
    counter = SyncCounter()
    with counter, ToListCounter(counter.ops):
        fn()
    return counter.ops


def test_host_syncs_of_a_training_step(tmp_path, monkeypatch):
    # the CUDA code path on the CPU: grouped-matmul experts; the model's CPU-only input check is off (on a GPU
    # forward() does not run it: the data checks ids where they are made)
    from model import Model
    monkeypatch.setattr(Model, "check_inputs", lambda self, *a: None)
    base = ["--moe_backend=grouped", "--log_interval=1000", "--eval_interval=1000", "--grad_accum_steps=2",
            "--mtp_schedule=1,1,1,1", f"--out_dir={tmp_path}/x"] + TINY[:7]
    from data import PackedLoader
    from loss import ModelWithLoss, count_targets, step_coefficients
    from model import ModelConfig
    cfg = parse_config(base, train.DEFAULTS)
    model = ModelWithLoss(Model(ModelConfig(**{k: cfg[k] for k in checkpoint.MODEL_FIELDS})))
    loader = PackedLoader(None, "train", 2, 32)
    batches = [loader.next_batch() for _ in range(2)]
    coef = step_coefficients(sum(count_targets(b, 4) for b in batches), torch.ones(4, dtype=torch.float64))
    off = torch.autocast("cpu", enabled=False)
    assert count_syncs(lambda: train.forward_backward(model, batches, [0, 1, 2, 3], coef, off)) == []

    def run(steps):
        argv = base + [f"--max_iters={steps}", f"--out_dir={tmp_path}/{steps}"]
        return lambda: train.main(parse_config(argv, train.DEFAULTS))
    extra = len(count_syncs(run(6))) - len(count_syncs(run(3)))
    assert extra == 3  # one per step: the guard's decision (finite? stop? any target?) read in one .tolist()


def state(step, val=None, run="r"):
    return dict(model={"w": torch.full((1000,), float(step))}, step=step, run=run, val_nt_loss=val)


def test_save_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 1, state(1, 1.0), keep=2)

    def half_then_fail(obj, f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full writing .*ckpt_0000002.pt"):
        checkpoint.save_checkpoint(tmp_path, 2, state(2, 0.5), keep=2)
    monkeypatch.undo()
    expected = ["checkpoints.json", "ckpt_0000001.pt", "ckpt_0000001.pt.sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    path, ckpt = checkpoint.find_resume(tmp_path, "")
    assert ckpt["step"] == 1


def test_save_killed_midway_keeps_the_previous_checkpoint(tmp_path):
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(HERE)!r})
import checkpoint
from test_train import state
checkpoint.save_checkpoint({str(tmp_path)!r}, 1, state(1, 1.0), keep=2)
def slow(obj, f):
    f.write(b"x" * 1000); f.flush(); print("writing", flush=True); time.sleep(60)
torch.save = slow
checkpoint.save_checkpoint({str(tmp_path)!r}, 2, state(2, 0.5), keep=2)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()  # kill -9 in the middle of the write
    p.wait(timeout=30)
    path, ckpt = checkpoint.find_resume(tmp_path, "")
    assert ckpt["step"] == 1 and path.name == "ckpt_0000001.pt"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corruption_is_detected_and_resume_falls_back(tmp_path, damage, capsys):
    checkpoint.save_checkpoint(tmp_path, 1, state(1, 1.0), keep=3)
    checkpoint.save_checkpoint(tmp_path, 2, state(2, 0.5), keep=3)
    bad = tmp_path / "ckpt_0000002.pt"
    raw = bytearray(bad.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = raw[:len(raw) // 2]
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="ckpt_0000002.pt: sha256 .* expected"):
        checkpoint.load_checkpoint(bad)
    with pytest.raises(ValueError, match="ckpt_0000002.pt"):
        checkpoint.find_resume(tmp_path, str(bad))  # an explicit bad path is an error, not a fallback
    path, ckpt = checkpoint.find_resume(tmp_path, "")
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
    (tmp_path / "ckpt_0000001.pt.sha256").write_text(f"{checkpoint.sha256_file(path)}  {path.name}\n")  # checksum ok
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        checkpoint.load_checkpoint(path)
    assert not Path(SENTINEL).exists()


def test_overrides_are_typed():
    argv = ["--n_embd=64", "--learning_rate=1", "--data=some/dir", "--compile=True", "--mtp_schedule=1"]
    cfg = parse_config(argv, train.DEFAULTS)
    assert cfg["n_embd"] == 64 and cfg["learning_rate"] == 1.0 and cfg["data"] == "some/dir" and cfg["compile"] is True
    assert cfg["mtp_schedule"] == "1"
    with pytest.raises(ValueError, match="unknown setting 'n_emb'; did you mean n_embd"):
        parse_config(["--n_emb=64"], train.DEFAULTS)
    with pytest.raises(ValueError, match="n_embd='big' is str, expected int"):
        parse_config(["--n_embd=big"], train.DEFAULTS)
    with pytest.raises(ValueError, match="expected --name=value"):
        parse_config(["n_embd=3"], train.DEFAULTS)


def test_gpu_preset_parses_and_trains_on_shards(tmp_path):
    # the preset's file format and the shard path end to end, shrunk to CPU size by later overrides
    from data import EOT, write_shard
    rng = torch.Generator().manual_seed(0)
    docs = [[EOT] + torch.randint(0, 50000, (int(n),), generator=rng).tolist() for n in torch.randint(5, 200, (300,))]
    write_shard(tmp_path / "fineweb_train_000001.bin", [t for d in docs for t in d])
    cfg = parse_config(["--config=configs/gpt2_small_moe.conf"], train.DEFAULTS)
    assert cfg["n_embd"] == 768 and cfg["seq_len"] == 1024 and cfg["data"].endswith("*.bin")
    train_run(tmp_path / "out", "--config=configs/gpt2_small_moe.conf", f"--data={tmp_path}/fineweb_train_*.bin",
              "--val_fraction=0.05", "--n_layer=1", "--n_head=2", "--n_embd=32", "--seq_len=64", "--batch_size=2",
              "--grad_accum_steps=1", "--max_iters=2", "--warmup_iters=1", "--compile=False", "--eval_iters=1",
              "--log_interval=1", f"--out_dir={tmp_path / 'out'}", tiny=False)
    assert [r["step"] for r in metrics(tmp_path / "out") if "loss" in r] == [1, 2]


def test_head_schedule_drops_heads_and_resumes_across_stages(tmp_path):
    args = ["--max_iters=6", "--mtp_schedule=1,1,1,1;1,.5;1", "--eval_interval=2", "--grad_accum_steps=2",
            "--keep_last=0"]
    log = train_run(tmp_path / "full", *args, nproc=2)
    assert "replicas identical: True" in log and "stage 3/3 of the head schedule, heads [1]" in log
    rows = {r["step"]: r for r in metrics(tmp_path / "full") if "loss" in r}
    h = lambda r, k: r[f"loss_h{k}"]
    for s in (1, 2):  # stage 1: four heads of weight 1
        assert rows[s]["loss"] == pytest.approx(sum(h(rows[s], k) for k in range(1, 5)), rel=1e-12)
    for s in (3, 4):  # stage 2: heads 1 and 2, head 2 at half weight; heads 3, 4 not computed
        assert rows[s]["loss"] == pytest.approx(h(rows[s], 1) + 0.5 * h(rows[s], 2), rel=1e-12)
        assert h(rows[s], 3) is None and h(rows[s], 4) is None
    for s in (5, 6):  # stage 3: the next-token loss alone
        assert rows[s]["loss"] == pytest.approx(rows[s]["nt_loss"], rel=1e-12) and h(rows[s], 2) is None
    ck = {s: weights(tmp_path / "full" / f"ckpt_{s:07d}.pt") for s in (2, 4, 6)}
    for name in ck[2]:  # a dropped head keeps the weights it had when dropped (no gradient, no decay)
        if name.startswith(("heads.2.", "heads.3.")):
            assert torch.equal(ck[2][name], ck[6][name]), name
        if name.startswith("heads.1."):
            assert torch.equal(ck[4][name], ck[6][name]) and not torch.equal(ck[2][name], ck[4][name]), name
    evals = [r for r in metrics(tmp_path / "full") if "val_loss" in r]
    assert all(r["val_accept_h4"] is not None for r in evals)  # the drafters are evaluated in every stage
    train_run(tmp_path / "split", *args, "--stop_after=3", nproc=2)  # stops inside stage 2
    train_run(tmp_path / "split", *args, "--init_from=resume", nproc=2)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bit-exact across the boundary


def test_ctrl_c_while_the_token_cache_builds(tmp_path):
    # Ctrl-C during the build of the token cache: one line, exit 130, no traceback, no partial cache left. The
    # build is slowed from outside (each batch of 64 documents waits) so that the signal lands inside it.
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(400):
        (texts / f"doc{i:03d}.txt").write_text(f"document {i} " * 50)
    cache = tmp_path / "cache"
    patch = ("import time, tiktoken\nslow = tiktoken.Encoding.encode_ordinary_batch\n"
             "tiktoken.Encoding.encode_ordinary_batch = lambda *a, **k: (time.sleep(0.5), slow(*a, **k))[1]")
    p = launch(tmp_path / "out", f"--data={texts}", f"--cache_dir={cache}", patch=patch)
    deadline = time.time() + 120
    while not list(cache.glob(".tmp-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)  # the build has begun once its temporary folder exists
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    log, _ = p.communicate(timeout=60)
    assert p.returncode == 130, log[-3000:]
    assert "Traceback" not in log and re.search(r"\ninterrupted while building the token cache \S+; no part of it is "
                                                r"left behind \(the next run builds it again\)\n$", log), log[-3000:]
    assert list(cache.iterdir()) == []


def test_metrics_after_a_cut_line_and_on_a_full_disk(tmp_path):
    train_run(tmp_path / "cut", "--max_iters=2")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"run": "x", "step": 3, "lo')  # a write cut by a kill -9
    train_run(tmp_path / "cut", "--max_iters=3", "--init_from=resume")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    cut = [i for i, line in enumerate(lines) if line.startswith('{"run": "x"')]
    assert len(cut) == 1 and lines[cut[0]] == '{"run": "x", "step": 3, "lo', lines  # alone on its line
    assert json.loads(lines[cut[0] + 1])["event"] == "resume"  # the resume is a record of its own
    # a full disk while writing metrics.jsonl: one line naming the file, exit 1
    (tmp_path / "full").mkdir()
    os.symlink("/dev/full", tmp_path / "full" / "metrics.jsonl")
    log = train_run(tmp_path / "full", "--max_iters=2", ok=False, code=1)
    assert re.search(r"error: No space left on device writing \S+metrics.jsonl", log) and "Traceback" not in log, log


def test_schedule_notes_for_heads_never_trained_and_stages_without_steps(tmp_path):
    log = train_run(tmp_path / "a", "--max_iters=2", "--n_predict=6", "--mtp_schedule=1,1,1,1;1@0.5;1")
    assert "note: heads [5, 6] have weight 0 in every stage" in log, log[-3000:]
    # free stages share the half that stage 2 leaves: starts 0, ceil(0.25 * 2) = 1, ceil(0.75 * 2) = 2 = max_iters
    assert "note: stages [3] of mtp_schedule get no step with max_iters=2" in log, log[-3000:]


COUNT_DDP = """
DDP = torch.nn.parallel.DistributedDataParallel
init = DDP.__init__
def counted(self, *a, **kw):
    init(self, *a, **kw)
    if RANK == 0:
        print("DDP built", flush=True)
DDP.__init__ = counted
"""


def test_ddp_is_rebuilt_only_when_the_heads_change_and_user_errors_print_once(tmp_path):
    # stages 1 and 2 run the same heads (other weights): one DDP for both; stage 3 drops head 2: a second one
    log = train_run(tmp_path / "a", "--max_iters=3", "--mtp_schedule=1,1;1,.5;1", "--n_predict=2", nproc=2,
                    patch=COUNT_DDP)
    assert log.count("DDP built") == 2 and "replicas identical: True" in log, log[-3000:]
    log = train_run(tmp_path / "b", "--batch_size=0", nproc=2, ok=False)  # every rank finds it: rank 0 says it
    assert log.count("error: batch_size=0, expected >= 1") == 1, log[-3000:]
