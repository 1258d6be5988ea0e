"""Tests of model.py on tiny configs (float64 where exact equality is wanted), for each style of multi-token
prediction where the heads matter: packed rows equal their documents run alone, gradient isolation, padding
ids, heads subsets and their FLOPs by hand, backends against references, router statistics over real tokens
only, pure-padding rows, bad input, and no recompiles after warm-up."""
import pytest
import torch

from data import EOT, pack
from loss import ModelWithLoss, mtp_loss, mtp_targets
from model import MTP_STYLES, Depth, Model, ModelConfig, doc_mask, experts_dense, experts_grouped, experts_loop

V = 64
per_style = pytest.mark.parametrize("style", MTP_STYLES)


def tiny(**kw):
    base = dict(vocab_size=V, seq_len=32, n_layer=2, n_head=2, n_embd=16, n_experts=4, top_k=2, n_predict=3)
    return ModelConfig(**{**base, **kw})


def make(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return Model(tiny(**kw)).to(dtype)


def docs_batch(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [[EOT] + torch.randint(0, V, (n - 1,), generator=g).tolist() for n in lengths]
    b = pack(docs, T)
    b["input_ids"] = b["input_ids"] % V  # tiny vocabulary: map EOT (and padding) into range
    return b, [[t % V for t in d] for d in docs]


def run(model, b):
    return model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"])


@per_style
def test_packed_row_equals_each_document_alone(style):
    model = make(mtp_style=style)
    b, docs = docs_batch([10, 7, 9], 32)
    assert b["input_ids"].shape == (1, 32)
    packed = run(model, b).hidden  # (n_predict, 1, T, D)
    for d in range(3):
        seg = (b["doc_ids"][0] == d).nonzero()[:, 0]
        alone = model(b["input_ids"][:, seg]).hidden  # one document: the is_causal path, positions 0..n-1
        torch.testing.assert_close(packed[:, 0, seg], alone[:, 0], rtol=1e-10, atol=1e-10)


@per_style
def test_changing_one_document_leaves_the_others_unchanged(style):
    model = make(mtp_style=style)
    b, _ = docs_batch([10, 7, 9], 32)
    changed = {k: v.clone() for k, v in b.items()}
    seg_a = b["doc_ids"][0] == 1
    changed["input_ids"][0, seg_a] = (changed["input_ids"][0, seg_a] + 5) % V
    h1, h2 = run(model, b).hidden, run(model, changed).hidden
    others = b["doc_ids"][0] != 1
    torch.testing.assert_close(h1[:, 0, others], h2[:, 0, others], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(h1[:, 0, seg_a], h2[:, 0, seg_a])  # the test can fail: A itself did change


@per_style
def test_gradient_does_not_cross_documents(style):
    model = make(mtp_style=style)
    b, _ = docs_batch([10, 7, 9], 32)
    emb = {}
    model.tok_emb.register_forward_hook(lambda m, i, o: emb.setdefault("x", o))
    out = run(model, b)
    tgt = mtp_targets(b["input_ids"], b["doc_ids"], 3)
    tgt[:, b["doc_ids"] != 1] = -100  # the loss of document 1 alone (every head)
    sums, _ = mtp_loss(out.hidden, model.lm_head.weight, tgt)
    (g,) = torch.autograd.grad(sums.sum(), emb["x"])
    in_doc = b["doc_ids"][0] == 1
    assert torch.equal(g[0, ~in_doc], torch.zeros_like(g[0, ~in_doc]))  # exactly zero
    assert g[0, in_doc].abs().sum() > 0


@per_style
def test_padding_ids_change_nothing(style):
    model = make(mtp_style=style)
    b, _ = docs_batch([10, 7], 32)
    other = {k: v.clone() for k, v in b.items()}
    pad = ~b["attention_mask"]
    other["input_ids"][pad] = torch.randint(0, V, (int(pad.sum()),))
    o1, o2 = run(model, b), run(model, other)
    real = b["attention_mask"][0]
    torch.testing.assert_close(o1.hidden[:, 0, real], o2.hidden[:, 0, real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o1.aux_loss, o2.aux_loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(o1.expert_counts, o2.expert_counts)


@per_style
def test_attention_mask_only_means_one_document_per_row(style):
    # a plain padded batch (the setting of the original bug report): each row's real tokens are one document,
    # so they must equal that row run alone, unpadded, as a plain sequence
    model = make(mtp_style=style)
    b, _ = docs_batch([12, 20], 20)  # two rows: one full, one with padding
    mask = b["attention_mask"]
    h = model(b["input_ids"], attention_mask=mask).hidden
    for row in range(2):
        n = int(mask[row].sum())
        alone = model(b["input_ids"][row:row + 1, :n]).hidden
        torch.testing.assert_close(h[:, row, :n], alone[:, 0], rtol=1e-12, atol=1e-12)


@per_style
def test_heads_subset_equals_the_full_run(style):
    model = make(mtp_style=style)
    b, _ = docs_batch([10, 7, 9], 32)
    full, part = run(model, b), model(**b, heads=[0, 2])
    if style == "shared":  # one state, whatever the heads
        assert part.hidden.shape[0] == full.hidden.shape[0] == 1
        torch.testing.assert_close(part.hidden, full.hidden, rtol=0, atol=0)
    else:
        assert part.hidden.shape[0] == 2
        torch.testing.assert_close(part.hidden, full.hidden[[0, 2]], rtol=0, atol=0)
    assert model.head_modules_run([0, 2]) == {"parallel": {0, 2}, "sequential": {0, 1, 2}, "shared": {0}}[style]


def test_flops_per_style_by_hand():
    cfg = tiny()
    D, T, lm = cfg.n_embd, cfg.seq_len, cfg.vocab_size * cfg.n_embd
    models = {style: make(mtp_style=style, mtp_detach=False) for style in MTP_STYLES}
    block = sum(p.numel() for p in models["parallel"].heads[0].parameters())  # a dense head block
    depth = sum(p.numel() for p in models["sequential"].heads[1].parameters())
    assert depth == block + 2 * D * D + 2 * D  # the merge (2D -> D) and two norms on top of a block
    # one head more costs its module, its unembedding and its attention
    par, seq, sh = (models[s].flops_per_token for s in MTP_STYLES)
    assert par() - par(n_heads=2) == 6 * (lm + block) + 12 * D * T
    assert seq() - seq(n_heads=2) == 6 * (lm + depth) + 12 * D * T
    assert seq(n_heads=1) == par(n_heads=1) == sh(n_heads=1)  # head 1 is the same block in every style
    # heads 1 and 3: sequential runs depth 1 for depth 2 but unembeds two heads; parallel skips head 2 entirely
    assert seq(heads=[0, 2]) == seq(n_heads=3) - 6 * lm
    assert par(heads=[0, 2]) == par(n_heads=3) - 6 * (lm + block) - 12 * D * T
    # shared logits: one block, one unembedding whatever the heads scored (their targets are gathers)
    assert sh() == sh(n_heads=1) == par(n_heads=1)
    assert par(n_heads=1) < seq() and par() < seq()
    # detached drafters at a quarter of the positions: their unembedding a quarter as often, without its weight
    # gradient (4 of the 6); head 1's as before
    det = make(mtp_style="sequential", mtp_detach=True).flops_per_token
    per_depth = 6 * depth + 4 * lm / 4 + 12 * D * T
    assert det(draft_rate=0.25) - det(n_heads=1, draft_rate=0.25) == (cfg.n_predict - 1) * per_depth


def test_sequential_depths_are_modules_of_their_own():
    model = make(mtp_style="sequential")
    assert not isinstance(model.heads[0], Depth) and all(isinstance(m, Depth) for m in model.heads[1:])
    assert len(model.heads) == model.cfg.n_predict and len(make(mtp_style="shared").heads) == 1
    names = {n for n, _ in model.named_parameters()}
    assert {"heads.1.merge.weight", "heads.1.norm_h.weight", "heads.1.norm_e.weight"} <= names
    merge = model.heads[1].merge.weight  # initialized like any matrix, not scaled as a residual projection
    assert merge.shape == (model.cfg.n_embd, 2 * model.cfg.n_embd) and 0.015 < merge.std() < 0.025


def test_routing_is_float32_under_autocast():
    # top-k on bf16 router logits flips choices between nearly tied experts: routing must stay float32
    torch.manual_seed(0)
    moe = make(dtype=torch.float32, n_embd=64, n_experts=8).blocks[0].ffn
    x = torch.randn(4096, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, idx, gate = moe.route(x)
        _, _, counts_bf16 = moe(x[None], torch.ones(1, 4096, dtype=torch.bool))
    ref_logits, _, ref_idx, _ = moe.route(x)
    _, _, ref_counts = moe(x[None], torch.ones(1, 4096, dtype=torch.bool))
    assert logits.dtype == gate.dtype == torch.float32
    assert torch.equal(idx, ref_idx) and torch.equal(counts_bf16, ref_counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # negative control: what autocast would have done
        bf16_idx = torch.topk((x @ moe.router.weight.t()).float().softmax(-1), 2).indices
    assert not torch.equal(bf16_idx, ref_idx)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_learns_from_the_language_model_loss(top_k):
    # Switch Transformer keeps the raw probability as the gate of a single expert; a renormalized gate is 1.0
    model = make(top_k=top_k, aux_loss_coef=0.0, z_loss_coef=0.0)
    b, _ = docs_batch([10, 7, 9], 32)
    (g,) = torch.autograd.grad(ModelWithLoss(model)(b).sums.sum(), [model.blocks[0].ffn.router.weight])
    assert g.abs().max() > 1e-6


@pytest.mark.parametrize("style", ["parallel", "sequential"])  # a depth attends with the same mask
def test_flex_attention_equals_sdpa(style):
    b, _ = docs_batch([10, 7, 9, 30, 5], 32)
    ref = make(dtype=torch.float32, mtp_style=style)
    flex = make(dtype=torch.float32, attn_backend="flex", mtp_style=style)
    with torch.no_grad():
        h_ref, h_flex = run(ref, b).hidden, run(flex, b).hidden
    real = b["attention_mask"]
    torch.testing.assert_close(h_flex[:, real], h_ref[:, real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dispatch", [experts_grouped, experts_dense])
def test_expert_dispatch_equals_the_loop(dispatch):
    torch.manual_seed(0)
    N, D, Fh, E, K = 40, 16, 24, 6, 2
    x = torch.randn(N, D, requires_grad=True)
    w = [torch.randn(E, Fh, D, requires_grad=True), torch.randn(E, Fh, D, requires_grad=True),
         torch.randn(E, D, Fh, requires_grad=True)]
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # expert E-1 never used: empty group
    gate = torch.rand(N, K)
    y_loop, y = experts_loop(x, idx, gate, *w), dispatch(x, idx, gate, *w)
    torch.testing.assert_close(y, y_loop, rtol=1e-4, atol=1e-4)
    g_loop = torch.autograd.grad(y_loop.square().sum(), [x] + w)
    g = torch.autograd.grad(y.square().sum(), [x] + w)
    for a, c in zip(g, g_loop):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-3)


def test_router_statistics_ignore_padding():
    model = make()
    b, _ = docs_batch([9, 8], 32)  # one row, 17 real tokens, 15 padding
    real = int(b["attention_mask"].sum())
    cut = {k: v[:, :real] for k, v in b.items()}
    outs, grads = [], []
    for batch in (b, cut):
        out = run(model, batch)
        outs.append(out)
        grads.append(torch.autograd.grad(out.aux_loss, [m.ffn.router.weight for m in model.blocks]))
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(outs[0].expert_counts, outs[1].expert_counts)
    assert outs[0].expert_counts.sum() == real * 2 * model.cfg.top_k  # 2 MoE layers, top_k each
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@per_style
def test_pure_padding_row_is_finite(style):
    model = make(mtp_style=style)
    b, _ = docs_batch([20, 32], 32)
    b = {k: torch.cat([v, v[:1]]) for k, v in b.items()}
    b["doc_ids"][2], b["attention_mask"][2], b["position_ids"][2] = -1, False, 0  # row 2: only padding
    out = run(model, b)
    sums, _ = mtp_loss(out.hidden, model.lm_head.weight, mtp_targets(b["input_ids"], b["doc_ids"], 3))
    (sums.sum() + out.aux_loss + out.hidden.sum()).backward()
    assert torch.isfinite(out.hidden).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_doc_mask_by_hand():
    m = doc_mask(torch.tensor([[0, 0, 1, -1]], dtype=torch.int32))[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@per_style
def test_every_expert_gets_a_gradient(style):
    model = make(mtp_style=style)
    b, _ = docs_batch([5], 8)
    run(model, b).hidden.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="n_embd=10 must split into n_head=4"):
        tiny(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="top_k=5 > n_experts=4"):
        tiny(top_k=5)
    with pytest.raises(ValueError, match="n_head=4 is not a multiple of n_kv_head=3"):
        tiny(n_head=4, n_embd=24, n_kv_head=3)
    model = make()
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token ids in \[0, 70\], expected \[0, 64\)"):
        model(ids + torch.arange(8) * 10)
    with pytest.raises(ValueError, match="sequence length 40 > seq_len 32"):
        model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"doc_ids has shape \(1, 7\), expected \(1, 8\)"):
        model(ids, doc_ids=torch.zeros(1, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="mtp_style='deepseek', expected 'parallel', 'sequential' or 'shared'"):
        tiny(mtp_style="deepseek")
    with pytest.raises(ValueError, match=r"heads=\[0, 3\], expected distinct head indices in \[0, n_predict=3\)"):
        model(ids, heads=[0, 3])
    with pytest.raises(ValueError, match=r"heads=\[\], expected"):
        model(ids, heads=[])


def test_gqa_and_counts():
    model = make(n_kv_head=1)
    b, _ = docs_batch([10, 7], 32)
    assert torch.isfinite(run(model, b).hidden).all()
    total, active = model.param_counts()
    cfg = model.cfg
    routed = cfg.n_layer * 3 * cfg.n_experts * cfg.ffn_hidden * cfg.n_embd
    assert total == sum(p.numel() for p in model.parameters())
    assert active == total - routed + routed * cfg.top_k // cfg.n_experts


@pytest.mark.parametrize("style", ["parallel", "sequential"])  # shared logits compile head 1's block only
def test_no_recompile_after_warmup(style):
    torch._dynamo.reset()
    model = make(dtype=torch.float32, mtp_style=style)
    model.compile_blocks(dynamic=False)
    try:  # varying routing and document counts; the row of [31] has padding, so the mask path again
        for i, lengths in enumerate([[10, 7, 9], [30, 2], [5, 5, 5, 5, 5], [31], [3, 12, 16]]):
            if i == 2:
                torch.compiler.set_stance("fail_on_recompile")
            b, _ = docs_batch(lengths, 32, seed=i)
            out = run(model, b)
            (out.hidden.sum() + out.aux_loss).backward()
    finally:
        torch.compiler.set_stance("default")


def test_aux_free_bias_update_and_selection():
    model = make()
    counts = torch.tensor([[10.0, 0.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]])  # per MoE layer, all-reduced counts
    model.update_expert_bias(counts, 0.1)
    b0, b1 = model.blocks[0].ffn.expert_bias, model.blocks[1].ffn.expert_bias
    assert b0.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0]) and b1.tolist() == [0.0] * 4
    b0[:] = torch.tensor([-10.0, 10.0, 10.0, -10.0])  # the bias decides selection: experts 1 and 2 only
    b, _ = docs_batch([12], 16)
    out = run(model, b)
    assert out.expert_counts[0, 0] == 0 and out.expert_counts[0, 3] == 0 and out.expert_counts[0, 1:3].sum() == 2 * 12
