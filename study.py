"""study.py: training runs compared side by side, one command per table, raw results kept in the repo.

    python study.py --study=muon                # AdamW against Muon, learning rates swept, default model and corpus
    python study.py --study=muon --rows=adamw_3e-3,muon_3e-3   # only these rows
    python study.py --study=muon --table        # print the table from study_results.json, run nothing
    python study.py --study=heads --bench=ROW,ROW   # sample.py --bench on these rows' checkpoints, kept in the rows
    python study.py --study=heads --decode=ROW,ROW  # their drafts in greedy decoding, all drafts on every forward

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
NEW_TOKENS = 128  # per held-out prompt, in --bench and --decode

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
        # extra targets as a learning aid at small constant weights (Megatron's 0.1), every position, attached: at
        # equal steps (240) against 1 head; shared logits cost almost no time, sequential depths their blocks
        "shared_w01": ["--mtp_style=shared", "--mtp_detach=False", "--mtp_sample=1", "--mtp_schedule=1,0.1,0.1,0.1",
                       "--mtp_own_lr=False"],
        "shared_w01_half": ["--mtp_style=shared", "--mtp_detach=False", "--mtp_sample=1",
                            "--mtp_schedule=1,0.1,0.1,0.1@0.5;1", "--mtp_own_lr=False"],
        "seq_att_w01": ["--mtp_style=sequential", "--mtp_detach=False", "--mtp_sample=1",
                        "--mtp_schedule=1,0.1,0.1,0.1", "--mtp_own_lr=False"],
        # the default's drafting stage with the depths attached at weight 0.1 (Muon's update of a depth's matrices
        # does not depend on its loss's scale; the trunk gets a tenth of their pull)
        "seq_att01_s16_late10": ["--mtp_detach=False", "--mtp_schedule=1@0.9;1,0.1,0.1,0.1"],
        **{f"seq_att01_s16_late10_{tail}": ["--mtp_detach=False", "--mtp_schedule=1@0.9;1,0.1,0.1,0.1", *more]
           for tail, more in (("seed1", ["--seed=1"]), ("seed2", ["--seed=2"]))},
        # a second seed at three times the budget
        "seq_own_s16_late10_x3_seed1": ["--max_iters=720", "--seed=1"],
        "one_head_eq_x3_seed1": ["--n_predict=1", "--mtp_schedule=1", "--max_iters=745", "--seed=1"],
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
    """sample.py --bench (greedy, 20 held-out prompts, 128 new tokens) on a finished row's checkpoint -> the fields
    it adds to the row: the speedup (median, quartiles), the tokens per forward (median), what a forward with all
    drafts cost over a plain one (the draft policy's timings) and the matmul rate read beside it."""
    import sample
    from settings import parse_config
    out = HERE / "study_runs" / study / row["row"]
    args = [f"--out_dir={out}", "--bench=True", f"--max_new_tokens={NEW_TOKENS}"]
    print(f"== {row['row']}: sample.py {' '.join(args)}", flush=True)
    r = sample.main(parse_config(args, sample.DEFAULTS))
    return dict(speedup=[r["speedup_median"], *r["speedup_quartiles"]], bench_matmul_gflops=round(matmul_gflops()),
                bench_tokens_per_forward=r["tokens_per_forward"], bench_cost_all_drafts=r["cost_all_drafts"])


def repeated_ngrams(prompt, new, n=4):
    """The fraction of the new tokens that end an n-gram already seen in prompt + the new tokens before them."""
    seq, seen, hits = prompt + new, set(), 0
    for i in range(n - 1, len(seq)):
        gram = tuple(seq[i - n + 1:i + 1])
        hits += i >= len(prompt) and gram in seen
        seen.add(gram)
    return hits / max(len(new), 1)


def decode_row(study, row):
    """What the drafts hold in real greedy decoding of a finished row's checkpoint: every drafting head drafts on
    every forward (the policy's choice overridden) over sample.py --bench's held-out prompts, 128 new tokens -> the
    fields it adds to the row: the tokens per forward (median, quartiles) and how much the greedy text repeats
    itself (the median fraction of new tokens that end a 4-gram seen before in the prompt or the text). A model
    without drafts (1 head, shared logits) decodes plainly: 1 token per forward."""
    import statistics

    import torch

    import sample
    from checkpoint import load_model
    model, _, state = load_model(HERE / "study_runs" / study / row["row"], "", torch.device("cpu"))
    shortlist = sample.shortlist_of(model, state, sample.DEFAULTS["draft_vocab"])
    n = model.cfg.n_predict - 1 if model.cfg.mtp_style != "shared" else 0
    tpf, rep = [], []
    for _, _, prompt in sample.bench_prompts(model, state, sample.DEFAULTS["bench_prompts"]):
        ids, st = sample.generate(model, prompt, NEW_TOKENS, speculative=n > 0, shortlist=shortlist,
                                  fixed_drafts=n if n else None)
        tpf.append(st["tokens_per_forward"])
        rep.append(repeated_ngrams(prompt, ids))
    lo, med, hi = statistics.quantiles(tpf, n=4)
    how = f"all {n} drafts on every forward" if n else "plain decoding (no drafts)"
    print(f"== {row['row']}: {how}: {med:.2f} tokens per forward ({lo:.2f}-{hi:.2f}); "
          f"repeated 4-grams in the greedy text: {statistics.median(rep):.2f}", flush=True)
    return dict(forced_tokens_per_forward=[med, lo, hi], repeated_4grams=statistics.median(rep))


def table(study, results):
    rows = [r for r in results if r["study"] == study]
    print(f"{'row':28s} {'arguments':62s} {'steps':>5s} {'time':>7s} {'val_nt_loss':>11s} {'tok/fwd':>7s} "
          f"{'accept h2..h4':>15s} {'tok/s':>6s} {'matmul':>7s}  speedup (quartiles)")
    for r in sorted(rows, key=lambda r: r["row"]):
        acc = " ".join(f"{a:.2f}" if a is not None else "   -" for a in r.get("accept") or [None] * 3)
        line = (f"{r['row']:28s} {' '.join(r['args']):62s} {r['steps']:5d} {r['train_s']:6.0f}s "
                f"{r['val_nt_loss']:11.4f} {r['val_tokens_per_forward']:7.2f} {acc:>15s} {r['tokens_per_s']:6.0f} "
                f"{r['matmul_gflops']:4d} GF/s")
        if r.get("speedup"):
            line += "  {:.2f}x ({:.2f}-{:.2f})".format(*r["speedup"])
            line += f" at {r['bench_matmul_gflops']} GF/s" if "bench_matmul_gflops" in r else ""
        if r.get("bench_cost_all_drafts"):
            line += (f", decoding {r['bench_tokens_per_forward']:.2f} tok/fwd, a forward with all drafts "
                     f"{r['bench_cost_all_drafts']:.2f}x plain")
        if "forced_tokens_per_forward" in r:
            med, lo, hi = r["forced_tokens_per_forward"]
            line += f" | all drafts: {med:.2f} tok/fwd ({lo:.2f}-{hi:.2f}), repeated 4-grams {r['repeated_4grams']:.2f}"
        print(line)


def main(argv):
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in argv if a.startswith("--"))
    study = opts.get("study", "muon")
    if study not in STUDIES:
        raise SystemExit(f"error: --study={study!r}, expected one of {', '.join(STUDIES)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for mode, measure in (("bench", bench_row), ("decode", decode_row)):
        if mode not in opts:
            continue
        for name in opts[mode].split(","):
            done = [r for r in results if r["study"] == study and r["row"] == name]
            if not done:
                raise SystemExit(f"error: --{mode}: no finished row {name!r} in study {study}")
            fields = measure(study, done[0])
            results = json.loads(RESULTS.read_text())  # another study.py may have written meanwhile: its fields stay
            results = [dict(r, **fields) if r["study"] == study and r["row"] == name else r for r in results]
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if not {"table", "bench", "decode"} & opts.keys():
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
