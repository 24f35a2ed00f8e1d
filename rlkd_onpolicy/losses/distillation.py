"""One entry point for the full distillation objective: a KD divergence plus the RLKD ranking loss.

    L = rank_weight · L_rank + w · L_KD,   w = 1, or |top-k(p) ∩ top-k(q)| / k with dynamic weighting

RLKD's total is 2·L_rank + L_KD, so LossSpec's default `rank_weight=2.0` reproduces the paper and `rank_weight=0`
turns ranking off.
The teacher is either dense (`teacher_logits`) or sparse (`teacher_topk_ids` + `teacher_topk_logprobs`).
"""

import math
from typing import NamedTuple

import torch

from rlkd_onpolicy.losses.divergences import dense_divergence, sparse_divergence
from rlkd_onpolicy.losses.ranking import ranking_loss, sparse_ranking_loss, topk_overlap
from rlkd_onpolicy.losses.reduction import check_mask
from rlkd_onpolicy.losses.spec import LossSpec


class DistillationLoss(NamedTuple):
    """Reduced parts of the objective; `loss = kd_part + rank_weight · rank`, `num_tokens` counted tokens."""

    loss: torch.Tensor
    kd: torch.Tensor
    rank: torch.Tensor
    num_tokens: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_tail_logprob: torch.Tensor | None = None,
    spec: LossSpec | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    rank_stats: dict | None = None,
    **options,
) -> DistillationLoss:
    """KD divergence + `rank_weight` × RLKD ranking loss, per token, reduced once.

    Args:
        student_logits: (..., V) the student's logits (q).
        teacher_logits: (..., V) the teacher's logits (p), or None with a sparse teacher:
        teacher_topk_ids / teacher_topk_logprobs / teacher_tail_logprob: (..., K) / (..., K) / (...) sparse teacher.
        spec: the objective (`LossSpec`: divergence, ranking term, dynamic weighting); or, without it, its fields
            as keyword `options` (loss="jsd", rank_weight=0, ...), the others at LossSpec's defaults.
        mask: (...) bool; reduction: "mean", "sum" or "none" (per token); `num_tokens` is always returned, so
            "sum" gives what a trainer needs to divide once per optimizer step.
        rank_stats: a dict that gains the ranking loss's row counts ("rows", "hard_rows", "undefined_rows"; see
            `ranking_loss`), for diagnostics; untouched when rank_weight is 0.

    Example:
        >>> out = distillation_loss(torch.randn(2, 9, 100), torch.randn(2, 9, 100), spec=LossSpec(rank_weight=2.0))
        >>> out.loss.backward()  # doctest: +SKIP
    """
    spec = LossSpec.from_options(spec, **options)
    loss, rank_weight, rank_k, temperature = spec.loss, spec.rank_weight, spec.rank_k, spec.temperature
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none' (num_tokens is always returned).")
    sparse = teacher_logits is None
    if sparse and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("Give either teacher_logits or both teacher_topk_ids and teacher_topk_logprobs.")
    if not sparse and teacher_topk_ids is not None:
        raise ValueError("Give either teacher_logits or a sparse teacher (teacher_topk_ids), not both.")
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                        ("teacher_topk_logprobs", teacher_topk_logprobs)):  # fmt: skip
        if value is not None and (value.ndim == 0 or value.shape[-1] == 0):
            raise ValueError(f"{name} must be (..., V) with V ≥ 1 (the last dimension the vocabulary or the "
                             f"teacher's K); got shape {tuple(value.shape)}.")  # fmt: skip
    lead = student_logits.shape[:-1]
    check_mask(mask, lead)
    # A teacher row that is −inf everywhere (every token suppressed) has no distribution to distil: it counts as
    # masked, with a finite stand-in so that no NaN reaches the loss or its gradient through the masked row.
    dead = (teacher_logits if not sparse else teacher_topk_logprobs).amax(-1).isneginf()  # (...), no (..., V) temp
    if bool(dead.any()):
        mask = ~dead if mask is None else mask.bool() & ~dead
        if sparse:
            uniform = torch.full_like(teacher_topk_logprobs, -math.log(teacher_topk_logprobs.shape[-1]))
            teacher_topk_logprobs = torch.where(dead[..., None], uniform, teacher_topk_logprobs)
        else:
            teacher_logits = torch.where(dead[..., None], torch.zeros_like(teacher_logits), teacher_logits)

    if sparse:
        kd = sparse_divergence(
            student_logits, teacher_topk_ids, teacher_topk_logprobs, loss=loss, beta=spec.beta,
            skew_alpha=spec.skew_alpha, temperature=temperature, missing_mass=spec.missing_mass,
            teacher_tail_logprob=teacher_tail_logprob, mask=mask, reduction="none",
        )
    else:
        kd = dense_divergence(
            student_logits, teacher_logits, loss, beta=spec.beta, skew_alpha=spec.skew_alpha, temperature=temperature,
            mask=mask, reduction="none",
        )
    if rank_weight > 0:
        if sparse:
            rank = sparse_ranking_loss(
                student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob=teacher_tail_logprob,
                rank_k=rank_k, rank_union=spec.rank_union, regularization_strength=spec.regularization_strength,
                temperature=temperature, mask=mask, reduction="none", stats=rank_stats,
            )
        else:
            rank = ranking_loss(
                student_logits, teacher_logits, rank_k=rank_k, rank_union=spec.rank_union,
                regularization_strength=spec.regularization_strength, temperature=temperature, mask=mask,
                reduction="none", stats=rank_stats,
            )
    else:
        rank = torch.zeros_like(kd)
    if spec.rank_dynamic_weighting:
        with torch.no_grad():
            if sparse:
                best = teacher_topk_logprobs.topk(rank_k, dim=-1).indices
                teacher_top = teacher_topk_ids.gather(-1, best)
            else:
                teacher_top = teacher_logits.topk(rank_k, dim=-1).indices
            overlap = topk_overlap(teacher_top, student_logits.topk(rank_k, dim=-1).indices).to(kd.dtype)
        kd = kd * overlap
    total = kd + rank_weight * rank
    num_tokens = torch.tensor(lead.numel() if mask is None else int(mask.sum()), device=kd.device)
    if reduction == "none":
        return DistillationLoss(total, kd, rank, num_tokens)
    sums = (total.sum(), kd.sum(), rank.sum())
    if reduction == "sum":
        return DistillationLoss(*sums, num_tokens)
    denom = num_tokens.clamp_min(1)
    return DistillationLoss(*(s / denom for s in sums), num_tokens)
