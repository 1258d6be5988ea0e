"""muon.py: the optimizer. AdamW for every parameter, or Muon for the weight matrices and AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is
Scalable for LLM Training", the Moonlight paper) is momentum SGD whose update of each weight matrix is
orthogonalized: the momentum M = U S V^T is replaced by about U V^T (five quintic Newton-Schulz iterations in
bfloat16, the coefficients of torch.optim.Muon and Keller Jordan's code), so every direction of the matrix moves
by about the same amount, whatever the gradient's spectrum.

Which parameters (param_groups, one rule, checked: every parameter in exactly one group):
  Muon:  the weight of every nn.Linear inside the model's modules (attention qkv and proj, the shared experts and
         the dense blocks' SwiGLU, any projection a future module adds), and the stacked routed experts of every
         MoE (w1_EFD, w3_EFD, w2_EDF: [E, ...], each expert orthogonalized as its own matrix; flattening the
         experts into one matrix would couple their updates).
  AdamW: the embedding and the unembedding (tied or not: the lm_head nn.Linear is the exception to the rule
         above), the MoE routers (an nn.Linear, but an E-row classifier, not a hidden layer), every parameter of
         fewer than 2 dimensions (norms, biases). Decay on the 2-D ones only, as train.py's AdamW does.
  A parameter of 2 or more dimensions that fits none of these is an error (a new kind of weight must be placed
  on purpose, not silently).

Learning rate: Muon's update of an A x B matrix is scaled by 0.2 * sqrt(max(A, B)) (adjust_lr_fn=
"match_rms_adamw", the default; Moonlight section 2.2, torch.optim.Muon's option of the same name), which gives
it the root-mean-square of a typical AdamW update, so a learning rate and weight decay tuned for AdamW carry over;
adjust_lr_fn="original" is Keller Jordan's sqrt(max(1, A / B)), whose learning rates (0.02 in his code) are not
AdamW's.
Weight decay is decoupled (p *= 1 - lr * weight_decay, the unscaled lr), as in AdamW and torch.optim.Muon.

FSDP2 (fully_shard: every parameter a DTensor sharded on dim 0): the momentum update is elementwise, so each rank
updates its shard; the orthogonalization is not, so a sharded 2-D matrix is gathered whole (an all-gather),
orthogonalized, and each rank keeps its rows. Stacked experts [E, F, D] split on dim 0 give each rank whole
experts (E need not be a multiple of the world size), orthogonalized locally without communication; a stack split
on another dimension (fully_shard's shard_placement_fn) is gathered like a matrix.
Every rank orthogonalizes every gathered matrix (the same work as under DDP); distributing that work across ranks
(torchtitan's and Dion's distributed Muon) is not done here.

State (what a checkpoint holds): "momentum_buffer" for a Muon parameter (torch.optim.Muon's name), "step",
"exp_avg", "exp_avg_sq" for an AdamW parameter (torch.optim.AdamW's), plain tensors shaped like their parameter,
so torch.distributed.checkpoint's full state dicts and torch.load(weights_only=True) work as for AdamW.
Every group carries "lr_ratio": the training loop sets group["lr"] = lr_now * group["lr_ratio"] each step.
"""
import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.optim.adamw import adamw

