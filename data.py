"""data.py: the GPT-2 tokenizer (offline), corpus sources, a token cache, packing, and the batch dict.

Every mask of this project is born here. A batch is a dict of (B, T) tensors (see DESIGN.md):

    input_ids      int64  token ids; padding holds EOT (50256) but is never counted
    attention_mask bool   True for a real token, False for padding
    doc_ids        int32  0, 1, 2, ... per segment in row order; -1 for padding
    position_ids   int64  position inside its segment, restarting at 0; 0 for padding

A document is [EOT] + tokens + [EOT]. The leading EOT begins it, as in the llm.c / modded-nanogpt FineWeb
shards; the trailing EOT ends it and is a real target, so a model learns where a text stops. Neither the
token cache nor a shard stores it twice: it is the next document's leading EOT read once more, or, after the
last document of the cache or of a shard, an EOT appended when reading (`Corpus.tokens`, the one path every
reader takes). A document longer than T is cut into chunks of at most T, each its own segment; its last
chunk carries the trailing EOT. Chunks are packed into rows with best-fit decreasing inside windows of
`PACK_WINDOW` chunks: padding only at row tails, every token of the split exactly once per epoch.

The global stream of rows depends only on (corpus, split, seq_len, seed): rank r of W takes global
rows r, r+W, r+2W, ..., so the global batch is the same whatever the world size or accumulation.

Sources: None is the Python standard library (one document per .py file). A string that names an existing
path is that path: a folder is its text files, recursively, one document per file; a .bin file is one shard;
a .jsonl file is one document per line's "text"; any other file is one text cut into documents at blank
lines (`split_text`). Anything else is a glob: all matches .bin shards, or all text files (one document per
file). Suffixes are case-insensitive. A folder and a glob's `**` enter a symlinked folder once (a loop is not
followed round again), and a file reached under two names is read once. A text file that is clearly binary
(a NUL byte, or compressed) is skipped, and bytes that are not UTF-8 are read as U+FFFD: each with one warning
that counts them and names the first. `Corpus.fingerprint` names the data itself, not its path, so a resume
can refuse data that changed under the same path.
"""
import base64
import errno
import fnmatch
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import sysconfig
import time
from bisect import bisect_left
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
import torch

EOT = 50256  # <|endoftext|>, also our beginning-of-document token
GPT2_VOCAB = 50257
RANKS_FILE = Path(__file__).with_name("gpt2.tiktoken")
# The hash tiktoken itself expects for r50k_base (the GPT-2 encoding).
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k pattern: equivalent to GPT-2's original regex, but faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".py", ".text", ".tex", ".c", ".h", ".js", ".html"}
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4
# bump when the cache changes: old caches are then rebuilt (2: meta.json holds the fingerprint; 3: named by the
# sources' contents, binary files skipped, meta.json holds that name and the count of skipped files)
CACHE_VERSION = 3
PACK_WINDOW = 8192  # chunks packed together; larger packs tighter, costs more per window
DEFAULT_CACHE = Path(__file__).with_name("data_cache")
MIN_DOC_CHARS = 2000  # a single text file is cut into documents of at least this many characters (split_text)
# how compressed files begin (regular expressions over bytes; `\x28` is a literal byte), named in the error or
# warning so that a user knows to decompress them
COMPRESSED = {rb"\x1f\x8b": "gzip", rb"BZh[1-9]1AY&SY": "bzip2", rb"\xfd7zXZ\x00": "xz",
              rb"\x28\xb5\x2f\xfd": "zstd", rb"PK\x03\x04": "zip"}
WARN_NAMES = 3  # a warning about many files names this many of them


