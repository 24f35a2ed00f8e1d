"""Soft ranks and the RLKD ranking loss against plain float64 references."""

import itertools

import pytest
import torch
from loss_reference import pearson, rank_loss_per_token, soft_rank_pav

from rlkd_onpolicy._imports import is_torchsort_available
from rlkd_onpolicy.losses import distillation_loss, ranking_loss, soft_rank, sparse_ranking_loss, teacher_topk


def _values(*shape, scale=2.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _projection_by_qp(z: list[float]) -> list[float]:
    """Euclidean projection of z onto the permutahedron of (n, …, 1), solved as a generic QP with scipy.

    Fully independent of sorting/isotonic regression: the permutahedron is {μ : Σ_S μ ≤ sum of the |S| largest
    w for every subset S, with equality for the whole set}.
    """
    from scipy.optimize import minimize

    n = len(z)
    w = sorted(range(1, n + 1), reverse=True)
    cons = [{"type": "eq", "fun": lambda m: sum(m) - sum(w)}]
    for size in range(1, n):
        bound = sum(w[:size])
        for subset in itertools.combinations(range(n), size):
            cons.append({"type": "ineq", "fun": lambda m, s=subset, b=bound: b - sum(m[i] for i in s)})
    res = minimize(lambda m: 0.5 * sum((m[i] - z[i]) ** 2 for i in range(n)), x0=[sum(w) / n] * n,
                   constraints=cons, method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    assert res.success
    return list(res.x)


@pytest.mark.parametrize("seed", range(4))
def test_soft_rank_is_the_permutahedron_projection(seed):
    values = _values(5, scale=0.7, seed=seed)  # small spread: several pooled blocks
    got = soft_rank(values.unsqueeze(0), 1.0)[0]
    torch.testing.assert_close(got, torch.tensor(_projection_by_qp(values.tolist()), dtype=torch.float64),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("strength", [0.1, 1.0, 3.0])
def test_soft_rank_matches_pav_reference(strength):
    values = _values(64, 9, seed=1)
    got = soft_rank(values, strength)
    ref = torch.tensor([soft_rank_pav(row.tolist(), strength) for row in values], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_soft_rank_tends_to_hard_rank():
    values = _values(32, 12, seed=2)
    hard = values.argsort(-1).argsort(-1).double() + 1
    errors = [(soft_rank(values, eps) - hard).abs().max().item() for eps in (1.0, 1e-1, 1e-2, 1e-4)]
    assert errors[0] > errors[-1]
    assert errors[-1] < 1e-9  # gaps between values exceed ε·n here, so the projection is a vertex


@pytest.mark.skipif(not is_torchsort_available(), reason="torchsort is not installed (optional: pip install torchsort)")
def test_soft_rank_matches_torchsort():
    import torchsort

    values = _values(16, 10, seed=3).float()
    for strength in (0.5, 1.0):
        expected = torchsort.soft_rank(values, regularization_strength=strength)
        torch.testing.assert_close(soft_rank(values, strength), expected)


def test_soft_rank_gradcheck():
    values = _values(4, 6, scale=0.5, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: soft_rank(v, 0.7), (values,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("union", ["exact", "concat"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # ranks are on logits / temperature
def test_ranking_loss_matches_reference(union, k, temperature):
    s, t = _values(3, 4, 30, seed=5), _values(3, 4, 30, seed=6)
    s[0, 0] = t[0, 0] * 0.9 + 0.1  # one student close to the teacher: overlapping top-k, small loss
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(7)) > 0.3
    got = ranking_loss(s, t, rank_k=k, rank_union=union, temperature=temperature, mask=mask, reduction="none")
    ref = rank_loss_per_token((s / temperature).reshape(-1, 30), (t / temperature).reshape(-1, 30), k, union)
    ref = torch.tensor(ref, dtype=torch.float64).reshape(3, 4) * mask
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_ranking_loss_orders():
    t = _values(8, 40, seed=8)
    assert ranking_loss(t.clone(), t) < 1e-12  # identical logits: Spearman 1
    assert ranking_loss(-t, t) > 1.0  # reversed preferences: negative correlation


def test_ranking_loss_gradcheck_and_teacher_gets_no_gradient():
    s = _values(5, 12, seed=9).requires_grad_()
    t = _values(5, 12, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ranking_loss(x, t.detach(), rank_k=3), (s,), eps=1e-7, atol=1e-6)
    ranking_loss(s, t, rank_k=3).backward()
    assert t.grad is None or torch.all(t.grad == 0)
    assert s.grad.abs().sum() > 0


def test_constant_ranks_contribute_zero_not_nan():
    s = torch.zeros(3, 10, dtype=torch.float64, requires_grad=True)  # constant values: constant soft ranks
    t = _values(3, 10, seed=11)
    loss = ranking_loss(s, t, rank_k=4, reduction="none")
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert pearson([1.0, 1.0], [1.0, 2.0]) is None  # the reference agrees the correlation is undefined


def test_fully_masked_ranking_loss():
    s = _values(2, 3, 10, seed=12).requires_grad_()
    loss = ranking_loss(s, _values(2, 3, 10, seed=13), mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss == 0
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("union", ["exact", "concat"])
def test_sparse_ranking_with_k_equal_v_is_dense(union):
    s, t = _values(6, 15, seed=14).requires_grad_(), _values(6, 15, seed=15)
    top = teacher_topk(t, 15, temperature=1.5)
    sparse = sparse_ranking_loss(s, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob, rank_k=4,
                                 rank_union=union, temperature=1.5)
    dense = ranking_loss(s, t, rank_k=4, rank_union=union, temperature=1.5)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-10)
    g1, g2 = torch.autograd.grad(sparse, s), torch.autograd.grad(dense, s)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)


def test_sparse_ranking_fills_uncached_ids_with_the_mean_tail_logprob():
    s, t = _values(5, 20, seed=16), _values(5, 20, seed=17)
    top = teacher_topk(t, 6)
    got = sparse_ranking_loss(s, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob, rank_k=3,
                              reduction="none")
    # reference: the teacher as a full vector, cached ids at their log-probs, every other id at log(tail / (V − K))
    full = torch.full((5, 20), 0.0, dtype=torch.float64)
    full += (top.tail_logprob - torch.log(torch.tensor(14.0, dtype=torch.float64))).unsqueeze(-1)
    full.scatter_(-1, top.ids, top.logprobs)
    ref = rank_loss_per_token(s, full, 3)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-10)


def test_rank_bad_input():
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"rank k=7 must be in \[1, V=6\]"):
        ranking_loss(s, t, rank_k=7)
    with pytest.raises(ValueError, match="union='set'"):
        ranking_loss(s, t, rank_union="set")
    with pytest.raises(ValueError, match="regularization_strength=0"):
        ranking_loss(s, t, regularization_strength=0)
    top = teacher_topk(t, 3)
    with pytest.raises(ValueError, match=r"rank k=4 exceeds the teacher's cached top-K=3"):
        sparse_ranking_loss(s, top.ids, top.logprobs, rank_k=4)
    with pytest.raises(ValueError, match="same shape"):
        ranking_loss(s, torch.randn(2, 7))


# Teachers emit −inf (masked or suppressed tokens, padding rows set to −inf by logits processors), finfo.min or
# −1e30 (processors that mask with "a very negative number"); each case is one of these.
EXTREMES = [float("-inf"), torch.finfo(torch.float32).min, -1e30]


def _with_extremes(values: torch.Tensor, extreme: float) -> torch.Tensor:
    """Rows of `values (m, V)` where row r keeps its first r % 8 + 1 entries and the rest are `extreme` (so some
    rows have fewer finite entries than the top-k, and the extremes tie among themselves)."""
    out = values.clone()
    keep = torch.arange(values.shape[0]).unsqueeze(-1) % 8 + 1
    out[torch.arange(values.shape[-1]).unsqueeze(0) >= keep] = extreme
    return out


def _stand_in(values: torch.Tensor) -> torch.Tensor:
    """The same rows in float64 with every extreme replaced by one finite value 1000 below the row's finite minimum:
    soft ranks stop changing once a value is more than (n − 1)·ε below the others, so this is their limit."""
    values = values.double()
    extreme = values < -1e29
    low = values.masked_fill(extreme, float("inf")).min(-1, keepdim=True).values - 1000.0
    return torch.where(extreme, low, values)


@pytest.mark.parametrize("strength", [1.0, 0.1])  # 0.1: finfo.min / ε overflows to −inf inside the operator
@pytest.mark.parametrize("extreme", EXTREMES)
def test_soft_rank_of_extreme_values_is_their_limit(extreme, strength):
    """Issue 15, defect 1, at its source: −inf gave NaN soft ranks (inf − inf in the isotonic step) and finfo.min or
    −1e30 wrong ones (cancellation and overflow in the cumulative sums). They must be the finite limit."""
    values = _with_extremes(_values(24, 9, seed=20).float(), extreme)
    got = soft_rank(values, strength)
    ref = torch.tensor([soft_rank_pav(row.tolist(), strength) for row in _stand_in(values)], dtype=torch.float64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def _loss_and_grad(student, teacher, sparse: bool, k: int = 5):
    student = student.detach().clone().requires_grad_()
    if sparse:  # the teacher's top-8, as a cache or `teacher_top_k` gives it
        top = teacher_topk(teacher, 8)
        loss = sparse_ranking_loss(student, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob, rank_k=k)
    else:
        loss = ranking_loss(student, teacher, rank_k=k)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


@pytest.mark.parametrize("sparse", [False, True])  # full teacher logits; the teacher's top-K
@pytest.mark.parametrize("extreme", EXTREMES)
def test_ranking_gradient_is_finite_when_the_teacher_holds_extreme_logits(extreme, sparse):
    """Issue 15, defect 1: with the teacher's logits at −inf, finfo.min or −1e30 beyond a few tokens the loss stayed
    finite but its gradient was NaN (every seed at −inf), so a run stopped or skipped every step. 40 rows here, and
    the loss and gradient must equal those of the finite limit (`_stand_in`), computed in float64."""
    student = _values(40, 50, seed=21).float()
    teacher = _with_extremes(_values(40, 50, seed=22).float(), extreme)
    loss, grad = _loss_and_grad(student, teacher, sparse)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = _loss_and_grad(student.double(), _stand_in(teacher), sparse)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-5)
    assert grad.abs().sum() > 0  # the rows with finite teacher values still train


# -- diagnostics: the row counts behind the trainer's rank_hard_fraction / rank_undefined_fraction ----------------


def test_stats_count_hard_rows_which_pass_no_gradient():
    torch.manual_seed(0)
    teacher = torch.randn(6, 40, dtype=torch.float64)
    for scale, expect_hard in ((100.0, True), (0.01, False)):
        # distinct values `scale` apart: far apart (100) no two candidates pool; close (0.01) all of them do
        student = torch.stack([torch.randperm(40) for _ in range(6)]).double().mul(scale).requires_grad_()
        stats: dict = {}
        ranking_loss(student, teacher, rank_k=5, regularization_strength=1.0, reduction="sum", stats=stats).backward()
        assert stats["rows"] == 6 and stats["undefined_rows"] == 0, stats
        # far-apart logits: every row's soft ranks are the hard ranks and the gradient is exactly zero
        assert stats["hard_rows"] == (6 if expect_hard else 0), (scale, stats)
        assert bool((student.grad == 0).all()) == expect_hard, scale


def test_stats_count_undefined_rows_and_only_counted_tokens():
    student = torch.randn(2, 3, 30, dtype=torch.float64)
    teacher = torch.randn(2, 3, 30, dtype=torch.float64)
    teacher[0, 0] = 0.0  # a constant teacher row: its ranks are constant, the correlation undefined
    mask = torch.tensor([[True, True, False], [True, False, False]])
    stats: dict = {}
    ranking_loss(student, teacher, rank_k=4, mask=mask, stats=stats)
    ranking_loss(student, teacher, rank_k=4, mask=mask, stats=stats)  # counts add up over calls
    assert stats == {"rows": 6, "hard_rows": stats["hard_rows"], "undefined_rows": 2}, stats


def test_sparse_stats_match_dense_with_the_full_vocabulary():
    torch.manual_seed(1)
    student = torch.randn(5, 12, dtype=torch.float64) * 3
    teacher = torch.randn(5, 12, dtype=torch.float64) * 3
    logprobs = teacher.log_softmax(-1)
    dense, sparse = {}, {}
    ranking_loss(student, teacher, rank_k=3, stats=dense)
    ids = torch.arange(12).expand(5, 12)
    sparse_ranking_loss(student, ids, logprobs, rank_k=3, stats=sparse)
    assert dense == sparse and dense["rows"] == 5, (dense, sparse)


def test_distillation_loss_passes_rank_stats_through():
    stats: dict = {}
    distillation_loss(torch.randn(2, 4, 20), torch.randn(2, 4, 20), rank_weight=2.0, rank_stats=stats)
    assert stats["rows"] == 8
    untouched: dict = {}
    distillation_loss(torch.randn(2, 4, 20), torch.randn(2, 4, 20), rank_weight=0.0, rank_stats=untouched)
    assert untouched == {}
