"""The proofs that masking is right. Run `python test_mask.py` (one line per property and multi-token-prediction
style, exit 1 if any fails) or `pytest test_mask.py`. Tiny float64 models on the CPU, seconds in all.

The bug this project was born from: a loss computed on padding because the attention mask never
reached it, and a sum over accumulation steps logged as the loss. Each test below states a property
that rules out a part of that class of bug, for each style of multi-token prediction (parallel heads,
sequential depths, shared logits); the negative controls reproduce the bug, or a mutant of the sequential
depths' input shift, and show the checks can tell right from wrong. A mutant is patched in from here
(model.tokens_ahead is the rule a sequential depth reads its token by), never switched on in the model.
"""
import contextlib
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from data import EOT, pack, rows_to_batch
from loss import (
    IGNORE,
    ModelWithLoss,
    count_targets,
    mtp_loss,
    mtp_targets,
    sampled_columns,
    step_coefficients,
    train_targets,
)
from model import MTP_STYLES, Model, ModelConfig, tokens_ahead

V, N_PREDICT = 64, 4
TOL = dict(rtol=1e-9, atol=1e-11)
per_style = pytest.mark.parametrize("style", MTP_STYLES)


def make_model(style="parallel", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, seq_len=64, n_layer=2, n_head=2, n_embd=16, n_experts=4, top_k=2,
                      **{"n_predict": N_PREDICT, "mtp_style": style, "mtp_detach": False, **kw})
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


def run(model, batch):
    return model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])


def loss_and_grads(model, batch, with_aux=True):
    """-> (per-head sums, counts, {param name: gradient of sum_k sums_k (+ aux)}), through the training path
    (grad_scale given: the single-buffer gradient, and for shared logits the combined one)."""
    model.zero_grad(set_to_none=True)
    ones = torch.ones(N_PREDICT, dtype=torch.float64)
    out = ModelWithLoss(model)(batch, grad_scale=ones)
    (out.sums.sum() + (out.aux_loss if with_aux else 0)).backward()
    return out.sums.detach(), out.counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    sa, ca, ga = a
    sb, cb, gb = b
    assert torch.equal(ca, cb), f"counts {ca.tolist()} != {cb.tolist()}"
    torch.testing.assert_close(sa, sb, **TOL)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL, msg=lambda m: f"gradient of {name}: {m}")


@contextlib.contextmanager
def patched(module, name, value):
    """module.name = value inside the block (a mutant, patched from the test; works without pytest too)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@per_style
def test_padding_changes_nothing(style):
    """padding changes nothing: the same documents padded more, less or not at all give equal loss sums, counts,
    gradients"""
    model, docs = make_model(style), make_docs([10, 7, 15])  # 32 tokens in all
    no_padding = layout([docs], 32)
    some_padding = layout([docs], 48)
    much_padding = layout([[d] for d in docs], 32)  # one document per row
    ref = loss_and_grads(model, no_padding)
    assert_same(ref, loss_and_grads(model, some_padding))
    assert_same(ref, loss_and_grads(model, much_padding))


@per_style
def test_padding_ids_change_nothing(style):
    """the ids stored at padding positions change nothing"""
    model = make_model(style)
    batch = layout([make_docs([10, 7]), make_docs([20], seed=1)], 32)
    other = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["attention_mask"]
    other["input_ids"][pad] = torch.randint(0, V, (int(pad.sum()),))
    assert_same(loss_and_grads(model, batch), loss_and_grads(model, other))


def isolation_failures(model):
    """-> what changed in one document when only the other one of its row changed, both ways (A changed: B's
    outputs, loss, gradients; B changed: A's), as a list of names; empty when documents are isolated."""
    a, b = make_docs([12, 14])
    a2, b2 = [a[0]] + [(t + 7) % V for t in a[1:]], [b[0]] + [(t + 5) % V for t in b[1:]]

    def doc_only(batch, d):
        out = run(model, batch)
        tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], N_PREDICT)
        tgt[:, batch["doc_ids"] != d] = IGNORE  # document d's targets only
        model.zero_grad(set_to_none=True)
        sums, _ = mtp_loss(out.hidden, model.lm_head.weight, tgt)
        sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.hidden[:, batch["doc_ids"] == d].detach(), sums.detach(), grads

    failures = []
    for d, changed in ((1, [a2, b]), (0, [a, b2])):  # document d stays, the other one changes
        (h1, s1, g1), (h2, s2, g2) = doc_only(layout([[a, b]], 32), d), doc_only(layout([changed], 32), d)
        failures += [f"document {d}'s states"] * (not torch.allclose(h1, h2, **TOL))
        failures += [f"document {d}'s loss"] * (not torch.allclose(s1, s2, **TOL))
        failures += [f"document {d}'s gradient of {n}" for n in g1 if not torch.allclose(g1[n], g2[n], **TOL)]
    return failures


