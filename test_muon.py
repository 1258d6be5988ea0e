"""Tests of muon.py on tiny models, CPU, seconds: the batched Newton-Schulz against torch's own on each matrix (and
the flattened-experts mutant shown to differ), the Muon step against torch.optim.Muon on 2-D matrices, the AdamW
groups against torch.optim.AdamW, the parameter groups of several model shapes (every parameter in exactly one,
checked against names written out by hand), a bit-exact state-dict round trip, no NaN from a zero gradient, bad
settings refused, and FSDP2 on 2 gloo ranks against one process (this file is also that run's worker script:
`python -m torch.distributed.run --standalone --nproc_per_node=2 test_muon.py`)."""
import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.optim._muon import _zeropower_via_newtonschulz  # torch.optim.Muon's own 2-D function: the reference

import muon
from model import Model, ModelConfig

HERE = Path(__file__).parent
V = 64


def tiny(**kw):
    base = dict(vocab_size=V, seq_len=16, n_layer=2, n_head=2, n_embd=16, n_experts=4, top_k=2, n_predict=2)
    return ModelConfig(**{**base, **kw})


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Model(tiny(**kw))


def fake_grads(model, step, skip=()):
    """A gradient for every parameter, the same for the same (name, step) in any process; names in skip get None
    (a head that did not run)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator().manual_seed(1000 * step + i)
        full = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if any(name.startswith(s) for s in skip):
            p.grad = None
        elif hasattr(p, "placements"):  # an FSDP2 shard: this rank's rows of the same full gradient
            from torch.distributed.tensor import distribute_tensor
            p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = full


def through_file(obj):
    """obj saved and loaded again as a checkpoint is (torch.load with weights_only=True: no code runs)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def build(model, name="muon", **kw):
    return muon.build_optimizer(model, name, **{**dict(lr=0.02, weight_decay=0.1, betas=(0.9, 0.95)), **kw})


# ----------------------------------------------------------------------------- Newton-Schulz


def test_batched_newton_schulz_equals_torchs_on_each_matrix_and_flattening_does_not():
    g = torch.Generator().manual_seed(0)
    for shape in [(4, 24, 16), (3, 16, 24), (2, 20, 20), (24, 16), (1, 7, 9)]:
        G = torch.randn(shape, generator=g)
        batched = muon.orthogonalize(G)
        per_matrix = torch.stack([_zeropower_via_newtonschulz(m, muon.NS_COEFFICIENTS, 5, muon.NS_EPS)
                                  for m in G.reshape(-1, *shape[-2:])]).reshape(shape)
        torch.testing.assert_close(batched, per_matrix, rtol=0, atol=0)  # the same operations, bit for bit
        sv = torch.linalg.svdvals(batched.float())
        assert sv.min() > 0.6 and sv.max() < 1.2, (shape, sv.min(), sv.max())  # about orthogonal
    # the mutant: the experts as one (E * F, D) matrix couple their updates (each expert's singular values are
    # no longer about 1, and the result differs from the per-expert one by far more than bfloat16 rounding)
    G = torch.randn(4, 24, 16, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1.0])[:, None, None]
    flat = muon.orthogonalize(G.reshape(-1, 16)).reshape(G.shape)
    assert (flat.float() - muon.orthogonalize(G).float()).abs().max() > 0.1
    assert torch.linalg.svdvals(flat[2].float()).max() < 0.1  # the small expert hardly moves when coupled


def test_newton_schulz_of_zero_is_zero():
    for dtype in muon.NS_DTYPES.values():
        out = muon.orthogonalize(torch.zeros(3, 8, 5), dtype=dtype)
        assert out.dtype == dtype and torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- the step against torch's optimizers


@pytest.mark.parametrize("adjust, nesterov", [("match_rms_adamw", True), ("original", True),
                                              ("match_rms_adamw", False)])
