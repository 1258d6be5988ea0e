"""loss.py: which targets each multi-token-prediction head may learn from, and the loss as sums and counts.

Head k (k = 1..n_predict) predicts token t + k. Its target at (b, t) is input_ids[b, t + k] when
t + k < T and doc_ids[b, t] >= 0 and doc_ids[b, t + k] == doc_ids[b, t]; otherwise -100 (ignored).
Validity comes from position and document, never from comparing ids with a pad id: EOT is a real token
(the EOT that ends a document is a target; the one that begins the next document is not).

The loss is returned as per-head sums and counts; train.py divides once by the global count of the
whole step (all micro-batches, all ranks). mtp_loss() never materializes the (n_predict, B, T, vocab)
logits: it walks over chunks of rows and computes the gradients during the forward (the design of
Liger-Kernel's fused linear cross-entropy), keeping grad_hidden and one grad_weight per head; or a single
grad_weight when the caller says beforehand by how much it will weigh each head (`grad_scale`), as the
training step can, since its coefficients w_k * world_size / N_k are known before the forward.

Shared logits (modded-nanogpt's multi-token prediction without extra parameters): the model gives one state,
and head k scores the same logits against token t + k. The chunked loss then computes one matmul and one
softmax per row for all K heads and gathers K target logits; with grad_scale, a row's logit gradient is
sum_k c_k (softmax - onehot_k) over the heads k with a target there, so a step costs one unembedding whatever K.

Precision: the chunk matmuls run in the autocast dtype when autocast is on (bf16 on CUDA: they are half
the training FLOPs of the GPT-2-sized preset), else in the inputs' dtype; their outputs are upcast (a bf16
matmul's logits are rounded to bf16 first), and the softmax, the sums and the weight-gradient accumulation
are float32 (float64 for float64 inputs).

ModelWithLoss puts the model and its loss in one forward, the one way train.py, bench.py and the tests
get (sums, counts) from a batch; DDP and FSDP wrap it whole (see its docstring).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100
# Logits held at once, chunk_rows * vocab: 32 MiB of float32 fits a CPU's caches better than 64; on a GPU
# small chunks only add launches (the GPT-2-sized preset would run ~400 tiny matmul triplets per micro-batch
# at 2**23), so 512 MiB there.
CHUNK_ELEMS = {"cpu": 2**23, "cuda": 2**27}


def mtp_targets(input_ids, doc_ids, n_predict):
    """-> (n_predict, B, T) int64 targets, IGNORE where head k has nothing valid to predict.
    The one place that decides target validity."""
    B, T = input_ids.shape
    out = torch.full((n_predict, B, T), IGNORE, dtype=torch.long, device=input_ids.device)
    for k in range(1, min(n_predict, T - 1) + 1):
        ok = (doc_ids[:, k:] == doc_ids[:, :-k]) & (doc_ids[:, :-k] >= 0)  # (B, T - k)
        out[k - 1, :, :-k] = torch.where(ok, input_ids[:, k:], IGNORE)
    return out


def sampled_columns(batch, rate):
    """-> (B, m) int64, m = round(rate * T) (at least 1): the columns of each row where the drafting heads (2..n)
    learn, ascending. Each row's m columns of smallest hash of what the row holds there (column, token, position
    in its document): the same whatever the micro-batching, the world size or a resume, since a row of the data
    stream is the same row there; and a fixed count, so gathering them needs no host sync."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    B, T = ids.shape
    col = torch.arange(T, device=ids.device).expand(B, T)
    mask = 0xFFFFFFFF  # 32-bit arithmetic in int64 (no overflow), the same on every device
    x = ((col * 73856093) ^ (ids * 19349663) ^ (pos.long() * 83492791)) & mask
    for _ in range(2):  # a 32-bit integer mix (degski's): every input bit moves every output bit
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = ((x >> 16) ^ x) * T + col  # ties broken by column: a strict order
    m = min(T, max(1, round(rate * T)))
    return torch.topk(x, m, dim=1, largest=False).indices.sort(dim=1).values


