"""report.py: what a training run says: its log lines on rank 0's stdout and the same as JSON objects in
metrics.jsonl (one per line, tagged with the run id; plot.py reads them), the ETA, FLOP/s and MFU.

A library of train.py: plain arguments in, strings and dicts out; it imports nothing of the project.
"""
import json
import os
import re

import torch

PEAK_BF16 = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "B200": 2250e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}  # dense, one device


def per_head(sums, counts, heads, n):
    """[loss of head k or None] for k = 1..n: None where the head did not run or had no target."""
    out = [None] * n
    for h, s, cnt in zip(heads, sums.tolist(), counts.tolist()):
        out[h] = s / cnt if cnt else None
    return out


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def eta_s(step, interval, last_eval_s, c, stages, stage_flops, now):
    """Steps left at the last interval's seconds per step (a step of another stage of the head schedule priced by
    its FLOPs against this one's), plus evaluations left at the last one's time (before the first, eval_iters
    steps' time: an evaluation runs eval_iters global batches forward only). None before a step was timed."""
    if not interval["steps"]:
        return None
    sec_per_step = interval["train_s"] / interval["steps"]
    ends = [start for start, _ in stages[1:]] + [c.max_iters]  # now: the stage of the steps just timed
    steps_left = sum(max(0, end - max(step, start)) * f / stage_flops[now]
                     for (start, _), end, f in zip(stages, ends, stage_flops))
    # evaluations at steps step..max_iters (this step's comes after its log line), the last one at max_iters
    evals_left = c.max_iters // c.eval_interval - (step - 1) // c.eval_interval + (c.max_iters % c.eval_interval > 0)
    return steps_left * sec_per_step + evals_left * (last_eval_s or c.eval_iters * sec_per_step)


class Metrics:
    """The log lines on rank 0's stdout and, as JSON objects tagged with the run id, in metrics.jsonl."""

    def __init__(self, path, run_id, log):
        self.run_id, self.log, self.path = run_id, log, path
        self.file = None
        if path is not None:
            partial = False  # a killed run may have left a partial last line: the next record starts a new one
            if path.is_file() and path.stat().st_size:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    partial = f.read(1) != b"\n"
            self.file = open(path, "a")
            if partial:
                self.file.write("\n")

    def emit(self, record, line):
        self.log(line)
        if self.file:
            try:
                self.file.write(json.dumps(dict(run=self.run_id, **record)) + "\n")
                self.file.flush()
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror} writing {self.path}") from None

    def close(self):
        if self.file:
            self.file.close()


def announce(c, env, raw_model, tokens_per_step):
    """The run's first lines: settings, sizes, the step's tokens, the head schedule."""
    log = env.log
    listed = max(len(stage.split("@")[0].split(",")) for stage in c.mtp_schedule.split(";"))
    if listed > c.n_predict:
        log(f"note: mtp_schedule={c.mtp_schedule!r} weighs {listed} heads; the model has n_predict={c.n_predict}, "
            f"so the weights of heads {c.n_predict + 1}..{listed} are not used")
    never = [k + 1 for k in range(c.n_predict) if all(ws[k] == 0 for _, ws in env.stages)]
    if never:
        log(f"note: heads {never} have weight 0 in every stage of mtp_schedule={c.mtp_schedule!r}: never trained")
    n_total, n_active = raw_model.param_counts()
    log(f"config: {json.dumps(vars(c))}")
    detached = c.mtp_detach and c.n_predict > 1 and c.mtp_style != "shared"
    drafters = (f", heads 2..n detached and at {c.mtp_sample:g} of the positions" if detached else
                f", heads 2..n at {c.mtp_sample:g} of the positions" if c.mtp_sample < 1 else "")
    mflop = raw_model.flops_per_token(draft_rate=c.mtp_sample) / 1e6
    log(f"parameters: {n_total / 1e6:.2f}M total, {n_active / 1e6:.2f}M active per token; "
        f"{mflop:.1f} MFLOP per token (training, all heads{drafters})")
    log(f"tokens per step: {tokens_per_step} = batch_size {c.batch_size} x seq_len {c.seq_len} x grad_accum_steps "
        f"{c.grad_accum_steps} x world_size {env.world}; device {env.device}, compile {c.compile}, "
        f"{'FSDP2' if c.fsdp else 'DDP' if env.distributed else 'one process'}")
    if len(env.stages) > 1 or any(w != 1 for w in env.stages[0][1]):
        log("head schedule: " + "; ".join(f"steps {start}+: w = {list(w)}" for start, w in env.stages))
    empty = [i + 1 for i, (start, _) in enumerate(env.stages) if start >= (env.stages + [(c.max_iters, 0)])[i + 1][0]]
    if empty:
        log(f"note: stages {empty} of mtp_schedule get no step with max_iters={c.max_iters}")


