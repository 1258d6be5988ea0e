"""study.py: training runs compared side by side, one command per table, raw results kept in the repo.

    python study.py --study=muon                # AdamW against Muon, learning rates swept, default model and corpus
    python study.py --study=muon --rows=adamw_3e-3,muon_3e-3   # only these rows
    python study.py --study=muon --table        # print the table from study_results.json, run nothing
    python study.py --study=heads --bench=ROW,ROW   # sample.py --bench on these rows' checkpoints, kept in the rows

Each row is one `python train.py ...` run in its own out_dir under study_runs/ (same seed, default corpus). Its
result (steps, wall time, final held-out next-token loss, tokens per forward) is appended to study_results.json
as soon as it finishes, so a study can span several sittings and the table is rebuilt without rerunning: a row
already in the file is skipped. Wall times are those of the machine the row ran on; the float32 matmul rate
(bench.matmul_peak) is recorded beside each row, since these machines differ by 2x.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "study_results.json"

# the rows of each study: name -> train.py arguments (beyond --out_dir); the default run is 240 steps
STUDIES = {
    "muon": {
        **{f"{opt}_{lr}": [f"--optimizer={opt}", f"--learning_rate={lr}"]
           for opt in ("adamw", "muon") for lr in ("3e-3", "6e-3", "1.2e-2", "2.4e-2", "4.8e-2")},
        **{f"larger_{opt}_{lr}": [f"--optimizer={opt}", f"--learning_rate={lr}", "--n_embd=256", "--n_layer=4",
                                  "--n_head=8", "--max_iters=120", "--eval_interval=60"]
           for opt, lr in (("adamw", "3e-3"), ("muon", "3e-3"))},
    },
    # the extra heads against one head (README "What the extra heads buy"); the default model, corpus and Muon
    "heads": {
        "one_head": ["--n_predict=1", "--mtp_schedule=1"],
        # drafters on a detached trunk, learning at 1/8 of the positions, in the last quarter of the run
        # (rows with --mtp_own_lr=False ran before it existed, the flag added to their records: the run's schedule)
        "par_det_s8_late25": ["--mtp_detach=True", "--mtp_sample=0.125", "--mtp_schedule=1@0.75;1,1,1,1",
                              "--mtp_own_lr=False"],
        "seq_det_s8_late25": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.125",
                              "--mtp_schedule=1@0.75;1,1,1,1", "--mtp_own_lr=False"],
        "seq_det_s16_late10": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                               "--mtp_schedule=1@0.9;1,1,1,1", "--mtp_own_lr=False"],
        # equal time: 1 head gets the steps the default's drafters take (their last tenth costs 1.34x a 1-head step,
        # measured side by side: 3.4% of the run), and the same at three times the budget
        "one_head_eq": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=248"],
        "seq_det_s16_late10_x3": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                                  "--mtp_schedule=1@0.9;1,1,1,1", "--max_iters=720",
                                  "--mtp_own_lr=False"],
        "one_head_eq_x3": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=745"],
        # the same pair with another seed (other initial weights and data order)
        "seq_det_s16_late10_seed1": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                                     "--mtp_schedule=1@0.9;1,1,1,1", "--seed=1",
                                     "--mtp_own_lr=False"],
        "one_head_eq_seed1": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=248", "--seed=1"],
        # the drafters on their own warmup and cosine over the steps they train (mtp_own_lr), the last 10% or 5%
        "seq_own_s16_late10": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                               "--mtp_schedule=1@0.9;1,1,1,1", "--mtp_own_lr=True"],
        "seq_own_s16_late5": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                              "--mtp_schedule=1@0.95;1,1,1,1", "--mtp_own_lr=True"],
        "seq_own_s16_late10_seed1": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                                     "--mtp_schedule=1@0.9;1,1,1,1", "--mtp_own_lr=True", "--seed=1"],
        # equal time for the last-5% row: its 12 drafting steps at 1.34x add 4 steps' time
        "one_head_eq5": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=244"],
        "one_head_eq5_seed1": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=244", "--seed=1"],
        "seq_own_s16_late5_x3": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                                 "--mtp_schedule=1@0.95;1,1,1,1", "--mtp_own_lr=True", "--max_iters=720"],
        "one_head_eq5_x3": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=732"],  # 36 drafting steps at 1.34x
        # a third seed for goal 1's gaps under 0.01 nats (the default's loss is 1 head's at 240 steps)
        "seq_own_s16_late10_seed2": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                                     "--mtp_schedule=1@0.9;1,1,1,1", "--mtp_own_lr=True", "--seed=2"],
        "one_head_eq_seed2": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=248", "--seed=2"],
        "one_head_eq5_seed2": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=244", "--seed=2"],
        "seq_own_s16_late10_x3": ["--mtp_style=sequential", "--mtp_detach=True", "--mtp_sample=0.0625",
                                  "--mtp_schedule=1@0.9;1,1,1,1", "--mtp_own_lr=True", "--max_iters=720"],
    },
}


def matmul_gflops():
    import bench  # torch and the model load only when a row runs or is benched, not for --table
    return bench.matmul_peak()["float32"] / 1e9


def run_row(study, name, args):
    out = HERE / "study_runs" / study / name
    cmd = [sys.executable, "train.py", f"--out_dir={out}", "--overwrite=True", *args]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: row {name} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return row_result(study, name, args, out, wall)


def row_result(study, name, args, out, wall):
    """A finished run's row, read from its metrics.jsonl."""
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in recs if "loss" in r]
    last_eval = [r for r in recs if "val_nt_loss" in r][-1]
    return dict(study=study, row=name, args=args, steps=train[-1]["step"], wall_s=wall and round(wall, 1),
                train_s=round(train[-1]["elapsed_s"], 1), val_nt_loss=last_eval["val_nt_loss"],
                val_tokens_per_forward=last_eval["val_tokens_per_forward"],
                accept=[last_eval.get(f"val_accept_h{k}") for k in range(2, 5)],  # heads 2..4 (None if absent)
                tokens_per_s=sorted(r["tokens_per_s"] for r in train if r["tokens_per_s"])[len(train) // 2],
                matmul_gflops=round(matmul_gflops()), when=time.strftime("%Y-%m-%d %H:%M"))


def bench_row(study, row):
    """sample.py --bench (greedy, 20 held-out prompts, 128 new tokens) on a finished row's checkpoint -> the row with
    its speedup (median, quartiles) and the matmul rate read beside it."""
    import sample
    from settings import parse_config
    out = HERE / "study_runs" / study / row["row"]
    print(f"== {row['row']}: sample.py --out_dir={out} --bench=True --max_new_tokens=128", flush=True)
    r = sample.main(parse_config([f"--out_dir={out}", "--bench=True", "--max_new_tokens=128"], sample.DEFAULTS))
    return dict(row, speedup=[r["speedup_median"], *r["speedup_quartiles"]], bench_matmul_gflops=round(matmul_gflops()))


def table(study, results):
    rows = [r for r in results if r["study"] == study]
    print(f"{'row':26s} {'arguments':62s} {'steps':>5s} {'time':>7s} {'val_nt_loss':>11s} {'tok/fwd':>7s} "
          f"{'accept h2..h4':>15s} {'tok/s':>6s} {'matmul':>7s}  speedup (quartiles)")
    for r in sorted(rows, key=lambda r: r["row"]):
        acc = " ".join(f"{a:.2f}" if a is not None else "   -" for a in r.get("accept") or [None] * 3)
        print(f"{r['row']:26s} {' '.join(r['args']):62s} {r['steps']:5d} {r['train_s']:6.0f}s {r['val_nt_loss']:11.4f} "
              f"{r['val_tokens_per_forward']:7.2f} {acc:>15s} {r['tokens_per_s']:6.0f} {r['matmul_gflops']:4d} GF/s"
              + ("  {:.2f}x ({:.2f}-{:.2f})".format(*r["speedup"]) if r.get("speedup") else ""))


def main(argv):
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in argv if a.startswith("--"))
    study = opts.get("study", "muon")
    if study not in STUDIES:
        raise SystemExit(f"error: --study={study!r}, expected one of {', '.join(STUDIES)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if "bench" in opts:
        for name in opts["bench"].split(","):
            done = [r for r in results if r["study"] == study and r["row"] == name]
            if not done:
                raise SystemExit(f"error: --bench: no finished row {name!r} in study {study}")
            row = bench_row(study, done[0])
            results = json.loads(RESULTS.read_text())  # another study.py may have written meanwhile
            results = [row if r["study"] == study and r["row"] == name else r for r in results]
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    elif "table" not in opts:
        wanted = opts["rows"].split(",") if "rows" in opts else list(STUDIES[study])
        unknown = [w for w in wanted if w not in STUDIES[study]]
        if unknown:
            raise SystemExit(f"error: --rows: {', '.join(unknown)} not in study {study} ({', '.join(STUDIES[study])})")
        for name in wanted:
            if any(r["study"] == study and r["row"] == name for r in results):
                continue
            row = run_row(study, name, STUDIES[study][name])
            results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []  # another study.py may have
            RESULTS.write_text(json.dumps(results + [row], indent=1) + "\n")  # written meanwhile
            results.append(row)
    table(study, results)


if __name__ == "__main__":
    main(sys.argv[1:])
