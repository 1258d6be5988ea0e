"""Tests of plot.py on a hand-written metrics.jsonl: which lines are drawn (the last run, the last line of each
step, nothing from before a resume past its checkpoint), the PNG, several folders on one figure, and the
one-line errors (no matplotlib, no metrics.jsonl, a bad line, no training line)."""
import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import plot  # imports matplotlib only where it draws: the tests of loading and errors run without it

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

HERE = Path(__file__).parent


def heads(prefix, *values):
    return {f"{prefix}_h{k}": v for k, v in enumerate(values, 1)}


def evals(step, elapsed, losses, acc, accept, tpf):
    return dict(run="b", step=step, val_loss=sum(losses), val_nt_loss=losses[0], **heads("val_loss", *losses),
                **heads("val_acc", *acc), **{f"val_accept_h{k}": v for k, v in enumerate(accept, 2)},
                val_tokens_per_forward=tpf, elapsed_s=elapsed)


def train(step, elapsed, *losses, stage=0):
    return dict(run="b", step=step, loss=sum(v or 0 for v in losses), nt_loss=losses[0], **heads("loss", *losses),
                aux_loss=0.01, grad_norm=10 / step, lr=1e-3, tokens_per_s=1000.0, flops_per_s=1e9, mfu=None,
                expert_load=1.2, pad_frac=0.0, elapsed_s=elapsed, eta_s=1.0, stage=stage, unknown_key="ignored")


# Run "a" is an older run in the same folder: never drawn. Run "b" logs to step 40, crashes before saving 40,
# resumes from the checkpoint at 20 (its clock continues from the 2.6 s saved there) and logs step 30 again with head 3
# inactive (the second stage of an mtp_schedule). LIVE is the file while the resumed run is at step 30.
LIVE = [
    dict(run="a", event="start", step=0),
    dict(train(10, 1.0, 9.0, 9.0, 9.0), run="a"),
    dict(run="b", event="start", step=0),
    train(10, 1.0, 5.0, 6.0, 7.0),
    train(20, 2.0, 4.0, 5.0, 6.0),
    evals(20, 2.5, (4.5, 5.5, 6.5), (0.3, 0.2, 0.1), (0.5, 0.25), 1.6),
    train(30, 3.0, 3.6, 4.6, 5.6),
    train(40, 4.0, 3.3, 4.3, 5.3),  # before the crash: superseded by the resume, never repeated in LIVE
    evals(40, 4.5, (3.9, 4.9, 5.9), (0.3, 0.2, 0.1), (0.5, 0.25), 1.6),  # evaluated, then the save failed
    dict(run="b", event="resume", step=20),
    train(30, 3.6, 3.5, 4.5, stage=1),  # no loss_h3 key
]
DONE = LIVE + [
    train(40, 4.6, 3.2, 4.2, None, stage=1),  # loss_h3 null
    evals(40, 5.1, (3.4, 4.4), (0.4, 0.3), (0.6,), 1.5),
]


