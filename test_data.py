"""Tests of data.py: the offline tokenizer, packing invariants, shards, the token cache, the loader's
resume and world-size invariance, and every bad input named in the issue."""
import errno
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
from collections import Counter

import numpy as np
import pytest
import tiktoken
import torch

import data
from data import EOT, PackedLoader, get_tokenizer, pack, read_shard, write_shard


def test_tokenizer_ids_and_round_trip():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    text = open(data.__file__, encoding="utf-8").read()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_tokenizer_equals_tiktoken_r50k_base(tmp_path, monkeypatch):
    # tiktoken's own r50k_base, loaded offline from its cache (named by the sha1 of the download URL)
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    shutil.copy(data.RANKS_FILE, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("r50k_base")
    text = open(data.__file__, encoding="utf-8").read() + " 12345 naïve café 日本語 \n\n  x"
    assert get_tokenizer().encode_ordinary(text) == reference.encode_ordinary(text)


def test_tokenizer_bad_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        get_tokenizer(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(data.RANKS_FILE.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"bad.tiktoken: sha256 .* expected {data.RANKS_SHA256}"):
        get_tokenizer(bad)


def check_invariants(batch, docs, T):
    ids, mask, doc, pos = (batch[k] for k in ("input_ids", "attention_mask", "doc_ids", "position_ids"))
    assert ids.dtype == torch.int64 and doc.dtype == torch.int32
    assert pos.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.shape[1] == T and torch.equal(mask, doc >= 0)
    for b in range(len(ids)):
        real = int(mask[b].sum())
        assert not mask[b, real:].any(), "padding only at the tail"
        assert (ids[b, real:] == EOT).all() and (pos[b, real:] == 0).all() and (doc[b, real:] == -1).all()
        d = doc[b, :real]
        assert d[0] == 0 and ((d[1:] - d[:-1]) >= 0).all() and ((d[1:] - d[:-1]) <= 1).all()
        start = torch.ones(real, dtype=torch.bool)
        start[1:] = d[1:] != d[:-1]
        for t in range(real):  # positions restart at 0 per segment and increase by 1 inside it
            assert pos[b, t] == (0 if start[t] else pos[b, t - 1] + 1)
    # every token exactly once
    assert Counter(ids[mask].tolist()) == Counter(t for d in docs for t in d)


@pytest.mark.parametrize("seed", range(5))
def test_pack_invariants(seed):
    rng = np.random.default_rng(seed)
    T = 32
    docs = [[EOT] + rng.integers(0, 50000, rng.integers(0, 80)).tolist() for _ in range(40)]
    batch = pack(docs, T)
    check_invariants(batch, docs, T)
    # a document of at most T tokens is never split: it is one segment of exactly its length
    seg_lengths = Counter(int((batch["doc_ids"][b] == d).sum()) for b in range(len(batch["doc_ids"]))
                          for d in range(int(batch["doc_ids"][b].max()) + 1))
    expected = Counter(n for d in docs for n in ([T] * (len(d) // T) + ([len(d) % T] if len(d) % T else [])))
    assert seg_lengths == expected


def test_pack_by_hand():
    batch = pack([[EOT, 1, 2], [EOT, 3, 4, 5, 6, 7]], 5)  # the second document is cut into 5 + 1
    assert batch["input_ids"].tolist() == [[EOT, 3, 4, 5, 6], [EOT, 1, 2, 7, EOT]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", "\n"]
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, rng.integers(5, 300))))
    (d / "empty.txt").write_text("   \n")
    (d / "latin1.md").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_text_dir_summary_and_cache(text_dir, tmp_path):
    corpus = data.Corpus(text_dir, cache_dir=tmp_path, quiet=True)
    assert corpus.summary["docs"] == 31 and corpus.summary["empty_skipped"] == 1
    assert corpus.summary["non_utf8_replaced"] == 1
    stamp = (corpus.cache_path / "tokens.u16").stat().st_mtime_ns
    again = data.Corpus(text_dir, cache_dir=tmp_path, quiet=True)  # reused, not rebuilt
    assert again.cache_path == corpus.cache_path and (again.cache_path / "tokens.u16").stat().st_mtime_ns == stamp
    enc = get_tokenizer()
    assert corpus.tokens(0).tolist() == [EOT] + enc.encode_ordinary((text_dir / "doc00.txt").read_text()) + [EOT]


def test_text_cache_documents_end_with_eot(text_dir, tmp_path):
    corpus = data.Corpus(text_dir, cache_dir=tmp_path, quiet=True)
    enc, n = get_tokenizer(), corpus.summary["docs"]
    docs = [corpus.tokens(d).tolist() for d in range(n)]
    assert all(d[0] == EOT and d[-1] == EOT and EOT not in d[1:-1] for d in docs)
    # the last document's trailing EOT is appended (the cache stores [EOT] + ids per document)
    last = (text_dir / "latin1.md").read_bytes().decode("utf-8", errors="replace")  # sorted last
    assert docs[-1] == [EOT] + enc.encode_ordinary(last) + [EOT]
    assert corpus.summary["tokens"] == corpus.length.sum()  # counted at build time, each trailing EOT included
    # a long document cut into chunks: concatenated they are the document, and only the last ends with EOT
    d = int(np.argmax(corpus.length))
    _, off, length = data.chunk(corpus.length[d:d + 1], 16)
    chunks = [corpus.tokens(d, o, k).tolist() for o, k in zip(off, length)]
    assert len(chunks) > 3 and sum(chunks, []) == docs[d]
    assert chunks[-1][-1] == EOT and all(c[-1] != EOT for c in chunks[:-1])


def segments(batch):
    """The token lists of a batch's segments, row by row."""
    ids, doc = batch["input_ids"], batch["doc_ids"]
    return [ids[b][doc[b] == d].tolist() for b in range(len(ids)) for d in range(int(doc[b].max()) + 1)]


def epoch_segments(loader):
    """The segments of the loader's rows until its epoch ends (batch_size 1: no row of the next epoch)."""
    assert loader.B == 1
    out, epoch = [], loader.epoch
    while loader.epoch == epoch:
        out += segments(loader.next_batch())
    return out


def test_long_document_last_chunk_from_the_loader_ends_with_eot(tmp_path):
    p = tmp_path / "docs.jsonl"
    texts = ["a long document: " + " ".join(f"word{i}" for i in range(100)), "short one", "two", "three", "four"]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    T = 16
    segs = []
    for split in ("train", "val"):
        segs += epoch_segments(PackedLoader(p, split, batch_size=1, seq_len=T, val_fraction=0.2,
                                            cache_dir=tmp_path / "c", quiet=True))
    enc = get_tokenizer()
    docs = [[EOT] + enc.encode_ordinary(t) + [EOT] for t in texts]
    n = len(docs[0])
    assert n > 4 * T and Counter(t for s in segs for t in s) == Counter(t for d in docs for t in d)
    assert docs[0][(n - 1) // T * T:] in segs  # the long document's last chunk, ending with its EOT
    # every document's last chunk ends with its EOT; no other chunk does (the texts hold no EOT)
    assert sum(s[-1] == EOT for s in segs) == len(docs)


def test_shard_documents_come_out_as_eot_tokens_eot(tmp_path):
    # shard 0 starts with EOT; shard 1 does not: its first tokens are a document with no leading EOT, ended
    # by the first EOT. The last document of each shard gets its trailing EOT appended, unless the shard ends
    # with an EOT (shard 2): that one ends its document and opens no [EOT, EOT] document of its own.
    write_shard(tmp_path / "s_000.bin", [EOT, 1, 2, EOT, 3, 4, 5])
    write_shard(tmp_path / "s_001.bin", [7, 8, EOT, 9])
    write_shard(tmp_path / "s_002.bin", [EOT, 5, 6, EOT])
    expected = [[EOT, 1, 2, EOT], [EOT, 3, 4, 5, EOT], [7, 8, EOT], [EOT, 9, EOT], [EOT, 5, 6, EOT]]
    corpus = data.Corpus(str(tmp_path / "s_*.bin"))
    assert sorted(corpus.tokens(d).tolist() for d in range(len(corpus.start))) == sorted(expected)
    assert corpus.length.tolist() == [4, 5, 3, 3, 4] and corpus.summary["tokens"] == 19
    segs = []
    for split in ("train", "val"):
        loader = PackedLoader(split=split, batch_size=1, seq_len=8, val_fraction=0.25, corpus=corpus)
        segs += epoch_segments(loader)
    assert sorted(segs) == sorted(expected)


def test_cache_rebuilt_on_change_and_never_half_written(text_dir, tmp_path, monkeypatch):
    d = tmp_path / "src"
    shutil.copytree(text_dir, d)
    first = data.Corpus(d, cache_dir=tmp_path / "cache", quiet=True).cache_path
    (d / "doc00.txt").write_text("a changed document")
    second = data.Corpus(d, cache_dir=tmp_path / "cache", quiet=True)
    assert second.cache_path != first and second.summary["docs"] == 31
    # an interrupted build leaves no usable cache: the next run builds it afresh
    (d / "doc01.txt").write_text("changed again")
    calls = []

    def boom(self, texts, num_threads=1):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(tiktoken.Encoding, "encode_ordinary_batch", boom)
    # Ctrl-C: one line that says what became of the build (train.py prints it, not a traceback)
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted while building the token cache .*cache/text-"
                                                r"[0-9a-f]{20}; no part of it is left behind"):
        data.Corpus(d, cache_dir=tmp_path / "cache", quiet=True)
    monkeypatch.undo()
    assert calls and not list((tmp_path / "cache").glob(".tmp-*"))
    third = data.Corpus(d, cache_dir=tmp_path / "cache", quiet=True)
    assert third.summary["docs"] == 31


def test_jsonl_source(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "", "two docs", "three"]) + "\n")
    corpus = data.Corpus(p, cache_dir=tmp_path / "c", quiet=True)
    assert corpus.summary["docs"] == 3 and corpus.summary["empty_skipped"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2"):
        data.Corpus(bad, cache_dir=tmp_path / "c", quiet=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        data.Corpus(empty, cache_dir=tmp_path / "c", quiet=True)


def test_shards_round_trip_and_loader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[EOT] + rng.integers(0, 50000, rng.integers(1, 50)).tolist() for _ in range(40)]
    write_shard(tmp_path / "s_000.bin", [t for d in docs[:20] for t in d])
    write_shard(tmp_path / "s_001.bin", [t for d in docs[20:] for t in d])
    assert read_shard(tmp_path / "s_000.bin").tolist() == [t for d in docs[:20] for t in d]
    corpus = data.Corpus(str(tmp_path / "s_*.bin"))
    assert corpus.summary["docs"] == 40
    assert sorted(corpus.tokens(d).tolist() for d in range(40)) == sorted(d + [EOT] for d in docs)
    loader = PackedLoader(str(tmp_path / "s_*.bin"), batch_size=2, seq_len=16, val_fraction=0.1)
    assert loader.next_batch()["input_ids"].shape == (2, 16)


def test_bad_shards(tmp_path):
    write_shard(tmp_path / "ok.bin", [EOT, 1, 2, 3])
    raw = bytearray((tmp_path / "ok.bin").read_bytes())
    cases = {"magic": (0, 12345, "magic 12345 at offset 0, expected 20240520"),
             "version": (1, 7, "version 7 at offset 4, expected 1"),
             "count": (2, 9, "1032 bytes, expected 1042 .*9 tokens")}
    for name, (i, value, msg) in cases.items():
        b = bytearray(raw)
        b[4 * i:4 * i + 4] = np.int32(value).tobytes()
        (tmp_path / f"{name}.bin").write_bytes(bytes(b))
        with pytest.raises(ValueError, match=f"{name}.bin: {msg}"):
            read_shard(tmp_path / f"{name}.bin")
    b = bytearray(raw)
    b[1024 + 4:1024 + 6] = np.uint16(60000).tobytes()
    (tmp_path / "tok.bin").write_bytes(bytes(b))
    with pytest.raises(ValueError, match="tok.bin: token id 60000 at byte offset 1028 .*expected ids < 50257"):
        read_shard(tmp_path / "tok.bin")
    (tmp_path / "short.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="short.bin: 3 bytes"):
        read_shard(tmp_path / "short.bin")


def test_bad_sources_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="nowhere: no such file"):
        data.Corpus(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir: directory holds no text files"):
        data.Corpus(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match=r"\*.bin: no file matches this glob"):
        data.Corpus(str(tmp_path / "*.bin"))
    with pytest.raises(ValueError, match="data='': expected a path, a glob"):
        PackedLoader("")
    with pytest.raises(ValueError, match="seq_len 1"):
        PackedLoader(tmp_path / "nowhere", seq_len=1)
    with pytest.raises(ValueError, match="batch_size 0"):
        PackedLoader(tmp_path / "nowhere", batch_size=0)
    with pytest.raises(ValueError, match="seq_len 1"):
        pack([[EOT, 1]], 1)


def test_split_text_rule():
    a, b = "a" * 1997, "b" * 10
    assert data.split_text(a + "\n\n" + b) == [a + "\n\n" + b]  # 1999 characters at the break: one document
    assert data.split_text(a + "b\n\n" + b) == [a + "b\n\n", b]  # 2000: cut after the blank line
    assert data.split_text(a + "b\n \t\n\n  " + b + "\n\n") == [a + "b\n \t\n\n", "  " + b + "\n\n"]
    assert data.split_text(a + "b\n" + b) == [a + "b\n" + b]  # a single newline is no paragraph break
    text = "".join(f"paragraph {i} " + "x" * (i * 37 % 500) + "\n\n" for i in range(100))
    docs = data.split_text(text)
    assert "".join(docs) == text and all(len(d) >= data.MIN_DOC_CHARS for d in docs[:-1]) and len(docs) > 5


def test_single_text_file_is_cut_into_documents(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], rng.integers(5, 80))) + "\n\n"
                   for _ in range(300))
    p = tmp_path / "book.txt"
    p.write_text(text)
    corpus = data.Corpus(p, cache_dir=tmp_path / "c", quiet=True)
    enc, n = get_tokenizer(), corpus.summary["docs"]
    assert n == len(data.split_text(text)) > 10
    # every character in exactly one document, in order, each [EOT] + tokens + [EOT]
    docs = [corpus.tokens(d).tolist() for d in range(n)]
    assert all(d[0] == EOT == d[-1] for d in docs) and "".join(enc.decode(d[1:-1]) for d in docs) == text
    for split in ("train", "val"):
        assert PackedLoader(p, split, batch_size=2, seq_len=64, val_fraction=0.1, cache_dir=tmp_path / "c",
                            quiet=True).next_batch()["attention_mask"][:, 0].all()
    small = tmp_path / "small.txt"
    small.write_text("one paragraph\n\n" * 100)  # 1500 characters: one document
    with pytest.raises(ValueError, match=r"small.txt: 1500 bytes give 1 document.* at least 2000 characters"):
        data.Corpus(small, cache_dir=tmp_path / "c", quiet=True)
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_sources_by_path_or_glob(tmp_path):
    d = tmp_path / "corpus[v1]"  # a folder named with glob characters is that folder
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(f"document number {i}")
    (d / "upper.MD").write_text("an upper-case suffix")
    write_shard(d / "s_000.BIN", [EOT, 1, 2])
    write_shard(d / "s_001.bin", [EOT, 3])
    (d / "x.jsonl").write_text('{"text": "a"}\n')
    c = dict(cache_dir=tmp_path / "c", quiet=True)
    assert data.Corpus(d, **c).summary["docs"] == 4 and data.resolve_source(d)[0] == "text"
    g = str(tmp_path / "corpus?v1?")
    assert data.resolve_source(g + "/*.txt") == ("text", [d / f"doc{i}.txt" for i in range(3)])
    assert data.Corpus(g + "/*.[tT]*", **c).summary["docs"] == 3
    assert data.Corpus(g + "/*.[mM][dD]", **c).summary["docs"] == 1
    shards = data.Corpus(g + "/s_*", **c)
    assert shards.kind == "shards" and shards.summary["shards"] == 2 and shards.summary["docs"] == 2
    assert data.Corpus(d / "s_000.BIN").kind == "shards"
    (tmp_path / "UP.JSONL").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert data.Corpus(tmp_path / "UP.JSONL", **c).summary["docs"] == 2
    with pytest.raises(ValueError, match=r"the glob matches \{'\.bin': 2, '\.jsonl': 1, '\.md': 1, '\.txt': 3\}; "
                                         r"expected only .bin shards or only text files \(.*\.txt"):
        data.Corpus(g + "/*", **c)
    with pytest.raises(ValueError, match=r"the glob matches \{'\.jsonl': 1\}"):
        data.Corpus(g + "/*.jsonl", **c)
    with pytest.raises(ValueError, match=r"no file matches this glob"):
        data.Corpus(g + "/*.rst", **c)


