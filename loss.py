"""loss.py: which targets each multi-token-prediction head may learn from, and the loss as sums and counts.

Head k (k = 1..n_predict) predicts token t + k. Its target at (b, t) is input_ids[b, t + k] when
t + k < T and doc_ids[b, t] >= 0 and doc_ids[b, t + k] == doc_ids[b, t]; otherwise -100 (ignored).
Validity comes from position and document, never from comparing ids with a pad id: EOT is a real token.

The loss is returned as per-head sums and counts; train.py divides once by the global count of the
whole step (all micro-batches, all ranks). mtp_loss() never materializes the (n_predict, B, T, vocab)
logits: it walks over chunks of rows and computes the gradients during the forward (the design of
Liger-Kernel's fused linear cross-entropy), keeping grad_hidden and one grad_weight per head; or a single
grad_weight when the caller says beforehand by how much it will weigh each head (`grad_scale`), as the
training step can, since its coefficients w_k * world_size / N_k are known before the forward.
"""
import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMS = 2**23  # logits held at once: chunk_rows * vocab (32 MiB in float32: fits caches better than 64)


def mtp_targets(input_ids, doc_ids, n_predict):
    """-> (n_predict, B, T) int64 targets, IGNORE where head k has nothing valid to predict.
    The one place that decides target validity."""
    B, T = input_ids.shape
    out = torch.full((n_predict, B, T), IGNORE, dtype=torch.long, device=input_ids.device)
    for k in range(1, min(n_predict, T - 1) + 1):
        ok = (doc_ids[:, k:] == doc_ids[:, :-k]) & (doc_ids[:, :-k] >= 0)  # (B, T - k)
        out[k - 1, :, :-k] = torch.where(ok, input_ids[:, k:], IGNORE)
    return out


def count_targets(batch, n_predict):
    """-> (n_predict,) int64 valid targets per head; needs no model, so counts can be all-reduced early."""
    return (mtp_targets(batch["input_ids"], batch["doc_ids"], n_predict) != IGNORE).sum((1, 2))