@lru_cache(maxsize=None)
def get_tokenizer(path=RANKS_FILE):
    """GPT-2 BPE from the ranks file in the repo: no network, hash checked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: GPT-2 ranks file not found; get it with "
                         "`pip download --no-deps openai-whisper==20250625` (whisper/assets/gpt2.tiktoken)")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, expected {RANKS_SHA256} (GPT-2 r50k_base ranks)")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_VOCAB)


# ----------------------------------------------------------------------------- shards (llm.c format)

def write_shard(path, tokens):
    """Write an llm.c / modded-nanogpt shard: 256 int32 header (magic, version, count), then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(256, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def read_shard(path, vocab_size=GPT2_VOCAB):
    """Memory-map a shard after checking its header, size and token range."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"shard {path}: {size} bytes, expected at least the {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {path}: magic {header[0]} at offset 0, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path}: version {header[1]} at offset 4, expected {SHARD_VERSION}")
    n = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * n:
        raise ValueError(f"shard {path}: {size} bytes, expected {SHARD_HEADER_BYTES + 2 * n} "
                         f"(header at offset 8 says {n} tokens)")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
    bad = np.flatnonzero(tokens >= vocab_size)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"shard {path}: token id {tokens[i]} at byte offset {SHARD_HEADER_BYTES + 2 * i} "
                         f"(token {i}), expected ids < {vocab_size}")
    return tokens


# ----------------------------------------------------------------------------- text sources

def _find(base, comps, hidden=False):
    """Paths under folder `base` that match the pattern components `comps` (glob syntax; '**' is any number of
    folders) -> list of str, only paths that exist. glob.glob(recursive=True) follows a symlinked folder at every
    level, so a folder holding a link to itself lists each file ~40 times (until the path is too long) and two
    such links take 2**40 steps; here '**' enters each real folder once per place in the pattern: a linked
    folder is read, a loop is not gone round again. hidden=False: '*' and '**' skip names that start with '.'
    unless the pattern's component does, as glob does."""
    out, seen = [], set()

    def names(d, dots):
        try:
            return sorted(n for n in os.listdir(d or ".") if dots or not n.startswith("."))
        except OSError:  # not a folder, or not readable: nothing in it matches
            return []

    def walk(d, i):
        if i == len(comps):
            out.append(d)
            return
        comp, last = comps[i], i == len(comps) - 1
        if comp == "**":
            key = (os.path.realpath(d or "."), i)
            if key in seen:
                return
            seen.add(key)
            walk(d, i + 1)  # '**' as no folder at all
            for name in names(d, hidden):
                p = os.path.join(d, name)
                if os.path.isdir(p):
                    walk(p, i)
                elif last:
                    out.append(p)
        elif glob.has_magic(comp):
            for name in fnmatch.filter(names(d, hidden or comp.startswith(".")), comp):
                walk(os.path.join(d, name), i + 1)
        else:
            walk(os.path.join(d, comp), i + 1)

    walk(base, 0)
    return [p for p in out if os.path.exists(p)]  # a dangling symlink names no data


def _glob(pattern):
    """glob.glob(pattern, recursive=True) with `_find`'s rule for symlinked folders."""
    parts = pattern.split(os.sep)
    i = next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = os.sep.join(parts[:i]) or (os.sep if pattern.startswith(os.sep) else "")
    return _find(base, [part for part in parts[i:] if part not in ("", ".")])


def _unique(paths):
    """Sorted, each file once: a file under two names (a symlink beside its target, a folder reached twice) would
    be two documents, and the split could put one in training and the other in the held-out set."""
    out, seen = [], set()
    for p in sorted(Path(p) for p in paths):
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def resolve_source(source):
    """-> (kind, paths). kind is 'shards', 'jsonl', 'text' (one document per file) or 'textfile' (one file cut
    into documents at blank lines). An existing path wins over a glob, so a folder named 'run[1]' is a folder."""
    if source is None:  # the Python standard library of the running interpreter
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = _unique(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
        if not paths:
            raise ValueError(f"default corpus: no .py files under {root}")
        return "text", paths
    source = str(source)
    if not source.strip():  # Path("") is the current folder: never what was meant
        raise ValueError(f"data={source!r}: expected a path, a glob of shards or text files, "
                         "or None for the default corpus")
    path = Path(source)
    if path.is_dir():  # its files at any depth, hidden ones included
        paths = _unique(p for p in map(Path, _find(str(path), ["**", "*"], hidden=True))
                        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not paths:
            hint = f"; shards are given as a glob, e.g. {path / '*.bin'}" if any(path.rglob("*.[bB][iI][nN]")) else ""
            raise ValueError(f"{source}: directory holds no text files (suffixes {sorted(TEXT_SUFFIXES)}){hint}")
        return "text", paths
    if path.is_file():
        return {".bin": "shards", ".jsonl": "jsonl"}.get(path.suffix.lower(), "textfile"), [path]
    paths = _unique(_glob(source))
    if not paths:
        raise ValueError(f"{source}: " + ("no file matches this glob" if any(c in source for c in "*?[")
                                          else "no such file or directory"))
    found = Counter((p.suffix.lower() or "no suffix") if p.is_file() else "folder" for p in paths)
    if set(found) == {".bin"}:
        return "shards", paths
    if set(found) <= TEXT_SUFFIXES:
        return "text", paths
    raise ValueError(f"{source}: the glob matches {dict(sorted(found.items()))}; expected only .bin shards "
                     f"or only text files ({' '.join(sorted(TEXT_SUFFIXES))})")


def split_text(text):
    """Cut one text into documents: a document ends at the first paragraph break (a newline followed by lines
    holding only whitespace) at which it holds at least MIN_DOC_CHARS characters; the last one holds what is
    left and may be shorter. Every character lands in exactly one document, in order."""
    docs, start = [], 0
    for m in re.finditer(r"\n(?:[^\S\n]*\n)+", text):
        if m.end() - start >= MIN_DOC_CHARS and m.end() < len(text):
            docs.append(text[start:m.end()])
            start = m.end()
    return docs + [text[start:]]


def _binary(raw):
    """Why raw is clearly not text -> a few words, or None. Text never holds a NUL byte; compressed data is named
    so that its owner knows to decompress it."""
    for magic, name in COMPRESSED.items():
        if re.match(magic, raw):
            return f"{name}-compressed"
    nul = raw.find(b"\0")
    return None if nul < 0 else f"a NUL byte at offset {nul}"


def _iter_texts(kind, paths):
    """Yield (where, raw bytes) of each document: where is its file, or its file and line (errors name them)."""
    for path in paths:
        if kind == "text":
            yield path, path.read_bytes()
            continue
        if kind == "textfile":
            raw = path.read_bytes()
            what = _binary(raw)
            if what:  # the whole source: skipping it would leave nothing
                raise ValueError(f"{path}: {what}, expected UTF-8 text"
                                 + ("; decompress it first" if what.endswith("compressed") else ""))
            # surrogateescape: bad UTF-8 survives the cut byte for byte and is counted per document later
            docs = split_text(raw.decode("utf-8", "surrogateescape"))
            n = sum(1 for d in docs if d.strip())
            if n < 2:
                raise ValueError(f"{path}: {len(raw)} bytes give {n} document(s); a single text file is cut at blank "
                                 f"lines into documents of at least {MIN_DOC_CHARS} characters and a train/val "
                                 f"split needs 2: give more than {MIN_DOC_CHARS} characters with a blank line "
                                 f"after the first {MIN_DOC_CHARS}, or a folder of files")
            for d in docs:
                yield path, d.encode("utf-8", "surrogateescape")
            continue
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object with a \"text\" string ({e!r})") \
                        from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}: line {lineno}: \"text\" is {type(text).__name__}, expected a string")
                yield f"{path} line {lineno}", text.encode("utf-8", "surrogatepass")


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _sources_key(kind, paths):
    """A hash of the sources' resolved paths and contents: the name of their token cache. Sizes and mtimes would
    be cheaper, but an edit can keep both (a same-length fix, `cp -p`, a tool that restores mtimes) and the stale
    cache would be read. Reading the default corpus (~1,800 files, 31 MB) for it costs a few tenths of a second."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, RANKS_SHA256, GPT2_PATTERN, kind,
                                   [str(p.resolve()) for p in paths]]).encode())
    for path in paths:
        file_hash = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(2**20):
                file_hash.update(block)
        h.update(file_hash.digest())
    return h.hexdigest()


def _open_cache(out, key):
    """Check the cache folder out against what its own meta.json promises -> (offsets, meta, None) when all holds,
    else (None, None, what is wrong). A tokens.u16 cut short (an interrupted copy, a full disk) would otherwise
    be read with most documents a single EOT."""
    def bad(why):
        return None, None, why
    try:
        meta = json.loads((out / "meta.json").read_text())
    except FileNotFoundError:
        return bad("meta.json is missing")
    except (OSError, ValueError) as e:
        return bad(f"meta.json is unreadable: {e}")
    if not isinstance(meta, dict) or meta.get("key") != key:
        return bad("meta.json names other sources or another cache version")
    docs, tokens = meta.get("docs"), meta.get("tokens")
    if not (type(docs) is int and type(tokens) is int and docs >= 1):
        return bad(f"meta.json says docs={docs!r}, tokens={tokens!r}, expected integers")
    try:
        offsets = np.load(out / "offsets.npy")
    except FileNotFoundError:
        return bad("offsets.npy is missing")
    except (OSError, ValueError, EOFError) as e:
        return bad(f"offsets.npy is unreadable: {e}")
    if offsets.dtype != np.int64 or offsets.shape != (docs + 1,):
        return bad(f"offsets.npy holds {offsets.dtype} {offsets.shape}; meta.json's {docs} documents need "
                   f"int64 ({docs + 1},)")
    if offsets[0] != 0 or (np.diff(offsets) < 1).any():
        return bad("offsets.npy does not rise from 0")
    try:
        size = (out / "tokens.u16").stat().st_size
    except FileNotFoundError:
        return bad("tokens.u16 is missing")
    if size != 2 * offsets[-1]:
        return bad(f"tokens.u16 has {size} bytes, offsets.npy says {offsets[-1]} tokens ({2 * offsets[-1]} bytes)")
    if tokens != offsets[-1] + docs:
        return bad(f"meta.json says {tokens} tokens, offsets.npy {offsets[-1] + docs} (trailing EOTs included)")
    firsts = np.memmap(out / "tokens.u16", dtype=np.uint16, mode="r")[offsets[:-1]]
    if (firsts != EOT).any():
        return bad(f"document {int(np.argmax(firsts != EOT))} does not begin with EOT")
    return offsets, meta, None


def _build_cache(kind, paths, out_dir, key, quiet):
    """Build out_dir atomically: in a .tmp-<name>-<host>-<pid> folder, renamed when complete (over a damaged
    out_dir, which is moved aside first). Any failure (a bad file, KeyboardInterrupt, disk full) removes that
    folder; one left by a build killed with kill -9 is removed by the next build here once its pid is gone (only
    on this host: pids of others mean nothing). A KeyboardInterrupt comes out with a one-line message."""
    host = socket.gethostname()
    for stale in out_dir.parent.glob(".tmp-*"):  # host "gpu-node1" is not "node1": the whole name must match
        m = re.fullmatch(rf"\.tmp-\w+-[0-9a-f]+-{re.escape(host)}-(\d+)(?:\.old)?", stale.name)
        if m and int(m[1]) > 0 and not _alive(int(m[1])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{host}-{os.getpid()}")
    old = tmp.with_name(tmp.name + ".old")  # where a damaged cache goes to be removed
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta, warnings = _tokenize(kind, paths, tmp, key, quiet)
        for _ in range(3):  # out_dir may be a cache that another process finished meanwhile, or a damaged one
            try:
                os.replace(tmp, out_dir)  # atomic: an interrupted build never leaves a usable-looking cache
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if _open_cache(out_dir, key)[2] is None:
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
                break
            try:
                os.replace(out_dir, old)
            except FileNotFoundError:  # another process moved it
                pass
            shutil.rmtree(old, ignore_errors=True)
        else:
            raise OSError(errno.ENOTEMPTY, f"could not replace the damaged token cache {out_dir}")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if not quiet:
            print(file=sys.stderr)  # end the progress line
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while building the token cache {out_dir} (2 bytes per "
                                        "token); free space there or set cache_dir to another disk") from e
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: a line for the user, not a traceback of tokenizer internals
            raise KeyboardInterrupt(f"interrupted while building the token cache {out_dir}; no part of it is "
                                    "left behind (the next run builds it again)") from None
        raise
    if not quiet:
        print(f"\rprepared {out_dir}: {json.dumps(meta)}", file=sys.stderr)
        for line in warnings:
            print(line, file=sys.stderr)


def _tokenize(kind, paths, tmp, key, quiet):
    """Tokenize every document once into tmp/tokens.u16 ([EOT] + ids per document) + offsets.npy + meta.json
    -> (meta, warning lines). The fingerprint hashes what the loader reads (tokens, offsets) and the file names
    relative to their common folder, so copying the files elsewhere keeps it and adding an (even empty or
    binary) file changes it."""
    enc = get_tokenizer()
    total_bytes = sum(p.stat().st_size for p in paths)
    tmp.mkdir(parents=True)
    root = os.path.commonpath([str(p.resolve().parent) for p in paths])
    fingerprint = hashlib.sha256(json.dumps([RANKS_SHA256, GPT2_PATTERN, kind, [
        os.path.relpath(p.resolve(), root) for p in paths]]).encode())
    offsets, n_tokens, done_bytes, n_read, n_empty, t0, last = [0], 0, 0, 0, 0, time.time(), 0.0
    binary, bad_utf8 = [], []  # where each such document came from

    def flush(texts, f):
        nonlocal n_tokens
        for ids in enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1):
            buf = np.asarray([EOT] + ids, dtype=np.uint16).tobytes()
            f.write(buf)
            fingerprint.update(buf)
            n_tokens += len(ids) + 1
            offsets.append(n_tokens)

    with open(tmp / "tokens.u16", "wb") as f:
        texts = []
        for where, raw in _iter_texts(kind, paths):
            n_read += 1
            done_bytes += len(raw)
            if kind == "text":  # a file of a folder or glob: named by its path inside the corpus
                where = os.path.relpath(where.resolve(), root)
                what = _binary(raw)
                if what:
                    binary.append(f"{where} ({what})")
                    continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                bad_utf8.append(str(where))
            if not text.strip():
                n_empty += 1
                continue
            texts.append(text)
            if len(texts) == 64:
                flush(texts, f)
                texts = []
            now = time.time()
            if not quiet and now - last > 2:
                last, rate = now, done_bytes / 1e6 / max(now - t0, 1e-9)
                eta = (total_bytes - done_bytes) / 1e6 / max(rate, 1e-9)
                print(f"\rtokenizing: {len(offsets) - 1 + len(texts)} docs, {done_bytes / 1e6:.1f}/"
                      f"{total_bytes / 1e6:.1f} MB, {rate:.2f} MB/s, ETA {eta:.0f}s", end="", file=sys.stderr)
        flush(texts, f)
        f.flush()
        os.fsync(f.fileno())
    if len(offsets) == 1:
        raise ValueError(f"{paths[0] if len(paths) == 1 else paths[0].parent}: no non-empty document found"
                         + (f" ({len(binary)} binary files skipped: {_names(binary)})" if binary else ""))
    offsets = np.asarray(offsets, dtype=np.int64)
    np.save(tmp / "offsets.npy", offsets)
    fingerprint.update(offsets.tobytes())
    # tokens: what the loader reads in one epoch, each document's trailing EOT included
    meta = dict(docs=len(offsets) - 1, tokens=n_tokens + len(offsets) - 1, empty_skipped=n_empty,
                binary_skipped=len(binary), non_utf8_replaced=len(bad_utf8), megabytes=round(done_bytes / 1e6, 2),
                seconds=round(time.time() - t0, 2), fingerprint=fingerprint.hexdigest()[:16], key=key)
    (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete cache
    warnings = []
    if binary:
        warnings.append(f"warning: skipped {len(binary)} of {len(paths)} files as binary: {_names(binary)}")
    if bad_utf8:
        unit = "files" if kind == "text" else "documents"
        warnings.append(f"warning: {len(bad_utf8)} of {n_read} {unit} are not valid UTF-8 (each bad byte is read "
                        f"as U+FFFD): {_names(bad_utf8)}")
    return meta, warnings


def _names(items):
    """The first WARN_NAMES of items, each once, and how many more there are."""
    items = list(dict.fromkeys(items))  # a file cut into several documents is named once
    more = len(items) - WARN_NAMES
    return ", ".join(items[:WARN_NAMES]) + (f" and {more} more" if more > 0 else "")


def _shard_fingerprint(paths):
    """Hashing every byte of many GB of shards at each start is too slow, so this hashes the sorted file names,
    their sizes, and the first and last MiB of each shard: an edit inside a shard that keeps its size and
    spares both ends goes unnoticed."""
    h = hashlib.sha256(b"shards")
    for path in sorted(paths, key=lambda p: p.name):
        size = path.stat().st_size
        h.update(json.dumps([path.name, size]).encode())
        with open(path, "rb") as f:
            h.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()[:16]


class Corpus:
    """Documents as slices of token arrays: doc i is arrays[src[i]][start[i] : start[i] + length[i]], read
    through `tokens(i)`, which appends the trailing EOT where that slice runs one past the array's end."""

    def __init__(self, source=None, cache_dir=None, quiet=False):
        kind, paths = resolve_source(source)
        self.source, self.kind = source, kind
        if kind == "shards":
            self.arrays, src, start, length = [], [], [], []
            for i, path in enumerate(paths):
                tokens = read_shard(path)
                starts = np.flatnonzero(tokens == EOT)
                if len(tokens) and (not len(starts) or starts[0] != 0):
                    starts = np.concatenate([[0], starts])  # tokens before the first EOT: a document too
                end = len(tokens)
                if len(starts) > 1 and starts[-1] == end - 1:  # a final EOT opens nothing: it ends the document before
                    starts, end = starts[:-1], end - 1
                self.arrays.append(tokens)
                src.append(np.full(len(starts), i, dtype=np.int32))
                start.append(starts)
                length.append(np.diff(np.append(starts, end)) + 1)  # + the next document's EOT
            self.src, self.start, self.length = (np.concatenate(a).astype(np.int64) for a in (src, start, length))
            self.fingerprint = _shard_fingerprint(paths)
            self.summary = dict(docs=len(self.start), tokens=int(self.length.sum()), shards=len(paths),
                                fingerprint=self.fingerprint)
            return
        key = _sources_key(kind, paths)
        out = Path(cache_dir or DEFAULT_CACHE) / f"{kind}-{key[:20]}"
        offsets, meta, problem = _open_cache(out, key)
        if problem:
            if out.exists() and not quiet:
                print(f"warning: the token cache {out} is damaged ({problem}); rebuilding it", file=sys.stderr)
            out.parent.mkdir(parents=True, exist_ok=True)
            _build_cache(kind, paths, out, key, quiet)
            offsets, meta, problem = _open_cache(out, key)
            if problem:  # a bug, not the user's
                raise RuntimeError(f"token cache {out}: {problem}, right after it was built")
        self.arrays = [np.memmap(out / "tokens.u16", dtype=np.uint16, mode="r")]
        self.src = np.zeros(len(offsets) - 1, dtype=np.int64)
        self.start, self.length = offsets[:-1], np.diff(offsets) + 1  # + the next document's EOT
        self.summary = meta
        self.fingerprint = meta["fingerprint"]
        self.cache_path = out

    def tokens(self, doc, offset=0, n=None):
        """Tokens [offset, offset + n) of document doc (to its end by default): what every reader reads."""
        array = self.arrays[self.src[doc]]
        lo = self.start[doc] + offset
        hi = lo + (self.length[doc] - offset if n is None else n)
        if hi <= len(array):
            return array[lo:hi]
        return np.append(array[lo:hi], np.uint16(EOT))  # the last document's trailing EOT is not stored

    def split(self, split, val_fraction):
        """Document indices of a split. Deterministic and independent of the training seed."""
        n = len(self.start)
        if n < 2:
            raise ValueError(f"{self.source}: {n} document(s); a train/val split needs at least 2")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction {val_fraction}, expected 0 < val_fraction < 1")
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r}, expected 'train' or 'val'")
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        perm = np.random.default_rng(20240520).permutation(n)
        return np.sort(perm[n_val:] if split == "train" else perm[:n_val])