@pytest.mark.parametrize("split", ["train", "val"])
def test_corpus_smaller_than_one_batch(tmp_path, split):
    p = tmp_path / "tiny.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "two words", "three short words"]))
    loader = PackedLoader(p, split, batch_size=8, seq_len=16, cache_dir=tmp_path / "c", quiet=True)
    for _ in range(3):  # each batch spans several epochs
        b = loader.next_batch()
        assert b["input_ids"].shape == (8, 16) and b["attention_mask"][:, 0].all()
    assert loader.epoch >= 3


def test_fingerprint_names_the_data_not_the_path(text_dir, tmp_path):
    fp = lambda src: data.Corpus(src, cache_dir=tmp_path / "c", quiet=True).fingerprint
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    shutil.copytree(text_dir, a)
    shutil.copytree(text_dir, b)
    for p in b.iterdir():
        os.utime(p, (1e9, 1e9))  # other path, other mtime, same files
    base = fp(a)
    assert re.fullmatch("[0-9a-f]{16}", base)
    assert fp(b) == base and fp(str(a) + "/") == base and fp(str(a) + "/*.[tm]*") == base  # a glob of the same files
    (b / "doc03.txt").write_text("an edited document")
    assert fp(b) != base
    shutil.rmtree(b)
    shutil.copytree(text_dir, b)
    (b / "zz_added.txt").write_text("an added document")
    assert fp(b) != base
    (b / "zz_added.txt").write_text("   ")  # even an empty file (skipped as a document) is another set of files
    assert fp(b) != base
    # shards: the same files elsewhere give the same fingerprint; an edit or an added shard does not
    for d in (a, b):
        for i in range(2):
            write_shard(d / f"s_{i:03d}.bin", [EOT, 1, 2, i])
        os.utime(d / "s_000.bin", (1e9, 1e9))
    assert fp(str(a / "s_*.bin")) == fp(str(b / "s_*.bin"))
    write_shard(b / "s_001.bin", [EOT, 1, 2, 7])
    assert fp(str(a / "s_*.bin")) != fp(str(b / "s_*.bin"))
    write_shard(a / "s_002.bin", [EOT])
    assert fp(str(a / "s_*.bin")) != fp(str(a / "s_00[01].bin"))


