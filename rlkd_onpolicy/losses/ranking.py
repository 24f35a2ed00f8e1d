"""The RLKD ranking loss (Peng & Zhang 2024, arXiv 2409.12545) and the soft-rank operator it needs.

Per token: 1 − Spearman correlation between the teacher's and the student's ranks of a few candidate tokens:
the union of the teacher's top-k and the student's top-k (the student's own top-k is there so that tokens the
student over-rates are pushed down too). Spearman = Pearson correlation of ranks; the student's ranks are
*soft* (differentiable) ranks, the teacher's are soft ranks taken as constants.

Soft ranks: the L2-regularised operator of Blondel et al. 2020, "Fast Differentiable Sorting and Ranking",
r(θ) = P(θ/ε, w): the Euclidean projection of θ/ε onto the permutahedron of w = (n, n−1, …, 1), ascending
(the largest value gets rank ≈ n, as in torchsort). As ε → 0 it tends to the hard ranks 1…n; ε = 1 is the paper's.
The projection reduces to one isotonic regression on the sorted values (Blondel et al., Prop. 3), solved here
in closed form with the min–max formula, which is batched and exact, O(n²) per row for the few candidates.
"""

import torch

from rlkd_onpolicy.losses.divergences import (
    _compute_dtype,
    check_sparse_teacher,
    check_temperature,
    log1mexp,
)
from rlkd_onpolicy.losses.reduction import Reduced, check_mask, masked_token_loss

UNIONS = ("exact", "concat")


# ---------------------------------------------------------------------------------------------------------------
# soft ranks


def _isotonic_nonincreasing(y: torch.Tensor) -> torch.Tensor:
    """argmin_v ‖v − y‖² subject to v_1 ≥ v_2 ≥ … ≥ v_n, over the last axis of `y (..., n)`.

    Min–max formula (Robertson, Wright & Dykstra 1988): v_i = min_{j ≤ i} max_{l ≥ i} mean(y_j … y_l).
    Autograd through the selected mean gives the exact Jacobian (averaging over the block containing i).
    """
    n = y.shape[-1]
    zero = y.new_zeros(y.shape[:-1] + (1,))
    csum = torch.cat([zero, y.cumsum(-1)], dim=-1)  # csum[..., m] = y_0 + … + y_{m-1}
    j = torch.arange(n, device=y.device).unsqueeze(-1)
    l = torch.arange(n, device=y.device).unsqueeze(0)  # noqa: E741
    lengths = (l - j + 1).clamp_min(1).to(y.dtype)
    means = (csum[..., None, 1:] - csum[..., :-1, None]) / lengths  # [..., j, l] = mean(y_j … y_l)
    means = means.masked_fill(l < j, float("-inf"))
    suffix_max = means.flip(-1).cummax(-1).values.flip(-1)  # [..., j, i] = max_{l ≥ i} mean(y_j … y_l)
    suffix_max = suffix_max.masked_fill(j > l, float("inf"))  # keep j ≤ i (here the column index plays i)
    return suffix_max.min(dim=-2).values


def soft_rank(values: torch.Tensor, regularization_strength: float = 1.0) -> torch.Tensor:
    """Soft ranks of `values (..., n)` along the last axis, ascending (largest ≈ n), L2-regularised (Blondel 2020).

    Example:
        >>> soft_rank(torch.tensor([[3.0, 1.0, 2.0]]), 1e-3)
        tensor([[3., 1., 2.]])
    """
    if not regularization_strength > 0:
        raise ValueError(f"regularization_strength={regularization_strength} must be positive (1.0 in RLKD).")
    n = values.shape[-1]
    scaled = values / regularization_strength
    ordered, perm = scaled.sort(dim=-1, descending=True)
    ordered = _bounded_gaps(ordered)
    w = torch.arange(n, 0, -1, device=values.device, dtype=values.dtype)
    ranks_sorted = ordered - _isotonic_nonincreasing(ordered - w)
    return ranks_sorted.gather(-1, perm.argsort(dim=-1))


def _bounded_gaps(ordered: torch.Tensor) -> torch.Tensor:
    """Descending values `(..., n)` moved to start at 0 with every gap between neighbours cut to n: the same soft
    ranks, but finite and small for any row of finite or ±inf values (teachers emit −inf, finfo.min, −1e30).

    Why the ranks do not change: with y = s − w (s descending, w = n … 1), a gap s_m − s_{m+1} > n − 1 makes every
    y above it exceed every y below it, so the isotonic regression splits there and each side's ranks depend only
    on the differences within that side (the operator is shift invariant). Cutting such a gap to n keeps it > n − 1
    and leaves the differences within each side as they were; equal values (−inf next to −inf) get a gap of 0.
    Without this, −inf gives inf − inf = NaN, and huge finite values lose the ranks to cancellation in the
    cumulative sums (finfo.min overflows them to −inf). The gradient is exact: zero across a cut gap, as the true
    ranks are locally constant there.
    """
    n = ordered.shape[-1]
    high, low = ordered[..., :-1], ordered[..., 1:]
    gaps = torch.where(high == low, torch.zeros_like(high), high - low).clamp(max=n)
    return torch.cat([ordered.new_zeros(ordered.shape[:-1] + (1,)), -gaps.cumsum(-1)], dim=-1)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise Pearson correlation of `a, b (m, n)` and whether it is defined (neither row constant)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    ss_a, ss_b = (a * a).sum(-1), (b * b).sum(-1)
    n = a.shape[-1]
    # Ranks are O(n); rounding leaves about n·eps in each, so a row is constant below this sum of squares.
    tol = 100.0 * n * (n * torch.finfo(a.dtype).eps) ** 2
    defined = (ss_a > tol) & (ss_b > tol)
    denom = torch.sqrt(torch.where(defined, ss_a * ss_b, torch.ones_like(ss_a)))
    return torch.where(defined, (a * b).sum(-1) / denom, torch.zeros_like(ss_a)), defined