def train_targets(batch, n_predict, draft_rate=1.0):
    """mtp_targets for training: with draft_rate < 1, heads 2..n keep their targets at sampled_positions() only
    (head 1 keeps all of its own). The target mask the step counts (count_targets) and learns from."""
    tgt = mtp_targets(batch["input_ids"], batch["doc_ids"], n_predict)
    if draft_rate < 1 and n_predict > 1:
        cols = sampled_columns(batch, draft_rate)
        keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool).scatter_(1, cols, True)
        tgt[1:] = torch.where(keep, tgt[1:], IGNORE)
    return tgt


def count_targets(batch, n_predict, draft_rate=1.0):
    """-> (n_predict,) int64 valid training targets per head; needs no model, so counts can be all-reduced early."""
    return (train_targets(batch, n_predict, draft_rate) != IGNORE).sum((1, 2))


def _matmul_dtype(t):
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _ChunkedLinearCE(torch.autograd.Function):
    """sums[k] = sum over valid rows of cross_entropy(h[k] @ w.T, targets[k]); gradients made in forward.
    h may hold one state for all K targets (shared logits): h[0] is then scored against every targets[k] with one
    matmul and one softmax per chunk whatever K, and, given scale_K, one gradient per row: sum over the targets k
    valid there of scale_k * (softmax - onehot_k). With need_grad False (evaluation) it also returns each state's
    argmax per row (the head's greedy token), (S, N) for S states."""

    @staticmethod
    def forward(ctx, h_SND, w_VD, tgt_KN, chunk_rows, need_grad, scale_K):
        S, N, D = h_SND.shape
        K = tgt_KN.shape[0]
        shared = S == 1 and K > 1
        combined = shared and scale_K is not None  # one gradient row for all K targets: grad_h has one state
        acc = torch.promote_types(h_SND.dtype, torch.float32)  # softmax, sums, accumulation
        mm = _matmul_dtype(h_SND)  # the matmuls: autocast's dtype, decided here, not by autocast's op lists
        need_w = need_grad and w_VD.requires_grad
        w = w_VD.to(mm)
        sums_K = torch.zeros(K, dtype=acc, device=h_SND.device)
        preds_SN = None if need_grad else torch.empty(S, N, dtype=torch.long, device=h_SND.device)
        # the gradient of each (state, target) pair's sum: K of them, or one when the targets share their state
        # and their weights are known
        grad_h = h_SND.new_empty(1 if combined else K, N, D) if need_grad else None
        # one weight gradient per head, or their sum weighted by scale_K (then the backward checks that the
        # incoming gradient is proportional to scale_K)
        n_w = 0 if not need_w else (1 if scale_K is not None else K)
        grad_w = torch.zeros(n_w, *w_VD.shape, dtype=acc, device=w_VD.device)
        with torch.autocast(h_SND.device.type, enabled=False):
            for s in range(S):
                ks = range(K) if shared else range(s, s + 1)  # the targets scored against state s
                for r in range(0, N, chunk_rows):
                    h_CD, t_KC = h_SND[s, r:r + chunk_rows].to(mm), tgt_KN[ks.start:ks.stop, r:r + chunk_rows]
                    logits_CV = (h_CD @ w.t()).to(acc)
                    if preds_SN is not None:
                        preds_SN[s, r:r + chunk_rows] = logits_CV.argmax(-1)
                    valid_KC = t_KC != IGNORE
                    t_safe_CK = torch.where(valid_KC, t_KC, 0).t()
                    target_logit_KC = logits_CV.gather(1, t_safe_CK).t()
                    # one softmax, in place, with few passes over the (C, V) chunk: it is memory-bound
                    max_C = logits_CV.amax(dim=-1, keepdim=True)
                    probs_CV = logits_CV.sub_(max_C).exp_()
                    sum_C = probs_CV.sum(dim=-1, keepdim=True)
                    lse_C = (max_C + sum_C.log())[:, 0]
                    sums_K[ks.start:ks.stop] += ((lse_C - target_logit_KC) * valid_KC).sum(1)
                    if not need_grad:
                        continue
                    # d(CE)/d(logits) = softmax - onehot(target)
                    g_CV = probs_CV.div_(sum_C)
                    if combined:  # sum_k c_k valid_k (softmax - onehot_k): rows without a target are zeros
                        c_CK = (valid_KC.to(acc) * scale_K.to(acc)[:, None]).t()
                        g_CV.mul_(c_CK.sum(1, keepdim=True)).scatter_add_(1, t_safe_CK, -c_CK)
                        g_CV = g_CV.to(mm)
                        grad_h[0, r:r + chunk_rows] = (g_CV @ w).to(grad_h.dtype)
                        if need_w:
                            _accumulate(grad_w[0], g_CV, h_CD, acc, mm)
                        continue
                    for j, k in enumerate(ks):  # ignored rows are zeroed on the (C, D) side
                        g_k = g_CV if len(ks) == 1 else g_CV.clone()
                        g_k.scatter_add_(1, t_safe_CK[:, j:j + 1], torch.full_like(t_safe_CK[:, :1], -1, dtype=acc))
                        g_k = g_k.to(mm)
                        keep_C1 = valid_KC[j, :, None].to(acc)
                        grad_h[k, r:r + chunk_rows] = ((g_k @ w).to(acc) * keep_C1).to(grad_h.dtype)
                        if need_w:  # accumulate, the head's scale applied on the (C, D) side: no host sync
                            hk_CD = h_CD.to(acc) * (keep_C1 if scale_K is None else keep_C1 * scale_K[k].to(acc))
                            _accumulate(grad_w[0 if scale_K is not None else k], g_k, hk_CD, acc, mm)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, scale_K if scale_K is not None else grad_w.new_empty(0))
            ctx.w_dtype, ctx.shared, ctx.combined = w_VD.dtype, shared, combined
        else:
            ctx.mark_non_differentiable(preds_SN)
        return sums_K, preds_SN

    @staticmethod
    def backward(ctx, grad_sums_K, _):
        grad_h, grad_w, scale_K = ctx.saved_tensors
        g_K = grad_sums_K.to(grad_w.dtype)
        ratio = None
        if scale_K.numel() and (grad_w.shape[0] or ctx.combined):  # summed buffers: g must be c * scale
            s_K = scale_K.to(g_K.dtype)
            ratio = (g_K @ s_K) / (s_K @ s_K).clamp(min=torch.finfo(s_K.dtype).tiny)
            ok = ~((g_K - ratio * s_K).abs().max() > 1e-5 * g_K.abs().max())  # NaN passes: the step's guard takes it
            # checked on the device (no host sync): raises at once on a CPU, a device-side assert on a GPU
            torch._assert_async(ok, "mtp_loss: grad_scale was given, but the loss weighs the heads in another "
                                    "proportion (the gradient is not proportional to grad_scale)")
        if ctx.combined:
            dh = grad_h * ratio.to(grad_h.dtype)
        else:
            dh = grad_h * grad_sums_K.to(grad_h.dtype)[:, None, None]
            dh = dh.sum(0, keepdim=True) if ctx.shared else dh  # K targets of one state
        dw = None
        if grad_w.shape[0] and ratio is not None:
            dw = (ratio * grad_w[0]).to(ctx.w_dtype)
        elif grad_w.shape[0]:  # sum_k g_k * grad_w[k] as one (1, K) @ (K, V*D) product: no (K, V, D) temporary
            dw = (g_K[None] @ grad_w.flatten(1)).view(grad_w.shape[1:]).to(ctx.w_dtype)
        return dh, dw, None, None, None, None