def test_stale_builds_of_dead_processes_are_removed(text_dir, tmp_path):
    cache = tmp_path / "cache"
    host = socket.gethostname()
    cache.mkdir()
    stale = cache / f".tmp-text-0123abcd-{host}-99999999"  # a build killed with kill -9: its pid is gone
    live = cache / f".tmp-text-0123abcd-{host}-{os.getpid()}"  # a build still running
    other = cache / ".tmp-text-0123abcd-otherhost-99999999"  # another machine's pids mean nothing here
    similar = cache / f".tmp-text-0123abcd-gpu-{host}-99999999"  # nor do those of a host whose name ends like ours
    for p in (stale, live, other, similar):
        p.mkdir()
        (p / "tokens.u16").write_bytes(b"\0\0")
    corpus = data.Corpus(text_dir, cache_dir=cache, quiet=True)
    expected = [live.name, other.name, similar.name, corpus.cache_path.name]
    assert sorted(p.name for p in cache.iterdir()) == sorted(expected)


def test_failed_build_leaves_nothing_and_disk_full_is_named(text_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_open = open

    class FullDisk:  # a file whose writes fail as on a full disk
        def __init__(self, f):
            self.f = f
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(data, "open", lambda path, mode="r", *a, **k: (
        FullDisk(real_open(path, mode, *a, **k)) if "w" in mode else real_open(path, mode, *a, **k)), raising=False)
    with pytest.raises(OSError, match=f"disk full while building the token cache {cache}") as e:
        data.Corpus(text_dir, cache_dir=cache, quiet=True)
    assert e.value.errno == errno.ENOSPC and not list(cache.iterdir())
    monkeypatch.undo()
    assert data.Corpus(text_dir, cache_dir=cache, quiet=True).summary["docs"] == 31


def test_resume_gives_identical_batches(text_dir, tmp_path):
    make = lambda: PackedLoader(text_dir, batch_size=3, seq_len=256, seed=5, cache_dir=tmp_path, quiet=True)
    a = make()
    for _ in range(7):  # enough to cross an epoch boundary on this small corpus
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(20)]
    b = make()
    b.load_state_dict(state)
    for e in expected:
        got = b.next_batch()
        assert all(torch.equal(got[k], e[k]) for k in e)
    assert b.epoch >= 1