# ----------------------------------------------------------------------------- packing

def chunk(lengths, seq_len):
    """Cut documents of the given lengths into chunks of at most seq_len -> (doc, offset, length) arrays."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_chunks = (lengths + seq_len - 1) // seq_len  # ceil, on an array
    doc = np.repeat(np.arange(len(lengths)), n_chunks)
    first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    offset = (np.arange(len(doc)) - first) * seq_len
    return doc, offset, np.minimum(seq_len, lengths[doc] - offset)


def best_fit(lengths, seq_len):
    """Best-fit decreasing: -> list of rows, each a list of item indices whose lengths sum to <= seq_len."""
    caps, owners, rows = [], [], []  # caps: sorted free space of open rows; owners: their row index
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        size = int(lengths[i])
        j = bisect_left(caps, size)  # the open row with the least free space that still fits
        if j == len(caps):
            row, free = len(rows), seq_len - size
            rows.append([i])
        else:
            free, row = caps.pop(j) - size, owners.pop(j)
            rows[row].append(i)
        if free > 0:
            k = bisect_left(caps, free)
            caps.insert(k, free)
            owners.insert(k, row)
    return rows


def rows_to_batch(rows, seq_len):
    """rows: list of lists of 1-D token arrays (the segments of each row) -> batch dict of (B, T) tensors."""
    B = len(rows)
    ids = np.full((B, seq_len), EOT, dtype=np.int64)
    doc = np.full((B, seq_len), -1, dtype=np.int32)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    for b, segments in enumerate(rows):
        t = 0
        for d, seg in enumerate(segments):
            n = len(seg)
            ids[b, t:t + n], doc[b, t:t + n], pos[b, t:t + n] = seg, d, np.arange(n)
            t += n
        if t > seq_len:
            raise ValueError(f"row {b}: {t} tokens, expected at most seq_len={seq_len}")
    doc_t = torch.from_numpy(doc)
    return dict(input_ids=torch.from_numpy(ids), attention_mask=doc_t >= 0,
                doc_ids=doc_t, position_ids=torch.from_numpy(pos))


def pack(docs, seq_len):
    """Pack token lists into rows of seq_len -> batch dict. Every token once, nothing added: callers pass full
    documents, [EOT] + tokens + [EOT]."""
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}, expected >= 2")
    docs = [np.asarray(d, dtype=np.int64) for d in docs]
    doc, off, length = chunk([len(d) for d in docs], seq_len)
    keep = length > 0
    doc, off, length = doc[keep], off[keep], length[keep]
    rows = [[docs[doc[i]][off[i]:off[i] + length[i]] for i in row] for row in best_fit(length, seq_len)]
    return rows_to_batch(rows, seq_len)


class PackedLoader:
    """Deterministic packed rows of one split; rank r of W takes global rows r, r+W, ... .

    Epoch e shuffles the split's documents with seed (seed, e), cuts them into chunks, and packs each
    window of PACK_WINDOW chunks with best-fit decreasing; the rows of a window are then shuffled.
    State is (epoch, window, row inside the window): three integers, the same on every rank.
    """

    def __init__(self, source=None, split="train", batch_size=8, seq_len=1024, rank=0, world_size=1, seed=0,
                 device="cpu", val_fraction=0.01, cache_dir=None, quiet=False, corpus=None):
        if seq_len < 2:
            raise ValueError(f"seq_len {seq_len}, expected >= 2")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}, expected >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}, expected 0 <= rank < world_size")
        self.corpus = corpus or Corpus(source, cache_dir=cache_dir, quiet=quiet)
        self.docs = self.corpus.split(split, val_fraction)
        self.B, self.T, self.rank, self.W, self.seed = batch_size, seq_len, rank, world_size, seed
        self.device = torch.device(device)
        self.epoch, self.window, self.row = 0, 0, 0
        self._epoch_chunks = self._window_rows = None

    def _chunks(self, epoch):
        if self._epoch_chunks is None or self._epoch_chunks[0] != epoch:
            docs = np.random.default_rng([self.seed, epoch]).permutation(self.docs)
            doc, off, length = chunk(self.corpus.length[docs], self.T)
            self._epoch_chunks = (epoch, docs[doc], off, length)
        return self._epoch_chunks[1:]

    def _rows(self, epoch, window):
        """The packed rows of one window, each an array of (doc, offset, length) segments."""
        if self._window_rows is None or self._window_rows[0] != (epoch, window):
            doc, off, length = (a[window * PACK_WINDOW:(window + 1) * PACK_WINDOW] for a in self._chunks(epoch))
            rows = best_fit(length, self.T)
            order = np.random.default_rng([self.seed, epoch, window]).permutation(len(rows))
            self._window_rows = ((epoch, window), [np.stack([doc[rows[r]], off[rows[r]], length[rows[r]]], 1)
                                                   for r in order])
        return self._window_rows[1]

    def _next_rows(self, n):
        """The next n rows of the global stream (advances the state)."""
        out = []
        while len(out) < n:
            rows = self._rows(self.epoch, self.window)
            take = rows[self.row:self.row + n - len(out)]
            out += take
            self.row += len(take)
            if self.row == len(rows):
                self.window, self.row = self.window + 1, 0
                if self.window * PACK_WINDOW >= len(self._chunks(self.epoch)[0]):
                    self.epoch, self.window = self.epoch + 1, 0
        return out

    def next_batch(self):
        mine = self._next_rows(self.B * self.W)[self.rank::self.W]
        rows = [[self.corpus.tokens(d, o, n) for d, o, n in segs] for segs in mine]
        batch = rows_to_batch(rows, self.T)
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def state_dict(self):
        return dict(epoch=self.epoch, window=self.window, row=self.row, seed=self.seed, seq_len=self.T)

    def load_state_dict(self, state):
        if (state["seed"], state["seq_len"]) != (self.seed, self.T):
            raise ValueError(f"loader state for seed {state['seed']}, seq_len {state['seq_len']}; "
                             f"this loader has seed {self.seed}, seq_len {self.T}")
        self.epoch, self.window, self.row = int(state["epoch"]), int(state["window"]), int(state["row"])


def token_counts(corpus, docs):
    """Unigram counts (GPT2_VOCAB,) int64 of documents `docs` of a Corpus, each read as tokens() reads it: a
    checkpoint's `token_counts` (train.py saves the training split's; sample.py drafts over the most frequent)."""
    if not len(docs):
        return torch.zeros(GPT2_VOCAB, dtype=torch.long)
    tokens = np.concatenate([corpus.tokens(d) for d in docs])
    return torch.from_numpy(np.bincount(tokens, minlength=GPT2_VOCAB)[:GPT2_VOCAB].astype(np.int64))


def packing_report(seq_lens=(256, 512, 1024), source=None):
    """Fraction of real tokens, packed vs one document (chunk) per padded row, over one epoch of the train split."""
    corpus, out = Corpus(source, quiet=True), {}
    for T in seq_lens:
        loader = PackedLoader(seq_len=T, corpus=corpus)
        _, _, length = loader._chunks(0)
        n_rows = sum(len(loader._rows(0, w)) for w in range(math.ceil(len(length) / PACK_WINDOW)))
        out[T] = dict(packed=length.sum() / (n_rows * T), padded=length.sum() / (len(length) * T))
    return out


def ngram_baselines(corpus, val_fraction=0.01):
    """Next-token cross-entropy (nats) of the validation split under unigram and interpolated bigram models
    counted on the training split (add-one smoothing): the bars a language model must clear."""
    def targets(docs):  # (previous, next) pairs inside documents: what head 1 is asked to predict
        prev, nxt = [], []
        for d in docs:
            toks = corpus.tokens(d).astype(np.int64)  # its trailing EOT is a target too
            prev.append(toks[:-1])
            nxt.append(toks[1:])
        return np.concatenate(prev), np.concatenate(nxt)
    (tp, tn), (vp, vn) = targets(corpus.split("train", val_fraction)), targets(corpus.split("val", val_fraction))
    uni = (np.bincount(tn, minlength=GPT2_VOCAB) + 1.0) / (len(tn) + GPT2_VOCAB)
    pairs, counts = np.unique(tp * GPT2_VOCAB + tn, return_counts=True)
    ctx = np.bincount(tp, minlength=GPT2_VOCAB)
    i = np.clip(np.searchsorted(pairs, vp * GPT2_VOCAB + vn), 0, len(pairs) - 1)
    c_pair = np.where(pairs[i] == vp * GPT2_VOCAB + vn, counts[i], 0)
    p_bi = c_pair / np.maximum(ctx[vp], 1)
    bigram = min(-np.mean(np.log(lam * p_bi + (1 - lam) * uni[vn])) for lam in np.linspace(0.05, 0.95, 19))
    return dict(unigram=float(-np.mean(np.log(uni[vn]))), bigram=float(bigram), val_targets=len(vn))


if __name__ == "__main__":  # python data.py: prepare the default corpus and report on it
    t0 = time.time()
    loader = PackedLoader(batch_size=16, seq_len=1024)
    print(f"corpus: {loader.corpus.summary} ({time.time() - t0:.1f}s)")
    for T, r in packing_report().items():
        print(f"seq_len {T}: real-token fraction packed {r['packed']:.4f}, "
              f"one document chunk per row {r['padded']:.4f}")
    b = ngram_baselines(loader.corpus)
    print(f"validation next-token loss of n-gram baselines counted on the training split ({b['val_targets']} targets): "
          f"unigram {b['unigram']:.3f} nats, interpolated bigram {b['bigram']:.3f} nats")
