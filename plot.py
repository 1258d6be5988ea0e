"""plot.py: training curves from the metrics.jsonl files that train.py writes.

    python plot.py out                                # -> out/metrics.png
    python plot.py out_a out_b --out=compare.png      # several runs on one figure (default: out_a/metrics.png)

One PNG, a grid of panels: the loss of every head against step and against elapsed time (held-out losses as
markers at evaluation steps), learning rate, gradient norm, expert load, throughput, and the heads' held-out
accuracy, draft acceptance and tokens per forward. Runs are told apart by colour and named by folder; heads of
one run by shade, head 1 darkest. A series whose keys a file lacks (an older train.py) is left out.

A folder's file may hold several runs (a new run appends under another "run" id) and a resumed run logs again
the steps after its checkpoint: only the last run id is drawn, for each step the last line written, and nothing
written before a "resume" event past its step (a run plotted while it replays shows no stale future). A resumed
process restarts elapsed_s from 0; where it goes back, the time axis continues from the time before.
matplotlib is an optional dependency, imported here only: nothing a run needs depends on it.
"""
import json
import math
import sys
from pathlib import Path

USAGE = "usage: python plot.py DIR [DIR ...] [--out=FILE.png]"


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_run(folder):
    """The last run of folder/metrics.jsonl as dict(name, dir, id, train, evals, resumes): train and evals are
    lists of records sorted by step, one per step. Raises ValueError, with file and line, on a user error."""
    folder = Path(folder)
    path = folder if folder.name == "metrics.jsonl" else folder / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is {path.parent} the out_dir of a train.py run?)")
    raw = path.read_bytes()
    lines, records, bad = raw.splitlines(), [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)  # accepts the NaN / Infinity that json.dumps writes for a diverged step
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append((i, line, len(records)))
    for i, line, before in bad:  # a line cut by a kill is followed by the resumed run's event; a last line
        cut = (i == len(lines) and not raw.endswith(b"\n")) or any("event" in r for r in records[before:])
        if not cut:  # without its newline is being written: both are skipped, anything else is an error
            raise ValueError(f"{path}:{i}: not a JSON object: {line[:80].decode(errors='replace')!r}")
    if bad:
        print(f"note: {path}: skipped {len(bad)} line(s) cut short by a stopped or running write "
              f"(line {', '.join(str(i) for i, _, _ in bad[:3])})", file=sys.stderr)
    # A file written before runs had ids is one run; after one, lines without an id belong to an older run.
    run_id = next((r["run"] for r in reversed(records) if r.get("run") is not None), None)
    records = [r for r in records if run_id is None or r.get("run") == run_id]
    train, evals, resumes = {}, {}, []
    for r in records:
        if not isinstance(r.get("step"), (int, float)):
            continue
        if r.get("event") == "resume":  # lines written before it past its checkpoint are a discarded future
            resumes.append(r["step"])
            train = {s: t for s, t in train.items() if s <= r["step"]}
            evals = {s: t for s, t in evals.items() if s <= r["step"]}
        elif "event" in r:
            continue
        elif any(k.startswith("val_") for k in r):
            evals[r["step"]] = r  # a step logged twice (before a crash, then after the resume): the last wins
        else:
            train[r["step"]] = r
    if not train:
        raise ValueError(f"{path}: no training line" + (f" in its last run ({run_id})" if run_id else ""))
    # elapsed_s is the run's clock: a resumed process continues it from its checkpoint, so it is read as written
    for s, r in evals.items():  # eval lines of an older train.py have no time: that of the step's train line
        if r.get("elapsed_s") is None and s in train:
            r["elapsed_s"] = train[s].get("elapsed_s")
    name = str(path.parent) if folder.name == "metrics.jsonl" else str(folder)
    return dict(name=name, dir=path.parent, id=run_id, train=[train[s] for s in sorted(train)],
                evals=[evals[s] for s in sorted(evals)], resumes=resumes)


