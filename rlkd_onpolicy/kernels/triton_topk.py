"""Triton fast path of the fused top-k loss (imported lazily: `import rlkd_onpolicy` never imports triton).

Per chunk of C tokens (Liger-Kernel's fused-linear scheme):
1. logits = hidden @ Wᵀ (+ b), one (C, V) buffer in the input dtype (a cuBLAS matmul);
2. the ranking part, if any, in PyTorch on the few union ids of each row (its gradient is scattered in at step 4);
3. one Triton program per row computes the KD loss with an online log-sum-exp over V tiles (fp32) and
   overwrites the row's logits with d(loss)/d(logits) in place;
4. grad_hidden[chunk] = G @ W and grad_W += Gᵀ @ hidden (two matmuls), so no N×V tensor ever exists.
For reductions to a scalar, the gradients are computed in the forward (scaled by grad_output in the backward);
for reduction="none" the backward recomputes each chunk with the per-token grad_output as row weights.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from rlkd_onpolicy.kernels.reference import chunk_bounds
from rlkd_onpolicy.losses.ranking import pearson_rows, soft_rank, sparse_teacher_values, union_groups
from rlkd_onpolicy.losses.spec import LossSpec

_CODES = {"fkl": 0, "rkl": 1, "jsd": 2, "tvd": 3, "skl": 4, "srkl": 5, "zero": 6}
# float32 min: log 0 is clamped here, as `losses.divergences._finite_logs` does (a constexpr: compiled kernels may
# only read constexpr globals)
_FMIN = tl.constexpr(-3.4028234663852886e38)
# Reductions name triton's own combine functions instead of calling tl.max / tl.sum: those are @jit helpers, which
# fail under TRITON_INTERPRET=1 when triton was imported before the variable was set (transformers imports it),
# while tl.reduce with these combiners is the same code on a GPU and numpy's fast path in the interpreter.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _bucket_terms(lp, lq, log_wp, log_wq, weight_q, LOSS: tl.constexpr):
    """Per bucket: the divergence term and g = ∂D/∂log q (log p, log q finite, clamped at the float32 min).

    fkl   p(lp − lq)                         g = −p
    rkl   q(lq − lp)                         g = q(lq − lp + 1)
    jsd   β p(lp − lm) + (1−β) q(lq − lm)    g = (1−β) q (lq − lm),  lm = log(βp + (1−β)q)   (the ∂lm terms cancel)
    tvd   ½|p − q|                           g = ½ sign(q − p) q
    skl   p(lp − lm), m = αp + (1−α)q        g = −(1−α) p q / m
    srkl  q(lq − lm), m = (1−α)p + αq        g = q(lq − lm + 1 − α q / m)
    log_wp, log_wq are the logs of the mixture weights of p and q, weight_q = exp(log_wq).
    """
    p = tl.exp(lp)
    q = tl.exp(lq)
    if LOSS == 0:
        value = p * (lp - lq)
        grad = -p
    elif LOSS == 1:
        value = q * (lq - lp)
        grad = q * (lq - lp + 1.0)
    elif LOSS == 3:
        value = 0.5 * tl.abs(p - q)
        grad = 0.5 * tl.where(q > p, q, tl.where(q < p, -q, 0.0))
    elif LOSS == 6:
        value = lp * 0.0
        grad = lp * 0.0
    else:
        a = lp + log_wp
        b = lq + log_wq
        top = tl.maximum(a, b)
        lm = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
        if LOSS == 2:
            value = (1.0 - weight_q) * p * (lp - lm) + weight_q * q * (lq - lm)
            grad = weight_q * q * (lq - lm)
        elif LOSS == 4:
            value = p * (lp - lm)
            grad = -weight_q * p * tl.exp(lq - lm)
        else:
            value = q * (lq - lm)
            grad = q * (lq - lm + 1.0 - weight_q * tl.exp(lq - lm))
    return value, grad


@triton.jit
def _topk_kd_kernel(
    logits_ptr,  # (C, V) logits in; d(loss)/d(logits) out when WRITE_GRAD (in place)
    logits_stride,
    ids_ptr,  # (C, K) teacher ids, distinct per row
    logprobs_ptr,  # (C, K) teacher log-probs
    tail_ptr,  # (C,) teacher tail log-prob (fp32)
    scale_ptr,  # (C,) per-row weight of the gradient (grad_output of reduction="none", else 1)
    loss_ptr,  # (C,) fp32 per-row KD loss out
    V,
    K,
    inv_temperature,
    log_wp,
    log_wq,
    weight_q,
    LOSS: tl.constexpr,
    TAIL: tl.constexpr,  # missing_mass == "tail"
    FULL: tl.constexpr,  # K == V: both tails are exactly empty
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    k_offsets = tl.arange(0, BLOCK_K)
    k_mask = k_offsets < K
    ids = tl.load(ids_ptr + row * K + k_offsets, mask=k_mask, other=0).to(tl.int64)
    lp = tl.load(logprobs_ptr + row * K + k_offsets, mask=k_mask, other=0.0).to(tl.float32)
    z = tl.load(row_ptr + ids, mask=k_mask, other=float("-inf")).to(tl.float32) * inv_temperature
    z_max = tl.reduce(z, 0, _MAX)
    lse_ids = z_max + tl.log(tl.reduce(tl.where(k_mask, tl.exp(z - z_max), 0.0), 0, _SUM))

    lse_tail = float("-inf")
    if TAIL:
        # Knock the K ids out of the row in place: one sweep then gives the log-sum-exp of the *other* logits
        # exactly (log(Σ_all − Σ_ids) would cancel catastrophically when the top-K holds most of the mass).
        tl.debug_barrier()
        tl.store(row_ptr + ids, tl.full([BLOCK_K], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty),
                 mask=k_mask)
        tl.debug_barrier()
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offsets = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + offsets, mask=offsets < V, other=float("-inf")).to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.reduce(x, 0, _MAX))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) − (-inf) while all seen are -inf
            s = s * tl.exp(m - safe) + tl.reduce(tl.exp(x - safe), 0, _SUM)
            m = m_new
        has_tail = s > 0.0  # false when K = V: every logit was knocked out
        lse_tail = tl.where(has_tail, tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(has_tail, s, 1.0)),
                            float("-inf"))
        top = tl.maximum(lse_ids, lse_tail)
        lse = top + tl.log(tl.exp(lse_ids - top) + tl.exp(lse_tail - top))
        lq = tl.maximum(z - lse, _FMIN)
        lq_tail = tl.maximum(lse_tail - lse, _FMIN)
        if FULL:
            lp_tail = lq_tail * 0.0 + _FMIN  # a tensor, like the loaded tail
        else:
            lp_tail = tl.maximum(tl.load(tail_ptr + row).to(tl.float32), _FMIN)
        lp = tl.maximum(lp, _FMIN)
    else:
        lq = tl.maximum(z - lse_ids, _FMIN)
        lp_max = tl.reduce(tl.where(k_mask, lp, float("-inf")), 0, _MAX)
        lp = lp - (lp_max + tl.log(tl.reduce(tl.where(k_mask, tl.exp(lp - lp_max), 0.0), 0, _SUM)))
        lp = tl.maximum(lp, _FMIN)

    # Padding lanes (K < BLOCK_K) hold p = q = 0, so every term of theirs is 0 without an inf · 0.
    lp = tl.where(k_mask, lp, _FMIN)
    lq = tl.where(k_mask, lq, _FMIN)
    value, g = _bucket_terms(lp, lq, log_wp, log_wq, weight_q, LOSS)
    value = tl.where(k_mask, value, 0.0)
    g = tl.where(k_mask, g, 0.0)
    total = tl.reduce(value, 0, _SUM)
    g_sum = tl.reduce(g, 0, _SUM)
    if TAIL:
        value_tail, g_tail = _bucket_terms(lp_tail, lq_tail, log_wp, log_wq, weight_q, LOSS)
        total += value_tail
        g_sum += g_tail
    tl.store(loss_ptr + row, total)

    if WRITE_GRAD:
        # The buckets are a softmax of u = [z_ids, (lse_tail)]: log q_j = u_j − logsumexp(u). So
        #   ∂D/∂u_j = g_j − q_j Σ_i g_i,
        # and the tail bucket u_tail = logsumexp(z outside the ids) passes its share to each outside logit v as
        #   ∂D/∂z_v = ∂D/∂u_tail · exp(z_v − lse_tail).   Finally ∂/∂logits = (1/T) ∂/∂z, times the row weight.
        scale = tl.load(scale_ptr + row).to(tl.float32) * inv_temperature
        grad_ids = (g - tl.exp(lq) * g_sum) * scale
        if TAIL:
            coef = (g_tail - tl.exp(lq_tail) * g_sum) * scale
            safe_tail = tl.where(lse_tail == float("-inf"), 0.0, lse_tail)
        for start in range(0, V, BLOCK_V):
            offsets = start + tl.arange(0, BLOCK_V)
            if TAIL:
                x = tl.load(row_ptr + offsets, mask=offsets < V, other=float("-inf")).to(tl.float32)
                x = x * inv_temperature
                grad = tl.where(x == float("-inf"), 0.0, coef * tl.exp(x - safe_tail))
            else:
                grad = tl.full([BLOCK_V], 0.0, tl.float32)
            tl.store(row_ptr + offsets, grad.to(logits_ptr.dtype.element_ty), mask=offsets < V)
        tl.debug_barrier()
        tl.store(row_ptr + ids, grad_ids.to(logits_ptr.dtype.element_ty), mask=k_mask)


def _loss_code(spec: LossSpec) -> tuple[int, float, float, float]:
    """Kernel code and mixture weights (log w_p, log w_q, w_q); the end points map to the plain KLs or to 0,
    exactly as `losses.divergences.bucket_divergence` special-cases them."""
    loss, beta, alpha = spec.loss, spec.beta, spec.skew_alpha
    if loss == "jsd":
        loss = "fkl" if beta == 0.0 else "rkl" if beta == 1.0 else loss
        weight_p = beta
    elif loss == "skl":
        loss = "fkl" if alpha == 0.0 else "zero" if alpha == 1.0 else loss
        weight_p = alpha
    elif loss == "srkl":
        loss = "rkl" if alpha == 0.0 else "zero" if alpha == 1.0 else loss
        weight_p = 1.0 - alpha
    else:
        weight_p = 0.5
    if not 0.0 < weight_p < 1.0:
        weight_p = 0.5  # unused by the plain KLs and "zero"
    return _CODES[loss], math.log(weight_p), math.log1p(-weight_p), 1.0 - weight_p


def _kd_chunk(logits, ids, logprobs, tail, scale, spec: LossSpec, write_grad: bool) -> torch.Tensor:
    """Launch the kernel on a (C, V) logits chunk; returns the (C,) fp32 KD loss, logits overwritten."""
    rows, vocab = logits.shape
    k = ids.shape[1]
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    code, log_wp, log_wq, weight_q = _loss_code(spec)
    block_v = min(triton.next_power_of_2(vocab), 1024 if _INTERPRET else 4096)
    _topk_kd_kernel[(rows,)](
        logits, logits.stride(0), ids, logprobs, tail, scale, loss, vocab, k, 1.0 / spec.temperature,
        log_wp, log_wq, weight_q,
        LOSS=code, TAIL=spec.missing_mass == "tail", FULL=k == vocab, WRITE_GRAD=write_grad,
        BLOCK_V=block_v, BLOCK_K=triton.next_power_of_2(k), num_warps=8,
    )
    return loss


def _rank_chunk(logits, ids, logprobs, tail, spec: LossSpec, need_grad: bool):
    """The ranking loss of a chunk on its union ids only: (C,) losses and [(rows, ids, d loss/d scaled logits)].

    The same computation as `losses.sparse_ranking_loss`, but the student's values are gathered at the (g, n)
    union ids first, so its gradient is (g, n) instead of a second (C, V) buffer.
    """
    vocab, cached = logits.shape[1], ids.shape[1]
    compute = tail.dtype
    teacher_lp = logprobs.to(compute)
    fill = tail - math.log(max(vocab - cached, 1))
    teacher_top = ids.gather(-1, teacher_lp.topk(spec.rank_k, dim=-1).indices).long()
    student_top = logits.topk(spec.rank_k, dim=-1).indices  # dividing by T > 0 keeps the order
    loss = torch.zeros(logits.shape[0], device=logits.device, dtype=compute)
    grads = []
    for rows, candidates in union_groups(teacher_top, student_top, spec.rank_union):
        values = (logits[rows.unsqueeze(-1), candidates].to(compute) / spec.temperature).requires_grad_(need_grad)
        with torch.enable_grad():
            student_ranks = soft_rank(values, spec.regularization_strength)
            with torch.no_grad():
                teacher_values = sparse_teacher_values(candidates, ids[rows], teacher_lp[rows], fill[rows])
                teacher_ranks = soft_rank(teacher_values, spec.regularization_strength)
            rho, defined = pearson_rows(student_ranks, teacher_ranks)
            group_loss = torch.where(defined, 1.0 - rho, torch.zeros_like(rho))
            if need_grad:
                (grad,) = torch.autograd.grad(group_loss.sum(), values)
                grads.append((rows, candidates, grad))
        loss[rows] = group_loss.detach()
    return loss, grads


def _run(hidden, weight, bias, ids, logprobs, tail, spec: LossSpec, chunk_size: int, row_scale, need_grads):
    """One pass over the chunks: per-row (kd, rank) and, when `need_grads` (hidden, weight, bias) grads for
    Σ_rows row_scale · (kd + rank_weight · rank)."""
    n = hidden.shape[0]
    kd = torch.zeros(n, device=hidden.device, dtype=tail.dtype)
    rank = torch.zeros_like(kd)
    grad_hidden = torch.zeros_like(hidden) if need_grads[0] else None
    grad_weight = torch.zeros_like(weight) if need_grads[1] else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_grads[2] else None
    write_grad = any(need_grads)
    ones = torch.ones(min(n, chunk_size), device=hidden.device, dtype=torch.float32)
    for start, end in chunk_bounds(n, chunk_size):
        if end == start:
            break
        chunk = hidden[start:end]
        logits = torch.nn.functional.linear(chunk, weight, bias).contiguous()
        scale = ones[: end - start] if row_scale is None else row_scale[start:end].float().contiguous()
        rank_grads = []
        if spec.rank_weight:
            rank[start:end], rank_grads = _rank_chunk(
                logits, ids[start:end], logprobs[start:end], tail[start:end], spec, write_grad
            )
        kd[start:end] = _kd_chunk(logits, ids[start:end], logprobs[start:end], tail[start:end], scale, spec,
                                  write_grad)
        if not write_grad:
            continue
        for rows, candidates, grad in rank_grads:
            # d(rank_weight · rank)/d logits = rank_weight / T · d rank/d(logits / T); duplicates ("concat") add up.
            grad = grad * (spec.rank_weight / spec.temperature) * scale[rows].unsqueeze(-1).to(grad.dtype)
            flat = (rows.unsqueeze(-1) * logits.shape[1] + candidates).reshape(-1)
            logits.view(-1).index_add_(0, flat, grad.reshape(-1).to(logits.dtype))
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), chunk)
        if grad_bias is not None:
            grad_bias += logits.float().sum(0)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return kd, rank, (grad_hidden, grad_weight, grad_bias)


class _FusedTopKLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, tail, spec, chunk_size, per_row):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.spec, ctx.chunk_size, ctx.per_row = spec, chunk_size, per_row
        if per_row:
            # Per-token output: its grad_output weights each row, so the backward recomputes with those weights.
            kd, rank, _ = _run(hidden, weight, bias, ids, logprobs, tail, spec, chunk_size, None, (False, False, False))
            ctx.save_for_backward(hidden, weight, bias, ids, logprobs, tail)
        else:
            kd, rank, grads = _run(hidden, weight, bias, ids, logprobs, tail, spec, chunk_size, None, need)
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
            ctx.has_grad = [g is not None for g in grads]
        rows = kd + spec.rank_weight * rank  # a new tensor even at rank_weight = 0: kd is a separate output
        ctx.mark_non_differentiable(kd, rank)
        return (rows if per_row else rows.sum()), kd, rank

    @staticmethod
    def backward(ctx, grad_output, _grad_kd, _grad_rank):
        if ctx.per_row:
            hidden, weight, bias, ids, logprobs, tail = ctx.saved_tensors
            need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
            _, _, grads = _run(hidden, weight, bias, ids, logprobs, tail, ctx.spec, ctx.chunk_size, grad_output, need)
        else:
            # The gradients were computed in the forward for a unit grad_output; the loss is linear in it.
            scale = grad_output.to(torch.float32)
            grads = [
                (g * scale).to(g.dtype) if present else None
                for g, present in zip(ctx.saved_tensors, ctx.has_grad, strict=True)
            ]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def triton_topk_loss(
    student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
    spec: LossSpec, chunk_size: int, per_row: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend interface of `reference.reference_topk_loss`: `(loss, kd_rows, rank_rows)`."""
    return _FusedTopKLoss.apply(
        student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
        spec, chunk_size, per_row,
    )