# ---------------------------------------------------------------------------------------------------------------
# the candidate set: union of the two top-k


def union_groups(teacher_top: torch.Tensor, student_top: torch.Tensor, union: str = "exact"):
    """Split rows by candidate-set size and return `[(rows (g,), ids (g, n)), ...]`.

    `teacher_top, student_top (m, k)`: each model's top-k ids per row. "concat" keeps all 2k ids (the released
    RLKD code's behaviour: duplicates count twice); "exact" removes student ids already in the teacher's top-k,
    so a row has k … 2k distinct ids, and rows of equal size are processed together (at most k + 1 groups).
    """
    rows = torch.arange(teacher_top.shape[0], device=teacher_top.device)
    if union == "concat":
        return [(rows, torch.cat([teacher_top, student_top], dim=-1))]
    if union != "exact":
        raise ValueError(f"union={union!r} is not one of {UNIONS}.")
    duplicate = (student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)).any(-1)  # (m, k)
    n_new = (~duplicate).sum(-1)
    # New ids first, in the student's order (a stable sort on the duplicate flag).
    new_first = student_top.gather(-1, duplicate.to(torch.int8).argsort(dim=-1, stable=True))
    groups = []
    for size in n_new.unique().tolist():
        selected = rows[n_new == size]
        ids = torch.cat([teacher_top[selected], new_first[selected, :size]], dim=-1)
        groups.append((selected, ids))
    return groups


def topk_overlap(teacher_top: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
    """|top-k(p) ∩ top-k(q)| / k per row, from `(m, k)` id tensors (the OR@k of RLKD)."""
    return (student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)).any(-1).double().mean(-1)


def hard_rank_rows(soft: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Rows of `soft = soft_rank(values)` that equal the hard ranks: no two values were pooled by the isotonic
    regression, so the soft rank is locally constant there and passes no gradient (values far apart compared with
    the regularization strength)."""
    hard = values.argsort(dim=-1).argsort(dim=-1).to(soft.dtype) + 1.0
    return ((soft - hard).abs() <= 1e-6 * values.shape[-1]).all(-1)


def _rank_rows(
    student: torch.Tensor, teacher_values_fn, teacher_top, student_top, union, regularization_strength,
    stats: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """1 − ρ(soft ranks) per row of `student (m, V)` (scaled logits); `teacher_values_fn(rows, ids) -> (g, n)`.

    `stats`, when given, gains the counts behind the trainer's ranking diagnostics: "rows", "hard_rows" (student
    soft ranks equal to the hard ranks: no gradient) and "undefined_rows" (constant ranks: the row contributes 0).
    """
    if stats is not None:
        for key in ("rows", "hard_rows", "undefined_rows"):
            stats.setdefault(key, 0)
        stats["rows"] += student.shape[0]
    if student.shape[0] == 0:
        return student.sum(-1)  # keeps the graph, so an all-masked batch still back-propagates zeros
    loss = student.new_zeros(student.shape[0])
    for rows, ids in union_groups(teacher_top, student_top, union):
        values = student[rows].gather(-1, ids)
        student_ranks = soft_rank(values, regularization_strength)
        with torch.no_grad():
            teacher_ranks = soft_rank(teacher_values_fn(rows, ids), regularization_strength)
        rho, defined = pearson_rows(student_ranks, teacher_ranks)
        loss = loss.index_put((rows,), torch.where(defined, 1.0 - rho, torch.zeros_like(rho)))
        if stats is not None:
            with torch.no_grad():
                stats["hard_rows"] += int(hard_rank_rows(student_ranks.detach(), values.detach()).sum())
                stats["undefined_rows"] += int((~defined).sum())
    return loss


def _check_rank_options(k: int, vocab: int, union: str, regularization_strength: float, temperature: float) -> None:
    if not 1 <= k <= vocab:
        raise ValueError(f"rank k={k} must be in [1, V={vocab}] (RLKD uses k=5 with a KD loss).")
    if union not in UNIONS:
        raise ValueError(f"union={union!r} is not one of {UNIONS}.")
    if not regularization_strength > 0:
        raise ValueError(f"regularization_strength={regularization_strength} must be positive (1.0 in RLKD).")
    check_temperature(temperature)


def ranking_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    rank_k: int = 5,
    rank_union: str = "exact",
    regularization_strength: float = 1.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    stats: dict | None = None,
) -> Reduced:
    """RLKD ranking loss 1 − Spearman(soft ranks) over the union of both top-k, from full logits (Peng & Zhang 2024).

    Args:
        student_logits: (..., V) student logits; its soft ranks carry the gradient.
        teacher_logits: (..., V) teacher logits; its soft ranks are constants.
        rank_k: how many top tokens of each model enter the candidate set (5 with a KD loss, 10–15 alone).
        rank_union: "exact" (per-row union, duplicates removed) or "concat" (teacher then student top-k, duplicates
            kept).
        regularization_strength: ε of the soft rank; values are logits / temperature.
        mask, reduction: as in the divergences. A row with constant ranks (undefined correlation) contributes 0.
        stats: a dict that gains counts of the counted rows, of those whose soft ranks are hard (no gradient) and
            of those with an undefined correlation ("rows", "hard_rows", "undefined_rows"), summed over calls.

    Example:
        >>> s = torch.arange(8.0)  # student logits over V = 8; teachers: the same order, top 2 swapped, reversed
        >>> [round(float(ranking_loss(s, t, rank_k=5)), 4) for t in (s, s[[0, 1, 2, 3, 4, 5, 7, 6]], s.flip(-1))]
        [0.0, 0.1, 2.0]
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape (..., V); vocabulary sizes that differ by padding rows must be cut to the tokenizer's."
        )
    _check_rank_options(rank_k, student_logits.shape[-1], rank_union, regularization_strength, temperature)
    check_mask(mask, student_logits.shape[:-1])

    def per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(student)
        student = student.to(dtype) / temperature
        teacher = teacher.detach().to(dtype) / temperature
        return _rank_rows(
            student,
            lambda rows, ids: teacher[rows].gather(-1, ids),
            teacher.topk(rank_k, dim=-1).indices,
            student.detach().topk(rank_k, dim=-1).indices,
            rank_union,
            regularization_strength,
            stats,
        )

    return masked_token_loss(per_token, (student_logits, teacher_logits), student_logits.shape[:-1], mask, reduction)


