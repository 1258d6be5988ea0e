"""settings.py: `--name=value` overrides and `--config=FILE` files over typed defaults, the device, the head and
learning-rate schedules.

nanoGPT's configurator in spirit (a script's defaults, overridden from the command line or a file of
`name = value` lines), but nothing is exec'd: a value is a Python literal (or a bare word, read as a string)
and must have its default's type. The defaults themselves live in the scripts that own them (the top of
train.py, model.ModelConfig, sample.py's DEFAULTS); this module only reads overrides against them.
"""
import ast
import difflib
import io
import itertools
import math
import re
import tokenize
from pathlib import Path

import torch


def parse_value(name, text, where, defaults):
    """Parse an override as a Python literal and check it against the default's type. Nothing is eval'd."""
    if name not in defaults:
        close = [k for k in defaults if name and k.startswith(name)][:3]
        close = close or difflib.get_close_matches(name, defaults, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{where}: unknown setting {name!r}{hint}")
    default = defaults[name]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text  # a bare word: a string
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # a string setting takes the text as written: --mtp_schedule=1,.5 is "1,.5", not a tuple
    ok = (value is None or isinstance(value, str)) if default is None else type(value) is type(default)
    if not ok:
        expected = "None or str" if default is None else type(default).__name__
        raise ValueError(f"{where}: {name}={value!r} is {type(value).__name__}, expected {expected} "
                         f"like the default {default!r}")
    return value


def strip_comment(line):
    """The line without its `# comment`; a `#` inside a quoted value stays (name = "a#b")."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return line[:tok.start[1]].strip()
    except (tokenize.TokenError, SyntaxError):  # an unclosed quote: leave the line whole, the value check speaks
        pass
    return line.strip()


def read_config_file(path, defaults):
    """A file of `name = value` lines (blank lines and # comments allowed) -> dict of overrides."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"--config={path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config={path}: not a text file of `name = value` lines (not UTF-8)") from None
    out = {}
    for i, raw in enumerate(lines, 1):
        line = strip_comment(raw)
        if not line:
            continue
        key, eq, val = (s.strip() for s in line.partition("="))
        if not eq or not key.isidentifier():
            raise ValueError(f"{path}:{i}: {raw.strip()[:80]!r}, expected a line `name = value`")
        out[key] = parse_value(key, val, f"{path}:{i}", defaults)
    return out


def parse_config(argv, defaults):
    """--name=value arguments (and --config=FILE of `name = value` lines) over the defaults -> a new dict."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --name=value")
        name, text = arg[2:].split("=", 1)
        if name == "config":
            cfg.update(read_config_file(text, defaults))
        else:
            cfg[name] = parse_value(name, text, "command line", defaults)
    return cfg


def resolve_device(name):
    """'auto', 'cpu', 'cuda', 'cuda:N' -> torch.device, or ValueError when this machine has no such device. A
    CUDA device always comes back with its index (torch.cuda.set_device refuses a bare 'cuda')."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}, expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def attention_bytes(batch_size, seq_len, n_head, device, backend):
    """Memory the dense-mask attention path needs at once: the (B, 1, T, T) boolean mask and, in case SDPA
    falls back to its math kernel, the (B, H, T, T) float32 scores. FlexAttention's BlockMask is small."""
    if backend == "flex" or (backend == "auto" and device.type == "cuda"):
        return 0
    return batch_size * seq_len ** 2 * (1 + 4 * n_head)


def available_bytes(device):
    """Free memory of a GPU, or MemAvailable of this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return math.inf


def check_attention_memory(batch_size, seq_len, n_head, device, backend):
    need, have = attention_bytes(batch_size, seq_len, n_head, device, backend), available_bytes(device)
    if need > have:
        raise ValueError(f"seq_len={seq_len} with batch_size={batch_size} needs {need / 2**30:.1f} GiB for the "
                         f"dense attention mask and scores, and {device} has {have / 2**30:.1f} GiB available: "
                         "lower seq_len or batch_size")


def parse_schedule(text, n_predict, max_iters):
    """mtp_schedule -> [(first step, (w_1, .., w_n_predict))] per stage. A stage is `w1,w2,..` or `w1,w2,..@f`
    (it lasts the fraction f of max_iters); stages without a fraction share what the others leave equally.
    Heads not listed get weight 0; weights of heads beyond n_predict are dropped (main() says so)."""
    stages, fracs = [], []
    for stage in text.split(";"):
        weights, _, frac = stage.partition("@")
        try:
            w = [float(x) for x in weights.split(",")]
            f = float(frac) if frac else None
        except ValueError:
            w, f = [], None
        if not w or not all(math.isfinite(x) and x >= 0 for x in w) or w[0] <= 0 or (f is not None and not 0 < f <= 1):
            raise ValueError(f"mtp_schedule={text!r}: stage {stage!r}, expected comma-separated head weights >= 0, "
                             f"head 1's > 0, optionally @ the fraction of the run in (0, 1] "
                             f"(e.g. '1,.5,.25@0.1;1': three heads for the first 10%, then head 1 alone)")
        stages.append((tuple(w) + (0.0,) * n_predict)[:n_predict])
        fracs.append(f)
    given, free = sum(f for f in fracs if f is not None), fracs.count(None)
    if given > 1 + 1e-9 or (not free and abs(given - 1) > 1e-9):
        raise ValueError(f"mtp_schedule={text!r}: the stages' fractions add up to {given:g}, expected "
                         f"{'at most ' if free else ''}1")
    fracs = [f if f is not None else (1 - given) / free for f in fracs]
    ends = list(itertools.accumulate(fracs))
    starts = [0] + [math.ceil(round(e * max_iters, 6)) for e in ends[:-1]]  # stage i+1 starts at ceil(F_i * max_iters)
    return list(zip(starts, stages))


def stage_at(step, stages):
    return max(i for i, (start, _) in enumerate(stages) if start <= step or i == 0)


def lr_at(step, c, first=0):
    """Linear warmup, then cosine (or warmup-stable-decay) down to learning_rate * min_lr_ratio, which the
    last step (max_iters - 1) reaches exactly when the steps outnumber the warmup. first > 0: the same shape over
    the steps first.. only (drafters that join late, train.py's mtp_own_lr), with a warmup of at most an eighth of
    them; 0 before first."""
    span, step = c.max_iters - first, step - first
    if step < 0:
        return 0.0
    warmup = c.warmup_iters if first == 0 else max(1, min(c.warmup_iters, span // 8))
    if step < warmup:
        return c.learning_rate * (step + 1) / warmup
    floor = c.learning_rate * c.min_lr_ratio
    if c.lr_schedule == "wsd":  # decay over the steps decay_start .. max_iters - 1
        decay_start = max(warmup, round(span * (1 - c.decay_frac)))
        frac = max(0.0, (step + 1 - decay_start) / max(1, span - decay_start))
        return c.learning_rate - (c.learning_rate - floor) * min(frac, 1.0)
    frac = (step + 1 - warmup) / max(1, span - warmup)
    return floor + 0.5 * (c.learning_rate - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))