def test_muon_step_equals_torch_muon_on_matrices_and_on_each_expert(adjust, nesterov):
    """Matrices (wide, tall, square; two of one shape share a batch) against torch.optim.Muon on each, and stacks
    of experts against torch.optim.Muon on each expert as its own 2-D parameter: the momentum, the Newton-Schulz
    iterations, the learning-rate scale of one expert's (F, D) (not of the stack's first two dimensions), decay."""
    torch.manual_seed(0)
    shapes = [(24, 16), (16, 24), (24, 16), (20, 20), (3, 16, 40), (2, 40, 16)]
    mine = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    ref = [[nn.Parameter(m.detach().clone()) for m in (p.unbind() if p.dim() == 3 else [p])] for p in mine]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    opt = muon.MuonAdamW([{"kind": "muon", "params": mine}], adjust_lr_fn=adjust, **kw)
    torch_opt = torch.optim.Muon([q for qs in ref for q in qs], adjust_lr_fn=adjust, **kw)
    for step in range(3):
        for i, (p, qs) in enumerate(zip(mine, ref)):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            for q, g in zip(qs, p.grad.unbind() if p.dim() == 3 else [p.grad]):
                q.grad = g.clone()
        opt.step()
        torch_opt.step()
    for p, qs in zip(mine, ref):
        torch.testing.assert_close(p, torch.stack(qs).reshape(p.shape), rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.stack(
            [torch_opt.state[q]["momentum_buffer"] for q in qs]).reshape(p.shape), rtol=0, atol=0)


def test_adamw_groups_equal_torch_adamw_and_adamw_is_todays_optimizer():
    model, twin = make(tie_embeddings=False), make(tie_embeddings=False)
    opt = build(model)
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw_decay", "adamw_no_decay"]
    assert all(g["lr_ratio"] == 1.0 for g in opt.param_groups)
    adamw = dict(muon.param_groups(twin))["adamw"]
    ref = torch.optim.AdamW([{"params": [p for _, p in adamw if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for _, p in adamw if p.dim() < 2], "weight_decay": 0.0}],
                            lr=0.02, betas=(0.9, 0.95), fused=True)
    for step in range(3):
        fake_grads(model, step)
        fake_grads(twin, step)
        opt.step()
        ref.step()
    a, b = dict(model.named_parameters()), dict(twin.named_parameters())
    for name, _ in adamw:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # name="adamw": train.py's AdamW as it was (model order, decay on 2-D and more, fused), with lr_ratio
    plain = build(model, "adamw")
    assert type(plain) is torch.optim.AdamW and all(g["fused"] for g in plain.param_groups)
    assert [[id(p) for p in g["params"]] for g in plain.param_groups] == [
        [id(p) for p in model.parameters() if p.dim() >= 2], [id(p) for p in model.parameters() if p.dim() < 2]]
    assert [(g["weight_decay"], g["lr_ratio"], g["betas"]) for g in plain.param_groups] == [
        (0.1, 1.0, (0.9, 0.95)), (0.0, 1.0, (0.9, 0.95))]


# ----------------------------------------------------------------------------- parameter groups


def expected_muon_names(cfg):
    """The Muon parameters of a model.Model, written out from its architecture (not from muon.py's rule)."""
    style = getattr(cfg, "mtp_style", "parallel")
    blocks = [(f"blocks.{i}", i >= cfg.n_dense_layers) for i in range(cfg.n_layer)]
    heads = [(f"heads.{k}.block" if style == "sequential" and k else f"heads.{k}", False)
             for k in range(1 if style == "shared" else cfg.n_predict)]
    names = [f"heads.{k}.merge.weight" for k in range(1, cfg.n_predict)] if style == "sequential" else []
    for prefix, moe in blocks + heads:
        names += [f"{prefix}.attn.qkv.weight", f"{prefix}.attn.proj.weight"]
        if moe:
            names += [f"{prefix}.ffn.{w}" for w in ("w1_EFD", "w3_EFD", "w2_EDF")]
            names += [f"{prefix}.ffn.shared.{w}.weight" for w in ("w1", "w3", "w2")] if cfg.n_shared_experts else []
        else:
            names += [f"{prefix}.ffn.{w}.weight" for w in ("w1", "w3", "w2")]
    return names