def train_record(step, stage, s, loss, grad_norm, lr, heads, interval, elapsed, eta, c, peak, tokens_per_step):
    """The log line of a step and its metrics.jsonl record, from the step's reduced sums (read here: a sync)."""
    dt = max(interval["train_s"], 1e-9)  # training time only: evaluations and checkpoints excluded
    load = s["load"].view(-1, c.n_experts)
    losses = per_head(s["sums"], s["counts"], heads, c.n_predict)
    timed = interval["steps"] > 0  # no rate for an interval that held only the first compiled step
    flops = interval["flops"] / dt if timed else None
    rec = dict(step=step, stage=stage + 1, loss=loss.item(), nt_loss=losses[0],
               **{f"loss_h{k + 1}": v for k, v in enumerate(losses)}, aux_loss=s["aux"].item(),
               grad_norm=grad_norm.item(), lr=lr, tokens_per_s=float(interval["tokens"]) / dt if timed else None,
               flops_per_s=flops, mfu=flops / peak if peak and timed else None,
               pad_frac=1 - s["real"].item() / tokens_per_step,
               expert_load=(load.max(1).values / load.mean(1).clamp(min=1)).max().item() if len(load) else 1.0,
               elapsed_s=elapsed, eta_s=eta)
    heads_txt = " ".join(f"h{k + 1} {v:.3f}" for k, v in enumerate(losses) if v is not None)
    line = (f"step {step:5d} | loss {rec['loss']:.4f} | nt_loss {fmt(losses[0], '.4f')} ({heads_txt}) | "
            f"aux {rec['aux_loss']:.4f} | gnorm {rec['grad_norm']:.2f} | lr {lr:.2e} | "
            f"{fmt(rec['tokens_per_s'], '.0f')} tok/s | {fmt(flops and flops / 1e9, '.1f')} GFLOP/s per device"
            + (f" ({fmt(rec['mfu'] and 100 * rec['mfu'], '.1f')}% MFU)" if peak else "")
            + f" | load {rec['expert_load']:.2f} | pad {100 * rec['pad_frac']:.2f}% | {elapsed:.0f}s,"
            + f" ETA {fmt(eta, '.0f')}s")
    return rec, line


def eval_record(step, val, elapsed, c):
    acc_txt = " ".join(f"h{k + 1} {fmt(val[f'val_acc_h{k + 1}'])}" for k in range(c.n_predict))
    return dict(step=step, **val, elapsed_s=elapsed), (
        f"step {step:5d} | val_loss {val['val_loss']:.4f} | val_nt_loss {fmt(val['val_nt_loss'], '.4f')} | "
        f"acc {acc_txt} | tokens/forward {fmt(val['val_tokens_per_forward'], '.2f')}")


def peak_flops(device_name):
    """Dense bf16 FLOP/s of one device, by whole words of its name ("NVIDIA L40S" is not an "L4"), or None."""
    return next((v for k, v in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0]))
                 if re.search(rf"(?<![\w-]){re.escape(k)}(?![\w])", device_name)), None)


def memory_report(raw_model, opt):
    """Bytes this rank holds for parameters and optimizer state (FSDP: the local shards)."""
    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    pb = sum(local_bytes(p) for p in raw_model.parameters())
    ob = sum(local_bytes(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return f"memory per rank: parameters {pb / 2**20:.2f} MiB + optimizer state {ob / 2**20:.2f} MiB"
