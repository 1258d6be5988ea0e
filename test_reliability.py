"""The promises of README "Checkpoints and faults", each tried as a careless user or a real fault would:
nothing already written is lost by an ordinary command; a damaged index or checksum never kills a run or hides
a good checkpoint; every user error is one line, `error: ...`, exit code 2; every documented data source
trains; changed data is refused on resume; a full disk ends in a clear message and leaves nothing half-written."""
import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

import checkpoint
import train
from test_train import launch, metrics, state, train_run, wait_for_steps


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ckpts(out):
    return sorted(p.name for p in Path(out).glob("ckpt_*.pt"))


def index(out):
    return json.loads((Path(out) / "checkpoints.json").read_text())


# ----------------------------------------------------------------------------- 1. nothing written is lost

def test_a_new_run_refuses_a_folder_with_checkpoints_unless_told(tmp_path):
    train_run(tmp_path, "--max_iters=2", "--eval_interval=1")
    before = {n: digest(tmp_path / n) for n in ckpts(tmp_path)}
    log = train_run(tmp_path, "--max_iters=3", "--n_embd=64", ok=False, code=2)
    assert "holds checkpoints of an earlier run (ckpt_0000001.pt, ckpt_0000002.pt)" in log and "--overwrite=True" in log
    assert {n: digest(tmp_path / n) for n in ckpts(tmp_path)} == before  # untouched
    train_run(tmp_path, "--max_iters=3", "--n_embd=64", "--overwrite=True", "--eval_interval=3")
    assert ckpts(tmp_path) == ["ckpt_0000003.pt"] and index(tmp_path)["latest"] == "ckpt_0000003.pt"
    runs = [r["run"] for r in metrics(tmp_path) if r.get("event") == "start"]
    assert len(runs) == 2 and runs[0] != runs[1]  # two runs in one metrics.jsonl, told apart by their ids
    assert {r["run"] for r in metrics(tmp_path)} == set(runs)


def test_resume_path_alone_is_refused(tmp_path):
    train_run(tmp_path / "a", "--max_iters=1")
    before = digest(tmp_path / "a" / "ckpt_0000001.pt")
    log = train_run(tmp_path / "a", f"--resume_path={tmp_path / 'a' / 'ckpt_0000001.pt'}", ok=False, code=2)
    assert "resume_path=" in log and "add --init_from=resume" in log
    assert digest(tmp_path / "a" / "ckpt_0000001.pt") == before and ckpts(tmp_path / "a") == ["ckpt_0000001.pt"]


def test_resume_next_to_a_damaged_newer_checkpoint(tmp_path):
    train_run(tmp_path, "--max_iters=4", "--eval_interval=2")
    bad = tmp_path / "ckpt_0000004.pt"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated, its checksum no longer matches
    log = train_run(tmp_path, "--max_iters=6", "--eval_interval=1", "--keep_last=1", "--init_from=resume")
    assert "skipping checkpoint" in log and "resumed from" in log and "ckpt_0000002.pt at step 2" in log
    idx = index(tmp_path)
    assert idx["latest"] == "ckpt_0000006.pt" and all((tmp_path / n).exists() for n in idx["checkpoints"])
    assert "ckpt_0000006.pt" in ckpts(tmp_path) and (tmp_path / "ckpt_0000004.pt.damaged").exists()
    checkpoint.load_checkpoint(tmp_path / idx["best"])


def test_resume_refuses_to_overwrite_newer_good_checkpoints(tmp_path):
    train_run(tmp_path, "--max_iters=4", "--eval_interval=2")
    before = digest(tmp_path / "ckpt_0000004.pt")
    log = train_run(tmp_path, "--max_iters=6", "--init_from=resume", f"--resume_path={tmp_path / 'ckpt_0000002.pt'}",
                    ok=False, code=2)
    assert "newer than ckpt_0000002.pt (step 2) (ckpt_0000004.pt)" in log
    assert digest(tmp_path / "ckpt_0000004.pt") == before


def test_two_trainers_in_one_folder(tmp_path):
    first = launch(tmp_path, "--max_iters=100000")
    try:
        wait_for_steps(tmp_path, time.time() + 120)
        log = train_run(tmp_path, "--max_iters=3", "--overwrite=True", ok=False, code=2)
        assert "is in use by run" in log and f"pid {first.pid}" in log
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0 and "stop requested" in out
    finally:
        if first.poll() is None:
            first.kill()
    assert len({r["run"] for r in metrics(tmp_path)}) == 1  # the second never wrote a line


