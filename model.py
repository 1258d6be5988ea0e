"""model.py: a decoder-only Mixture-of-Experts transformer with document-causal attention and
multi-token-prediction (MTP) heads in three styles (ModelConfig.mtp_style).

    ids -> embedding -> n_layer trunk blocks -> x
    parallel (Gloeckle et al. 2024, "Better & Faster LLMs via Multi-token Prediction"): head k = one dense block
        on x -> shared final norm -> hidden[k-1], predicting token t + k
    sequential (DeepSeek-V3, arXiv 2412.19437, section 2.2): head 1 = one dense block on x; head k >= 2 (depth
        k-1) merges head k-1's state at t with the embedding of token t+k-1 (RMSNorm both, concatenate, project
        2D -> D), runs one dense block, then the shared final norm; token t+k-1 is read only where it is head
        k-1's target at t (tokens_ahead(): in t's document), elsewhere the embedding is zero
    shared logits (modded-nanogpt, 2025-12): head 1's block only; its one state at t is scored against
        t+1, t+2, ... (hidden has one row whatever the heads asked)
    logits = hidden @ lm_head.weight.T

forward() returns the heads' hidden states, not logits: loss.py computes the cross-entropy chunk by chunk so
the (n_predict, B, T, vocab) logits never exist at once. `heads` selects which heads are computed (a head
schedule drops heads late in training; plain decoding needs head 1 only); head_modules_run() says which
head modules that runs (sequential: a depth needs the depths before it).

Attention: query (b, t) sees key (b, s) iff s <= t and doc_ids[b, s] == doc_ids[b, t]. Padding has doc
id -1, so it sees only padding (itself included): no empty row, no NaN. Three backends compute it:
SDPA with a dense boolean mask (the reference, and the CPU training path), FlexAttention with a
BlockMask (CUDA), and SDPA is_causal for a plain sequence (no doc_ids, no attention_mask given).

Decoding: forward(ids, kv_cache=cache) feeds tokens at positions cache.pos, cache.pos + 1, ...; the model
builds the positions and the causal mask itself, so callers pass tokens only (as in gpt-fast). A sequential
depth reads tokens not fed yet (the next token, earlier depths' drafts): decode_depth() runs it at the last
fed position, with its own KV cache.

MoE: dropless top-k routing over stacked expert weights [E, ...] (every expert gets a gradient every
step, so DDP needs no find_unused_parameters), optional always-on shared experts, Switch load-balancing
and z-loss over real tokens only, and DeepSeek-V3's auxiliary-loss-free bias as an option.
Shape suffixes: B batch, T time, D model width, H heads, K top_k, E experts, F expert hidden, N tokens.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

MTP_STYLES = ("parallel", "sequential", "shared")


@dataclass
class ModelConfig:
    """The model's shape. These defaults are the model of `python train.py` (the one place they are set);
    every field is also a train.py setting (--n_embd=256) and a line of a --config file."""
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    seq_len: int = 256  # tokens per row; the RoPE table's length
    n_layer: int = 2  # trunk blocks (the n_predict head blocks come on top)
    n_head: int = 4  # attention heads
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head
    n_embd: int = 128  # model width
    n_experts: int = 4  # routed experts per MoE layer
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 1  # always-on experts (DeepSeekMoE); 0 for none
    expert_hidden: int = 0  # SwiGLU hidden of one expert; 0: 4 * n_embd / (top_k + n_shared_experts), rounded up to 16
    n_dense_layers: int = 0  # leading trunk blocks with a dense FFN instead of MoE (DeepSeek-V3 uses 3)
    n_predict: int = 4  # MTP heads; head k predicts token t + k
    mtp_style: str = "sequential"  # "sequential" (DeepSeek-V3 depths), "parallel" (a block per head), "shared" (logits)
    # heads 2..n learn on a detached trunk: their gradient reaches their own modules only, and the trunk and head 1
    # learn as a 1-head model (no effect with shared logits, which have no modules of their own to detach)
    mtp_detach: bool = True
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    rope_base: float = 10000.0  # rotary embedding base
    dropout: float = 0.0  # residual dropout; 0 keeps a training forward deterministic
    router_noise: float = 0.0  # std of Gaussian noise on router logits in training (0 = none)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (0 with bias balancing)
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    attn_backend: str = "auto"  # "sdpa" (dense mask), "flex" (FlexAttention BlockMask), "auto": flex on CUDA
    moe_backend: str = "auto"  # "loop", "grouped" (torch._grouped_mm), or "auto": grouped on CUDA in bf16

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")
        may_be_zero = ("n_kv_head", "expert_hidden", "n_dense_layers", "n_shared_experts")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and value < (0 if f.name in may_be_zero else 1):
                bad(f"{f.name}={value}, expected >= {0 if f.name in may_be_zero else 1}")
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            bad(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size")
        if self.n_head % kv:
            bad(f"n_head={self.n_head} is not a multiple of n_kv_head={kv}")
        if self.top_k > self.n_experts:
            bad(f"top_k={self.top_k} > n_experts={self.n_experts}")
        if self.n_dense_layers > self.n_layer:
            bad(f"n_dense_layers={self.n_dense_layers} > n_layer={self.n_layer}")
        if not 0 <= self.dropout < 1:
            bad(f"dropout={self.dropout}, expected 0 <= dropout < 1")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            bad(f"attn_backend={self.attn_backend!r}, expected 'auto', 'sdpa' or 'flex'")
        if self.moe_backend not in ("auto", "loop", "grouped"):
            bad(f"moe_backend={self.moe_backend!r}, expected 'auto', 'loop' or 'grouped'")
        if self.mtp_style not in MTP_STYLES:
            bad(f"mtp_style={self.mtp_style!r}, expected 'parallel', 'sequential' or 'shared'")

    @property
    def ffn_hidden(self):
        # a multiple of 16 keeps grouped-matmul strides aligned (torch._grouped_mm needs 16-byte strides)
        return self.expert_hidden or math.ceil(4 * self.n_embd // (self.top_k + self.n_shared_experts) / 16) * 16

    @property
    def n_head_modules(self):
        """Head modules with parameters: one per head, except shared logits (head 1's block scores every head)."""
        return 1 if self.mtp_style == "shared" else self.n_predict


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (len(heads), B, T, n_embd) final-normed states of the heads asked; shared logits: (1, ...)
    aux_loss: torch.Tensor  # scalar: aux_loss_coef * balance + z_loss_coef * z, summed over MoE layers
    expert_counts: torch.Tensor  # (n_moe_layers, n_experts) real tokens routed to each expert


# ----------------------------------------------------------------------------- attention

def doc_mask(doc_ids):
    """Dense boolean mask (B, 1, T, T): causal and same document. The reference for every backend."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def flex_block_mask(doc_ids):
    """The same mask as doc_mask(), as a FlexAttention BlockMask (built once per batch)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = doc_ids.shape

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (doc_ids[b, q] == doc_ids[b, kv])
    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


_flex_compiled = None


def flex_attention(q, k, v, block_mask):
    """FlexAttention, compiled on CUDA (its fast path); eager elsewhere (slow, for CPU tests only)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention as flex
    if q.is_cuda:
        _flex_compiled = _flex_compiled or torch.compile(flex, dynamic=False)
        flex = _flex_compiled
    return flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def rope(x, cos, sin):
    """Rotate pairs (x1, x2) of the two halves of head_dim. x: (B, H, T, hd); cos, sin: (B, 1, T, hd/2)."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# oneDNN's packed matmul (the op torch.compile's CPU freezing uses): few-row products with the unembedding
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class KVCache:
    """Keys and values of every attention module (trunk and head modules) for decoding one batch of sequences,
    preallocated to max_len positions. `pos` is the number of positions fed; truncate(n) rolls back.
    A forward that runs only some heads leaves the others behind (`head_pos`: the positions each head module
    holds); the trunk's output at every position is kept (`trunk`, B x max_len x D), so a later forward catches
    a head block up. Sequential style: the fed ids (`ids`) and each head module's output before the final norm
    (`states`) are kept too, since depth i at position s reads head i's state at s and token s + i: it holds
    position s only once token s + i is fed (what it ran beyond, on the next token and on drafts, the next
    decode_depth() recomputes), and a rollback to n positions leaves it n - i of them. (No depth reads the last
    depth's states: on the fast path, Model._depth_fast, they are kept at the last position it ran only.)"""

    def __init__(self, model, max_len, batch=1, vocab=None, shortlist=None):
        cfg, p = model.cfg, next(model.parameters())
        kv, hd = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        self.kv = {m: (p.new_zeros(batch, kv, max_len, hd), p.new_zeros(batch, kv, max_len, hd))
                   for m in model.modules() if isinstance(m, Attention)}
        self.trunk = p.new_zeros(batch, max_len, cfg.n_embd)
        n, sequential = len(model.heads), cfg.mtp_style == "sequential"
        # parallel heads: the drafting heads (indices 1..n-1) run as one batched block (Model._decode_drafters) on
        # their weights stacked here; their keys and values are views into one stacked tensor (n-1, B, KV, max_len,
        # hd), so that block and each head's own module read and write the same cache
        self.drafters = self.draft_kv = None
        if cfg.mtp_style == "parallel" and n > 2:
            self.draft_kv = tuple(p.new_zeros(n - 1, batch, kv, max_len, hd) for _ in range(2))
            for i, head in enumerate(model.heads[1:]):
                self.kv[head.attn] = (self.draft_kv[0][i], self.draft_kv[1][i])
            self.drafters = stack_drafters(model.heads[1:])
        self.pos, self.head_pos = 0, [0] * n
        self.lag = list(range(n)) if sequential else [0] * n  # depth i reads i tokens ahead of its position
        self.ids = torch.zeros(batch, max_len, dtype=torch.long, device=p.device) if sequential else None
        self.states = p.new_zeros(n, batch, max_len, cfg.n_embd) if sequential else None
        self.drafted = [0] * n  # sequential: pos when depth i last ran at position pos - 1; 0 after a feed or rollback
        # sequential depths, for Model._depth_fast: each depth's weights folded (fold_depth()), its keys and values as
        # views into one tensor (B, 2 KV, max_len, hd) written by one copy, the rotation as two tables
        # (rope_half_swap()), and the causal mask of every query position over every key, sliced, not built, per call
        self.depths = self.depth_kv = self.rope_CS = self.causal = None
        if sequential and n > 1:
            self.depths = [fold_depth(d) for d in model.heads[1:]]
            self.depth_kv = [p.new_zeros(batch, 2 * kv, max_len, hd) for _ in model.heads[1:]]
            for d, kv_B2KLh in zip(model.heads[1:], self.depth_kv):
                self.kv[d.block.attn] = (kv_B2KLh[:, :kv], kv_B2KLh[:, kv:])
            self.rope_CS = rope_half_swap(model.rope_cos, model.rope_sin, cfg.n_head + kv, kv)
            self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril()
        # the unembedding transposed, (D, vocab): decoding multiplies a few rows at a time, and the CPU's GEMM
        # reads this layout up to 1.8x faster than lm_head.weight.t() (vocab: drop the padding ids up front)
        self.unembed_DV = model.lm_head.weight[:vocab].detach().t().contiguous()
        self.unembed_packed = None  # oneDNN's copy for several rows at once, made by the first such call (unembed())
        # sequential depths' drafts over a shortlist of frequent ids only (FR-Spec, Zhao et al. 2025): `shortlist`
        # (N,) ascending ids, draft_DV its own contiguous (D, N) copy of their columns, small enough to stay in the
        # CPU's cache, where a pass over all 50k columns reads 25 MB from memory per depth. Verification keeps the
        # full vocabulary (unembed()), so a draft outside the shortlist is only a draft never proposed.
        self.shortlist = self.draft_DV = None
        if shortlist is not None:
            ids = torch.as_tensor(shortlist, dtype=torch.long).to(p.device).unique()  # sorted: ties break as argmax
            if len(ids) and not 0 <= int(ids[0]) <= int(ids[-1]) < self.unembed_DV.shape[1]:
                raise ValueError(f"shortlist ids in [{int(ids[0])}, {int(ids[-1])}], expected ids in "
                                 f"[0, {self.unembed_DV.shape[1]})")
            if 0 < len(ids) < self.unembed_DV.shape[1]:
                self.shortlist, self.draft_DV = ids, self.unembed_DV[:, ids].contiguous()

    def unembed(self, h):
        """(..., D) -> (..., vocab) logits. One row: a matrix-vector product over unembed_DV, the fastest there.
        Several rows of float32 on a CPU: oneDNN's matmul over a copy of the weight packed once, which reads the
        unembedding at about one row's cost for a handful of rows, where the BLAS GEMM (MKL, on an AMD EPYC) takes
        3-6 times a row's time (bench.py's decoding rows)."""
        if h.shape[:-1].numel() > 1 and h.dtype == torch.float32 and h.device.type == "cpu" and ONEDNN:
            if self.unembed_packed is None:
                self.unembed_packed = torch.ops.mkldnn._reorder_linear_weight(self.unembed_DV.t().contiguous())
            return torch.ops.mkldnn._linear_pointwise(h, self.unembed_packed, None, "none", [None], "")
        return h @ self.unembed_DV

    def draft_logits(self, h):
        """(..., D) -> (logits (..., N) over the shortlist's ids, those ids (N,)); without a shortlist, the full
        logits (unembed()) and None."""
        if self.draft_DV is None:
            return self.unembed(h), None
        return h @ self.draft_DV, self.shortlist

    def truncate(self, n):
        self.pos = n
        self.head_pos = [max(0, min(p, n - lag)) for p, lag in zip(self.head_pos, self.lag)]
        self.drafted = [0] * len(self.drafted)

    def update(self, attn, start, k, v):
        """Write k, v (B, KV, T, hd) at positions start.. and return the keys and values up to there."""
        K, V = self.kv[attn]
        end = start + k.shape[2]
        K[:, :, start:end], V[:, :, start:end] = k, v
        return K[:, :, :end], V[:, :, :end]


def _t(lin):
    return lin.weight.detach().t().contiguous()  # (in, out)


def fold_block(blk):
    """A dense block's matrices for decoding, each (in, out), every RMSNorm's weight folded into the matrix after it
    (norm(x) * g @ W = norm(x) @ (g * W)) and w1 | w3 side by side."""
    return dict(qkv=blk.norm1.weight.detach()[:, None] * _t(blk.attn.qkv),  # (D, (H + 2 KV) hd)
                proj=_t(blk.attn.proj),  # (D, D)
                w13=blk.norm2.weight.detach()[:, None] * torch.cat([_t(blk.ffn.w1), _t(blk.ffn.w3)], 1),  # (D, 2F)
                w2=_t(blk.ffn.w2))  # (F, D)


def stack_drafters(heads):
    """The drafting heads' blocks (parallel style, dense) folded (fold_block()) and stacked for
    Model._decode_drafters, every head's q, k, v projection side by side, since all of them read the same trunk
    output."""
    folded = [fold_block(h) for h in heads]
    return dict(qkv=torch.cat([f["qkv"] for f in folded], 1),  # (D, n*Q)
                **{k: torch.stack([f[k] for f in folded]) for k in ("proj", "w13", "w2")})  # (n, in, out)


def fold_depth(depth):
    """A sequential depth's weights as Model._depth_fast reads them (decoding), folded once per KVCache: its block's
    (fold_block()), and the two norms before the merge as one norm over both inputs side by side, their weights
    folded into the merge; the norms' eps as tensors for unit_rms()."""
    blk = depth.block
    g_he = torch.cat([depth.norm_h.weight, depth.norm_e.weight]).detach()
    eps = lambda norm: g_he.new_tensor(torch.finfo(g_he.dtype).eps if norm.eps is None else norm.eps)  # as nn.RMSNorm
    return dict(fold_block(blk), eps_he=eps(depth.norm_h), eps1=eps(blk.norm1), eps2=eps(blk.norm2),  # unit_rms()
                merge=g_he[:, None] * _t(depth.merge))  # (2D, D)


def unit_rms(x, eps):
    """F.rms_norm(x, (D,), eps=eps) (no weight; eps a 0-dim tensor), as x * rsqrt(|x|^2 / D + eps): three
    operations where F.rms_norm runs about eight (float32 casts included), 7 us against 11 us on a few rows."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]).rsqrt_()


def rope_half_swap(cos, sin, rotated, kept):
    """rope()'s tables (T, hd/2) -> (C, S) (T, rotated + kept, 2, hd/2) with rope(x) = x * C + swap(x) * S,
    swap(x) = (x2, x1) (x viewed as (..., 2, hd/2), flipped), for `rotated` heads (q and k: the same products and
    sums as rope(), x1 cos + x2 (-sin) and x2 cos + x1 sin, so the same values), then `kept` heads left as they are
    (v: x * 1 + swap(x) * 0 = x exactly): three elementwise ops over q, k and v at once, where rope() takes nine."""
    C, S = torch.stack([cos, cos], 1)[:, None], torch.stack([-sin, sin], 1)[:, None]  # (T, 1, 2, hd/2)
    return (torch.cat([C.expand(-1, rotated, -1, -1), torch.ones_like(C).expand(-1, kept, -1, -1)], 1),
            torch.cat([S.expand(-1, rotated, -1, -1), torch.zeros_like(S).expand(-1, kept, -1, -1)], 1))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.H, self.KV, self.hd = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (self.H + 2 * self.KV) * self.hd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x_BTD, cos, sin, mask, cache=None):
        """mask: None (plain causal), a boolean tensor (SDPA) or a BlockMask (flex); cache: (KVCache, start)."""
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], dim=-1)
        q = rope(q.view(B, T, self.H, self.hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = rope(k.view(B, T, self.KV, self.hd).transpose(1, 2), cos, sin)  # (B, KV, T, hd)
        v = v.view(B, T, self.KV, self.hd).transpose(1, 2)
        if cache is not None:  # decoding: append these keys and values, attend over all so far
            k, v = cache[0].update(self, cache[1], k, v)
        gqa = self.KV != self.H
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = flex_attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


# ----------------------------------------------------------------------------- feed-forward

class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


DENSE_MOE_TOKENS = 16  # up to this many tokens, "auto" runs every expert (experts_dense): fewer ops than routing


def experts_loop(x_ND, idx_NK, gate_NK, w1_EFD, w3_EFD, w2_EDF):
    """Reference dispatch (and the CPU fast path): for each expert, gather its tokens, run, scatter-add."""
    y_ND = torch.zeros_like(x_ND)
    for e in range(w1_EFD.shape[0]):
        tok, slot = torch.nonzero(idx_NK == e, as_tuple=True)  # may be empty: weights still get a 0 grad
        x_nD = x_ND.index_select(0, tok)
        h_nF = F.silu(x_nD @ w1_EFD[e].t()) * (x_nD @ w3_EFD[e].t())
        y_ND.index_add_(0, tok, (h_nF @ w2_EDF[e].t()) * gate_NK[tok, slot, None])
    return y_ND


def experts_grouped(x_ND, idx_NK, gate_NK, w1_EFD, w3_EFD, w2_EDF):
    """Grouped matmul over tokens sorted by expert (torch._grouped_mm with group end offsets). No host
    sync: group sizes come from a scatter-add (bincount would read the maximum back on CUDA)."""
    E, K = w1_EFD.shape[0], idx_NK.shape[1]
    flat = idx_NK.flatten()
    order = torch.argsort(flat, stable=True)  # assignment slots sorted by expert
    tok = order // K
    ones = torch.ones_like(flat, dtype=torch.int32)
    sizes = torch.zeros(E, dtype=torch.int32, device=x_ND.device).scatter_add_(0, flat, ones)
    offs = torch.cumsum(sizes, 0, dtype=torch.int32)
    dev = x_ND.device.type
    mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_ND.dtype
    x_nD = x_ND.index_select(0, tok).to(mm)
    w1, w3, w2 = (w.to(mm).transpose(-2, -1) for w in (w1_EFD, w3_EFD, w2_EDF))
    h_nF = F.silu(torch._grouped_mm(x_nD, w1, offs=offs)) * torch._grouped_mm(x_nD, w3, offs=offs)
    y_nD = torch._grouped_mm(h_nF, w2, offs=offs) * gate_NK.flatten()[order, None].to(mm)
    return torch.zeros_like(x_ND).index_add_(0, tok, y_nD.to(x_ND.dtype))


def experts_dense(x_ND, idx_NK, gate_NK, w1_EFD, w3_EFD, w2_EDF):
    """Every expert on every token, weighted by the gates (0 for an expert not chosen): E / top_k times the routed
    FLOPs, but the fewest operations, so the fastest path for a handful of tokens (decoding)."""
    h_ENF = F.silu(torch.einsum("nd,efd->enf", x_ND, w1_EFD)) * torch.einsum("nd,efd->enf", x_ND, w3_EFD)
    gate_NE = torch.zeros(x_ND.shape[0], w1_EFD.shape[0], dtype=gate_NK.dtype, device=x_ND.device)
    gate_NE = gate_NE.scatter(1, idx_NK, gate_NK)
    return torch.einsum("enf,edf,ne->nd", h_ENF, w2_EDF, gate_NE)


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, D, Fh = cfg.n_experts, cfg.n_embd, cfg.ffn_hidden
        self.cfg = cfg
        self.router = nn.Linear(D, E, bias=False)
        self.w1_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w2_EDF = nn.Parameter(torch.empty(E, D, Fh))
        # DeepSeek-V3 aux-loss-free balancing: a bias that only affects which experts are selected,
        # updated outside forward by Model.update_expert_bias() from all-reduced counts.
        self.register_buffer("expert_bias", torch.zeros(E))
        self.shared = SwiGLU(D, Fh * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def route(self, x_ND):
        """-> (router logits, probabilities (N, E), chosen experts, gates (N, K)), all in float32 or wider.
        Autocast is off here: top-k on bf16 logits flips choices between nearly tied experts."""
        cfg = self.cfg
        acc = torch.promote_types(x_ND.dtype, torch.float32)
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = x_ND.to(acc) @ self.router.weight.to(acc).t()
        if self.training and cfg.router_noise > 0:
            logits_NE = logits_NE + cfg.router_noise * torch.randn_like(logits_NE)
        probs_NE = logits_NE.softmax(-1)
        idx_NK = torch.topk(probs_NE + self.expert_bias, cfg.top_k, dim=-1).indices
        gate_NK = probs_NE.gather(1, idx_NK)
        if cfg.top_k > 1:  # renormalize over the chosen experts; a single gate keeps its raw probability
            gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True)  # (Switch), else it is 1.0 and the router learns nothing
        return logits_NE, probs_NE, idx_NK, gate_NK

    def forward(self, x_BTD, valid_BT):
        cfg, (B, T, D) = self.cfg, x_BTD.shape
        x_ND, valid_N = x_BTD.reshape(-1, D), valid_BT.reshape(-1)
        logits_NE, probs_NE, idx_NK, gate_NK = self.route(x_ND)
        grouped = cfg.moe_backend == "grouped" or (cfg.moe_backend == "auto" and x_ND.is_cuda
                                                   and torch.is_autocast_enabled("cuda") and cfg.ffn_hidden % 16 == 0)
        if cfg.moe_backend == "auto" and len(x_ND) <= DENSE_MOE_TOKENS:  # decoding: a few tokens at a time
            dispatch = experts_dense
        else:
            dispatch = experts_grouped if grouped else experts_loop
        y_ND = dispatch(x_ND, idx_NK, gate_NK.to(x_ND.dtype), self.w1_EFD, self.w3_EFD, self.w2_EDF)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        # Router statistics over real tokens only: padding must not pull the balance (Megatron-Core,
        # HF transformers both had this bug). f_E: fraction of assignments, p_E: mean probability.
        # (scatter_add, not one_hot: one_hot reads its input's range back, a host sync on a GPU)
        w_N = valid_N.to(probs_NE.dtype)
        n_real = w_N.sum().clamp(min=1)
        counts_E = w_N.new_zeros(cfg.n_experts).scatter_add_(0, idx_NK.flatten(),
                                                             w_N[:, None].expand_as(idx_NK).flatten())
        f_E = counts_E / (n_real * cfg.top_k)
        p_E = (probs_NE * w_N[:, None]).sum(0) / n_real
        balance = cfg.n_experts * (f_E * p_E).sum()  # Switch Transformer: 1.0 when perfectly balanced
        z = (torch.logsumexp(logits_NE, -1).square() * w_N).sum() / n_real
        return y_ND.view(B, T, D), cfg.aux_loss_coef * balance + cfg.z_loss_coef * z, counts_E


class Block(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.n_embd, eps=1e-6), nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.attn = Attention(cfg)
        self.ffn = MoE(cfg) if moe else SwiGLU(cfg.n_embd, 4 * cfg.n_embd * 2 // 3)
        self.drop = nn.Dropout(cfg.dropout)
        self.n_experts = cfg.n_experts

    def forward(self, x, cos, sin, mask, valid, cache=None):
        """-> (x, aux loss, expert counts (1, E)); a dense block has no router: aux 0, counts of shape (0, E)."""
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, cache))
        if isinstance(self.ffn, MoE):
            y, aux, counts = self.ffn(self.norm2(x), valid)
            return x + self.drop(y), aux, counts[None]
        return x + self.drop(self.ffn(self.norm2(x))), x.new_zeros(()), x.new_zeros(0, self.n_experts)


class Depth(nn.Module):
    """One depth of sequential multi-token prediction (DeepSeek-V3): the previous head's state at t (before the
    final norm) and the embedding of the token this depth reads at t, each RMS-normed, concatenated and projected
    from 2D to D, then one dense block. -> the state at t before the final norm (B, T, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_h, self.norm_e = nn.RMSNorm(cfg.n_embd, eps=1e-6), nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.merge = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.block = Block(cfg, moe=False)

    def forward(self, h_BTD, e_BTD, cos, sin, mask, valid, cache=None):
        # a zero embedding (no token to read) stays zero through RMSNorm: x * rsqrt(mean(x^2) + eps) = 0
        x_BTD = self.merge(torch.cat([self.norm_h(h_BTD), self.norm_e(e_BTD)], dim=-1))
        return self.block(x_BTD, cos, sin, mask, valid, cache)[0]


# ----------------------------------------------------------------------------- the model

class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # the initial weights come from a generator seeded by one draw here, before any module is built: each
        # parameter's values then do not depend on what else the model holds, so a model with more heads starts
        # with the same trunk and head 1 as a 1-head model (the study's equal-step comparisons are exact)
        init_seed = int(torch.randint(2**62, ()))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layer))
        # one module per head (shared logits: head 1's block alone); sequential: head 1's block, then the depths
        self.heads = nn.ModuleList(Block(cfg, moe=False) if i == 0 or cfg.mtp_style != "sequential" else Depth(cfg)
                                   for i in range(cfg.n_head_modules))
        self.norm_f = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.drop = nn.Dropout(cfg.dropout)
        hd = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)  # (seq_len, hd/2)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.init_weights(torch.Generator().manual_seed(init_seed))

    @torch.no_grad()
    def init_weights(self, gen=None):
        """Every initialization in one place. GPT-2 / nanoGPT: N(0, 0.02) for matrices and the embedding;
        the projections that write into the residual stream are scaled by 1/sqrt(2 * blocks), so the
        residual stream's variance does not grow with depth. Norms start at 1, expert biases at 0."""
        std, blocks = 0.02, self.cfg.n_layer + 1
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("proj.weight", "w2.weight", "w2_EDF")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * blocks), generator=gen)
            else:
                nn.init.normal_(p, 0.0, std, generator=gen)
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_bias.zero_()

    def drafter_parameters(self):
        """The drafting heads' own parameters (heads 2..n's modules; none with shared logits)."""
        return [p for head in self.heads[1:] for p in head.parameters()]

    def param_counts(self):
        """-> (total, active per token). Active counts top_k of n_experts routed experts."""
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for m in self.modules() if isinstance(m, MoE) for p in (m.w1_EFD, m.w3_EFD, m.w2_EDF))
        return total, total - routed + routed * self.cfg.top_k // self.cfg.n_experts

    def head_modules_run(self, heads):
        """Indices into self.heads of the modules a forward with these heads runs (all of them get a gradient
        through the heads asked): parallel, the heads themselves; sequential, depth i needs depths 1..i-1 and
        head 1 under it; shared logits, head 1's block whatever the heads."""
        heads = list(heads)
        if not heads:
            return set()
        if self.cfg.mtp_style == "shared":
            return {0}
        return set(range(max(heads) + 1)) if self.cfg.mtp_style == "sequential" else set(heads)

    def flops_per_token(self, seq_len=None, n_heads=None, heads=None, draft_rate=1.0):
        """Training FLOPs per token computing heads 1..n_heads (default all), or the heads given as indices: 6 *
        active matmul parameters (the head modules that run, head_modules_run(); the unembedding once per head
        scored, once in all for shared logits, whose extra targets are gathers; the embedding lookups free) +
        attention scores 6 * 2 * blocks * n_embd * T (nanoGPT/PaLM convention, counted as if every key were
        attended, blocks = n_layer + the head modules that run). Heads 2..n score the unembedding at a fraction
        draft_rate of the positions (train.py's mtp_sample), and with mtp_detach without its weight gradient (4
        of the 6)."""
        cfg, T = self.cfg, seq_len or self.cfg.seq_len
        heads = list(range(cfg.n_predict if n_heads is None else n_heads) if heads is None else heads)
        _, active = self.param_counts()
        lm = cfg.vocab_size * cfg.n_embd
        per_module = [sum(p.numel() for p in m.parameters()) for m in self.heads]
        run = self.head_modules_run(heads)
        trunk = active - sum(per_module) - lm * (1 if cfg.tie_embeddings else 2)
        if cfg.mtp_style == "shared":
            unembeddings = min(len(heads), 1)
        else:
            drafting = len([h for h in heads if h > 0])
            unembeddings = (0 in heads) + drafting * draft_rate * (4 / 6 if cfg.mtp_detach else 1)
        matmul = trunk + sum(per_module[i] for i in run) + lm * unembeddings
        return 6 * matmul + 12 * (cfg.n_layer + len(run)) * cfg.n_embd * T

    @torch.no_grad()
    def update_expert_bias(self, counts, rate):
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower overloaded.
        counts: (n_moe_layers, E), all-reduced over ranks so every rank applies the same update."""
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        for m, counts_E in zip(moes, counts):
            m.expert_bias += rate * torch.sign(counts_E.mean() - counts_E.float())

    def compile_blocks(self, **kwargs):
        """Compile each block in place (nn.Module.compile): parameter names stay the same, and forward()'s
        mask building stays eager outside the graphs."""
        torch._dynamo.config.capture_dynamic_output_shape_ops = True  # nonzero() in the MoE loop
        for block in list(self.blocks) + list(self.heads):
            block.compile(**kwargs)

    def check_inputs(self, input_ids, position_ids=None):
        """Token and position ids in range, with the values in the message. It reads values back, so
        forward() calls it only for CPU tensors (free there); on a GPU a bad id would be a device-side
        assert, and train.py / sample.py guarantee ids at the source (data.py checks them; the model's
        vocabulary covers GPT-2's)."""
        lo, hi = input_ids.min().item(), input_ids.max().item()
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids in [{lo}, {hi}], expected [0, {self.cfg.vocab_size})")
        if position_ids is not None and position_ids.numel():
            lo, hi = position_ids.min().item(), position_ids.max().item()
            if lo < 0 or hi >= self.cfg.seq_len:
                raise ValueError(f"position_ids in [{lo}, {hi}], expected [0, {self.cfg.seq_len})")

    def forward(self, input_ids, attention_mask=None, doc_ids=None, position_ids=None, heads=None, kv_cache=None):
        """input_ids (B, T) -> ModelOutput. doc_ids / position_ids as in data.py's batch; with attention_mask
        only, each row is one document followed by padding; with neither, each row is one plain sequence.
        heads: indices of the heads to compute (default all). kv_cache: decode at positions kv_cache.pos.. (the
        sequential style computes head 1 there; its depths draft with decode_depth())."""
        B, T = input_ids.shape
        for name, t in (("attention_mask", attention_mask), ("doc_ids", doc_ids), ("position_ids", position_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(input_ids.shape)} like input_ids")
        start = kv_cache.pos if kv_cache is not None else 0
        room = min(self.cfg.seq_len, kv_cache.trunk.shape[1]) if kv_cache is not None else self.cfg.seq_len
        if start + T > room:
            where = "the KV cache" if room < self.cfg.seq_len else "seq_len"
            raise ValueError(f"sequence length {start + T} > {where} {room}")
        if input_ids.device.type == "cpu":
            self.check_inputs(input_ids, position_ids)
        heads = self.check_heads(heads, kv_cache)
        if kv_cache is not None:
            return self._decode(input_ids, kv_cache, heads)
        if doc_ids is None and attention_mask is not None:  # a plain padded batch: one document per row
            doc_ids = torch.where(attention_mask.bool(), 0, -1).to(torch.int32)
        if doc_ids is None:
            mask, valid = None, torch.ones_like(input_ids, dtype=torch.bool)  # plain causal: the fastest path
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            use_flex = self.cfg.attn_backend == "flex" or (self.cfg.attn_backend == "auto" and input_ids.is_cuda)
            mask, valid = (flex_block_mask if use_flex else doc_mask)(doc_ids), doc_ids >= 0
            position_ids = positions_from_doc_ids(doc_ids) if position_ids is None else position_ids
        rope = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]  # (B, 1, T, hd/2)
        x, aux, counts = self._trunk(self.drop(self.tok_emb(input_ids)), rope, mask, valid)
        run = sorted(self.head_modules_run(heads))  # states before the final norm of the head modules run
        # mtp_detach: what the drafting heads read of the model below them (the trunk's output, head 1's state, the
        # embedding, the final norm; loss.py detaches the unembedding) carries no gradient back: the trunk and
        # head 1 get exactly the gradient of a 1-head model (test_mask.py), the drafters learn on top of it
        cut = (lambda t: t.detach()) if self.cfg.mtp_detach else (lambda t: t)
        if self.cfg.mtp_style == "sequential":
            # depth i at t reads token t + i where it lies in t's document, else a zero embedding: never a token
            # of another document, of padding or past the row
            states = {0: self.heads[0](x, *rope, mask, valid)[0]}
            docs = torch.zeros_like(input_ids, dtype=torch.int32) if doc_ids is None else doc_ids
            read_KBT = tokens_ahead(input_ids, docs, run[-1])
            for i in run[1:]:
                states[i] = self.heads[i](states[i - 1] if i > 1 else cut(states[0]),
                                          cut(self.embed_or_zero(read_KBT[i - 1])), *rope, mask, valid)
        else:
            states = {i: self.heads[i](x if i == 0 else cut(x), *rope, mask, valid)[0] for i in run}
        shown = [0] if self.cfg.mtp_style == "shared" else heads  # shared logits: one state scored by every head
        weight = self.norm_f.weight
        normed = [F.rms_norm(states[h], weight.shape, weight if h == 0 else cut(weight), self.norm_f.eps)
                  for h in shown]
        return ModelOutput(hidden=torch.stack(normed), aux_loss=aux, expert_counts=counts)

    def check_heads(self, heads, kv_cache=None):
        """heads -> a list of head indices, checked: a ValueError names the bad ones."""
        n = self.cfg.n_predict
        heads = list(range(n)) if heads is None else [int(h) for h in heads]
        if kv_cache is not None and self.cfg.mtp_style == "sequential":
            if heads != list(range(n)) and heads != [0]:
                raise ValueError(f"heads={heads}: a sequential model computes head 1 (index 0) in a forward with a KV "
                                 "cache; its depths read tokens not fed yet and draft with decode_depth()")
            heads = [0]
        if not heads or any(not 0 <= h < n for h in heads) or len(set(heads)) < len(heads):
            raise ValueError(f"heads={heads}, expected distinct head indices in [0, n_predict={n})")
        return heads

    def embed_or_zero(self, ids_BT):
        """Token embeddings, zero where ids_BT is negative (no token to read there)."""
        ok_BT = ids_BT >= 0
        return torch.where(ok_BT[..., None], self.tok_emb(torch.where(ok_BT, ids_BT, 0)), 0.0)

    def _trunk(self, x, rope, mask, valid, cache=None):
        aux, counts = x.new_zeros(()), []
        for block in self.blocks:
            x, block_aux, block_counts = block(x, *rope, mask, valid, cache)
            aux, counts = aux + block_aux, counts + [block_counts]
        return x, aux, torch.cat(counts)

    def _span(self, first, end, device):
        """Decoding: queries at positions first..end-1 over keys 0..end-1 -> (rope cos, rope sin, causal mask)."""
        keys = torch.arange(end, device=device)
        causal = (keys[None, :] <= keys[first:, None])[None, None]  # (1, 1, Tq, end)
        return self.rope_cos[first:end][None, None], self.rope_sin[first:end][None, None], causal

    def _decode(self, ids, cache, heads):
        """Feed ids (B, T) at positions cache.pos..; a head block that fell behind first catches up on the
        trunk outputs it missed (one forward over them). One sequence per row, no padding."""
        B, T = ids.shape
        start, end = cache.pos, cache.pos + T
        cos, sin, causal = self._span(start, end, ids.device)
        valid = torch.ones(B, T, dtype=torch.bool, device=ids.device)
        x, aux, counts = self._trunk(self.tok_emb(ids), (cos, sin), causal, valid, (cache, start))
        cache.trunk[:, start:end] = x
        if cache.ids is not None:
            cache.ids[:, start:end] = ids
        span = lambda first: (cos, sin, causal) if first == start else self._span(first, end, ids.device)
        hidden, run = {}, sorted(self.head_modules_run(heads))  # sequential and shared: head 1's block only
        drafting = run[1:] if run[:1] == [0] else run
        if cache.drafters is not None and len(drafting) > 1 and drafting == list(range(1, len(drafting) + 1)):
            hidden = self._decode_drafters(cache, len(drafting), end, T, span)  # heads 2..d+1 at once
            run = [h for h in run if h not in hidden]
        for h in run:  # head 1 always on its own module: plain decoding's computation, so greedy output is the same
            first = cache.head_pos[h]  # <= start
            out = self.heads[h](cache.trunk[:, first:end], *span(first), valid.new_ones(B, end - first),
                                (cache, first))[0]
            if cache.states is not None:
                cache.states[h, :, first:end] = out
            hidden[h] = self.norm_f(out[:, -T:])
            cache.head_pos[h] = end
        cache.pos, cache.drafted = end, [0] * len(cache.drafted)
        shown = [0] if self.cfg.mtp_style == "shared" else heads
        return ModelOutput(hidden=torch.stack([hidden[h] for h in shown]), aux_loss=aux, expert_counts=counts)

    def _decode_drafters(self, cache, d, end, T, span):
        """Parallel style, decoding: drafting heads 2..d+1 (indices 1..d) as one batched block over the trunk's
        outputs from the first position any of them lacks to end - 1 (a head that holds some of them recomputes
        their keys and values, the same ones) -> {index: final-normed state at the last T positions (B, T, D)}.
        Each head's Block computes the same (test_sample.py holds the two equal), in about a third of the
        operations for 3 heads: at decoding sizes a block's time is the overhead of its ~40 operations."""
        W, blk, K_n, V_n = cache.drafters, self.heads[1], *cache.draft_kv
        first = min(cache.head_pos[1:d + 1])
        x_BSD = cache.trunk[:, first:end]
        (B, S, D), H, KV, hd = x_BSD.shape, blk.attn.H, blk.attn.KV, blk.attn.hd
        cos, sin, causal = span(first)
        Q = (H + 2 * KV) * hd
        qkv = F.rms_norm(x_BSD, (D,), eps=blk.norm1.eps) @ W["qkv"][:, :d * Q]  # every head's q, k, v: one matmul
        qk, v = qkv.view(B, S, d, Q).permute(2, 0, 1, 3).split([(H + KV) * hd, KV * hd], dim=-1)  # (d, B, S, .)
        q, k = rope(qk.reshape(d * B, S, H + KV, hd).transpose(1, 2), cos, sin).split([H, KV], dim=1)  # one rotation
        K_n[:d, :, :, first:end] = k.view(d, B, KV, S, hd)
        V_n[:d, :, :, first:end] = v.reshape(d, B, S, KV, hd).transpose(2, 3)
        keys, values = (c[:d, :, :, :end].reshape(d * B, KV, end, hd) for c in (K_n, V_n))  # views: (d, B) merge
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, enable_gqa=KV != H)
        x_nND = x_BSD.reshape(1, B * S, D) + torch.bmm(y.transpose(1, 2).reshape(d, B * S, D), W["proj"][:d])
        a, b = torch.bmm(F.rms_norm(x_nND, (D,), eps=blk.norm2.eps), W["w13"][:d]).chunk(2, dim=-1)
        x_nND = x_nND + torch.bmm(F.silu(a) * b, W["w2"][:d])
        out = self.norm_f(x_nND.view(d, B, S, D)[:, :, -T:])
        for i in range(1, d + 1):
            cache.head_pos[i] = end
        return {i: out[i - 1] for i in range(1, d + 1)}

    def decode_depth(self, i, next_ids, kv_cache, check_ids=True):
        """Sequential style, decoding: depth i (head i + 1) at the last fed position p = kv_cache.pos - 1, where it
        reads token p + i, not fed yet. next_ids (B, i): the tokens at p+1 .. p+i (the next token, then the drafts
        of depths 1..i-1); depth i - 1 must have run at p on the same tokens (for i = 1, head 1 at every fed
        position) -> head i+1's final-normed state at p, (B, D). Depth i runs every position from the first it
        does not hold to p (one forward) and keeps its keys and values with its own KV cache. check_ids=False skips
        reading the ids' range back (sample.py's drafts come from the model's own logits)."""
        cache, cfg = kv_cache, self.cfg
        if cfg.mtp_style != "sequential" or not 1 <= i < cfg.n_predict:
            raise ValueError(f"decode_depth({i}): depths 1..n_predict-1 = {cfg.n_predict - 1} of a sequential model, "
                             f"this one is mtp_style={cfg.mtp_style!r}")
        if tuple(next_ids.shape) != (cache.trunk.shape[0], i):
            raise ValueError(f"decode_depth({i}): next_ids has shape {tuple(next_ids.shape)}, "
                             f"expected {(cache.trunk.shape[0], i)}: the next token and {i - 1} drafts")
        p = cache.pos - 1
        if p < 0 or (cache.head_pos[0] if i == 1 else cache.drafted[i - 1]) != cache.pos:
            raise ValueError(f"decode_depth({i}): {'head 1' if i == 1 else f'depth {i - 1}'} has not run at the "
                             f"last fed position {p} since it was fed")
        if check_ids and next_ids.device.type == "cpu":
            self.check_inputs(next_ids)
        first = cache.head_pos[i]
        lo = first + i  # position s = first .. p reads token s + i: the fed ones from lo, then next_ids
        read_BS = torch.cat([cache.ids[:, lo:p + 1], next_ids[:, max(0, lo - p - 1):]], dim=1)
        if cache.depths is not None and not (self.training or torch.is_grad_enabled()):
            out = self._depth_fast(i, read_BS, cache, first, p + 1)
        else:  # the module (training mode, or a gradient asked): the reference _depth_fast is held equal to
            out = self.heads[i](cache.states[i - 1, :, first:p + 1], self.tok_emb(read_BS),
                                *self._span(first, p + 1, next_ids.device),
                                torch.ones_like(read_BS, dtype=torch.bool), (cache, first))
            cache.states[i, :, first:p + 1] = out
        cache.head_pos[i] = max(first, p + 1 - i)  # positions whose token is fed; the rest read next_ids
        cache.drafted[i] = cache.pos
        w = self.norm_f.weight
        return F.rms_norm(out[:, -1], w.shape, w, self.norm_f.eps)

    def _depth_fast(self, i, read_BS, cache, first, end):
        """Depth i's forward at positions first..end-1 (reading the tokens read_BS) on the cache's folded weights
        (fold_depth()) -> its states there before the final norm (B, S, D), also written to cache.states[i] (the
        last depth: at end - 1 alone, since no depth reads its states; its keys and values at every position).
        Depth.forward's computation, its rounding aside, in about 20 operations where the module runs some 60 (its
        mask and rope slices built per call, 8 module calls, rope()'s nine ops, F.rms_norm's eight): at decoding
        sizes (width 128, a few positions) a block's time is per-operation overhead, not FLOPs. Measured on a loaded
        2-core AMD EPYC, sample.py's 3 drafts over 5-7 positions each, after a pass over the unembedding: 2.5-2.6 ms
        for the three depths and their draft logits against 4.0-4.2 ms through the modules."""
        W, (C, S), blk = cache.depths[i - 1], cache.rope_CS, self.heads[i].block
        H, KV, hd = blk.attn.H, blk.attn.KV, blk.attn.hd
        h_BSD, kv_B2KLh = cache.states[i - 1, :, first:end], cache.depth_kv[i - 1]
        B, n, D = h_BSD.shape
        x = torch.stack([h_BSD, F.embedding(read_BS, self.tok_emb.weight)], dim=2)  # (B, n, 2, D): norm_h, norm_e
        x = unit_rms(x, W["eps_he"]).view(B * n, 2 * D) @ W["merge"]  # (B n, D)
        qkv = (unit_rms(x, W["eps1"]) @ W["qkv"]).view(B, n, H + 2 * KV, 2, hd // 2)
        qkv = torch.addcmul(qkv * C[first:end], qkv.flip(3), S[first:end])  # q, k rotated as rope() does, v kept
        qkv = qkv.to(x.dtype).view(B, n, H + 2 * KV, hd)
        kv_B2KLh[:, :, first:end] = qkv[:, :, H:].transpose(1, 2)  # this depth's keys and values, one copy
        q = qkv[:, :, :H].transpose(1, 2)
        if i == len(cache.depths) and n > 1:  # no depth reads the last one's states: its block at p alone
            x, q, n = x.view(B, n, D)[:, -1], q[:, :, -1:], 1
        mask = cache.causal[end - n:end, :end] if n > 1 else None  # one query: it sees every key so far
        y = F.scaled_dot_product_attention(q, kv_B2KLh[:, :KV, :end], kv_B2KLh[:, KV:, :end], attn_mask=mask,
                                           enable_gqa=KV != H)
        x = torch.addmm(x, y.transpose(1, 2).reshape(B * n, D), W["proj"])
        a, b = (unit_rms(x, W["eps2"]) @ W["w13"]).chunk(2, dim=-1)
        out = cache.states[i, :, end - n:end]
        if B == 1:  # the sum lands in the cache's states directly (one row per position there)
            torch.addmm(x, F.silu(a) * b, W["w2"], out=out[0])
        else:
            out.copy_(torch.addmm(x, F.silu(a) * b, W["w2"]).view(B, n, D))
        return out

    def logits(self, hidden, kv_cache=None):
        """(..., D) -> (..., vocab_size); with a decoding cache, (..., the cache's vocab) from its copy."""
        return kv_cache.unembed(hidden) if kv_cache is not None else hidden @ self.lm_head.weight.t()


def positions_from_doc_ids(doc_ids):
    """Position inside each segment: restarts at 0 wherever doc_ids changes; 0 for padding."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = t - torch.cummax(torch.where(start, t, 0), dim=1).values
    return torch.where(doc_ids >= 0, pos, 0)


def tokens_ahead(input_ids, doc_ids, n):
    """-> (n, B, T) int64: row i-1 holds token t + i where it lies in t's document (t + i < T, doc_ids[t] >= 0,
    doc_ids[t + i] == doc_ids[t]), else -1. What sequential depth i reads at t: exactly head i's target at t
    under loss.mtp_targets' rule (this file imports nothing of the project; test_mask.py holds the two equal)."""
    B, T = input_ids.shape
    out = torch.full((n, B, T), -1, dtype=torch.long, device=input_ids.device)
    for i in range(1, min(n, T - 1) + 1):
        ok = (doc_ids[:, i:] == doc_ids[:, :-i]) & (doc_ids[:, :-i] >= 0)  # (B, T - i)
        out[i - 1, :, :-i] = torch.where(ok, input_ids[:, i:], -1)
    return out
