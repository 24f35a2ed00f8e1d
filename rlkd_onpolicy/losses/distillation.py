"""One entry point for the full distillation objective: a KD divergence plus the RLKD ranking loss.

    L = rank_weight · L_rank + w · L_KD,   w = 1, or |top-k(p) ∩ top-k(q)| / k with dynamic weighting

RLKD's total is 2·L_rank + L_KD, so `rank_weight=2.0` reproduces the paper and `rank_weight=0` turns ranking off.
The teacher is either dense (`teacher_logits`) or sparse (`teacher_topk_ids` + `teacher_topk_logprobs`).
"""

from typing import NamedTuple

import torch

from rlkd_onpolicy.losses.divergences import dense_divergence, sparse_divergence
from rlkd_onpolicy.losses.ranking import ranking_loss, sparse_ranking_loss, topk_overlap
from rlkd_onpolicy.losses.reduction import check_mask


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
    loss: str = "fkl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    missing_mass: str = "tail",
    rank_weight: float = 2.0,
    rank_k: int = 5,
    rank_union: str = "exact",
    rank_dynamic_weighting: bool = False,
    regularization_strength: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    rank_stats: dict | None = None,
) -> DistillationLoss:
    """KD divergence + `rank_weight` × RLKD ranking loss, per token, reduced once.

    Args:
        student_logits: (..., V) the student's logits (q).
        teacher_logits: (..., V) the teacher's logits (p), or None with a sparse teacher:
        teacher_topk_ids / teacher_topk_logprobs / teacher_tail_logprob: (..., K) / (..., K) / (...) sparse teacher.
        loss, beta, skew_alpha, temperature, missing_mass: the divergence (see `dense_divergence`).
        rank_weight, rank_k, rank_union, regularization_strength: the ranking loss (see `ranking_loss`).
        rank_dynamic_weighting: scale each token's KD term by its top-k overlap |top-k(p) ∩ top-k(q)| / k (RLKD).
        mask: (...) bool; reduction: "mean", "sum" or "none" (per token); `num_tokens` is always returned, so
            "sum" gives what a trainer needs to divide once per optimizer step.
        rank_stats: a dict that gains the ranking loss's row counts ("rows", "hard_rows", "undefined_rows"; see
            `ranking_loss`), for diagnostics; untouched when rank_weight is 0.

    Example:
        >>> out = distillation_loss(torch.randn(2, 9, 100), torch.randn(2, 9, 100), loss="fkl", rank_weight=2.0)
        >>> out.loss.backward()  # doctest: +SKIP
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none' (num_tokens is always returned).")
    if rank_weight < 0:
        raise ValueError(f"rank_weight={rank_weight} must be ≥ 0 (0 turns the ranking loss off; RLKD uses 2).")
    sparse = teacher_logits is None
    if sparse and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("Give either teacher_logits or both teacher_topk_ids and teacher_topk_logprobs.")
    if not sparse and teacher_topk_ids is not None:
        raise ValueError("Give either teacher_logits or a sparse teacher (teacher_topk_ids), not both.")
    lead = student_logits.shape[:-1]
    check_mask(mask, lead)

    if sparse:
        kd = sparse_divergence(
            student_logits, teacher_topk_ids, teacher_topk_logprobs, loss=loss, beta=beta, skew_alpha=skew_alpha,
            temperature=temperature, missing_mass=missing_mass, teacher_tail_logprob=teacher_tail_logprob,
            mask=mask, reduction="none",
        )
    else:
        kd = dense_divergence(
            student_logits, teacher_logits, loss, beta=beta, skew_alpha=skew_alpha, temperature=temperature,
            mask=mask, reduction="none",
        )
    if rank_weight > 0:
        if sparse:
            rank = sparse_ranking_loss(
                student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob=teacher_tail_logprob,
                k=rank_k, union=rank_union, regularization_strength=regularization_strength,
                temperature=temperature, mask=mask, reduction="none", stats=rank_stats,
            )
        else:
            rank = ranking_loss(
                student_logits, teacher_logits, k=rank_k, union=rank_union,
                regularization_strength=regularization_strength, temperature=temperature, mask=mask,
                reduction="none", stats=rank_stats,
            )
    else:
        rank = torch.zeros_like(kd)
    if rank_dynamic_weighting:
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