def write(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def column(recs, key):
    return [r.get(key) for r in recs]


def test_load_last_run_deduplicated(tmp_path):
    live = plot.load_run(write(tmp_path / "live", LIVE))
    assert live["id"] == "b" and live["resumes"] == [20]
    assert column(live["train"], "step") == [10, 20, 30]  # step 40 of the discarded segment is gone
    assert column(live["train"], "loss_h1") == [5.0, 4.0, 3.5]  # 3.5: the step 30 written last
    assert column(live["train"], "loss_h3") == [7.0, 6.0, None]
    assert column(live["evals"], "step") == [20]  # the evaluation at 40 before the crash is gone too

    run = plot.load_run(write(tmp_path / "done", DONE))
    assert column(run["train"], "step") == [10, 20, 30, 40]
    assert column(run["train"], "loss_h1") == [5.0, 4.0, 3.5, 3.2]
    assert column(run["train"], "loss_h3") == [7.0, 6.0, None, None]
    # the run's clock across the resume, as written (the discarded segment's 3.0 and 4.0 s are gone)
    assert column(run["train"], "elapsed_s") == [1.0, 2.0, 3.6, 4.6]
    assert column(run["evals"], "step") == [20, 40]
    assert column(run["evals"], "elapsed_s") == [2.5, 5.1]
    assert column(run["evals"], "val_accept_h3") == [0.25, None]
    assert plot.n_heads([run]) == 3
    assert math.isnan(plot.num(None)) and math.isnan(plot.num(float("inf"))) and plot.num(2) == 2.0


def test_load_old_files(tmp_path):
    # before runs had ids: the whole file is one run, the last line of a step wins, evals take the train time
    old = [dict(step=10, loss_h1=5.0, elapsed_s=1.0), dict(step=10, loss_h1=4.9, elapsed_s=1.1),
           dict(step=20, loss_h1=4.0, elapsed_s=2.0), dict(step=20, val_loss=4.5, val_nt_loss=4.5)]
    run = plot.load_run(write(tmp_path / "old", old))
    assert run["id"] is None and column(run["train"], "loss_h1") == [4.9, 4.0]
    assert column(run["evals"], "elapsed_s") == [2.0]
    # an old file that a run with ids then appended to: only the new run
    run = plot.load_run(write(tmp_path / "mixed", old + [dict(run="c", step=10, loss_h1=6.0)]))
    assert run["id"] == "c" and column(run["train"], "loss_h1") == [6.0] and run["evals"] == []


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert 20_000 < len(data) < 5_000_000, len(data)
    return struct.unpack(">II", data[16:24])  # width, height from the IHDR chunk


@needs_matplotlib
def test_cli_writes_png(tmp_path):
    out = write(tmp_path / "out", DONE)
    p = subprocess.run([sys.executable, "plot.py", str(out)], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    width, height = png_size(out / "metrics.png")
    assert width >= 1000 and height >= 1000


@needs_matplotlib
def test_two_folders_one_figure(tmp_path):
    a = write(tmp_path / "a", DONE)
    b = write(tmp_path / "b", [dict(step=s, loss_h1=5.0 / s, lr=1e-3) for s in (1, 2, 3)])  # no acceptance
    assert plot.main([str(a), str(b), f"--out={tmp_path / 'both.png'}"]) == 0
    png_size(tmp_path / "both.png")
    assert not (a / "metrics.png").exists()
    fig = plot.draw([plot.load_run(a), plot.load_run(b)])
    a_loss, _, a_lr, _, _, _, _, a_tpf = fig.axes
    assert [line.get_label() for line in a_lr.get_lines()] == [str(a), str(b)]
    assert [line.get_label() for line in a_tpf.get_lines()] == [str(a)]  # b has no acceptance: skipped
    assert len(a_loss.get_lines()) == 3 + 3 + 1 + 1  # a: 3 heads + 3 held-out, b: 1 head; a's resume line
    # a run with a single logged step: a line of one point draws nothing, so it is marked, never a legend entry
    # for an invisible series
    c = write(tmp_path / "c", [dict(step=1, loss_h1=5.0, lr=1e-3)])
    a_lr = plot.draw([plot.load_run(a), plot.load_run(c)]).axes[2]
    lone = [line for line in a_lr.get_lines() if line.get_label() == str(c)]
    assert len(lone) == 1 and lone[0].get_marker() not in (None, "None", "", " ")


def test_without_matplotlib(tmp_path):
    out = write(tmp_path / "out", DONE)
    code = ("import sys; sys.modules['matplotlib'] = None; import plot; "  # None: any import of it fails
            f"sys.exit(plot.main([{str(out)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr == "error: plot.py needs matplotlib: pip install matplotlib\n", p.stderr
    assert not (out / "metrics.png").exists()


@pytest.mark.parametrize("lines, expected", [
    (None, "no such file"),
    (['{"step": 1, "loss_h1": 3.0}', '{"step": 2, "loss_h1": 2.'], "metrics.jsonl:2: not a JSON object"),
    (['{"run": "x", "event": "start", "step": 0}', '{"run": "x", "step": 0, "val_loss": 3.0}'], "no training line"),
])
def test_user_errors(tmp_path, capsys, lines, expected):
    folder = tmp_path / "out"
    folder.mkdir()
    if lines is not None:
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        plot.main([str(folder)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_lines_cut_by_a_kill_or_a_running_write_are_skipped(tmp_path, capsys):
    done = [json.dumps(r) for r in DONE]
    # a run killed mid-write, then resumed (train.py starts its next record on a new line), then being written
    cut = done[:7] + ['{"run": "b", "step": 40, "lo'] + done[7:] + ['{"run": "b", "step": 50, "loss_h1": 3.']
    (tmp_path / "metrics.jsonl").write_text("\n".join(cut))  # no newline at the end: a write in progress
    run = plot.load_run(tmp_path)
    assert column(run["train"], "step") == [10, 20, 30, 40] and column(run["evals"], "step") == [20, 40]
    assert "skipped 2 line(s)" in capsys.readouterr().err
    # the same garbage with nothing after it that explains it (no resume, a newline): refused, with its line
    (tmp_path / "metrics.jsonl").write_text("\n".join(done[:7] + ['{"run": "b", "step": 40, "lo']) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:8: not a JSON object"):
        plot.load_run(tmp_path)
