"""model.py: a decoder-only Mixture-of-Experts transformer with document-causal attention and
multi-token-prediction (MTP) heads.

Layout (Gloeckle et al. 2024, "Better & Faster LLMs via Multi-token Prediction"):

    ids -> embedding -> n_layer trunk blocks -> h
    head k (k = 1..n_predict) = one dense transformer block on h -> shared final norm -> hidden[k-1]
    logits of head k = hidden[k-1] @ lm_head.weight.T, predicting token t + k

forward() returns the per-head hidden states, not logits: loss.py computes the cross-entropy chunk by
chunk so the (n_predict, B, T, vocab) logits never exist at once.

Attention: query (b, t) sees key (b, s) iff s <= t and doc_ids[b, s] == doc_ids[b, t]. Padding has doc
id -1, so it sees only padding (itself included): no empty row, no NaN. Three backends compute it:
SDPA with a dense boolean mask (the reference, and the CPU training path), FlexAttention with a
BlockMask (CUDA), and SDPA is_causal when every row is one document without padding.

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


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    seq_len: int = 1024  # longest row; RoPE table size
    n_layer: int = 4  # trunk blocks (the n_predict head blocks come on top)
    n_head: int = 4
    n_kv_head: int = 0  # grouped-query attention; 0 means n_head
    n_embd: int = 256
    n_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 1  # always-on experts (DeepSeekMoE); 0 for none
    expert_hidden: int = 0  # SwiGLU hidden size of one expert; 0 -> 4 * n_embd / (top_k + n_shared_experts), rounded up to 16
    n_dense_layers: int = 0  # leading trunk blocks with a dense FFN instead of MoE (DeepSeek-V3 uses 3)
    n_predict: int = 4  # MTP heads; head k predicts token t + k
    rope_base: float = 10000.0
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    dropout: float = 0.0  # residual dropout; 0 keeps a training forward deterministic
    router_noise: float = 0.0  # std of Gaussian noise on router logits in training (0 = none)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (0 with bias balancing)
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    attn_backend: str = "auto"  # "sdpa" (dense mask), "flex" (FlexAttention BlockMask), "auto": flex on CUDA
    moe_backend: str = "auto"  # "loop", "grouped" (torch._grouped_mm), or "auto": grouped on CUDA in bf16

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")
        for f in fields(self):
            if f.type in ("int", int) and f.name not in ("n_kv_head", "expert_hidden", "n_dense_layers",
                                                        "n_shared_experts") and getattr(self, f.name) < 1:
                bad(f"{f.name}={getattr(self, f.name)}, expected >= 1")
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

    @property
    def ffn_hidden(self):
        # a multiple of 16 keeps grouped-matmul strides aligned (torch._grouped_mm needs 16-byte strides)
        return self.expert_hidden or -(-4 * self.n_embd // (self.top_k + self.n_shared_experts) // 16) * 16


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (n_predict, B, T, n_embd) final-normed states of each head
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


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.H, self.KV, self.hd = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (self.H + 2 * self.KV) * self.hd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x_BTD, cos, sin, mask, kv_cache=None):
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], dim=-1)
        q = rope(q.view(B, T, self.H, self.hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = rope(k.view(B, T, self.KV, self.hd).transpose(1, 2), cos, sin)  # (B, KV, T, hd)
        v = v.view(B, T, self.KV, self.hd).transpose(1, 2)
        if kv_cache is not None:  # sampling: append this step's keys and values, attend over all
            k, v = kv_cache.update(self, k, v)
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
    """Grouped matmul over tokens sorted by expert (torch._grouped_mm with group end offsets)."""
    E, K = w1_EFD.shape[0], idx_NK.shape[1]
    order = torch.argsort(idx_NK.flatten(), stable=True)  # assignment slots sorted by expert
    tok = order // K
    offs = torch.cumsum(torch.bincount(idx_NK.flatten(), minlength=E), 0).to(torch.int32)
    dt = torch.get_autocast_dtype("cuda") if x_ND.is_cuda and torch.is_autocast_enabled("cuda") else x_ND.dtype
    x_nD = x_ND.index_select(0, tok).to(dt)
    w1, w3, w2 = (w.to(dt).transpose(-2, -1) for w in (w1_EFD, w3_EFD, w2_EDF))
    h_nF = F.silu(torch._grouped_mm(x_nD, w1, offs=offs)) * torch._grouped_mm(x_nD, w3, offs=offs)
    y_nD = torch._grouped_mm(h_nF, w2, offs=offs) * gate_NK.flatten()[order, None].to(dt)
    return torch.zeros_like(x_ND).index_add_(0, tok, y_nD.to(x_ND.dtype))


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

    def forward(self, x_BTD, valid_BT):
        cfg, (B, T, D) = self.cfg, x_BTD.shape
        x_ND, valid_N = x_BTD.reshape(-1, D), valid_BT.reshape(-1)
        acc = torch.promote_types(x_ND.dtype, torch.float32)  # routing in float32 at least
        logits_NE = x_ND.to(acc) @ self.router.weight.to(acc).t()
        if self.training and cfg.router_noise > 0:
            logits_NE = logits_NE + cfg.router_noise * torch.randn_like(logits_NE)
        probs_NE = logits_NE.softmax(-1)
        idx_NK = torch.topk(probs_NE + self.expert_bias, cfg.top_k, dim=-1).indices
        gate_NK = probs_NE.gather(1, idx_NK)
        gate_NK = (gate_NK / gate_NK.sum(-1, keepdim=True)).to(x_ND.dtype)
        grouped = cfg.moe_backend == "grouped" or (cfg.moe_backend == "auto" and x_ND.is_cuda
                                                   and torch.is_autocast_enabled("cuda") and cfg.ffn_hidden % 16 == 0)
        dispatch = experts_grouped if grouped else experts_loop
        y_ND = dispatch(x_ND, idx_NK, gate_NK, self.w1_EFD, self.w3_EFD, self.w2_EDF)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        # Router statistics over real tokens only: padding must not pull the balance (Megatron-Core,
        # HF transformers both had this bug). f_E: fraction of assignments, p_E: mean probability.
        w_N = valid_N.to(acc)
        n_real = w_N.sum().clamp(min=1)
        counts_E = (F.one_hot(idx_NK, cfg.n_experts).sum(1).to(acc) * w_N[:, None]).sum(0)
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

    def forward(self, x, cos, sin, mask, valid, kv_cache=None):
        """-> (x, aux loss, expert counts or None)."""
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, kv_cache))
        if isinstance(self.ffn, MoE):
            y, aux, counts = self.ffn(self.norm2(x), valid)
            return x + self.drop(y), aux, counts
        return x + self.drop(self.ffn(self.norm2(x))), None, None


# ----------------------------------------------------------------------------- the model

class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layer))
        self.heads = nn.ModuleList(Block(cfg, moe=False) for _ in range(cfg.n_predict))
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
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every initialization in one place. GPT-2 / nanoGPT: N(0, 0.02) for matrices and the embedding;
        the projections that write into the residual stream are scaled by 1/sqrt(2 * blocks), so the
        residual stream's variance does not grow with depth. Norms start at 1, expert biases at 0."""
        std, blocks = 0.02, self.cfg.n_layer + 1
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("proj.weight", "w2.weight", "w2_EDF")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * blocks))
            else:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_bias.zero_()

    def param_counts(self):
        """-> (total, active per token). Active counts top_k of n_experts routed experts."""
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for m in self.modules() if isinstance(m, MoE) for p in (m.w1_EFD, m.w3_EFD, m.w2_EDF))
        return total, total - routed + routed * self.cfg.top_k // self.cfg.n_experts

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 * active matmul parameters (the unembedding once per head, the
        embedding lookup free) + attention scores 6 * 2 * blocks * n_embd * T (nanoGPT/PaLM convention,
        counted as if every key were attended)."""
        cfg, T = self.cfg, seq_len or self.cfg.seq_len
        _, active = self.param_counts()
        lm = cfg.vocab_size * cfg.n_embd
        matmul = active - lm * (1 if cfg.tie_embeddings else 2) + lm * cfg.n_predict
        return 6 * matmul + 12 * (cfg.n_layer + cfg.n_predict) * cfg.n_embd * T

    @torch.no_grad()
    def update_expert_bias(self, counts, rate):
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower overloaded.
        counts: (n_moe_layers, E), all-reduced over ranks so every rank applies the same update."""
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        for m, c in zip(moes, counts):
            m.expert_bias += rate * torch.sign(c.mean() - c.float())

    def compile_blocks(self, **kwargs):
        """Compile each block in place (nn.Module.compile): parameter names stay the same, and forward()'s
        data-dependent checks and mask building stay eager outside the graphs."""
        torch._dynamo.config.capture_dynamic_output_shape_ops = True  # nonzero() in the MoE loop
        for block in list(self.blocks) + list(self.heads):
            block.compile(**kwargs)

    def check_inputs(self, input_ids, attention_mask, doc_ids, position_ids):
        B, T = input_ids.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} > seq_len {self.cfg.seq_len}")
        for name, t in (("attention_mask", attention_mask), ("doc_ids", doc_ids), ("position_ids", position_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(input_ids.shape)} like input_ids")
        lo, hi = input_ids.min().item(), input_ids.max().item()  # before any kernel: on CUDA a bad id is fatal
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids in [{lo}, {hi}], expected [0, {self.cfg.vocab_size})")
        if position_ids is not None and position_ids.numel():
            lo, hi = position_ids.min().item(), position_ids.max().item()
            if lo < 0 or hi >= self.cfg.seq_len:
                raise ValueError(f"position_ids in [{lo}, {hi}], expected [0, {self.cfg.seq_len})")

    def forward(self, input_ids, attention_mask=None, doc_ids=None, position_ids=None):
        self.check_inputs(input_ids, attention_mask, doc_ids, position_ids)
        if doc_ids is None:  # a plain padded batch: one document per row
            doc_ids = torch.zeros_like(input_ids, dtype=torch.int32)
            if attention_mask is not None:
                doc_ids = torch.where(attention_mask.bool(), doc_ids, -1)
        if position_ids is None:
            position_ids = positions_from_doc_ids(doc_ids)
        valid = doc_ids >= 0
        if bool((doc_ids == 0).all()):
            mask = None  # every row is one document without padding: plain causal, the fastest path
        elif self.cfg.attn_backend == "flex" or (self.cfg.attn_backend == "auto" and input_ids.is_cuda):
            mask = flex_block_mask(doc_ids)
        else:
            mask = doc_mask(doc_ids)
        cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]  # (B, 1, T, hd/2)
        return self.blocks_and_heads(self.drop(self.tok_emb(input_ids)), cos, sin, mask, valid)

    def blocks_and_heads(self, x, cos, sin, mask, valid, kv_cache=None):
        """Embeddings x (B, T, D) through the trunk and the heads -> ModelOutput (kv_cache: see sample.py)."""
        aux, counts = x.new_zeros(()), []
        for block in self.blocks:
            x, a, c = block(x, cos, sin, mask, valid, kv_cache)
            if a is not None:
                aux, counts = aux + a, counts + [c]
        hidden = torch.stack([self.norm_f(head(x, cos, sin, mask, valid, kv_cache)[0]) for head in self.heads])
        counts = torch.stack(counts) if counts else x.new_zeros((0, self.cfg.n_experts))
        return ModelOutput(hidden=hidden, aux_loss=aux, expert_counts=counts)

    def logits(self, hidden):
        return hidden @ self.lm_head.weight.t()


def positions_from_doc_ids(doc_ids):
    """Position inside each segment: restarts at 0 wherever doc_ids changes; 0 for padding."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    pos = t - torch.cummax(torch.where(start, t, 0), dim=1).values
    return torch.where(doc_ids >= 0, pos, 0)
