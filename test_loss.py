"""Tests of loss.py: hand-written targets, closed-form counts, the chunked cross-entropy against the
materialized reference (values and gradients), empty cases, and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from data import EOT, pack
from loss import IGNORE, count_targets, mtp_loss, mtp_loss_reference, mtp_targets

A1, A2, B1, B2 = 11, 12, 21, 22
X = IGNORE


def hand_row():
    # [EOT A1 A2 EOT B1 B2 pad pad]: two documents of 3 tokens, then padding (which also holds EOT)
    ids = torch.tensor([[EOT, A1, A2, EOT, B1, B2, EOT, EOT]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]], dtype=torch.int32)
    return ids, docs


def test_targets_by_hand():
    ids, docs = hand_row()
    expected = torch.tensor([
        [A1, A2, X, B1, B2, X, X, X],  # k=1: the EOT that starts document B is not a target of document A
        [A2, X, X, B2, X, X, X, X],    # k=2
        [X, X, X, X, X, X, X, X],      # k=3: no document has 4 tokens
        [X, X, X, X, X, X, X, X],      # k=4
    ])[:, None]
    assert torch.equal(mtp_targets(ids, docs, 4), expected)
    assert count_targets(dict(input_ids=ids, doc_ids=docs), 4).tolist() == [4, 2, 0, 0]


def test_eot_inside_a_document_is_a_real_target():
    # validity comes from doc_ids, not from comparing ids with the pad id: an EOT inside a document counts
    ids = torch.tensor([[EOT, 5, EOT, 6, EOT, EOT]])
    docs = torch.tensor([[0, 0, 0, 0, -1, -1]], dtype=torch.int32)
    assert mtp_targets(ids, docs, 1)[0, 0].tolist() == [5, EOT, 6, X, X, X]


def random_docs(g, n, max_len, vocab=50):
    return [[EOT] + torch.randint(0, vocab, (int(torch.randint(0, max_len, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_counts_closed_form(seed):
    g = torch.Generator().manual_seed(seed)
    T, n_predict = 16, 4
    batch = pack(random_docs(g, 12, 40), T)
    # segments (documents, or chunks of a split document) in order: their lengths
    lengths = [int((batch["doc_ids"][b] == d).sum()) for b in range(len(batch["doc_ids"]))
               for d in range(int(batch["doc_ids"][b].max()) + 1)]
    expected = [sum(max(0, n - k) for n in lengths) for k in range(1, n_predict + 1)]
    assert count_targets(batch, n_predict).tolist() == expected


def random_case(seed, K=3, B=3, T=12, D=8, V=37):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    docs = torch.full((B, T), -1, dtype=torch.int32)
    for b in range(B):  # random documents, random padding at the tail
        end = int(torch.randint(0, T + 1, (1,), generator=g))
        cuts = torch.sort(torch.randint(0, T, (3,), generator=g)).values
        docs[b, :end] = torch.bucketize(torch.arange(end), cuts, right=True).int()
    h = torch.randn(K, B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    return h, w, mtp_targets(ids, docs, K)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_chunked_equals_materialized(seed, chunk_rows):
    h, w, tgt = random_case(seed)
    scale = torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)  # unequal per-head weights, as in training
    sums, counts = mtp_loss(h, w, tgt, chunk_rows=chunk_rows)
    ref_sums, ref_counts = mtp_loss_reference(h, w, tgt)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((scale * sums).sum(), (h, w))
    ref_grads = torch.autograd.grad((scale * ref_sums).sum(), (h, w))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grad_scale_keeps_one_weight_gradient_and_checks_it():
    h, w, tgt = random_case(5)
    scale = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)  # a zero weight too (a head without targets)
    ref = torch.autograd.grad((scale * mtp_loss_reference(h, w, tgt)[0]).sum(), (h, w))
    for factor in (1.0, 3.0):  # the loss may weigh the heads by any multiple of grad_scale
        sums, _ = mtp_loss(h, w, tgt, chunk_rows=4, grad_scale=scale)
        got = torch.autograd.grad((factor * scale * sums).sum(), (h, w))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, factor * b, rtol=1e-12, atol=1e-12)
    sums, _ = mtp_loss(h, w, tgt, grad_scale=scale)
    with pytest.raises(ValueError, match="not proportional"):  # weighing the heads otherwise is refused
        torch.autograd.grad(sums.sum(), (h, w))


def test_negative_control_ignoring_the_mask_differs():
    # the original bug: targets from a plain shift, padding and document boundaries included
    h, w, tgt = random_case(0)
    ids = torch.where(tgt[0] == IGNORE, 0, tgt[0])
    buggy = F.cross_entropy((h[0] @ w.t()).flatten(0, 1), ids.flatten(), reduction="sum")
    right, _ = mtp_loss(h, w, tgt)
    assert not torch.allclose(buggy, right[0])


def test_all_ignored_gives_zero_and_zero_grad():
    h, w, tgt = random_case(1)
    sums, counts = mtp_loss(h, w, torch.full_like(tgt, IGNORE))
    assert sums.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]
    gh, gw = torch.autograd.grad(sums.sum(), (h, w))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_shape_mismatch_is_an_error():
    h, w, tgt = random_case(2)
    with pytest.raises(ValueError, match="targets shape"):
        mtp_loss(h, w, tgt[:2])


def test_compiled_equals_eager():
    h, w, tgt = random_case(3)
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    compiled = torch.compile(mtp_loss, fullgraph=False)
    for fn in (mtp_loss, compiled):
        sums, _ = fn(h, w, tgt, chunk_rows=7)
        gh, gw = torch.autograd.grad(sums.sum(), (h, w))
        if fn is mtp_loss:
            ref = (sums, gh, gw)
    for a, b in zip((sums, gh, gw), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
