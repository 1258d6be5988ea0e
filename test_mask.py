"""The proofs that masking is right. Run `python test_mask.py` (one line per property, exit 1 if any
fails) or `pytest test_mask.py`. Tiny float64 models on the CPU, a few seconds in all.

The bug this project was born from: a loss computed on padding because the attention mask never
reached it, and a sum over accumulation steps logged as the loss. Each test below states a property
that rules out a part of that class of bug; the last ones are negative controls that reproduce the
bug and show the checks can tell right from wrong.
"""
import sys

import torch
import torch.nn.functional as F

from data import EOT, pack, rows_to_batch
from loss import IGNORE, ModelWithLoss, count_targets, mtp_loss, mtp_targets, step_coefficients
from model import Model, ModelConfig

V, N_PREDICT = 64, 4
TOL = dict(rtol=1e-9, atol=1e-11)


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, seq_len=64, n_layer=2, n_head=2, n_embd=16, n_experts=4, top_k=2,
                      n_predict=N_PREDICT)
    return Model(cfg).double()  # float64: differences in the comparisons below are rounding only


def make_docs(lengths, seed=0):
    """Documents [EOT] + tokens + [EOT] of the given total lengths (>= 2)."""
    g = torch.Generator().manual_seed(seed)
    return [[EOT % V] + torch.randint(0, V, (n - 2,), generator=g).tolist() + [EOT % V] for n in lengths]


def layout(rows, T):
    """Rows given explicitly as lists of documents -> batch dict, padding only at row tails."""
    b = rows_to_batch(rows, T)
    b["input_ids"] %= V  # the tiny vocabulary: EOT (and the padding that holds it) mapped into range
    return b


def loss_and_grads(model, batch, with_aux=True):
    """-> (per-head sums, counts, {param name: gradient of sum_k sums_k (+ aux)})."""
    model.zero_grad(set_to_none=True)
    out = ModelWithLoss(model)(batch)
    (out.sums.sum() + (out.aux_loss if with_aux else 0)).backward()
    return out.sums.detach(), out.counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    sa, ca, ga = a
    sb, cb, gb = b
    assert torch.equal(ca, cb), f"counts {ca.tolist()} != {cb.tolist()}"
    torch.testing.assert_close(sa, sb, **TOL)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL, msg=lambda m: f"gradient of {name}: {m}")


def test_padding_changes_nothing():
    """padding changes nothing: the same documents padded more, less or not at all give equal loss sums, counts, gradients"""
    model, docs = make_model(), make_docs([10, 7, 15])  # 32 tokens in all
    no_padding = layout([docs], 32)
    some_padding = layout([docs], 48)
    much_padding = layout([[d] for d in docs], 32)  # one document per row
    ref = loss_and_grads(model, no_padding)
    assert_same(ref, loss_and_grads(model, some_padding))
    assert_same(ref, loss_and_grads(model, much_padding))


def test_padding_ids_change_nothing():
    """the ids stored at padding positions change nothing"""
    model = make_model()
    batch = layout([make_docs([10, 7]), make_docs([20], seed=1)], 32)
    other = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["attention_mask"]
    other["input_ids"][pad] = torch.randint(0, V, (int(pad.sum()),))
    assert_same(loss_and_grads(model, batch), loss_and_grads(model, other))


def test_documents_are_isolated():
    """documents are isolated: changing document A changes no output, loss or gradient of document B in the same row"""
    model = make_model()
    a, b = make_docs([12, 14])
    a2 = [a[0]] + [(t + 7) % V for t in a[1:]]

    def doc_b_only(batch):
        out = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
        tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], N_PREDICT)
        tgt[:, batch["doc_ids"] != 1] = IGNORE  # document B's targets only
        model.zero_grad(set_to_none=True)
        sums, _ = mtp_loss(out.hidden, model.lm_head.weight, tgt)
        sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.hidden[:, batch["doc_ids"] == 1].detach(), sums.detach(), grads

    h1, s1, g1 = doc_b_only(layout([[a, b]], 32))
    h2, s2, g2 = doc_b_only(layout([[a2, b]], 32))
    torch.testing.assert_close(h1, h2, **TOL)
    torch.testing.assert_close(s1, s2, **TOL)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **TOL)


def test_each_head_shift_by_hand():
    """each head's shift is right: a hand-written row [EOT A1 A2 EOT | EOT B1 B2 EOT | pad pad] has exactly the targets written out"""
    A1, A2, B1, B2, X = 11, 12, 21, 22, IGNORE
    ids = torch.tensor([[EOT, A1, A2, EOT, EOT, B1, B2, EOT, EOT, EOT]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1, -1]], dtype=torch.int32)
    expected = [[A1, A2, EOT, X, B1, B2, EOT, X, X, X],  # head 1 predicts t+1: each document's closing EOT
                [A2, EOT, X, X, B2, EOT, X, X, X, X],    # head 2 predicts t+2
                [EOT, X, X, X, EOT, X, X, X, X, X],      # head 3 predicts t+3: the closing EOT from the opening one
                [X] * 10]                                # head 4: no document is long enough
    assert mtp_targets(ids, docs, 4)[:, 0].tolist() == expected