from model import Model, MoE

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)
NS_EPS = 1e-7  # the Frobenius norm is clamped to this before dividing: a zero update stays zero, never NaN
EXPERT_STACKS = ("w1_EFD", "w3_EFD", "w2_EDF")
ADJUST_LR_FNS = ("match_rms_adamw", "original")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def param_groups(model: Model):
    """-> {"muon": [(name, param)], "adamw": [(name, param)]}, every parameter of the model in exactly one,
    by the rule in the module docstring. A tied unembedding is the embedding's parameter (listed once)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    # matrices that are not hidden layers: the embedding, the unembedding (a Linear, or the embedding when tied)
    # and the routers (a Linear each: an E-way classifier of tokens)
    adamw_2d = {id(model.tok_emb.weight), id(model.lm_head.weight)} | {id(m.router.weight) for m in moes}
    muon_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    muon_ids |= {id(getattr(m, n)) for m in moes for n in EXPERT_STACKS}
    groups = {"muon": [], "adamw": []}
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in adamw_2d:
            groups["adamw"].append((name, p))
        elif id(p) in muon_ids:
            groups["muon"].append((name, p))
        else:
            raise ValueError(f"parameter {name} of shape {tuple(p.shape)} is neither an nn.Linear weight, an expert "
                             "stack, the embedding, the unembedding nor a router: muon.param_groups has no rule for it")
    return groups


def orthogonalize(G, steps=5, coefficients=NS_COEFFICIENTS, eps=NS_EPS, dtype=torch.bfloat16):
    """Newton-Schulz orthogonalization of each matrix of G (..., A, B) -> the same shape, in `dtype`: about U V^T
    of each matrix's SVD (singular values land in about [0.7, 1.2], not exactly 1: the quintic trades exactness
    for speed, which does not hurt training per Jordan). The operations of torch.optim.Muon's 2-D function, batched
    over the leading dimensions: work on the wide orientation (A <= B, so the Gram matrix is the small one),
    normalize by the Frobenius norm (>= the spectral norm, so the iteration starts inside its basin)."""
    a, b, c = coefficients
    A, B = G.shape[-2:]
    X = G.reshape(-1, A, B).to(dtype)
    if A > B:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        X = torch.baddbmm(X, poly, X, beta=a)  # a * X + poly @ X
    if A > B:
        X = X.mT
    return X.reshape(G.shape)


def lr_scale(shape, adjust_lr_fn):
    """Muon's learning-rate multiplier for matrices of shape (..., A, B): torch.optim.Muon's _adjust_lr on the
    last two dimensions (one expert of a stack is one matrix), the same floating-point operations."""
    A, B = shape[-2:]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return math.sqrt(max(1, A / B))


def _local(t):
    """The tensor this rank holds (a DTensor's shard, a plain tensor itself): elementwise updates work on it."""
    return t.to_local() if hasattr(t, "to_local") else t


def _whole_matrices_local(p):
    """Does this rank's shard of p hold whole matrices (of its last two dimensions)? A plain tensor does; a DTensor
    does when it is split only on leading (batch) dimensions: FSDP2's dim-0 split of a 2-D matrix cuts it, of
    stacked experts [E, F, D] hands each rank whole experts (any E: torch.chunk's split, some ranks may get none)."""
    return all(not pl.is_shard() or pl.dim < p.dim() - 2 for pl in getattr(p, "placements", ()))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups with kind "muon", AdamW (torch's fused kernel, bit-identical to torch.optim.AdamW with
    fused=True) for those with kind "adamw". Built by build_optimizer(); see the module docstring."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95, nesterov=True,
                 ns_steps=5, adjust_lr_fn="match_rms_adamw", ns_dtype="bfloat16"):
        defaults = dict(lr=lr, lr_ratio=1.0, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=NS_COEFFICIENTS, ns_steps=ns_steps, ns_eps=NS_EPS,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"param group kind={g.get('kind')!r}, expected 'muon' or 'adamw'")
            # "fused" is what Optimizer.load_state_dict reads to put AdamW's step counter on the parameter's device
            g["fused"] = g["kind"] == "adamw"
            for p in g["params"]:
                if g["kind"] == "muon" and p.dim() < 2:
                    raise ValueError(f"a Muon parameter of shape {tuple(p.shape)}: Muon needs matrices (2-D or more)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            (self._adamw if g["kind"] == "adamw" else self._muon)(g)
        return loss

    def _adamw(self, g):
        """torch.optim.AdamW's step with fused=True: the same state and the same kernel."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # fused: on the device
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = g["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False, beta1=beta1,
                  beta2=beta2, lr=g["lr"], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False)

    def _muon(self, g):
        """Momentum (Nesterov by default) on each rank's shard, then the orthogonalization of whole matrices,
        batched over every matrix of one shape, then decay and the scaled update on each rank's shard."""
        mu, todo = g["momentum"], []
        for p in g["params"]:
            if p.grad is None:  # a head that did not run this step
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - mu)  # buf = mu * buf + (1 - mu) * grad
            update = grad.lerp(buf, mu) if g["nesterov"] else buf
            local = _whole_matrices_local(p)
            if not local:  # gather the whole matrix (a collective: every rank takes this branch for p)
                from torch.distributed.tensor import DTensor  # only here: a build without distributed never needs it
                update = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride()).full_tensor()
            todo.append((p, update, local))
        # one batched Newton-Schulz per matrix shape: fewer, larger kernels than one call per parameter
        by_shape = defaultdict(list)
        for i, (_, update, _) in enumerate(todo):
            by_shape[tuple(update.shape[-2:])].append(i)
        ortho = [None] * len(todo)
        for (A, B), idx in by_shape.items():
            stacked = torch.cat([todo[i][1].reshape(-1, A, B) for i in idx])
            out = orthogonalize(stacked, g["ns_steps"], g["ns_coefficients"], g["ns_eps"], NS_DTYPES[g["ns_dtype"]])
            for i, o in zip(idx, out.split([todo[i][1].numel() // (A * B) for i in idx])):
                ortho[i] = o.reshape(todo[i][1].shape)
        for (p, _, local), o in zip(todo, ortho):
            if not local:  # keep this rank's rows (the layout FSDP2 gave the parameter), no communication
                from torch.distributed.tensor import distribute_tensor
                o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None).to_local()
            w = _local(p)
            w.mul_(1 - g["lr"] * g["weight_decay"])
            w.add_(o, alpha=-g["lr"] * lr_scale(p.shape, g["adjust_lr_fn"]))


def build_optimizer(model: Model, name, lr, weight_decay, betas, eps=1e-8, momentum=0.95, nesterov=True,
                    ns_steps=5, adjust_lr_fn="match_rms_adamw", muon_lr_ratio=1.0, ns_dtype="bfloat16", drafters=()):
    """The training optimizer, one object -> torch.optim.Optimizer whose groups each carry "lr_ratio".

    name="adamw": torch.optim.AdamW, fused, decay on parameters of 2 or more dimensions only (two groups).
    name="muon": MuonAdamW with three groups: "muon" (the matrices, decay weight_decay, lr_ratio muon_lr_ratio),
    "adamw_decay" (embedding, unembedding, routers) and "adamw_no_decay" (norms, biases), both lr_ratio 1.
    With adjust_lr_fn="match_rms_adamw" (the default) Muon takes AdamW's learning rate and weight decay as they are.
    ns_dtype: the Newton-Schulz iterations' precision ("bfloat16" as torch.optim.Muon; "float32" or "float64"
    for exactness tests: bfloat16 rounding can turn a 1e-7 relative difference between two runs, DDP against FSDP
    say, into one bfloat16 step of an update's element, 4e-3 relative).
    drafters: parameters (the drafting heads') that get groups of their own, each group's twin with "_drafters"
    after its name and "drafters": True, so that the training loop can give them their own learning rate."""
    if name not in ("adamw", "muon"):
        raise ValueError(f"optimizer={name!r}, expected 'adamw' or 'muon'")
    checks = [("learning_rate", lr, lr >= 0, ">= 0"), ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
              ("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "two values in [0, 1)"),
              ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
              ("ns_steps", ns_steps, isinstance(ns_steps, int) and 1 <= ns_steps < 100, "an integer in [1, 100)"),
              ("adjust_lr_fn", adjust_lr_fn, adjust_lr_fn in ADJUST_LR_FNS, " or ".join(map(repr, ADJUST_LR_FNS))),
              ("ns_dtype", ns_dtype, ns_dtype in NS_DTYPES, " or ".join(map(repr, NS_DTYPES))),
              ("muon_lr_ratio", muon_lr_ratio, muon_lr_ratio > 0, "> 0")]
    for setting, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{setting}={value!r}, expected {expected}")
    groups = param_groups(model)  # raises on a parameter it has no rule for, whatever the optimizer
    betas, drafting = tuple(betas), {id(p) for p in drafters}

    def split(specs):  # each group, then the drafters' twins of the groups that hold some (the model's order kept)
        mine = [{**g, "params": [p for p in g["params"] if id(p) not in drafting]} for g in specs]
        twins = [{**g, "params": [p for p in g["params"] if id(p) in drafting], "drafters": True} for g in specs]
        for g in twins:
            if "name" in g:
                g["name"] += "_drafters"
        return mine + [g for g in twins if g["params"]]
    if name == "adamw":
        params = list(model.parameters())  # the model's order, as train.py's AdamW has always had it
        return torch.optim.AdamW(split([
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_ratio": 1.0},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_ratio": 1.0}]),
            lr=lr, betas=betas, eps=eps, fused=True)  # fused on every device: no host sync
    rest = [p for _, p in groups["adamw"]]
    return MuonAdamW(split([
        {"name": "muon", "kind": "muon", "params": [p for _, p in groups["muon"]], "weight_decay": weight_decay,
         "lr_ratio": muon_lr_ratio},
        {"name": "adamw_decay", "kind": "adamw", "params": [p for p in rest if p.dim() >= 2],
         "weight_decay": weight_decay},
        {"name": "adamw_no_decay", "kind": "adamw", "params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]), lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
