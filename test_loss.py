"""Tests of loss.py: hand-written targets, closed-form counts, the chunked cross-entropy against the
materialized reference (values and gradients), shared logits (one state scored against every head's targets:
the reference, and one unembedding's FLOPs whatever the heads), empty cases, and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from data import EOT, pack
from loss import (
    IGNORE,
    ModelWithLoss,
    count_targets,
    head_agreement,
    mtp_eval,
    mtp_loss,
    mtp_loss_reference,
    mtp_targets,
)

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
    with pytest.raises(RuntimeError, match="not proportional to grad_scale"):  # weighing the heads otherwise is refused
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


def test_precision_under_autocast():
    # the chunk matmuls run in autocast's dtype (bf16 products), the softmax and the sums in float32
    h, w, tgt = random_case(4, K=2, B=2, T=16, D=32, V=300)
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = mtp_loss(h, w, tgt, chunk_rows=7)
        gh, gw = torch.autograd.grad(sums.sum(), (h, w))
    assert sums.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    logits = (h.bfloat16() @ w.bfloat16().t()).float()  # the reference: bf16 products, float32 from there on
    ref = torch.stack([F.cross_entropy(logits[k].flatten(0, 1), tgt[k].flatten(), ignore_index=IGNORE, reduction="sum")
                       for k in range(2)])
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-4)
    rh, rw = torch.autograd.grad(ref.sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=1e-2)  # ours accumulates chunks in float32: closer to exact
    full, _ = mtp_loss(h.detach(), w.detach(), tgt)  # float32 all the way differs: the bf16 path was taken
    assert not torch.allclose(sums, full, rtol=1e-6, atol=0)


def test_shared_logits_precision_under_autocast():
    # the combined gradient of shared logits under autocast: bf16 products, float32 softmax and sums
    h, w, tgt = random_case(7, K=3, B=2, T=16, D=32, V=300)
    h = h[:1].detach().float().requires_grad_()
    w = w.detach().float().requires_grad_()
    scale = torch.tensor([1.0, 0.5, 0.25])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = mtp_loss(h, w, tgt, chunk_rows=7, grad_scale=scale)
        gh, gw = torch.autograd.grad((scale * sums).sum(), (h, w))
    assert sums.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    logits = (h[0].bfloat16() @ w.bfloat16().t()).float()
    ref = torch.stack([F.cross_entropy(logits.flatten(0, 1), tgt[k].flatten(), ignore_index=IGNORE, reduction="sum")
                       for k in range(3)])
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-4)
    rh, rw = torch.autograd.grad((scale * ref).sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=1e-2)


def test_head_agreement_by_hand():
    # one document [1 2 3 4 5] then padding; the heads' greedy tokens are written out
    ids = torch.tensor([[1, 2, 3, 4, 5, 0]])
    docs = torch.tensor([[0, 0, 0, 0, 0, -1]], dtype=torch.int32)
    tgt = mtp_targets(ids, docs, 3)  # head 1 [2 3 4 5 X X], head 2 [3 4 5 X X X], head 3 [4 5 X X X X]
    preds = torch.tensor([[2, 9, 4, 5, 7, 7], [3, 4, 8, 6, 7, 7], [9, 5, 1, 1, 7, 7]])[:, None]
    a = head_agreement(preds, tgt)
    assert a["correct"].tolist() == [3, 2, 1] and a["valid"].tolist() == [4, 3, 2]  # accuracy 3/4, 2/3, 1/2
    # head 2's draft at t vs head 1 at t+1, t = 0..3: (3 vs 9) (4 vs 4) (8 vs 5) (6 vs 7) -> 1 of 4
    # head 3's draft at t vs head 1 at t+2, t = 0..2: (9 vs 4) (5 vs 5) (1 vs 7) -> 1 of 3
    assert a["accepted"].tolist() == [1, 1] and a["judged"].tolist() == [4, 3]
    # consecutive accepted drafts at t = 0..3: (0, 2, 0, 0). Decoding visits t = 0 (1 token), then t = 1 (1 + 2
    # tokens), then t = 4, the document's last token: done. 4 tokens in 2 forwards = 2.0 (averaging 1 + run over
    # every position, 6 / 4 = 1.5, is not what decoding gets)
    assert a["run"].tolist() == [4] and a["positions"].tolist() == [2]


def test_model_with_loss_is_the_glue_written_out():
    from model import Model, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, seq_len=32, n_layer=1, n_head=2, n_embd=16, n_experts=4, n_predict=3)
    model = Model(cfg).double()
    batch = pack([[EOT % 64] + list(range(1, 12)) + [EOT % 64], [EOT % 64, 5, 6, 7, EOT % 64]], 32)
    batch["input_ids"] %= 64
    out = ModelWithLoss(model)(batch, heads=[0, 2])
    h = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"]).hidden
    tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], 3)
    sums, counts = mtp_loss_reference(h[[0, 2]], model.lm_head.weight, tgt[[0, 2]])
    torch.testing.assert_close(out.sums, sums, rtol=1e-12, atol=1e-12)
    assert out.counts.tolist() == counts.tolist() == [18 - 2 * 1, 18 - 2 * 3]  # documents of 13 and 5: sum of len - k
    ev = ModelWithLoss(model)(batch, predict=True)
    assert ev.preds.shape == (3, 1, 32) and torch.equal(ev.preds[0], model.logits(h[0]).argmax(-1))


@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_shared_logits_equal_the_materialized_reference(chunk_rows):
    # one state scored against the targets of 3 heads: the reference repeats the state and materializes the logits
    h, w, tgt = random_case(6)
    h1 = h[:1].detach().clone().requires_grad_()
    scale = torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)
    ref_sums, ref_counts = mtp_loss_reference(h1, w, tgt)
    manual = [F.cross_entropy((h1[0] @ w.t()).flatten(0, 1), tgt[k].flatten(), ignore_index=IGNORE, reduction="sum")
              for k in range(3)]
    torch.testing.assert_close(ref_sums, torch.stack(manual), rtol=1e-12, atol=1e-12)  # the reference itself
    ref_grads = torch.autograd.grad((scale * ref_sums).sum(), (h1, w))
    for grad_scale in (None, scale):  # per-head gradients, or the training path's single combined one
        sums, counts = mtp_loss(h1, w, tgt, chunk_rows=chunk_rows, grad_scale=grad_scale)
        assert torch.equal(counts, ref_counts)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad((scale * sums).sum(), (h1, w))
        assert grads[0].shape == h1.shape
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _, _, preds = mtp_eval(h1, w, tgt, chunk_rows=chunk_rows)  # every head's greedy token is head 1's
    assert preds.shape == tgt.shape and all(torch.equal(preds[k], (h1[0] @ w.t()).argmax(-1)) for k in range(3))
    sums, _ = mtp_loss(h1, w, tgt, chunk_rows=chunk_rows, grad_scale=scale)
    with pytest.raises(RuntimeError, match="not proportional to grad_scale"):  # the combined gradient is checked too
        torch.autograd.grad(sums.sum(), (h1, w))


def test_shared_logits_cost_one_unembedding_whatever_the_heads():
    # the training path (grad_scale given): the matmul FLOPs of 4 heads' targets equal those of 1 target; 4 states
    # (parallel heads, or a shared state repeated) cost 4 times as much
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulFlops(TorchDispatchMode):  # torch's FlopCounterMode does not count the in-place addmm_
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_", "matmul", "bmm"):
                a, b = args[:2] if name in ("mm", "matmul", "bmm") else args[1:3]
                self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            return func(*args, **(kwargs or {}))
    g = torch.Generator().manual_seed(0)
    K, B, T, D, V = 4, 2, 16, 8, 50
    h = torch.randn(1, B, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    tgt = mtp_targets(ids, torch.zeros(B, T, dtype=torch.int32), K)

    def flops(hidden, targets):
        scale = torch.ones(len(targets))
        with MatmulFlops() as counter:
            sums, _ = mtp_loss(hidden, w, targets, chunk_rows=8, grad_scale=scale)
            torch.autograd.grad((scale * sums).sum(), (h, w))
        return counter.flops
    one, shared, repeated = flops(h, tgt[:1]), flops(h, tgt), flops(h.expand(K, B, T, D), tgt)
    assert one == shared == 3 * 2 * B * T * V * D  # logits, the hidden gradient, the weight gradient
    assert repeated == K * one


def test_model_with_loss_for_each_style():
    from model import MTP_STYLES, Model, ModelConfig
    batch = pack([[EOT % 64] + list(range(1, 12)) + [EOT % 64], [EOT % 64, 5, 6, 7, EOT % 64]], 32)
    batch["input_ids"] %= 64
    tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], 3)
    for style in MTP_STYLES:
        torch.manual_seed(0)
        model = Model(ModelConfig(vocab_size=64, seq_len=32, n_layer=1, n_head=2, n_embd=16, n_experts=4, n_predict=3,
                                  mtp_style=style)).double()
        h = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"]).hidden
        assert h.shape[0] == (1 if style == "shared" else 3)
        out = ModelWithLoss(model)(batch, heads=[0, 2])
        sums, counts = mtp_loss_reference(h if style == "shared" else h[[0, 2]], model.lm_head.weight, tgt[[0, 2]])
        torch.testing.assert_close(out.sums, sums, rtol=1e-12, atol=1e-12)
        assert out.counts.tolist() == counts.tolist() == [18 - 2 * 1, 18 - 2 * 3]
