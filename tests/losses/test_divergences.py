"""Divergences, dense and sparse, against the plain float64 reference in loss_reference.py."""

import pytest
import torch
from loss_reference import dense_per_token, sparse_per_token

from rlkd_onpolicy.losses import (
    LOSSES,
    dense_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    sparse_divergence,
    teacher_topk,
    total_variation,
)

OPTS = {"beta": 0.3, "skew_alpha": 0.2}


def _ref_kw(loss):
    return {"beta": OPTS["beta"], "alpha": OPTS["skew_alpha"]}


def _logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # 2.0: temperature divides both sides' logits
def test_dense_matches_reference(loss, temperature):
    s, t = _logits(2, 5, 23, seed=1), _logits(2, 5, 23, seed=2)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    got = dense_divergence(s, t, loss, temperature=temperature, mask=mask, reduction="none", **OPTS)
    ref = dense_per_token(s.reshape(-1, 23), t.reshape(-1, 23), loss, temperature, **_ref_kw(loss))
    ref = torch.tensor(ref, dtype=torch.float64).reshape(2, 5) * mask
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    mean = dense_divergence(s, t, loss, temperature=temperature, mask=mask, reduction="mean", **OPTS)
    torch.testing.assert_close(mean, ref.sum() / mask.sum(), rtol=1e-10, atol=1e-12)
    total, count = dense_divergence(s, t, loss, temperature=temperature, mask=mask, reduction="sum_count", **OPTS)
    assert int(count) == int(mask.sum())
    torch.testing.assert_close(total, ref.sum(), rtol=1e-10, atol=1e-12)


def test_named_functions_are_the_dense_divergences():
    s, t = _logits(4, 17, seed=4), _logits(4, 17, seed=5)
    pairs = [
        (forward_kl(s, t), "fkl", {}),
        (reverse_kl(s, t), "rkl", {}),
        (generalized_jsd(s, t, beta=0.3), "jsd", {"beta": 0.3}),
        (total_variation(s, t), "tvd", {}),
        (skew_kl(s, t, skew_alpha=0.2), "skl", {"alpha": 0.2}),
        (skew_reverse_kl(s, t, skew_alpha=0.2), "srkl", {"alpha": 0.2}),
    ]
    for got, loss, kw in pairs:
        ref = torch.tensor(dense_per_token(s, t, loss, **kw), dtype=torch.float64).mean()
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=loss)