@per_style
def test_documents_are_isolated(style):
    """documents are isolated: changing one document of a row changes no output, loss or gradient of the other (both
    ways)"""
    assert isolation_failures(make_model(style)) == []


def test_each_head_shift_by_hand():
    """each head's shift is right: a hand-written row [EOT A1 A2 EOT | EOT B1 B2 EOT | pad pad] has exactly the targets
    written out"""
    A1, A2, B1, B2, X = 11, 12, 21, 22, IGNORE
    ids = torch.tensor([[EOT, A1, A2, EOT, EOT, B1, B2, EOT, EOT, EOT]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1, -1]], dtype=torch.int32)
    expected = [[A1, A2, EOT, X, B1, B2, EOT, X, X, X],  # head 1 predicts t+1: each document's closing EOT
                [A2, EOT, X, X, B2, EOT, X, X, X, X],    # head 2 predicts t+2
                [EOT, X, X, X, EOT, X, X, X, X, X],      # head 3 predicts t+3: the closing EOT from the opening one
                [X] * 10]                                # head 4: no document is long enough
    assert mtp_targets(ids, docs, 4)[:, 0].tolist() == expected


@per_style
def test_a_document_end_is_learned(style):
    """a document's closing EOT is a target of every head that reaches it; the next document's opening EOT never is"""
    model = make_model(style)
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


@per_style
def test_each_head_count_closed_form(style):
    """each head's count is the sum over documents (chunks of at most T) of max(0, length - k), both EOTs counted:
    before the forward (count_targets) and from it"""
    model = make_model(style)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 40, (9,), generator=g).tolist()
        batch = pack(make_docs(lengths, seed), 16)  # long documents are cut into chunks of <= 16
        batch["input_ids"] %= V
        chunks = [min(16, n - i) for n in lengths for i in range(0, n, 16)]
        expected = [sum(max(0, n - k) for n in chunks) for k in range(1, N_PREDICT + 1)]
        assert count_targets(batch, N_PREDICT).tolist() == expected
        with torch.no_grad():
            assert ModelWithLoss(model)(batch).counts.tolist() == expected
            assert ModelWithLoss(model)(batch, heads=[0, 2]).counts.tolist() == expected[0:3:2]  # a schedule's heads


@per_style
def test_router_statistics_ignore_padding(style):
    """the router's statistics (load-balancing loss, z-loss, expert counts) ignore padding"""
    model = make_model(style)
    padded = layout([make_docs([9, 8])], 40)
    cut = {k: v[:, :17] for k, v in padded.items()}
    outs = [model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]) for b in (padded, cut)]
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss, **TOL)
    assert torch.equal(outs[0].expert_counts, outs[1].expert_counts)
    assert int(outs[0].expert_counts.sum()) == 17 * model.cfg.n_layer * model.cfg.top_k


def accumulated_grads(model, micro_batches, normalize_per_micro_batch=False, draft_rate=1.0):
    """The training step's math (train.py): global counts first, then sum_m coef * sums_m, backward (with
    grad_scale=coef, as train.py passes it). draft_rate: train.py's mtp_sample."""
    model.zero_grad(set_to_none=True)
    head_w = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)  # unequal weights, as the default schedule
    n_k = sum(count_targets(b, N_PREDICT, draft_rate) for b in micro_batches)
    coef = step_coefficients(n_k, head_w)
    fwd = ModelWithLoss(model, draft_rate)
    for b in micro_batches:
        if normalize_per_micro_batch:  # the wrong way: a mean of per-micro-batch means
            out = fwd(b)
            loss = (head_w * out.sums / out.counts.clamp(min=1)).sum() / len(micro_batches)
        else:
            loss = (coef * fwd(b, grad_scale=coef).sums).sum()
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def uneven_batch():
    """8 rows of 32 with uneven padding, and the same rows as 4 micro-batches of 2."""
    docs = make_docs([30, 3, 25, 9, 4, 31, 12, 2, 20, 6, 2, 28], seed=3)
    rows = [[docs[0]], [docs[1]], [docs[2], docs[11][:5]], [docs[3], docs[4]], [docs[5]], [docs[6], docs[7]],
            [docs[8], docs[9], docs[10]], [docs[11]]]
    batch = layout(rows, 32)
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    assert len({int(m["attention_mask"].sum()) for m in micro}) > 1, "uneven padding across micro-batches"
    return batch, micro