def test_world_size_invariance(text_dir, tmp_path):
    one = PackedLoader(text_dir, batch_size=4, seq_len=64, cache_dir=tmp_path, quiet=True)
    two = [PackedLoader(text_dir, batch_size=2, seq_len=64, rank=r, world_size=2, cache_dir=tmp_path, quiet=True)
           for r in range(2)]
    for _ in range(12):
        full = one.next_batch()["input_ids"]
        r0, r1 = (ld.next_batch()["input_ids"] for ld in two)
        assert torch.equal(full[0::2], r0) and torch.equal(full[1::2], r1)


def test_epoch_covers_the_split_once_and_splits_are_disjoint(text_dir, tmp_path):
    loader = PackedLoader(text_dir, batch_size=1, seq_len=64, cache_dir=tmp_path, quiet=True, val_fraction=0.2)
    val = PackedLoader(text_dir, split="val", batch_size=1, seq_len=64, cache_dir=tmp_path, quiet=True,
                       val_fraction=0.2)
    assert not set(loader.docs) & set(val.docs) and len(loader.docs) + len(val.docs) == 31
    c = loader.corpus
    expected = Counter(t for d in loader.docs for t in c.tokens(d).tolist())
    seen = Counter()
    while loader.epoch == 0:
        b = loader.next_batch()
        seen.update(b["input_ids"][b["attention_mask"]].tolist())
    assert seen == expected
    assert seen[EOT] == 2 * len(loader.docs)  # each document's two EOTs