def test_jsd_endpoints_are_exactly_the_kls():
    s, t = _logits(3, 11, seed=6), _logits(3, 11, seed=7)
    assert torch.equal(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    torch.testing.assert_close(skew_kl(s, t, skew_alpha=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, skew_alpha=0.0), reverse_kl(s, t))
    assert skew_kl(s, t, skew_alpha=1.0).abs() < 1e-12  # KL(p‖p)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])  # both special-cased ends and two interior mixtures
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_equals_trl(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    s, t = _logits(3, 6, 31, seed=8).float(), _logits(3, 6, 31, seed=9).float()
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(10)) > 0.4
    labels = torch.where(mask, torch.zeros(3, 6, dtype=torch.long), torch.full((3, 6), -100))
    ours = generalized_jsd(s, t, beta=beta, temperature=temperature, mask=mask)
    trl = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_dense_gradcheck(loss):
    s = _logits(3, 7, seed=11).requires_grad_()
    t = _logits(3, 7, seed=12)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda x: dense_divergence(x, t, loss, temperature=1.3, mask=mask, **OPTS), (s,), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_sparse_matches_reference(loss, missing_mass):
    s, t = _logits(6, 19, seed=13), _logits(6, 19, seed=14)
    top = teacher_topk(t, 5)
    got = sparse_divergence(s, top.ids, top.logprobs, loss=loss, missing_mass=missing_mass, reduction="none", **OPTS)
    ref = sparse_per_token(s, top.ids, top.logprobs, loss, missing_mass, **_ref_kw(loss))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # the tail given explicitly (as a cache stores it) gives the same
    given = sparse_divergence(s, top.ids, top.logprobs, loss=loss, missing_mass=missing_mass,
                              teacher_tail_logprob=top.tail_logprob, reduction="none", **OPTS)
    torch.testing.assert_close(given, got, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
@pytest.mark.parametrize("given_tail", [True, False])  # tail from the cache, or derived from the K log-probs
def test_sparse_with_k_equal_v_is_dense(loss, missing_mass, given_tail):
    s, t = _logits(2, 4, 13, seed=15).requires_grad_(), _logits(2, 4, 13, seed=16)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    dense = dense_divergence(s, t, loss, temperature=1.5, mask=mask, **OPTS)
    top = teacher_topk(t, 13, temperature=1.5)  # a sparse teacher is given at the loss temperature
    # shuffle the K columns: the sparse form must not assume sorted ids
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    sparse = sparse_divergence(s, top.ids[..., perm], top.logprobs[..., perm], loss=loss, missing_mass=missing_mass,
                               teacher_tail_logprob=top.tail_logprob if given_tail else None, temperature=1.5,
                               mask=mask, **OPTS)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_dense,) = torch.autograd.grad(dense, s)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("missing_mass", ["tail", "renormalize"])
def test_sparse_gradcheck(loss, missing_mass):
    s = _logits(3, 9, seed=17).requires_grad_()
    top = teacher_topk(_logits(3, 9, seed=18), 4)
    assert torch.autograd.gradcheck(
        lambda x: sparse_divergence(x, top.ids, top.logprobs, loss=loss, missing_mass=missing_mass,
                                    temperature=0.8, **OPTS),
        (s,), eps=1e-6, atol=1e-5,
    )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sum_count"])
def test_fully_masked_gives_zero_and_zero_gradients(loss, reduction):
    s = _logits(2, 3, 10, seed=19).float().requires_grad_()
    t = _logits(2, 3, 10, seed=20).float()
    t[0, 0] = float("inf")  # garbage in masked rows must not leak
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for out in (
        dense_divergence(s, t, loss, mask=mask, reduction=reduction),
        sparse_divergence(s, teacher_topk(torch.randn(2, 3, 10), 4).ids, torch.full((2, 3, 4), -2.0),
                          loss=loss, mask=mask, reduction=reduction),
    ):
        value = out[0] if reduction == "sum_count" else out
        assert torch.all(value == 0)
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.all(grad == 0)
        if reduction == "sum_count":
            assert int(out[1]) == 0


def test_zero_probabilities_give_finite_values_and_gradients():
    # both models put -inf on some tokens (e.g. a masked vocabulary): 0·log 0 must be 0, gradients finite
    s = torch.randn(4, 12, dtype=torch.float64)
    t = torch.randn(4, 12, dtype=torch.float64)
    s[:, :3] = float("-inf")
    t[:, :3] = float("-inf")
    s.requires_grad_()
    for loss in LOSSES:
        value = dense_divergence(s, t, loss, **OPTS)
        ref = dense_per_token(s.detach()[:, 3:], t[:, 3:], loss, **_ref_kw(loss))
        torch.testing.assert_close(value, torch.tensor(ref, dtype=torch.float64).mean(), rtol=1e-9, atol=1e-12)
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(grad).all(), loss


def test_half_precision_is_computed_in_float32():
    s, t = _logits(4, 50, seed=21), _logits(4, 50, seed=22)
    ref = forward_kl(s.bfloat16().double(), t.bfloat16().double())
    got = forward_kl(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


# -- bad input: a ValueError naming the values ------------------------------------------------------------------


def test_vocabulary_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"student vocabulary size 10 != teacher vocabulary size 12"):
        forward_kl(torch.randn(2, 10), torch.randn(2, 12))


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_out_of_range(beta):
    with pytest.raises(ValueError, match=rf"beta={beta}"):
        generalized_jsd(torch.randn(2, 5), torch.randn(2, 5), beta=beta)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature="):
        forward_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=temperature)


def test_mask_of_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match=r"mask has shape \(3,\).*leading shape \(2,\)"):
        forward_kl(torch.randn(2, 5), torch.randn(2, 5), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        forward_kl(torch.randn(2, 5), torch.randn(2, 5), mask=torch.ones(2))


def test_unknown_loss_reduction_and_policy():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="loss='kl2'"):
        dense_divergence(s, t, "kl2")
    with pytest.raises(ValueError, match="reduction='avg'"):
        dense_divergence(s, t, "fkl", reduction="avg")
    top = teacher_topk(t, 2)
    with pytest.raises(ValueError, match="missing_mass='zero'"):
        sparse_divergence(s, top.ids, top.logprobs, missing_mass="zero")


def test_sparse_teacher_shape_and_id_checks():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"k=6 must be in \[1, V=5\]"):
        teacher_topk(s, 6)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        sparse_divergence(s, torch.tensor([[0, 7], [1, 2]]), torch.full((2, 2), -1.0))
    with pytest.raises(ValueError, match="same shape"):
        sparse_divergence(s, torch.tensor([[0, 1], [1, 2]]), torch.full((2, 3), -1.0))
