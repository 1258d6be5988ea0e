"""Tests of data.py: the offline tokenizer, packing invariants, shards, the token cache, the loader's
resume and world-size invariance, and every bad input named in the issue."""
import hashlib
import json
import shutil
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
    assert ids.dtype == torch.int64 and doc.dtype == torch.int32 and pos.dtype == torch.int64 and mask.dtype == torch.bool
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
    first = corpus.arrays[0][corpus.start[0]:corpus.start[0] + corpus.length[0]]
    assert first.tolist() == [EOT] + enc.encode_ordinary((text_dir / "doc00.txt").read_text())


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
    with pytest.raises(KeyboardInterrupt):
        data.Corpus(d, cache_dir=tmp_path / "cache", quiet=True)
    monkeypatch.undo()
    assert calls and not any((p / "meta.json").exists() and p.name.startswith(".tmp") for p in (tmp_path / "cache").iterdir())
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
    got = sorted(corpus.arrays[s][a:a + n].tolist() for s, a, n in zip(corpus.src, corpus.start, corpus.length))
    assert got == sorted(docs)
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
    with pytest.raises(ValueError, match="no shard matches"):
        data.Corpus(str(tmp_path / "*.bin"))
    with pytest.raises(ValueError, match="seq_len 1"):
        PackedLoader(tmp_path / "nowhere", seq_len=1)
    with pytest.raises(ValueError, match="batch_size 0"):
        PackedLoader(tmp_path / "nowhere", batch_size=0)
    with pytest.raises(ValueError, match="seq_len 1"):
        pack([[EOT, 1]], 1)


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
    val = PackedLoader(text_dir, split="val", batch_size=1, seq_len=64, cache_dir=tmp_path, quiet=True, val_fraction=0.2)
    assert not set(loader.docs) & set(val.docs) and len(loader.docs) + len(val.docs) == 31
    c = loader.corpus
    expected = Counter(t for d in loader.docs for t in c.arrays[0][c.start[d]:c.start[d] + c.length[d]].tolist())
    seen = Counter()
    while loader.epoch == 0:
        b = loader.next_batch()
        seen.update(b["input_ids"][b["attention_mask"]].tolist())
    assert seen == expected


def test_default_corpus_packs_tightly():
    report = data.packing_report()
    for T, r in report.items():
        assert r["packed"] >= 0.99, (T, r)
        assert r["packed"] > r["padded"]