def test_a_document_end_is_learned():
    """a document's closing EOT is a target of every head that reaches it; the next document's opening EOT never is"""
    model = make_model()
    docs = make_docs([9, 7])
    batch = layout([docs], 16)
    tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], N_PREDICT)
    closing, opening = 8, 9  # positions in the row: document A is 0..8, B is 9..15
    for k in range(1, N_PREDICT + 1):
        assert tgt[k - 1, 0, closing - k] == EOT % V  # head k learns A's end k positions before it
        assert tgt[k - 1, 0, opening - k] == IGNORE  # ... never B's opening EOT
        assert (tgt[k - 1, 0, :opening] != IGNORE).sum() == 9 - k  # ... nor anything else of B
    # and the loss really counts it: changing the closing EOT's id moves every head's sum (a loss that took
    # EOT for padding, ignore_index = EOT, the original bug's cousin, would not move)
    out = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
    s1, _ = mtp_loss(out.hidden, model.lm_head.weight, tgt)
    tgt2 = tgt.clone()
    tgt2[tgt == EOT % V] = 5
    s2, _ = mtp_loss(out.hidden, model.lm_head.weight, tgt2)
    assert (s1 != s2).all()


def test_each_head_count_closed_form():
    """each head's count is the sum over documents (chunks of at most T) of max(0, length - k), both EOTs counted"""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 40, (9,), generator=g).tolist()
        batch = pack(make_docs(lengths, seed), 16)  # long documents are cut into chunks of <= 16
        chunks = [min(16, n - i) for n in lengths for i in range(0, n, 16)]
        expected = [sum(max(0, n - k) for n in chunks) for k in range(1, N_PREDICT + 1)]
        assert count_targets(batch, N_PREDICT).tolist() == expected


def test_router_statistics_ignore_padding():
    """the router's statistics (load-balancing loss, z-loss, expert counts) ignore padding"""
    model = make_model()
    padded = layout([make_docs([9, 8])], 40)
    cut = {k: v[:, :17] for k, v in padded.items()}
    outs = [model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]) for b in (padded, cut)]
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss, **TOL)
    assert torch.equal(outs[0].expert_counts, outs[1].expert_counts)
    assert int(outs[0].expert_counts.sum()) == 17 * model.cfg.n_layer * model.cfg.top_k


def accumulated_grads(model, micro_batches, normalize_per_micro_batch=False):
    """The training step's math (train.py): global counts first, then sum_m coef * sums_m, backward."""
    model.zero_grad(set_to_none=True)
    head_w = torch.ones(N_PREDICT, dtype=torch.float64)
    n_k = sum(count_targets(b, N_PREDICT) for b in micro_batches)
    for b in micro_batches:
        out = ModelWithLoss(model)(b)
        sums, counts = out.sums, out.counts
        if normalize_per_micro_batch:  # the wrong way: a mean of per-micro-batch means
            loss = (sums / counts.clamp(min=1)).sum() / len(micro_batches)
        else:
            loss = (step_coefficients(n_k, head_w) * sums).sum()
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_does_not_change_the_math():
    """accumulation does not change the math: 8 rows at once equal 4 micro-batches of 2 rows with uneven padding"""
    model = make_model()
    docs = make_docs([30, 3, 25, 9, 4, 31, 12, 2, 20, 6, 2, 28], seed=3)
    rows = [[docs[0]], [docs[1]], [docs[2], docs[11][:5]], [docs[3], docs[4]], [docs[5]], [docs[6], docs[7]],
            [docs[8], docs[9], docs[10]], [docs[11]]]
    batch = layout(rows, 32)
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    assert len({int(m["attention_mask"].sum()) for m in micro}) > 1, "uneven padding across micro-batches"
    whole, split = accumulated_grads(model, [batch]), accumulated_grads(model, micro)
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], **TOL)
    wrong = accumulated_grads(model, micro, normalize_per_micro_batch=True)  # negative control
    assert any(not torch.allclose(whole[n], wrong[n], **TOL) for n in whole), "mean of means should differ"


def test_negative_control_the_original_bug():
    """negative control: a loss that ignores the attention mask (the original bug) differs on a padded batch"""
    model = make_model()
    batch = layout([make_docs([10, 7]), make_docs([5], seed=1)], 24)
    out = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
    right, counts = mtp_loss(out.hidden, model.lm_head.weight, mtp_targets(batch["input_ids"], batch["doc_ids"], N_PREDICT))
    logits = model.logits(out.hidden[0])  # head 1, every position, padding included, no document boundary
    buggy = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    assert not torch.allclose(buggy, right[0] / counts[0]), "the buggy loss should not match the masked one"
    # and the buggy loss moves with the padding, where the right one does not
    more = layout([make_docs([10, 7]), make_docs([5], seed=1)], 40)
    out2 = model(more["input_ids"], doc_ids=more["doc_ids"], position_ids=more["position_ids"])
    right2, _ = mtp_loss(out2.hidden, model.lm_head.weight, mtp_targets(more["input_ids"], more["doc_ids"], N_PREDICT))
    buggy2 = F.cross_entropy(model.logits(out2.hidden[0])[:, :-1].flatten(0, 1), more["input_ids"][:, 1:].flatten())
    torch.testing.assert_close(right, right2, **TOL)
    assert not torch.allclose(buggy, buggy2)


def test_negative_control_attention_across_documents():
    """negative control: attention that crosses documents (plain causal on a packed row) changes document B"""
    model = make_model()
    batch = layout([make_docs([12, 14])], 26)
    right = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"]).hidden
    leaky = model(batch["input_ids"]).hidden  # no doc_ids: the whole row is one document
    b = batch["doc_ids"][0] == 1
    assert not torch.allclose(right[:, 0, b], leaky[:, 0, b])


if __name__ == "__main__":
    failed = 0
    for fn in [f for n, f in list(globals().items()) if n.startswith("test_")]:
        try:
            fn()
            print(f"\u2713 {fn.__doc__}")
        except Exception as e:  # report and go on: one line per property
            failed += 1
            print(f"\u2717 {fn.__doc__}\n    {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"{len([n for n in globals() if n.startswith('test_')]) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
