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
from rlkd_onpolicy.kernels.reference import TopKLossOptions, reference_topk_loss
from rlkd_onpolicy.losses.divergences import MISSING_MASS, check_loss_options, log1mexp
from rlkd_onpolicy.losses.ranking import UNIONS
from rlkd_onpolicy.losses.reduction import REDUCTIONS

BACKENDS = ("auto", "torch", "triton")
# The Triton kernel keeps a row's K ids in registers; beyond this the reference is the better choice.
TRITON_MAX_K = 4096

__all__ = ["BACKENDS", "TopKLossOptions", "fused_topk_loss", "resolve_backend"]


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


def _check_inputs(hidden, weight, bias, ids, logprobs, tail, mask, options: TopKLossOptions, reduction: str):
    check_loss_options(options.loss, options.beta, options.skew_alpha, options.temperature)
    if options.missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass={options.missing_mass!r} is not one of {MISSING_MASS}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")
    if options.chunk_size < 1:
        raise ValueError(f"chunk_size={options.chunk_size} must be >= 1 (tokens per chunk of logits).")
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
    if options.rank_weight < 0:
        raise ValueError(f"rank_weight={options.rank_weight} must be >= 0 (RLKD uses 2.0; 0 turns ranking off).")
    if options.rank_weight > 0:
        if options.rank_union not in UNIONS:
            raise ValueError(f"rank_union={options.rank_union!r} is not one of {UNIONS}.")
        if not 1 <= options.rank_k <= k:
            raise ValueError(f"rank_k={options.rank_k} must be in [1, K={k}] (the teacher's top-k come from its K).")
        if not options.regularization_strength > 0:
            raise ValueError(f"regularization_strength={options.regularization_strength} must be positive.")


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
    lm_head_bias: torch.Tensor | None = None,
    loss: str = "fkl",
    missing_mass: str = "tail",
    teacher_tail_logprob: torch.Tensor | None = None,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    rank_weight: float = 0.0,
    rank_k: int = 5,
    rank_union: str = "exact",
    regularization_strength: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int = 1024,
    backend: str = "auto",
    return_parts: bool = False,
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
        teacher_tail_logprob: (...) log of the teacher mass outside its K ids; default log(1 − Σ exp(logprobs)).
        loss, beta, skew_alpha, missing_mass, temperature: as in `sparse_divergence`.
        rank_weight, rank_k, rank_union, regularization_strength: the ranking term (off when rank_weight = 0).
        reduction: "mean" | "sum" | "none" (shape (...), 0 at masked tokens) | "sum_count" ((sum, count)).
        chunk_size: tokens per chunk of logits (memory ~ chunk_size × V).
        backend: "auto" | "torch" | "triton".
        return_parts: also return {"kd": ..., "rank": ...}, detached, reduced the same way.

    Example:
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> t = torch.randn(6, 100).log_softmax(-1).topk(8)
        >>> fused_topk_loss(h, w, t.indices, t.values, loss="jsd").backward()
    """
    options = TopKLossOptions(
        loss=loss, missing_mass=missing_mass, beta=beta, skew_alpha=skew_alpha, rank_weight=rank_weight,
        rank_k=rank_k, rank_union=rank_union, regularization_strength=regularization_strength,
        temperature=temperature, chunk_size=chunk_size,
    )
    _check_inputs(student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs,
                  teacher_tail_logprob, mask, options, reduction)
    vocab, k = lm_head_weight.shape[0], teacher_topk_ids.shape[-1]
    chosen = resolve_backend(backend, student_hidden.device, k)

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
            hidden, lm_head_weight, lm_head_bias, ids, logprobs, tail, options, per_row
        )
    else:
        result, kd_rows, rank_rows = reference_topk_loss(
            hidden, lm_head_weight, lm_head_bias, ids, logprobs, tail, options, per_row
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