# the MTP styles of model.py: sequential depths add a 2D -> D projection (Muon's) and two norms per depth
STYLES = [dict(mtp_style=s) for s in ("sequential", "shared") if hasattr(ModelConfig, "mtp_style")]


@pytest.mark.parametrize("kw", [dict(), dict(n_shared_experts=0), dict(n_dense_layers=1), dict(tie_embeddings=False),
                                dict(n_predict=1), dict(n_predict=4, n_layer=3, n_dense_layers=2, n_shared_experts=2)]
                         + STYLES)
def test_every_parameter_in_exactly_one_group(kw):
    model = make(**kw)
    groups = muon.param_groups(model)
    names = [n for g in groups.values() for n, _ in g]
    assert len(names) == len(set(names)) and set(names) == {n for n, _ in model.named_parameters()}
    assert sum(p.numel() for g in groups.values() for _, p in g) == sum(p.numel() for p in model.parameters())
    muon_names = [n for n, _ in groups["muon"]]
    assert sorted(muon_names) == sorted(expected_muon_names(model.cfg))
    adamw_2d = {n for n, p in groups["adamw"] if p.dim() >= 2}
    routers = {f"blocks.{i}.ffn.router.weight" for i in range(model.cfg.n_dense_layers, model.cfg.n_layer)}
    assert adamw_2d == {"tok_emb.weight"} | routers | (set() if model.cfg.tie_embeddings else {"lm_head.weight"})
    # the rule "every matrix is Muon's" would take the embedding (2-D) and the routers too
    assert {n for n, p in model.named_parameters() if p.dim() >= 2} - set(muon_names) == adamw_2d
    opt = build(model)  # the optimizer holds each parameter once
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_a_new_module_falls_under_the_rule_and_an_unknown_matrix_is_refused():
    model = make()
    # a sequential-MTP-style projection 2D -> D in a new module: its weight is Muon's, its bias AdamW's
    model.mtp = nn.ModuleList([nn.Sequential(nn.RMSNorm(32), nn.Linear(32, 16, bias=True))])
    groups = {k: [n for n, _ in v] for k, v in muon.param_groups(model).items()}
    assert "mtp.0.1.weight" in groups["muon"] and {"mtp.0.1.bias", "mtp.0.0.weight"} <= set(groups["adamw"])
    model.blocks[0].ffn.w4_EFD = nn.Parameter(torch.zeros(4, 8, 16))  # a matrix of no known kind
    with pytest.raises(ValueError, match=r"parameter blocks\.0\.ffn\.w4_EFD of shape \(4, 8, 16\)"):
        muon.param_groups(model)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_drafters_get_groups_of_their_own_that_step_like_the_rest(name):
    model = make(n_predict=3)
    drafters = model.drafter_parameters()
    opt = build(model, name, drafters=drafters)
    mine = {id(p) for p in drafters}
    for g in opt.param_groups:  # each group holds drafters only or none, and says which
        assert {id(p) in mine for p in g["params"]} == {bool(g.get("drafters"))}, g.get("name")
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    if name == "muon":
        assert [g["name"] for g in opt.param_groups] == ["muon", "adamw_decay", "adamw_no_decay", "muon_drafters",
                                                         "adamw_no_decay_drafters"]  # heads have no 2-D AdamW params
    plain_model = copy.deepcopy(model)
    plain = build(plain_model, name)  # at the same learning rate, the split changes nothing
    for s in range(2):
        for m, o in ((model, opt), (plain_model, plain)):
            fake_grads(m, s)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))