def test_pruning_keeps_the_newest_and_the_best_of_this_run_only(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, state(1, 5.0, run="other"), keep=1)  # another run's file (an old layout)
    for step, val in ((2, 1.0), (3, 2.0), (4, None), (5, 3.0)):
        checkpoint.save_checkpoint(tmp_path, step, state(step, val), keep=1)
    assert ckpts(tmp_path) == ["ckpt_0000001.pt", "ckpt_0000002.pt", "ckpt_0000005.pt"]  # other run, best, newest
    idx = index(tmp_path)
    assert idx["latest"] == "ckpt_0000005.pt" and idx["best"] == "ckpt_0000002.pt"
    checkpoint.save_checkpoint(tmp_path, 6, state(6, None), keep=0)  # keep_last=0: keep everything
    assert ckpts(tmp_path)[-2:] == ["ckpt_0000005.pt", "ckpt_0000006.pt"]


# ----------------------------------------------------------------------------- 2. damaged index or checksum

@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"checkpoints": 5}', '{"checkpoints": {"ckpt_0000001.pt": 3}}', ""])
def test_a_damaged_index_is_rebuilt(tmp_path, garbage, capsys):
    checkpoint.save_checkpoint(tmp_path, 1, state(1, 2.0), keep=3)
    checkpoint.save_checkpoint(tmp_path, 2, state(2, 1.0), keep=3)
    (tmp_path / "checkpoints.json").write_text(garbage)
    checkpoint.save_checkpoint(tmp_path, 3, state(3, 4.0), keep=3)
    idx = index(tmp_path)
    assert sorted(idx["checkpoints"]) == ckpts(tmp_path) == ["ckpt_0000001.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert idx["best"] == "ckpt_0000002.pt" and idx["latest"] == "ckpt_0000003.pt"
    assert capsys.readouterr().err.count("is damaged; rebuilding it") == 1


def test_an_empty_checksum_hides_nothing(tmp_path):
    train_run(tmp_path, "--max_iters=4", "--eval_interval=2")
    (tmp_path / "ckpt_0000004.pt.sha256").write_text("")
    (tmp_path / "checkpoints.json").write_text("garbage")
    with pytest.raises(ValueError, match="checksum file ckpt_0000004.pt.sha256 is empty or garbled"):
        checkpoint.load_checkpoint(tmp_path / "ckpt_0000004.pt")
    log = train_run(tmp_path, "--max_iters=5", "--init_from=resume")
    assert "resumed from" in log and "at step 2" in log and "Traceback" not in log
    assert index(tmp_path)["latest"] == "ckpt_0000005.pt"


# ----------------------------------------------------------------------------- 3. user errors: one line, exit 2

USER_ERRORS = [
    ("--grad_accum_steps=0", "grad_accum_steps=0, expected >= 1"), ("--log_interval=0", "log_interval=0, expected >= 1"),
    ("--eval_interval=0", "eval_interval=0, expected >= 1"), ("--eval_iters=0", "eval_iters=0, expected >= 1"),
    ("--max_iters=-5", "max_iters=-5, expected >= 0"), ("--batch_size=0", "batch_size=0, expected >= 1"),
    ("--config=/nonexistent/x.conf", "--config=/nonexistent/x.conf: cannot read it"),
    ("--device=cuda:0", "device='cuda:0': this machine has 0 CUDA device(s)"), ("--device=mps", "device='mps', expected"),
    ("--device=foo", "device='foo', expected"), ("--seq_len=1000000", "seq_len=1000000 with batch_size=8 needs"),
    ("--data=", "data='': expected a path"), ("--data=/nonexistent/corpus", "/nonexistent/corpus: no such file"),
    ("--mtp_schedule=0,1", "mtp_schedule='0,1': stage '0,1', expected"), ("--mtp_schedule=1,-1", "stage '1,-1'"),
    ("--mtp_schedule=1;x", "stage 'x'"), ("--learning_rate=0", "learning_rate=0.0, expected 0 < learning_rate"),
    ("--init_from=restart", "init_from='restart', expected one of 'scratch', 'resume'"),
    ("--vocab_size=1000", "vocab_size=1000, expected >= 50257"), ("--fsdp=True", "fsdp=True needs several processes"),
    ("--n_embd=10", "n_embd=10 must split into n_head"), ("--val_fraction=1.5", "val_fraction=1.5, expected 0 <"),
    ("--keep_last=-1", "keep_last=-1, expected >= 0"), ("--top_k=9", "top_k=9 > n_experts=4"),
    ("--lr=1", "unknown setting 'lr'; did you mean lr_schedule"), ("--max_iters=1.5", "max_iters=1.5 is float, expected int"),
]


@pytest.mark.parametrize("arg, message", USER_ERRORS, ids=[a for a, _ in USER_ERRORS])
def test_user_errors_are_one_line(tmp_path, capsys, arg, message):
    with pytest.raises(SystemExit) as e:
        train.cli([f"--out_dir={tmp_path / 'out'}", arg])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_an_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("my notes")
    with pytest.raises(SystemExit) as e:
        train.cli([f"--out_dir={tmp_path / 'f'}", "--max_iters=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a file, expected a folder" in err and (tmp_path / "f").read_text() == "my notes"


# ----------------------------------------------------------------------------- 4. every documented source trains

def test_documented_sources_train(tmp_path):
    para = "The quick brown fox jumps over the lazy dog. " * 12 + "\n\n"
    (tmp_path / "book.txt").write_text(para * 20)  # one file: cut at blank lines into documents of >= 2000 chars
    (tmp_path / "texts").mkdir()
    for i in range(4):
        (tmp_path / "texts" / f"part{i}.MD").write_text(para * (i + 1))
    (tmp_path / "lines.JSONL").write_text("\n".join(json.dumps({"text": f"line {i} " + "x" * i}) for i in range(12)))
    (tmp_path / "tiny.jsonl").write_text("\n".join(json.dumps({"text": w}) for w in ["a", "b", "c"]))
    cache = f"--cache_dir={tmp_path / 'cache'}"
    for name, data in (("file", "book.txt"), ("glob", "texts/*.MD"), ("jsonl", "lines.JSONL"), ("tiny", "tiny.jsonl")):
        log = train_run(tmp_path / name, "--max_iters=2", f"--data={tmp_path / data}", "--val_fraction=0.3", cache)
        assert all(r["loss"] == r["loss"] for r in metrics(tmp_path / name) if "loss" in r), name  # no NaN
    # tiny: documents [EOT, a, EOT] of 3 tokens, so heads 3 and 4 have nothing to learn: said, not NaN
    assert "warning: head 3 has no target" in log and "warning: head 4 has no target" in log
    row = [r for r in metrics(tmp_path / "tiny") if "loss" in r][-1]
    assert row["loss_h3"] is None and row["loss_h1"] > 0


# ----------------------------------------------------------------------------- 5. changed data is refused

def test_changed_data_is_refused_on_resume(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    for i in range(6):
        (data / f"doc{i}.txt").write_text(f"document {i} " * 50)
    args = [f"--cache_dir={tmp_path / 'cache'}", "--val_fraction=0.2"]
    train_run(tmp_path / "out", "--max_iters=2", f"--data={data}", *args)
    train_run(tmp_path / "out", "--max_iters=3", f"--data={data}/", "--init_from=resume", *args)  # dir/ is dir
    (data / "doc9.txt").write_text("a new document under the same path")
    log = train_run(tmp_path / "out", "--max_iters=4", f"--data={data}", "--init_from=resume", *args, ok=False, code=2)
    assert "does not match this run: data_fingerprint:" in log


# ----------------------------------------------------------------------------- 6. a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_a_checkpoint(small_disk):
    # a checkpoint of this model is ~20 MiB: the first fits, the second (written beside it) does not
    log = train_run(small_disk / "out", "--max_iters=4", "--eval_interval=2", ok=False, code=1)
    assert "error: disk full writing" in log and "ckpt_0000004.pt" in log and "the last good checkpoint is 2" in log
    assert "Traceback" not in log and not list((small_disk / "out").glob(".tmp-*"))
    assert ckpts(small_disk / "out") == ["ckpt_0000002.pt"] and index(small_disk / "out")["latest"] == "ckpt_0000002.pt"
    checkpoint.load_checkpoint(small_disk / "out" / "ckpt_0000002.pt")


def test_disk_full_while_tokenizing(small_disk, tmp_path):
    log = train_run(tmp_path / "out", "--max_iters=1", f"--cache_dir={small_disk}", ok=False, code=1)  # stdlib: 31 MB
    assert "error: disk full while building the token cache" in log and "Traceback" not in log
    assert not list(small_disk.glob(".tmp-*"))