@per_style
def test_accumulation_does_not_change_the_math(style):
    """accumulation does not change the math: 8 rows at once equal 4 micro-batches of 2 rows with uneven padding,
    also with the drafting heads learning at sampled positions only (mtp_sample)"""
    model = make_model(style)
    batch, micro = uneven_batch()
    for rate in (1.0, 0.25):
        whole = accumulated_grads(model, [batch], draft_rate=rate)
        split = accumulated_grads(model, micro, draft_rate=rate)
        for name in whole:
            torch.testing.assert_close(whole[name], split[name], **TOL)
        wrong = accumulated_grads(model, micro, normalize_per_micro_batch=True, draft_rate=rate)  # negative control
        assert any(not torch.allclose(whole[n], wrong[n], **TOL) for n in whole), "mean of means should differ"


@per_style
def test_sampled_positions_are_a_target_mask(style):
    """mtp_sample: each row's drafting heads keep their targets at round(rate * T) columns drawn from the row itself
    (the same columns when the row is alone), head 1 keeps all; the loss over those columns only equals the loss
    with the mask over every column, sums and gradients, the drafters detached or attached"""
    batch, micro = uneven_batch()
    cols = sampled_columns(batch, 0.25)
    assert cols.shape == (8, 8) and all(len(set(r)) == 8 for r in cols.tolist())
    assert torch.equal(torch.cat([sampled_columns(m, 0.25) for m in micro]), cols)  # a row's own, batch or not
    assert len({tuple(r) for r in cols.tolist()}) > 1, "every row sampling the same columns"
    full, sampled = mtp_targets(batch["input_ids"], batch["doc_ids"], N_PREDICT), train_targets(batch, N_PREDICT, 0.25)
    keep = torch.zeros(8, 32, dtype=torch.bool).scatter_(1, cols, True)
    assert torch.equal(sampled[0], full[0])
    assert torch.equal(sampled[1:], torch.where(keep, full[1:], IGNORE))
    assert count_targets(batch, N_PREDICT, 0.25).tolist() == (sampled != IGNORE).sum((1, 2)).tolist()
    coef = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    for detach in (False,) if style == "shared" else (True, False):  # shared logits have nothing to detach
        model = make_model(style, mtp_detach=detach)
        out = ModelWithLoss(model, 0.25)(batch, grad_scale=coef)  # the drafting heads scored at the sampled columns
        (coef * out.sums).sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        ref_out = run(model, batch)  # the reference: every column scored, the mask in the targets
        weight = model.lm_head.weight
        if detach:  # what mtp_detach means, written out: the drafters' unembedding carries no gradient
            ref = [mtp_loss(ref_out.hidden[:1], weight, sampled[:1])[0],
                   mtp_loss(ref_out.hidden[1:], weight.detach(), sampled[1:])[0]]
            ref_sums = torch.cat(ref)
        else:
            ref_sums = mtp_loss(ref_out.hidden, weight, sampled)[0]
        (coef * ref_sums).sum().backward()
        torch.testing.assert_close(out.sums, ref_sums.detach(), **TOL)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, **TOL, msg=lambda m: f"{n}, mtp_detach={detach}: {m}")


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_detached_drafters_leave_the_trunk_a_one_head_gradient(style):
    """mtp_detach: the trunk and head 1 get exactly the gradient of a 1-head model with the same weights, the
    drafting heads learn (a gradient of their own); negative control: without the detach the trunk's differs"""
    batch, _ = uneven_batch()
    grads = {}
    for name, kw in (("one", dict(n_predict=1)), ("detached", dict(mtp_detach=True)), ("attached", {})):
        model = make_model(style, **kw)
        model.load_state_dict(make_model(style).state_dict(), strict=False)  # heads 2..n absent from the 1-head model
        n = model.cfg.n_predict
        coef = step_coefficients(count_targets(batch, n, 0.5), torch.ones(n, dtype=torch.float64))
        out = ModelWithLoss(model, 0.5)(batch, grad_scale=coef)
        ((coef * out.sums).sum() + out.aux_loss).backward()
        grads[name] = {k: p.grad for k, p in model.named_parameters()}
    one = grads["one"]
    for k in one:
        torch.testing.assert_close(grads["detached"][k], one[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    drafters = [k for k in grads["detached"] if k.startswith(("heads.1.", "heads.2.", "heads.3."))]
    assert drafters and all(grads["detached"][k].abs().sum() > 0 for k in drafters)
    assert not torch.allclose(grads["attached"]["blocks.0.attn.qkv.weight"], one["blocks.0.attn.qkv.weight"], **TOL)


@per_style
def test_negative_control_the_original_bug(style):
    """negative control: a loss that ignores the attention mask (the original bug) differs on a padded batch"""
    model = make_model(style)
    batch = layout([make_docs([10, 7]), make_docs([5], seed=1)], 24)
    out = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
    tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], N_PREDICT)
    right, counts = mtp_loss(out.hidden, model.lm_head.weight, tgt)
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