def _accumulate(into_VD, g_CV, h_CD, acc, mm):
    """into_VD += g_CV.T @ h_CD, in acc precision (products in mm, the matmul dtype)."""
    if mm == acc:
        into_VD.addmm_(g_CV.t(), h_CD.to(acc))
    else:
        into_VD += (g_CV.t() @ h_CD.to(mm)).to(acc)


def _chunked(hidden, weight, targets, chunk_rows, need_grad, grad_scale):
    S, B, T, D = hidden.shape
    K = targets.shape[0]
    if targets.shape[1:] != (B, T) or S not in (K, 1):
        raise ValueError(f"targets shape {tuple(targets.shape)}, expected {(S, B, T)} to match hidden, or any number "
                         "of heads for a hidden of one state (shared logits)")
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMS.get(hidden.device.type, CHUNK_ELEMS["cuda"]) // weight.shape[0])
    tgt = targets.reshape(K, B * T)
    if grad_scale is not None:
        grad_scale = grad_scale.detach().to(hidden.device)
    sums, preds = _ChunkedLinearCE.apply(hidden.reshape(S, B * T, D), weight, tgt, chunk_rows, need_grad, grad_scale)
    return sums, (tgt != IGNORE).sum(1), None if preds is None else preds.view(S, B, T).expand(K, B, T)