def test_a_state_saved_before_the_drafters_had_groups_resumes_exactly():
    import checkpoint
    full = StateDictOptions(full_state_dict=True)
    a = make(n_predict=3)
    opt_a = build(a)  # the groups of a checkpoint written before the drafters had their own
    for s in range(2):
        fake_grads(a, s)
        opt_a.step()
    saved = through_file(get_optimizer_state_dict(a, opt_a, options=full))
    b = copy.deepcopy(a)
    opt_b = build(b, drafters=b.drafter_parameters())
    names = {p: n for n, p in b.named_parameters()}
    set_optimizer_state_dict(b, opt_b, checkpoint.regroup_optimizer(saved, opt_b, names), options=full)
    assert [g["name"] for g in opt_b.param_groups][-2:] == ["muon_drafters", "adamw_no_decay_drafters"]
    assert all(g.get("drafters", False) == g["name"].endswith("_drafters") for g in opt_b.param_groups)
    for m, o in ((a, opt_a), (b, opt_b)):
        fake_grads(m, 2)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = copy.deepcopy(a)  # the saved state as it is, without regrouping: the drafters' groups take the old names
    opt_c = build(c, drafters=c.drafter_parameters())
    set_optimizer_state_dict(c, opt_c, saved, options=full)
    assert [g["name"] for g in opt_c.param_groups][-2:] == ["muon", "adamw_no_decay"]


# ----------------------------------------------------------------------------- resume, zero gradients, bad settings


@pytest.mark.parametrize("via", ["torch.save", "distributed.checkpoint"])
def test_state_dict_round_trip_continues_bit_exactly(via):
    full = StateDictOptions(full_state_dict=True)

    def steps(model, opt, which):
        for s in which:  # head 1 sits out step 1 (no gradient: skipped, no state made for it)
            fake_grads(model, s, skip=("heads.1.",) if s == 1 else ())
            opt.step()
            opt.zero_grad(set_to_none=True)

    a = make()
    opt_a = build(a)
    steps(a, opt_a, range(3))
    b = make()
    opt_b = build(b)
    steps(b, opt_b, range(2))
    sd = opt_b.state_dict() if via == "torch.save" else get_optimizer_state_dict(b, opt_b, options=full)
    ckpt = through_file({"model": b.state_dict(), "optimizer": sd})  # plain tensors, numbers, strings
    for resumed_state in (True, False):
        c = make(seed=1)  # other weights, overwritten by the checkpoint's
        c.load_state_dict(ckpt["model"])
        opt_c = build(c)
        if resumed_state and via == "torch.save":
            opt_c.load_state_dict(ckpt["optimizer"])
        elif resumed_state:
            set_optimizer_state_dict(c, opt_c, ckpt["optimizer"], options=full)
        steps(c, opt_c, [2])
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
        assert same == resumed_state  # and without the optimizer state (momentum, Adam moments) it differs


def test_zero_gradient_gives_no_nan_only_decay():
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in muon.param_groups(model)["muon"]:
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, before[name] * (1 - 0.02 * 0.1), rtol=0, atol=0)


def test_bad_settings_are_refused():
    model = make()
    for kw, msg in [(dict(name="sgd"), r"optimizer='sgd', expected 'adamw' or 'muon'"),
                    (dict(lr=-1.0), r"learning_rate=-1.0, expected >= 0"),
                    (dict(momentum=1.0), r"momentum=1.0, expected in \[0, 1\)"),
                    (dict(adjust_lr_fn="rms"), r"adjust_lr_fn='rms', expected 'match_rms_adamw' or 'original'"),
                    (dict(ns_dtype="half"), r"ns_dtype='half', expected 'bfloat16' or 'float32' or 'float64'"),
                    (dict(betas=(0.9, 1.5)), r"betas=\(0.9, 1.5\), expected two values in \[0, 1\)")]:
        with pytest.raises(ValueError, match=msg):
            build(model, **{"name": "muon", **kw})


# ----------------------------------------------------------------------------- FSDP2 on 2 ranks


def test_fsdp2_muon_equals_one_process():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "test_muon.py"]
    r = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fsdp2 muon: all checks passed" in r.stdout, (r.stdout + r.stderr)[-4000:]


