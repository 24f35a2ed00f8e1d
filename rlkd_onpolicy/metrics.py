"""Agreement of the student's top-k with the teacher's (the RLKD paper's metrics).

- CR@k: the fraction of tokens whose *ordered* top-k lists are identical;
- MOR@k: the mean over tokens of |top-k(p) ∩ top-k(q)| / k;
- Spearman@k: the mean Spearman correlation of exact (hard) ranks over the union of the two top-k sets. A token
  whose union holds a single id (k = 1 and both agree) counts as 1: the one-element orders agree.
"""

import torch

from rlkd_onpolicy.losses.ranking import _pearson, topk_overlap, union_groups
from rlkd_onpolicy.losses.reduction import check_mask


def _hard_ranks(values: torch.Tensor) -> torch.Tensor:
    # Ascending ordinal ranks 1..n (ties broken by position), the convention of `soft_rank`.
    return values.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).to(torch.float64) + 1


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
        >>> topk_agreement(torch.randn(4, 100), torch.randn(4, 100), ks=(1, 5))["mor@5"]
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape (..., V)."
        )
    vocab = student_logits.shape[-1]
    if not ks or any(not 1 <= k <= vocab for k in ks):
        raise ValueError(f"ks={ks} must be a non-empty tuple of integers in [1, V={vocab}].")
    check_mask(mask, student_logits.shape[:-1])
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1)
        student, teacher = student[keep], teacher[keep]
    result: dict[str, float] = {}
    k_max = max(ks)
    teacher_top = teacher.topk(k_max, dim=-1).indices  # sorted, best first
    student_top = student.topk(k_max, dim=-1).indices
    empty = student.shape[0] == 0
    for k in sorted(ks):
        same = (teacher_top[:, :k] == student_top[:, :k]).all(-1)
        result[f"cr@{k}"] = 0.0 if empty else same.double().mean().item()
        result[f"mor@{k}"] = 0.0 if empty else topk_overlap(teacher_top[:, :k], student_top[:, :k]).mean().item()
    total = 0.0
    for rows, ids in union_groups(teacher_top, student_top, "exact"):
        if ids.shape[-1] == 1:
            total += rows.numel()
            continue
        rho, _ = _pearson(_hard_ranks(student[rows].gather(-1, ids)), _hard_ranks(teacher[rows].gather(-1, ids)))
        total += rho.sum().item()
    result[f"spearman@{k_max}"] = 0.0 if empty else total / student.shape[0]
    return result