def sparse_teacher_values(
    ids: torch.Tensor, teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """The teacher's log-probs at `ids (g, n)`, looked up in its top-K; `fill (g,)` where an id is not cached."""
    match = ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)  # (g, n, K)
    found = match.any(-1)
    # where, not match · logprobs: a −inf log-prob at a non-matching id would give 0 · −inf = NaN
    cached = teacher_topk_logprobs.unsqueeze(-2)
    value = torch.where(match, cached, torch.zeros_like(cached)).sum(-1)
    return torch.where(found, value, fill.unsqueeze(-1).expand_as(value))


def sparse_ranking_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    teacher_tail_logprob: torch.Tensor | None = None,
    rank_k: int = 5,
    rank_union: str = "exact",
    regularization_strength: float = 1.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    stats: dict | None = None,
) -> Reduced:
    """The ranking loss against a sparse teacher (top-K ids and log-probs, at the loss temperature).

    The teacher's top-k are the k best of its cached K (so k ≤ K). Teacher values are its log-probs (soft ranks
    are shift invariant, so log-probs rank exactly as logits do). A student top-k id outside the cached K gets
    the teacher value log(tail mass / (V − K)), the mean log-prob of an uncached token, which is never above the
    K-th cached one; several such ids tie. With K = V this is exactly `ranking_loss` on the teacher's logits.
    `stats` as in `ranking_loss`.
    """
    check_sparse_teacher(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, mask)
    vocab, cached = student_logits.shape[-1], teacher_topk_ids.shape[-1]
    _check_rank_options(rank_k, vocab, rank_union, regularization_strength, temperature)
    if rank_k > cached:
        raise ValueError(f"rank k={rank_k} exceeds the teacher's cached top-K={cached}; use k ≤ K or a larger cache.")
    tensors = (student_logits, teacher_topk_ids, teacher_topk_logprobs)
    if teacher_tail_logprob is not None:
        tensors = tensors + (teacher_tail_logprob,)

    def per_token(student, ids, logprobs, tail=None):
        dtype = _compute_dtype(student)
        student = student.to(dtype) / temperature
        logprobs = logprobs.detach().to(dtype)
        if tail is None:
            tail = log1mexp(torch.logsumexp(logprobs, dim=-1))
        fill = tail.to(dtype) - torch.log(torch.tensor(float(max(vocab - cached, 1)), dtype=dtype))
        best = logprobs.topk(rank_k, dim=-1).indices
        return _rank_rows(
            student,
            lambda rows, cand: sparse_teacher_values(cand, ids[rows], logprobs[rows], fill[rows]),
            ids.gather(-1, best).long(),
            student.detach().topk(rank_k, dim=-1).indices,
            rank_union,
            regularization_strength,
            stats,
        )

    return masked_token_loss(per_token, tensors, student_logits.shape[:-1], mask, reduction)
