"""settings.py: `--name=value` overrides and `--config=FILE` files over typed defaults, and the device.

nanoGPT's configurator in spirit (a script's defaults, overridden from the command line or a file of
`name = value` lines), but nothing is exec'd: a value is a Python literal (or a bare word, read as a string)
and must have its default's type. The defaults themselves live in the scripts that own them (the top of
train.py, model.ModelConfig, sample.py's DEFAULTS); this module only reads overrides against them.
"""
import ast
import difflib
import io
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
    """'auto', 'cpu', 'cuda', 'cuda:N' -> torch.device, or ValueError when this machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}, expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