def mtp_loss(hidden, weight, targets, chunk_rows=None, grad_scale=None):
    """hidden (n_predict, B, T, D), weight (V, D) the unembedding, targets (n_predict, B, T)
    -> (sums, counts), each (n_predict,): summed cross-entropy (float32) and number of valid targets.
    hidden of one state (1, B, T, D) with targets of n_predict heads: shared logits, that state scored against
    every head's targets (one matmul and one softmax per row).
    grad_scale (n_predict,), optional: the factors the caller will multiply the sums by before backward
    (any multiple works); then one weight-sized gradient buffer is kept instead of one per head (and for shared
    logits one hidden-sized gradient, one weight-gradient product per chunk)."""
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    sums, counts, _ = _chunked(hidden, weight, targets, chunk_rows, need_grad, grad_scale)
    return sums, counts


@torch.no_grad()
def mtp_eval(hidden, weight, targets, chunk_rows=None):
    """As mtp_loss, without gradients, also -> preds (n_predict, B, T): each head's greedy (argmax) token."""
    return _chunked(hidden, weight, targets, chunk_rows, False, None)


def mtp_loss_reference(hidden, weight, targets):
    """The plain way, for tests and benchmarks: materialize all logits, then F.cross_entropy."""
    hidden = hidden.expand(len(targets), *hidden.shape[1:])  # one state for every head: shared logits
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    sums = torch.stack([F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(),
                                        ignore_index=IGNORE, reduction="sum") for k in range(len(hidden))])
    return sums, (targets != IGNORE).sum((1, 2))


def head_agreement(preds, targets):
    """What self-speculative decoding would get, from one teacher-forced forward (evaluation). preds and
    targets (K, B, T) for heads 1..K -> sums and counts, each a float64 tensor:
      correct (K), valid (K):   head k's greedy token equals its target, over its valid targets (accuracy);
      accepted (K-1), judged (K-1): head k's draft at t equals head 1's greedy token at t+k-1, over positions t
          where t+k-1 is in t's document (= head k-1 has a valid target at t): the draft survives verification;
      run (1), positions (1):   tokens and forwards of greedy self-speculative decoding, visiting positions as it
          does: from each document's first position t, a forward yields 1 + the number of consecutive accepted
          drafts from head 2 on, and the next forward is at t + that many. The judge is head 1's greedy token under
          the true prefix (teacher forcing), where decoding has its own greedy prefix: an estimate, which
          `sample.py --bench` measures for real."""
    K, B, T = preds.shape
    valid = targets != IGNORE
    correct = ((preds == targets) & valid).sum((1, 2))
    accept = torch.zeros(K - 1, B, T, dtype=torch.bool, device=preds.device)
    for j in range(1, min(K, T)):  # head j+1 drafts token t+j+1; head 1 at t+j is its judge
        accept[j - 1, :, :T - j] = (preds[j, :, :T - j] == preds[0, :, j:]) & valid[j - 1, :, :T - j]
    run = accept.long().cumprod(0).sum(0)  # (B, T); zeros when K = 1 (no drafts)
    tokens = forwards = 0
    for run_T, ok_T in zip(run.tolist(), valid[0].tolist()):  # the positions decoding visits (evaluation only)
        t = 0
        while t < T:
            if not ok_T[t]:  # no head-1 target here: a document's last token, or padding
                t += 1
                continue
            tokens, forwards, t = tokens + 1 + run_T[t], forwards + 1, t + 1 + run_T[t]
    pieces = dict(correct=correct, valid=valid.sum((1, 2)), accepted=accept.sum((1, 2)),
                  judged=valid[:K - 1].sum((1, 2)), run=torch.tensor([tokens], device=preds.device),
                  positions=torch.tensor([forwards], device=preds.device))
    return {k: v.double() for k, v in pieces.items()}


def step_coefficients(global_counts, head_weights, world_size=1):
    """The factor each micro-batch multiplies its per-head sums by before backward: world_size * w_k / N_k,
    with N_k the global count of the whole step (DDP averages gradients, hence world_size); 0 where N_k = 0."""
    return torch.where(global_counts > 0, head_weights * world_size / global_counts.clamp(min=1), 0.0)