def num(v):
    """A plottable float: a missing, null or non-finite value (an inactive head, mfu on CPU) becomes a gap."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def n_heads(runs):
    keys = [k for run in runs for r in run["train"] + run["evals"] for k in r]
    return max([int(k.rsplit("_h", 1)[1]) for k in keys if k.rsplit("_h", 1)[-1].isdigit()], default=1)


def minor_label(lo, hi):
    """Label 2, 3, 4, 6 times a power of 10 on a log axis spanning under 1.5 decades, none on a wider one."""
    few = math.log10(hi / lo) < 1.5
    return lambda v, _: f"{v:g}" if few and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 3, 4, 6) else ""


def draw(runs):
    """The figure of these runs (load_run's dicts); main saves it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    K = n_heads(runs)
    # a Figure on the Agg canvas, not pyplot: no screen, no backend to choose, no global state to close
    fig = Figure(figsize=(14, 15), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2)
    (a_loss, a_time), (a_lr, a_gn), (a_load, a_tps), (a_acc, a_tpf) = axes

    def line(ax, recs, key, x="step", **kw):
        xs = [num(r.get(x)) / (60 if x == "elapsed_s" else 1) for r in recs]
        ys = [num(r.get(key)) for r in recs]
        finite = sum(not math.isnan(x + y) for x, y in zip(xs, ys))
        if finite == 1 and kw.get("marker") is None:  # a lone point of a line draws nothing: mark it
            kw = dict(kw, marker="o", ms=4)
        if finite:  # a key absent from this file: no series, and no legend entry
            ax.plot(xs, ys, **kw)

    for i, run in enumerate(runs):
        color, name, train, evals = f"C{i}", run["name"], run["train"], run["evals"]
        # head k: the run's colour mixed with white, h1 darkest. Only the first run's heads get legend entries
        # (a shade means the same head in every run); runs are named in the other panels' legends.
        shades = [tuple(c + (1 - c) * 0.7 * k / max(K - 1, 1) for c in to_rgb(color)) for k in range(K)]
        lab = (lambda s: s) if i == 0 else (lambda s: None)
        for ax, x in ((a_loss, "step"), (a_time, "elapsed_s")):
            for k, shade in enumerate(shades, 1):
                line(ax, train, f"loss_h{k}", x, color=shade, lw=1.3, label=lab(f"h{k}"))
            for k, shade in enumerate(shades, 1):
                line(ax, evals, f"val_loss_h{k}", x, color=shade, ls="none", marker="o", ms=6, mec="k", mew=0.6,
                     label=lab("held-out") if k == 1 else None)
        for k, shade in enumerate(shades, 1):
            line(a_acc, evals, f"val_acc_h{k}", color=shade, ls=":", marker="o", ms=4, label=lab(f"acc h{k}"))
        for k, shade in list(enumerate(shades, 1))[1:]:  # head 1 drafts nothing: acceptance starts at head 2
            line(a_acc, evals, f"val_accept_h{k}", color=shade, marker="s", ms=4, label=lab(f"accept h{k}"))
        for s in run["resumes"]:
            a_loss.axvline(s, color=color, ls="--", lw=0.8, alpha=0.6)
        line(a_lr, train, "lr", color=color, label=name)
        line(a_gn, train, "grad_norm", color=color, lw=0.9, label=name)
        line(a_load, train, "expert_load", color=color, lw=0.9, label=name)
        line(a_tps, train, "tokens_per_s", color=color, lw=0.9, label=name)
        line(a_tpf, evals, "val_tokens_per_forward", color=color, marker="o", label=name)

    for ax, title, ylabel in (
            (a_loss, "loss per head (lines: train, dots: held-out)", "loss (nats)"),
            (a_time, "loss per head vs time", "loss (nats)"),
            (a_lr, "learning rate", "lr"),
            (a_gn, "gradient norm before clipping", "grad norm"),
            (a_load, "expert load: busiest expert / mean (1 = balanced)", "load"),
            (a_tps, "throughput (real tokens)", "tokens/s"),
            (a_acc, "held-out accuracy (dotted) and draft acceptance vs head 1 (solid)", "fraction"),
            (a_tpf, "tokens per forward of greedy self-speculative decoding", "tokens/forward")):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("elapsed (min)" if ax is a_time else "step")
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", color="gray", transform=ax.transAxes)
            continue
        if ax in (a_loss, a_time, a_gn):
            ax.set_yscale("log")  # the first steps (~10.8 nats, large gradients) would flatten the rest
            # plain 0.4, 1, 6 rather than 4x10^-1; within a decade or so, some ticks between powers of 10 too
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(minor_label(*ax.get_ylim())))
        if ax is a_acc:
            ax.set_ylim(0, 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2 if ax in (a_loss, a_time, a_acc) else 1)
    fig.suptitle(", ".join(r["name"] + (f" (run {r['id']})" if r["id"] else "") + f": step {r['train'][-1]['step']}"
                           for r in runs))
    return fig


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None)
    folders = [a for a in args if not a.startswith("--out=")]
    bad = [a for a in folders if a.startswith("-")]
    if bad or not folders or out == "":
        fail(f"unknown option {bad[0]}; {USAGE}" if bad else USAGE)
    try:
        runs = [load_run(f) for f in folders]
    except ValueError as e:
        fail(e)
    try:
        import matplotlib  # noqa: F401  (draw imports its parts)
    except ImportError:
        fail("plot.py needs matplotlib: pip install matplotlib")
    out = Path(out) if out else runs[0]["dir"] / "metrics.png"
    fig = draw(runs)
    try:
        fig.savefig(out, dpi=100)
    except (OSError, ValueError) as e:  # a missing folder, no permission, an unknown extension
        fail(f"{out}: cannot write: {getattr(e, 'strerror', None) or e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