class _ChunkedLinearCE(torch.autograd.Function):
    """sums[k] = sum over valid rows of cross_entropy(h[k] @ w.T, targets[k]); gradients made in forward."""

    @staticmethod
    def forward(ctx, h_KND, w_VD, tgt_KN, chunk_rows, need_grad, scale_K):
        K, N, D = h_KND.shape
        dt = h_KND.dtype
        acc = torch.promote_types(dt, torch.float32)  # softmax and accumulation: at least float32
        need_w = need_grad and w_VD.requires_grad
        w = w_VD.to(dt)
        sums_K = torch.zeros(K, dtype=acc, device=h_KND.device)
        grad_h = torch.empty_like(h_KND)
        # one weight gradient per head, or their sum weighted by scale_K (then the backward checks that the
        # incoming gradient is proportional to scale_K)
        n_w = 0 if not need_w else (1 if scale_K is not None else K)
        scales = scale_K.tolist() if scale_K is not None and need_w else None
        grad_w = torch.zeros(n_w, *w_VD.shape, dtype=acc, device=w_VD.device)
        for k in range(K):
            for s in range(0, N, chunk_rows):
                h_CD, t_C = h_KND[k, s:s + chunk_rows], tgt_KN[k, s:s + chunk_rows]
                logits_CV = (h_CD @ w.t()).to(acc)
                valid_C = t_C != IGNORE
                t_safe = torch.where(valid_C, t_C, 0)[:, None]
                target_logit_C = logits_CV.gather(1, t_safe)[:, 0]
                # one softmax, in place, with few passes over the (C, V) chunk: it is memory-bound
                max_C = logits_CV.amax(dim=-1, keepdim=True)
                probs_CV = logits_CV.sub_(max_C).exp_()
                sum_C = probs_CV.sum(dim=-1, keepdim=True)
                lse_C = (max_C + sum_C.log())[:, 0]
                sums_K[k] += ((lse_C - target_logit_C) * valid_C).sum()
                if not need_grad:
                    continue
                # d(CE)/d(logits) = softmax - onehot(target); ignored rows are zeroed on the (C, D) side
                g_CV = probs_CV.div_(sum_C)
                g_CV.scatter_add_(1, t_safe, torch.full_like(t_safe, -1, dtype=g_CV.dtype))
                g_CV = g_CV.to(dt)
                keep_C1 = valid_C[:, None].to(dt)
                grad_h[k, s:s + chunk_rows] = (g_CV @ w) * keep_C1
                if need_w:  # accumulate in place, the head's scale applied in the accumulation precision
                    into, alpha = (grad_w[k], 1.0) if scale_K is None else (grad_w[0], scales[k])
                    if dt == acc:
                        into.addmm_(g_CV.t(), h_CD * keep_C1, alpha=alpha)
                    else:
                        into.add_((g_CV.t() @ (h_CD * keep_C1)).to(acc), alpha=alpha)
        ctx.save_for_backward(grad_h, grad_w, scale_K if scale_K is not None else grad_w.new_empty(0))
        ctx.w_dtype = w_VD.dtype
        return sums_K

    @staticmethod
    def backward(ctx, grad_sums_K):
        grad_h, grad_w, scale_K = ctx.saved_tensors
        g_K = grad_sums_K.to(grad_w.dtype)
        dh = grad_h * grad_sums_K.to(grad_h.dtype)[:, None, None]
        dw = None
        if grad_w.shape[0] and scale_K.numel():  # one buffer holding sum_k scale_k grad_w_k: g must be c * scale
            s_K = scale_K.to(g_K.dtype)
            c = (g_K @ s_K) / (s_K @ s_K).clamp(min=torch.finfo(s_K.dtype).tiny)
            if ((g_K - c * s_K).abs().max() > 1e-5 * g_K.abs().max()).item():
                raise ValueError(f"mtp_loss: grad_scale {scale_K.tolist()} given, but the loss weighs the heads "
                                 f"by {grad_sums_K.tolist()}, which is not proportional to it")
            dw = (c * grad_w[0]).to(ctx.w_dtype)
        elif grad_w.shape[0]:  # sum_k g_k * grad_w[k] as one (1, K) @ (K, V*D) product: no (K, V, D) temporary
            dw = (g_K[None] @ grad_w.flatten(1)).view(grad_w.shape[1:]).to(ctx.w_dtype)
        return dh, dw, None, None, None, None


def mtp_loss(hidden, weight, targets, chunk_rows=None, grad_scale=None):
    """hidden (n_predict, B, T, D), weight (V, D) the unembedding, targets (n_predict, B, T)
    -> (sums, counts), each (n_predict,): summed cross-entropy (float32) and number of valid targets.
    grad_scale (n_predict,), optional: the factors the caller will multiply the sums by before backward
    (any multiple works); then one weight-sized gradient buffer is kept instead of one per head."""
    K, B, T, D = hidden.shape
    if targets.shape != (K, B, T):
        raise ValueError(f"targets shape {tuple(targets.shape)}, expected {(K, B, T)} to match hidden")
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMS // weight.shape[0])
    tgt = targets.reshape(K, B * T)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad_scale is not None:
        grad_scale = grad_scale.detach().to(hidden.device)
    sums = _ChunkedLinearCE.apply(hidden.reshape(K, B * T, D), weight, tgt, chunk_rows, need_grad, grad_scale)
    return sums, (tgt != IGNORE).sum(1)


def mtp_loss_reference(hidden, weight, targets):
    """The plain way, for tests and benchmarks: materialize all logits, then F.cross_entropy."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    sums = torch.stack([F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(),
                                        ignore_index=IGNORE, reduction="sum") for k in range(len(hidden))])
    return sums, (targets != IGNORE).sum((1, 2))


def step_coefficients(global_counts, head_weights, world_size=1):
    """The factor each micro-batch multiplies its per-head sums by before backward: world_size * w_k / N_k,
    with N_k the global count of the whole step (DDP averages gradients, hence world_size); 0 where N_k = 0."""
    return torch.where(global_counts > 0, head_weights * world_size / global_counts.clamp(min=1), 0.0)


def objective(sums, counts, head_weights):
    """sum_k w_k * sums_k / counts_k over a whole step or evaluation; a head with no target adds 0."""
    return (step_coefficients(counts, head_weights) * sums).sum()
