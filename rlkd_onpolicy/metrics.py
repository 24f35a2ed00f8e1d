"""Agreement of the student's top-k with the teacher's (the RLKD paper's metrics).

- CR@k: the fraction of tokens whose *ordered* top-k lists are identical;
- MOR@k: the mean over tokens of |top-k(p) ∩ top-k(q)| / k;
- Spearman@k: the mean Spearman correlation of exact (hard) ranks over the union of the two top-k sets. A token
  whose union holds a single id (k = 1 and both agree) counts as 1: the one-element orders agree.
"""

import torch

from rlkd_onpolicy.losses.ranking import pearson_rows, topk_overlap, union_groups
from rlkd_onpolicy.losses.reduction import check_mask


def _hard_ranks(values: torch.Tensor) -> torch.Tensor:
    # Ascending ordinal ranks 1..n (ties broken by position), the convention of `soft_rank`.
    return values.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(torch.float64) + 1


def _check_ks(ks: tuple[int, ...], limit: int, what: str = "V") -> None:
    """`what` names the bound: the vocabulary V, or the number of top ids a side has (a sparse teacher's K)."""
    if not ks or any(not 1 <= k <= limit for k in ks):
        raise ValueError(f"ks={ks} must be a non-empty tuple of integers in [1, {what}={limit}].")


def _counted_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1)]


def _overlaps(student_top: torch.Tensor, teacher_top: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """CR@k and MOR@k from each side's sorted top ids `(n, ≥ max(ks))`; 0.0 for an empty selection."""
    result: dict[str, float] = {}
    empty = student_top.shape[0] == 0
    for k in sorted(ks):
        same = (teacher_top[:, :k] == student_top[:, :k]).all(-1)
        result[f"cr@{k}"] = 0.0 if empty else same.double().mean().item()
        result[f"mor@{k}"] = 0.0 if empty else topk_overlap(teacher_top[:, :k], student_top[:, :k]).mean().item()
    return result


@torch.no_grad()
def topk_overlap_metrics(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """CR@k and MOR@k against a sparse teacher: `teacher_topk_ids (..., K)` sorted best first, K ≥ max(ks)."""
    _check_ks(ks, student_logits.shape[-1])
    _check_ks(ks, teacher_topk_ids.shape[-1], "the teacher's K")
    check_mask(mask, student_logits.shape[:-1])
    student = _counted_rows(student_logits, mask)
    teacher_top = _counted_rows(teacher_topk_ids, mask)
    return _overlaps(student.topk(max(ks), dim=-1).indices, teacher_top, ks)


def topk_overlap_from_ids(
    student_topk_ids: torch.Tensor, teacher_topk_ids: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """`topk_overlap_metrics` from the student's sorted top ids `(n, ≥ max(ks))` of counted tokens (when its logits
    were never materialised) and the teacher's `(n, K)`."""
    _check_ks(ks, student_topk_ids.shape[-1], "the student's top ids")
    _check_ks(ks, teacher_topk_ids.shape[-1], "the teacher's K")
    return _overlaps(student_topk_ids, teacher_topk_ids, ks)


@torch.no_grad()
def topk_agreement(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ks: tuple[int, ...] = (1, 2, 3, 5, 10),
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """CR@k and MOR@k for each k in `ks`, and Spearman@max(ks), averaged over the tokens where `mask` is True.

    Args:
        student_logits, teacher_logits: (..., V); mask: (...) bool.
    Returns:
        {"cr@1": ..., "mor@1": ..., ..., "spearman@10": ...} as floats; empty selections give 0.0.

    Example:
        >>> student, teacher = torch.arange(8.0), torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 6.0])
        >>> topk_agreement(student, teacher, ks=(1, 2))  # the same top-2 set in the other order
        {'cr@1': 0.0, 'mor@1': 0.0, 'cr@2': 0.0, 'mor@2': 1.0, 'spearman@2': -1.0}
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape (..., V)."
        )
    vocab = student_logits.shape[-1]
    _check_ks(ks, vocab)
    check_mask(mask, student_logits.shape[:-1])
    student, teacher = _counted_rows(student_logits, mask), _counted_rows(teacher_logits, mask)
    k_max = max(ks)
    teacher_top = teacher.topk(k_max, dim=-1).indices  # sorted, best first
    student_top = student.topk(k_max, dim=-1).indices
    result = _overlaps(student_top, teacher_top, ks)
    empty = student.shape[0] == 0
    total = 0.0
    for rows, ids in union_groups(teacher_top, student_top, "exact"):
        if ids.shape[-1] == 1:
            total += rows.numel()
            continue
        rho, _ = pearson_rows(_hard_ranks(student[rows].gather(-1, ids)), _hard_ranks(teacher[rows].gather(-1, ids)))
        total += rho.sum().item()
    result[f"spearman@{k_max}"] = 0.0 if empty else total / student.shape[0]
    return result
