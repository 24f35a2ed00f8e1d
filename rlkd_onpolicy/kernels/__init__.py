"""Fused top-k distillation loss from the student's hidden states: no N×V tensor is ever held.

`fused_topk_loss` validates, drops masked rows, picks a backend and reduces:
- "torch": `reference.py`, the spec (chunked, checkpointed, the library's sparse losses per chunk);
- "triton": `triton_topk.py`, one Triton kernel per chunk computing the loss and writing d(loss)/d(logits) in place;
- "auto": Triton on CUDA when triton is installed, the reference elsewhere.
docs/kernels.md has the design, the gradient formulas and the measurements.
"""

from __future__ import annotations

import torch

from rlkd_onpolicy._imports import is_triton_available, require
from rlkd_onpolicy.kernels.reference import reference_topk_loss
from rlkd_onpolicy.losses.divergences import log1mexp
from rlkd_onpolicy.losses.reduction import REDUCTIONS
from rlkd_onpolicy.losses.spec import BACKENDS, LossSpec

# The Triton kernel keeps a row's K ids in registers; beyond this the reference is the better choice.
TRITON_MAX_K = 4096

__all__ = ["BACKENDS", "LossSpec", "fused_topk_loss", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device, k: int = 1) -> str:
    """The backend `fused_topk_loss` runs for `backend` on `device`: "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    if backend == "auto":
        use_triton = device.type == "cuda" and is_triton_available() and k <= TRITON_MAX_K
        return "triton" if use_triton else "torch"
    if backend == "triton":
        require("triton", "triton")
        if k > TRITON_MAX_K:
            raise ValueError(f"backend='triton' supports K <= {TRITON_MAX_K}, got K={k}; use backend='torch'.")
    return backend


def _check_inputs(hidden, weight, bias, ids, logprobs, tail, mask, spec: LossSpec, chunk_size: int, reduction: str):
    """What LossSpec cannot know: the tensors, the reduction, the chunk size and rank_k against the teacher's K."""
    if spec.rank_dynamic_weighting:
        raise ValueError("LossSpec.rank_dynamic_weighting=True is not supported by fused_topk_loss (it would need the "
                         "student's top-k over the whole vocabulary): use distillation_loss on the logits.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per chunk of logits).")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lm_head_weight must be (V, H) with H = student_hidden.shape[-1]={hidden.shape[-1]}; got "
            f"{tuple(weight.shape)}."
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"student_hidden ({hidden.dtype}, {hidden.device}) and lm_head_weight ({weight.dtype}, {weight.device}) "
            "must share dtype and device."
        )
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be (V,)=({vocab},); got {tuple(bias.shape)}.")
    lead = hidden.shape[:-1]
    if ids.shape != logprobs.shape or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} must both be "
            f"{tuple(lead)} + (K,), one row per row of student_hidden {tuple(hidden.shape)}."
        )
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"teacher_topk_ids must be int32 or int64; got {ids.dtype}.")
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"the teacher's top-K has K={k}, which must be in [1, V={vocab}].")
    if tail is not None and tail.shape != lead:
        raise ValueError(f"teacher_tail_logprob has shape {tuple(tail.shape)}; expected {tuple(lead)}.")
    if mask is not None and (mask.shape != lead or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(lead)} (True = the token counts); got "
            f"{mask.dtype} {tuple(mask.shape)}."
        )
    if spec.rank_weight > 0 and spec.rank_k > k:
        raise ValueError(f"rank_k={spec.rank_k} must be in [1, K={k}] (the teacher's top-k come from its K).")


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    """Ids of counted rows are in [0, V) and distinct within a row (the kernel scatters one gradient per id)."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"teacher_topk_ids holds ids outside [0, {vocab}) (min {low}, max {high}) at counted tokens: the "
            "teacher's ids do not fit the student's vocabulary."
        )
    ordered = ids.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("teacher_topk_ids repeats an id within a row; a top-K has K distinct ids.")


def _reduce(rows_or_sum: torch.Tensor, per_row: bool, count: torch.Tensor, index, total_rows: int, lead, reduction):
    if reduction == "none":
        full = rows_or_sum.new_zeros(total_rows)
        return (full.index_put((index,), rows_or_sum) if index is not None else rows_or_sum).reshape(lead)
    total = rows_or_sum.sum() if per_row else rows_or_sum
    if reduction == "sum":
        return total
    if reduction == "sum_count":
        return total, count
    return total / count.clamp_min(1)


def fused_topk_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    spec: LossSpec | None = None,
    lm_head_bias: torch.Tensor | None = None,
    teacher_tail_logprob: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
    return_parts: bool = False,
    **options,
):
    """Sparse KD loss (+ RLKD ranking loss) of a student against a top-K teacher, from the student's hidden states.

    loss per token = D(p_buckets ‖ q_buckets) + rank_weight · (1 − ρ(soft ranks)), with q = softmax(h·Wᵀ + b) / T
    the student (computed chunk by chunk, never as an N×V tensor) and p the sparse teacher; D, the buckets
    (`missing_mass`) and the ranking loss are those of `rlkd_onpolicy.losses.sparse_divergence` and
    `sparse_ranking_loss` (RLKD: Peng & Zhang 2024; the fused-linear idea: Liger-Kernel, Hsu et al. 2024).

    Args:
        student_hidden: (..., H) the student's final hidden states (q side); gets a gradient.
        lm_head_weight: (V, H) the student's output projection; gets a gradient. lm_head_bias: (V,) or None.
        teacher_topk_ids: (..., K) distinct teacher ids per token (p side; constants).
        teacher_topk_logprobs: (..., K) teacher log-probs over the full vocabulary at the loss temperature.
        mask: (...) bool, True where a token counts; masked rows never enter the computation.
        spec: the objective (`LossSpec`; its `backend` picks the kernel: "auto" | "torch" | "triton"; no
            rank_dynamic_weighting here). Or, without it, LossSpec's fields as keyword `options`, the others at
            LossSpec's defaults (rank_weight 2.0, as everywhere: pass rank_weight=0.0 for the KD term alone).
        teacher_tail_logprob: (...) log of the teacher mass outside its K ids; default log(1 − Σ exp(logprobs)).
        reduction: "mean" | "sum" | "none" (shape (...), 0 at masked tokens) | "sum_count" ((sum, count)).
        chunk_size: tokens per chunk of logits (memory ~ chunk_size × V).
        return_parts: also return {"kd": ..., "rank": ...}, detached, reduced the same way.

    Example:
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> t = torch.randn(6, 100).log_softmax(-1).topk(8)
        >>> fused_topk_loss(h, w, t.indices, t.values, spec=LossSpec(loss="jsd", rank_weight=0.0)).backward()
    """
    spec = LossSpec.from_options(spec, **options)
    _check_inputs(student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs,
                  teacher_tail_logprob, mask, spec, chunk_size, reduction)
    vocab, k = lm_head_weight.shape[0], teacher_topk_ids.shape[-1]
    chosen = resolve_backend(spec.backend, student_hidden.device, k)

    lead = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    ids = teacher_topk_ids.reshape(-1, k)
    logprobs = teacher_topk_logprobs.detach().reshape(-1, k)
    tail = None if teacher_tail_logprob is None else teacher_tail_logprob.detach().reshape(-1)
    index = None
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(-1)
        hidden, ids, logprobs = (t.index_select(0, index) for t in (hidden, ids, logprobs))
        tail = None if tail is None else tail.index_select(0, index)
    _check_ids(ids, vocab)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if tail is None:
        tail = log1mexp(logprobs.to(compute).logsumexp(-1))
    ids, logprobs, tail = ids.contiguous(), logprobs.contiguous(), tail.to(compute).contiguous()

    per_row = reduction == "none"
    if chosen == "triton":
        from rlkd_onpolicy.kernels.triton_topk import triton_topk_loss

        result, kd_rows, rank_rows = triton_topk_loss(
            hidden, lm_head_weight, lm_head_bias, ids, logprobs, tail, spec, chunk_size, per_row
        )
    else:
        result, kd_rows, rank_rows = reference_topk_loss(
            hidden, lm_head_weight, lm_head_bias, ids, logprobs, tail, spec, chunk_size, per_row
        )
    count = torch.tensor(hidden.shape[0], device=hidden.device)
    total_rows = lead.numel()
    out = _reduce(result, per_row, count, index, total_rows, lead, reduction)
    if not return_parts:
        return out
    parts = {
        name: _reduce(rows, True, count, index, total_rows, lead, reduction)
        for name, rows in (("kd", kd_rows), ("rank", rank_rows))
    }
    return out, parts