@per_style
def test_negative_control_attention_across_documents(style):
    """negative control: attention that crosses documents (plain causal on a packed row) changes document B"""
    model = make_model(style)
    batch = layout([make_docs([12, 14])], 26)
    right = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"]).hidden
    leaky = model(batch["input_ids"]).hidden  # no doc_ids: the whole row is one document
    b = batch["doc_ids"][0] == 1
    assert not torch.allclose(right[:, 0, b], leaky[:, 0, b])


@per_style
def test_packed_equals_alone(style):
    """packed equals alone: documents packed in one row give each document's states, loss sums and counts when
    run alone"""
    model, docs = make_model(style), make_docs([9, 14, 6, 3], seed=2)
    packed = layout([docs], 32)
    out = run(model, packed)
    sums, counts = mtp_loss(out.hidden, model.lm_head.weight,
                            mtp_targets(packed["input_ids"], packed["doc_ids"], N_PREDICT))
    alone_sums = torch.zeros_like(sums)
    alone_counts = torch.zeros_like(counts)
    for d, doc in enumerate(docs):
        alone = layout([[doc]], len(doc))  # no padding, no other document: positions 0..n-1
        a = run(model, alone)
        torch.testing.assert_close(out.hidden[:, 0, packed["doc_ids"][0] == d], a.hidden[:, 0], **TOL)
        s, c = mtp_loss(a.hidden, model.lm_head.weight, mtp_targets(alone["input_ids"], alone["doc_ids"], N_PREDICT))
        alone_sums, alone_counts = alone_sums + s, alone_counts + c
    torch.testing.assert_close(sums, alone_sums, **TOL)
    assert torch.equal(counts, alone_counts)


def target_sight_failures(model, n_changes=None):
    """-> [(head k, position t, changed position j)] where changing token j >= t + k changed head k's state at t,
    or its loss at t otherwise than through its target (the loss at t must stay the cross-entropy of the unchanged
    logits at t against the new target). Rows of two and three documents and padding: t + k runs inside a document
    and across boundaries. The loss is the materialized cross-entropy, loss.py's chunked one is held to it in
    test_loss.py."""
    batch = layout([make_docs([9, 11], seed=4), make_docs([5, 7, 6], seed=5)], 24)
    ids, docs, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    B, T = ids.shape

    def states_and_logits(x):
        h = model(x, doc_ids=docs, position_ids=pos).hidden.expand(N_PREDICT, B, T, -1)  # shared: one state for all
        return h, model.logits(h)

    def ce(logits, tgt):
        return F.cross_entropy(logits.flatten(0, 2), tgt.flatten(), ignore_index=IGNORE,
                               reduction="none").view(N_PREDICT, B, T)
    with torch.no_grad():
        h0, logits0 = states_and_logits(ids)
        failures = []
        for j in range(T if n_changes is None else n_changes):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 1 + j) % V  # another token, in every row
            h, logits = states_and_logits(changed)
            tgt = mtp_targets(changed, docs, N_PREDICT)
            loss, through_target = ce(logits, tgt), ce(logits0, tgt)
            for k in range(1, N_PREDICT + 1):
                for t in range(0, j - k + 1):  # t + k <= j
                    if not (torch.allclose(h[k - 1, :, t], h0[k - 1, :, t], **TOL)
                            and torch.allclose(loss[k - 1, :, t], through_target[k - 1, :, t], **TOL)):
                        failures.append((k, t, j))
    return failures


@per_style
def test_no_head_sees_its_target(style):
    """no head sees its target: changing any token at t+k or later changes neither head k's state at t nor its loss at t
    (but through the target)"""
    assert target_sight_failures(make_model(style)) == []