def fsdp_worker():
    """Each rank: a model in one process (the reference) and the same model under fully_shard (every parameter
    split on dim 0 over 2 ranks, the shared experts' 9 rows unevenly), the same gradients, Muon on both."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    dist.init_process_group("gloo")
    rank, full = dist.get_rank(), StateDictOptions(full_state_dict=True)

    def shard(model, experts_on_dim1=False):
        model = copy.deepcopy(model)
        place = (lambda p: Shard(1) if p.dim() == 3 else None) if experts_on_dim1 else None
        for block in list(model.blocks) + list(model.heads):
            fully_shard(block, shard_placement_fn=place)
        fully_shard(model)
        return model

    def max_diff(sharded, ref):
        b = dict(ref.named_parameters())
        return max((p.full_tensor() - b[n]).abs().max().item() for n, p in sharded.named_parameters())

    # the experts split on dim 0 (whole experts on each rank, orthogonalized locally): 4 as 2 + 2, 3 as 2 + 1,
    # 1 as 1 + none; or split on dim 1 (each expert cut in two: gathered)
    for n_experts, top_k, on_dim1 in ((4, 2, False), (3, 2, False), (1, 1, False), (4, 2, True)):
        kw = dict(n_experts=n_experts, top_k=top_k, expert_hidden=8 if on_dim1 else 9,  # FSDP2: dim 1 splits evenly
                  n_dense_layers=1, tie_embeddings=n_experts == 3)
        ref = make(**kw)
        sharded = shard(ref, on_dim1)
        w1 = sharded.blocks[1].ffn.w1_EFD
        assert w1.placements == (Shard(1 if on_dim1 else 0),) and muon._whole_matrices_local(w1) != on_dim1
        opt_ref, opt_sh = build(ref), build(sharded)
        for step in range(3):
            for m in (ref, sharded):
                fake_grads(m, step, skip=("heads.1.",) if step == 1 else ())
            opt_ref.step()
            opt_sh.step()
            d = max_diff(sharded, ref)
            assert d <= 1e-6, (n_experts, step, d)
        # the full optimizer state FSDP gathers (what train.py saves) equals the one process's, name by name
        sd_sh, sd_ref = get_optimizer_state_dict(sharded, opt_sh, options=full), get_optimizer_state_dict(ref, opt_ref)
        assert sd_sh["state"].keys() == sd_ref["state"].keys()
        for name, st in sd_ref["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(sd_sh["state"][name][k], v, rtol=0, atol=1e-6)
        # resume under FSDP from the one process's full state (through a file, as train.py does: a state dict
        # holds the optimizer's own tensors): the next step equals the one process's
        resumed = shard(ref, on_dim1)
        opt_res = build(resumed)
        set_optimizer_state_dict(resumed, opt_res, through_file(sd_ref), options=full)
        for m, opt in ((ref, opt_ref), (resumed, opt_res)):
            fake_grads(m, 3)
            opt.step()
        assert max_diff(resumed, ref) <= 1e-6
        # a real backward (each rank the same batch, so FSDP's averaged gradient is the one process's)
        ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
        for m, opt in ((ref, opt_ref), (resumed, opt_res)):
            opt.zero_grad(set_to_none=True)
            out = m(ids)
            (out.hidden.square().mean() + m.logits(out.hidden).logsumexp(-1).mean() + out.aux_loss).backward()
            opt.step()
        d = max_diff(resumed, ref)
        assert d <= 1e-5, ("real backward", n_experts, d)
        if rank == 0:
            print(f"fsdp2 muon, {n_experts} experts split on dim {int(on_dim1)}: max |sharded - one process| "
                  f"{d:.1e}", flush=True)
    # the mutant: orthogonalizing each rank's rows of a 2-D matrix alone is not Muon's update
    ref = make(n_experts=4, expert_hidden=9)
    sharded = shard(ref)
    opt_ref, opt_sh = build(ref), build(sharded)
    real = muon._whole_matrices_local
    muon._whole_matrices_local = lambda p: True
    try:
        for m, opt in ((ref, opt_ref), (sharded, opt_sh)):
            fake_grads(m, 0)
            opt.step()
    finally:
        muon._whole_matrices_local = real
    assert max_diff(sharded, ref) > 1e-3
    if rank == 0:
        print("fsdp2 muon: all checks passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    fsdp_worker()