def test_default_corpus_packs_tightly():
    report = data.packing_report()
    for T, r in report.items():
        assert r["packed"] >= 0.99, (T, r)
        assert r["packed"] > r["padded"]


# ----------------------------------------------------------------------------- issue 27: data that is not what it seems

def write_files(root, files):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def test_find_agrees_with_glob_where_there_is_no_symlink(tmp_path, monkeypatch):
    # the reference: glob.glob(recursive=True) on a tree without links, hidden names and nested folders included
    write_files(tmp_path, {n: "x" for n in ["r/1.txt", "r/.hid.txt", "r/a/2.txt", "r/a/b/3.md", "r/a/b/c/4.txt",
                                             "r/.h/5.txt", "r/.h/x/6.txt", "r/s/7.bin", "r/s/b/8.txt"]})
    patterns = ["r/**/*.txt", "r/**", "r/*", "r/.*", "r/**/.*", "r/*/*.txt", "**/*.md", "r/**/b/*", "r/a/**/c/*.txt",
                "r/[a.]*/*", "r/*.txt", "r/?/b/*", "r/a/b/3.md", "r/nowhere/*"]
    monkeypatch.chdir(tmp_path)
    for pattern in patterns:
        for prefix in ("", str(tmp_path) + os.sep):  # relative to the current folder, and absolute
            expected = sorted({p.rstrip(os.sep) for p in glob.glob(prefix + pattern, recursive=True)})
            assert sorted(data._glob(prefix + pattern)) == expected, pattern