def objective(sums, counts, head_weights):
    """sum_k w_k * sums_k / counts_k over a whole step or evaluation; a head with no target adds 0."""
    return (step_coefficients(counts, head_weights) * sums).sum()


@dataclass
class LossOutput:
    sums: torch.Tensor  # (len(heads),) summed cross-entropy of each head run
    counts: torch.Tensor  # (len(heads),) its valid targets
    aux_loss: torch.Tensor  # scalar: the router losses of the micro-batch
    expert_counts: torch.Tensor  # (n_moe_layers, n_experts)
    preds: torch.Tensor = None  # (len(heads), B, T) greedy tokens: evaluation only (predict=True)


class ModelWithLoss(nn.Module):
    """The model and its loss in one forward: batch -> LossOutput. One module, so that DDP and FSDP wrap the
    loss too. Why it matters under FSDP2: the loss reads the unembedding (lm_head.weight) outside Model.forward;
    FSDP2 gathers a module's parameters in its pre-forward hook and frees them after, so outside Model.forward
    the loss would see a shard. With this module as FSDP's root unit, the root parameters (embedding, final norm,
    unembedding) are gathered for the whole of this forward, model and loss, and the loss's gradient for the
    unembedding (computed in its forward, returned by its backward) is reduce-scattered like any other; the
    single-buffer gradient path (grad_scale) is unchanged. Unsharding the weight by hand around the loss would
    work too, but it would be a second code path for one parameter."""

    def __init__(self, model, draft_rate=1.0):
        super().__init__()
        self.model, self.draft_rate = model, draft_rate  # draft_rate: see train_targets (training only)

    def forward(self, batch, heads=None, grad_scale=None, predict=False):
        """batch: data.py's dict; heads: indices of the heads to run (default all); grad_scale: see mtp_loss;
        predict: evaluation, without gradients, with each head's greedy tokens (every target, no sampling)."""
        heads = list(range(self.model.cfg.n_predict) if heads is None else heads)
        out = self.model(**batch, heads=heads)
        weight = self.model.lm_head.weight
        if predict:
            targets = mtp_targets(batch["input_ids"], batch["doc_ids"], max(heads) + 1)[heads]
            sums, counts, preds = mtp_eval(out.hidden, weight, targets)
            return LossOutput(sums, counts, out.aux_loss, out.expert_counts, preds)
        targets = train_targets(batch, max(heads) + 1, self.draft_rate)[heads]
        cfg = self.model.cfg
        drafting = [j for j, k in enumerate(heads) if k > 0]  # rows of hidden and targets of heads 2..n
        if cfg.mtp_style == "shared" or not drafting or not (cfg.mtp_detach or self.draft_rate < 1):
            sums, counts = mtp_loss(out.hidden, weight, targets, grad_scale=grad_scale)
            return LossOutput(sums, counts, out.aux_loss, out.expert_counts)
        # the drafting heads apart: their unembedding detached (mtp_detach), their rows only where they have a
        # target (draft_rate < 1: the unembedding's cost falls with the sampled fraction)
        first = [j for j, k in enumerate(heads) if k == 0]
        scale = (lambda js: None) if grad_scale is None else (lambda js: grad_scale[js])
        parts = [mtp_loss(out.hidden[first], weight, targets[first], grad_scale=scale(first))] if first else []
        h_SBTD, t_KBT = out.hidden[drafting], targets[drafting]
        if self.draft_rate < 1:  # the sampled columns only: (S, B, m, D); the other columns have no target here
            cols_Bm = sampled_columns(batch, self.draft_rate)
            S, (B, m), D = len(drafting), cols_Bm.shape, h_SBTD.shape[-1]
            h_SBTD = h_SBTD.gather(2, cols_Bm[None, :, :, None].expand(S, B, m, D))
            t_KBT = t_KBT.gather(2, cols_Bm[None].expand(S, B, m))
        parts.append(mtp_loss(h_SBTD, weight.detach() if cfg.mtp_detach else weight, t_KBT, grad_scale=scale(drafting)))
        sums, counts = (torch.cat(t) for t in zip(*parts))
        return LossOutput(sums, counts, out.aux_loss, out.expert_counts)