def shifted_by_one(ids, docs, n):
    """The mutant of a sequential depth's input: depth i reads token t+i+1, head i+1's own target."""
    return tokens_ahead(ids, docs, n + 1)[1:]


def across_documents(ids, docs, n):
    """The mutant of a sequential depth's input rule: token t+i read whatever document it lies in (padding is
    still not read: only the document ids are ignored)."""
    return tokens_ahead(ids, torch.where(docs >= 0, 0, -1).to(docs.dtype), n)


def test_negative_control_a_depth_that_reads_its_target():
    """negative control: a sequential depth that reads token t+k instead of t+k-1 (an off-by-one in the shift) sees its
    target"""
    model = make_model("sequential")
    with patched(model_module, "tokens_ahead", shifted_by_one):
        failures = target_sight_failures(model, n_changes=8)
    assert failures and all(j == t + k for k, t, j in failures) and {k for k, _, _ in failures} == {2, 3, 4}, failures


def test_negative_control_a_depth_that_reads_across_documents():
    """negative control: a sequential depth that reads token t+k-1 from the next document breaks document isolation"""
    model = make_model("sequential")
    with patched(model_module, "tokens_ahead", across_documents):
        failures = isolation_failures(model)
    assert "document 0's states" in failures and "document 1's states" not in failures, failures


def test_depths_read_by_the_target_rule():
    """a sequential depth i reads at t exactly head i's target at t: the model's input rule (tokens_ahead) equals
    loss.mtp_targets on packed rows with split documents and padding"""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 30, (7,), generator=g).tolist()
        batch = pack(make_docs(lengths, seed), 16)
        ids, docs = batch["input_ids"], batch["doc_ids"]
        targets = mtp_targets(ids, docs, N_PREDICT)
        assert torch.equal(tokens_ahead(ids, docs, N_PREDICT), torch.where(targets == IGNORE, -1, targets))


def test_sequential_inputs_by_hand():
    """sequential depths read by hand: on [EOT A1 A2 EOT | EOT B1 B2 EOT | pad pad] each depth's token, state and
    positions are those written out"""
    A1, A2, B1, B2, E, X = 11, 12, 21, 22, EOT % V, None
    ids = torch.tensor([[E, A1, A2, E, E, B1, B2, E, E, E]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1, -1]], dtype=torch.int32)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0, 0]])
    reads = [[A1, A2, E, X, B1, B2, E, X, X, X],  # depth 1 (head 2) reads token t+1 of t's document
             [A2, E, X, X, B2, E, X, X, X, X],    # depth 2 (head 3) reads token t+2
             [E, X, X, X, E, X, X, X, X, X]]      # depth 3 (head 4) reads token t+3: X is a zero embedding
    model = make_model("sequential")
    seen, outs = {}, {}
    hooks = [m.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, args)) for i, m in
             enumerate(model.heads)]
    hooks += [m.register_forward_hook(lambda m, args, out, i=i: outs.setdefault(i, out)) for i, m in
              enumerate(model.heads)]
    with torch.no_grad():
        model(ids, doc_ids=docs, position_ids=pos)
    for h in hooks:
        h.remove()
    emb = model.tok_emb.weight
    for i in range(1, N_PREDICT):
        h_in, e_in, cos = seen[i][:3]
        expected = torch.stack([emb[t] if t is not None else torch.zeros_like(emb[0]) for t in reads[i - 1]])
        assert torch.equal(e_in[0], expected), f"depth {i}: the tokens read differ from {reads[i - 1]}"
        prev = outs[i - 1][0] if isinstance(outs[i - 1], tuple) else outs[i - 1]  # head 1's block returns a tuple
        assert torch.equal(h_in, prev), f"depth {i}: its state input is not head {i}'s state before the final norm"
        assert torch.equal(cos, model.rope_cos[pos][:, None]), f"depth {i}: positions are not the original ones"


if __name__ == "__main__":
    failed = passed = 0
    for fn in [f for n, f in list(globals().items()) if n.startswith("test_")]:
        marks = [m.args[1] for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]  # pytest's styles
        styles = (marks[0] if marks else MTP_STYLES) if "style" in inspect.signature(fn).parameters else [None]
        for style in styles:
            tag = f"[{style}] " if style else ""
            try:
                fn(style) if style else fn()
                passed += 1
                print(f"\u2713 {tag}{' '.join(fn.__doc__.split())}")
            except Exception as e:  # report and go on: one line per property and style
                failed += 1
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"\u2717 {tag}{' '.join(fn.__doc__.split())}\n    {why}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