def test_symlinked_folders_and_files_are_read_once(tmp_path):
    # a folder holding a link to itself, a link to its parent, a second name for a file, and a link to a folder
    # outside: glob.glob listed each file ~40 times (the same document in training and held-out), the folder form
    # once but without the linked folder
    d = tmp_path / "d"
    write_files(tmp_path, {**{f"d/doc{i}.txt": f"document number {i} " * (i + 1) for i in range(6)},
                           "d/sub/inner.txt": "inside a sub-folder", "ext/outer.txt": "in a linked folder"})
    (d / "self").symlink_to(".")
    (d / "sub" / "up").symlink_to("..")
    (d / "again.txt").symlink_to("doc0.txt")
    (d / "ext").symlink_to(tmp_path / "ext")
    (d / "gone.txt").symlink_to("nowhere.txt")  # dangling: no data
    real = sorted(str(p.resolve()) for p in [*(d / f"doc{i}.txt" for i in range(6)), d / "sub/inner.txt",
                                             tmp_path / "ext/outer.txt"])
    c = dict(cache_dir=tmp_path / "c", quiet=True)
    fingerprints = set()
    for source in (d, str(d / "**" / "*.txt"), str(tmp_path / "d" / "**" / "*.*")):
        kind, paths = data.resolve_source(source)
        assert kind == "text" and sorted(str(p.resolve()) for p in paths) == real, source
        corpus = data.Corpus(source, **c)
        docs = [tuple(corpus.tokens(i).tolist()) for i in range(corpus.summary["docs"])]
        assert len(docs) == len(set(docs)) == 8
        fingerprints.add(corpus.fingerprint)
    assert len(fingerprints) == 1  # the folder and its globs are the same data


def test_glob_over_two_symlink_loops_finishes(tmp_path):
    # two links to the folder itself: glob.glob walks 2**40 paths (hours); each real folder once is instant
    write_files(tmp_path, {"d/a.txt": "one", "d/b.txt": "two"})
    (tmp_path / "d" / "loop1").symlink_to(".")
    (tmp_path / "d" / "loop2").symlink_to(".")

    def too_slow(signum, frame):
        raise TimeoutError("a glob over two symlink loops took more than 20 s")
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        paths = data.resolve_source(str(tmp_path / "d" / "**" / "*.txt"))[1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [p.name for p in paths] == ["a.txt", "b.txt"]


def test_fingerprint_of_unchanged_data_is_stable(tmp_path):
    # the value that cache version 2 gave these files: checkpoints record it and a resume compares it, so a new
    # cache version must keep it (it hashes the file names inside the folder and the tokens, not the folder)
    write_files(tmp_path, {"src/a.txt": "def f(x):\n    return x + 1\n",
                           "src/b.md": "# Title\n\nSome text, naïve café.\n", "src/sub/c.py": "print('hi')\n"})
    c = dict(cache_dir=tmp_path / "c", quiet=True)
    assert data.Corpus(tmp_path / "src", **c).fingerprint == "c02c7ccdd5322cff"
    assert data.Corpus(str(tmp_path / "src" / "**" / "*.*"), **c).fingerprint == "c02c7ccdd5322cff"


def damage_truncated(cache):
    p = cache / "tokens.u16"
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def damage_garbled_offsets(cache):
    (cache / "offsets.npy").write_bytes(b"not numpy")


def damage_other_offsets(cache):
    offsets = np.load(cache / "offsets.npy")
    np.save(cache / "offsets.npy", offsets[:-5])  # a valid file that no longer matches meta.json


@pytest.mark.parametrize("damage, why", [
    (damage_truncated, r"tokens.u16 has \d+ bytes, offsets.npy says \d+ tokens"),
    (lambda c: (c / "offsets.npy").unlink(), "offsets.npy is missing"),
    (lambda c: (c / "tokens.u16").unlink(), "tokens.u16 is missing"),
    (lambda c: (c / "meta.json").unlink(), "meta.json is missing"),
    (lambda c: (c / "meta.json").write_text('{"docs": 3'), "meta.json is unreadable"),
    (damage_garbled_offsets, "offsets.npy is unreadable"),
    (damage_other_offsets, r"offsets.npy holds int64 \(27,\); meta.json's 31 documents need int64 \(32,\)"),
])
def test_damaged_cache_is_rebuilt_with_one_warning(text_dir, tmp_path, capsys, damage, why):
    good = data.Corpus(text_dir, cache_dir=tmp_path, quiet=True)
    expected = [good.tokens(i).tolist() for i in range(31)]
    del good  # its memory maps of the files about to be damaged
    capsys.readouterr()
    damage(next(tmp_path.glob("text-*")))
    again = data.Corpus(text_dir, cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert [again.tokens(i).tolist() for i in range(again.summary["docs"])] == expected
    assert err.count("is damaged") == 1
    assert re.search(rf"warning: the token cache {re.escape(str(again.cache_path))} is damaged \({why}.*\); "
                     "rebuilding it", err)
    assert again.fingerprint == data.Corpus(text_dir, cache_dir=tmp_path / "fresh", quiet=True).fingerprint
    data.Corpus(text_dir, cache_dir=tmp_path)  # now whole: used as it is, without a word
    assert "is damaged" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", again.cache_path.name]  # nothing else left


def test_edit_that_keeps_size_and_mtime_is_seen(text_dir, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(text_dir, d)
    before = data.Corpus(d, cache_dir=tmp_path / "c", quiet=True)
    p = d / "doc05.txt"
    stat, text = p.stat(), p.read_text()
    edited = text[::-1]  # the same characters, so the same size
    assert edited != text and len(edited.encode()) == stat.st_size
    p.write_text(edited)
    os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = data.Corpus(d, cache_dir=tmp_path / "c", quiet=True)
    assert after.tokens(5).tolist() == [EOT] + get_tokenizer().encode_ordinary(edited) + [EOT]
    assert after.fingerprint != before.fingerprint and after.cache_path != before.cache_path
    # a file touched (mtime only) is the same data: its cache is reused, not rebuilt
    os.utime(p, (1e9, 1e9))
    assert data.Corpus(d, cache_dir=tmp_path / "c", quiet=True).cache_path == after.cache_path


def test_binary_and_non_utf8_files_get_one_warning_each(tmp_path, capsys):
    text = "a plain text file about alpha and beta\n" * 20
    files = {f"good{i}.txt": f"{i}: {text}" for i in range(5)}
    files.update({"latin1.txt": "caf\xe9 au lait".encode("latin-1"), "cp1252.md": "\u201cquoted\u201d".encode("cp1252"),
                  "a_image.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "b_notes.txt": gzip.compress(text.encode()),
                  "c_blob.md": b"text, then a NUL\x00 byte", "d_packed.txt": b"PK\x03\x04zipped"})
    write_files(tmp_path / "d", files)
    corpus = data.Corpus(tmp_path / "d", cache_dir=tmp_path / "c")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        "warning: skipped 4 of 11 files as binary: a_image.txt (a NUL byte at offset 8), "
        "b_notes.txt (gzip-compressed), c_blob.md (a NUL byte at offset 16) and 1 more",
        "warning: 2 of 11 files are not valid UTF-8 (each bad byte is read as U+FFFD): cp1252.md, latin1.txt"]
    assert corpus.summary["docs"] == 7 and corpus.summary["binary_skipped"] == 4
    enc = get_tokenizer()
    assert sorted(corpus.tokens(i).tolist() for i in range(7)) == sorted(
        [EOT] + enc.encode_ordinary(t) + [EOT] for t in [files[f"good{i}.txt"] for i in range(5)]
        + ["caf\ufffd au lait", "\ufffdquoted\ufffd"])
    # JSON lines: a lone surrogate is no UTF-8 either, named by its line
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n{"text": "fine too"}\n')
    data.Corpus(p, cache_dir=tmp_path / "c")
    assert f"warning: 1 of 3 documents are not valid UTF-8 (each bad byte is read as U+FFFD): {p} line 2" \
        in capsys.readouterr().err
    # only binary files: an error that says why the folder holds no document
    write_files(tmp_path / "bin", {"x.txt": b"\x00\x01", "y.txt": gzip.compress(b"hello")})
    with pytest.raises(ValueError, match=r"no non-empty document found \(2 binary files skipped: x.txt \(a NUL"):
        data.Corpus(tmp_path / "bin", cache_dir=tmp_path / "c", quiet=True)


@pytest.mark.parametrize("name, content, why", [
    ("book.txt.gz", gzip.compress(b"a long text\n\n" * 500), r"gzip-compressed, expected UTF-8 text; decompress it"),
    ("book.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"x" * 5000, r"a NUL byte at offset 8, expected UTF-8 text$"),
], ids=["gzip", "png"])
def test_single_binary_file_is_an_error(tmp_path, name, content, why):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name}: {why}"):
        data.Corpus(tmp_path / name, cache_dir=tmp_path / "c", quiet=True)
