"""Token-level divergences between the teacher distribution p and the student distribution q.

Every divergence is computed on *buckets*: log-probabilities `log_p`, `log_q` over the same last axis. The
dense form uses the full vocabulary as buckets; the sparse form (teacher given as top-K ids and log-probs, as a
cache or a remote teacher provides) uses the K cached ids, plus one tail bucket with `missing_mass="tail"`.
One formula per divergence, shared by both forms, so the sparse form with K = V is the dense form.

Sides (p = teacher, q = student, as in GKD and DistiLLM):
    fkl   KL(p‖q) = Σ p (log p − log q)                      forward KL, mean-seeking
    rkl   KL(q‖p) = Σ q (log q − log p)                      reverse KL, mode-seeking
    jsd   β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q         generalized JSD (GKD, Agarwal et al. 2024);
          β = 0 is exactly fkl and β = 1 exactly rkl (TRL's convention), the mixture taken in log space
    tvd   ½ Σ |p − q|                                        total variation distance
    skl   KL(p ‖ αp + (1−α)q)                                skew KL (DistiLLM, Ko et al. 2024)
    srkl  KL(q ‖ (1−α)p + αq)                                skew reverse KL (DistiLLM)
A term 0·log 0 is 0. docs/losses.md has the derivations and the tail policies.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlkd_onpolicy.losses.reduction import Reduced, check_mask, masked_token_loss

LOSSES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
MISSING_MASS = ("tail", "renormalize")


# ---------------------------------------------------------------------------------------------------------------
# validation


def check_loss_options(loss: str, beta: float = 0.5, skew_alpha: float = 0.1, temperature: float = 1.0) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} is outside [0, 1]; JSD(β) interpolates forward KL (β=0) and reverse KL (β=1).")
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha={skew_alpha} is outside [0, 1]; DistiLLM uses 0.1.")
    check_temperature(temperature)


def check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a positive finite number (1.0 leaves logits as they are).")


def _check_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student vocabulary size {student_logits.shape[-1]} != teacher vocabulary size "
            f"{teacher_logits.shape[-1]}. If one model only has extra padding rows, cut both logits to the "
            "tokenizer's length first."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape (..., V)."
        )
    check_mask(mask, student_logits.shape[:-1])


def check_sparse_teacher(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> None:
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape (..., K)."
        )
    if teacher_topk_ids.shape[:-1] != lead:
        raise ValueError(
            f"the teacher's top-K has leading shape {tuple(teacher_topk_ids.shape[:-1])} but student_logits have "
            f"{tuple(lead)}; both need one row per token."
        )
    k = teacher_topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"the teacher's top-K has K={k}, which must be in [1, V={vocab}].")
    if teacher_topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_topk_ids must be an integer tensor; got {teacher_topk_ids.dtype}.")
    if teacher_topk_ids.numel() and (int(teacher_topk_ids.min()) < 0 or int(teacher_topk_ids.max()) >= vocab):
        raise ValueError(
            f"teacher_topk_ids holds ids outside [0, {vocab}) (min {int(teacher_topk_ids.min())}, max "
            f"{int(teacher_topk_ids.max())}): the teacher's ids do not fit the student's vocabulary."
        )
    if teacher_tail_logprob is not None and teacher_tail_logprob.shape != lead:
        raise ValueError(
            f"teacher_tail_logprob has shape {tuple(teacher_tail_logprob.shape)}; expected the leading shape "
            f"{tuple(lead)}."
        )
    check_mask(mask, lead)


# ---------------------------------------------------------------------------------------------------------------
# the divergences on buckets


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision logits are upcast: a log-softmax over 100k+ entries in bf16 loses most of the KD signal.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _finite_logs(log_x: torch.Tensor) -> torch.Tensor:
    # log 0 = -inf becomes the most negative finite number: exp() still gives exactly 0, so 0·log 0 terms are 0 in
    # value *and* gradient, and no inf − inf can appear. No branch, no where-with-NaN-gradient trap.
    return log_x.clamp_min(torch.finfo(log_x.dtype).min)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ a (log a − log b) over the last axis, from finite log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1−w)·q) for 0 ≤ w ≤ 1, in log space."""
    if weight_p <= 0.0:
        return log_q
    if weight_p >= 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def bucket_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, loss: str = "fkl", *, beta: float = 0.5, skew_alpha: float = 0.1
) -> torch.Tensor:
    """Per-token divergence between teacher buckets `log_p (..., B)` and student buckets `log_q (..., B)` → (...).

    Both are log-probabilities over the same buckets; p is the teacher, q the student (see the module docstring).
    """
    log_p, log_q = _finite_logs(log_p), _finite_logs(log_q)
    if loss == "fkl" or (loss == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if loss == "rkl" or (loss == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if loss == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if loss == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if loss == "skl":
        return _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))
    if loss == "srkl":
        return _kl(log_q, _log_mixture(log_p, log_q, 1.0 - skew_alpha))
    raise ValueError(f"loss={loss!r} is not one of {LOSSES}.")


# ---------------------------------------------------------------------------------------------------------------
# dense form: full-vocabulary logits of both models


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "fkl",
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> Reduced:
    """Divergence `loss` between teacher and student next-token distributions, from full-vocabulary logits.

    Args:
        student_logits: (..., V) logits of the student (q).
        teacher_logits: (..., V) logits of the teacher (p); no gradient is needed through them.
        loss: one of "fkl" KL(p‖q), "rkl" KL(q‖p), "jsd" (with `beta`), "tvd", "skl"/"srkl" (with `skew_alpha`).
        temperature: both logits are divided by it before the softmax.
        mask: (...) bool, True where the token counts.
        reduction: "mean" (over counted tokens), "sum", "none" or "sum_count" (see `losses.reduction`).

    Example:
        >>> s, t = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
        >>> round(float(dense_divergence(s, t, "jsd", beta=0.5, mask=torch.tensor([True, False]))), 4)  # row 0 only
        0.1928
    """
    check_loss_options(loss, beta, skew_alpha, temperature)
    _check_dense(student_logits, teacher_logits, mask)

    def per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(student)
        log_q = F.log_softmax(student.to(dtype) / temperature, dim=-1)
        log_p = F.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        return bucket_divergence(log_p, log_q, loss, beta=beta, skew_alpha=skew_alpha)

    return masked_token_loss(per_token, (student_logits, teacher_logits), student_logits.shape[:-1], mask, reduction)


def forward_kl(student_logits, teacher_logits, temperature=1.0, mask=None, reduction="mean") -> Reduced:
    """Forward KL(p‖q), p the teacher, q the student: Σ_v p_v (log p_v − log q_v) per token (Hinton et al. 2015).

    Shapes as in `dense_divergence`: logits (..., V), mask (...).
        >>> s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])  # student, teacher logits
        >>> round(float(forward_kl(s, t)), 4), float(forward_kl(s, s))
        (0.9957, 0.0)
    """
    return dense_divergence(student_logits, teacher_logits, "fkl", temperature=temperature, mask=mask,
                            reduction=reduction)


def reverse_kl(student_logits, teacher_logits, temperature=1.0, mask=None, reduction="mean") -> Reduced:
    """Reverse KL(q‖p), q the student, p the teacher: Σ_v q_v (log q_v − log p_v) per token (MiniLLM, Gu et al. 2024).

        >>> s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])  # student, teacher logits
        >>> round(float(reverse_kl(s, t)), 4)
        0.7299
    """
    return dense_divergence(student_logits, teacher_logits, "rkl", temperature=temperature, mask=mask,
                            reduction=reduction)


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, mask=None, reduction="mean") -> Reduced:
    """Generalized JSD(β) of GKD (Agarwal et al. 2024): β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q.

    p is the teacher and q the student; β = 0 is exactly forward KL(p‖q) and β = 1 exactly reverse KL(q‖p)
    (TRL's convention; the unscaled formula itself tends to 0 at both ends). With `mask` and reduction "mean"
    this equals TRL's `GKDTrainer.generalized_jsd_loss(..., labels=-100 where masked, reduction="batchmean")`.

        >>> s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])  # student, teacher logits
        >>> [round(float(generalized_jsd(s, t, beta=beta)), 4) for beta in (0.0, 0.5, 1.0)]  # fkl, JSD, rkl
        [0.9957, 0.1928, 0.7299]
    """
    return dense_divergence(student_logits, teacher_logits, "jsd", beta=beta, temperature=temperature, mask=mask,
                            reduction=reduction)


def total_variation(student_logits, teacher_logits, temperature=1.0, mask=None, reduction="mean") -> Reduced:
    """Total variation distance ½ Σ_v |p_v − q_v| per token (symmetric, bounded by 1; Wen et al. 2023 f-distill).

        >>> s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])  # student, teacher logits
        >>> round(float(total_variation(s, t)), 4)
        0.5752
    """
    return dense_divergence(student_logits, teacher_logits, "tvd", temperature=temperature, mask=mask,
                            reduction=reduction)


def skew_kl(student_logits, teacher_logits, skew_alpha=0.1, temperature=1.0, mask=None, reduction="mean") -> Reduced:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(p ‖ αp + (1−α)q), p the teacher, q the student; α = 0 is forward KL.

        >>> s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])  # student, teacher logits
        >>> [round(float(skew_kl(s, t, skew_alpha=alpha)), 4) for alpha in (0.0, 0.1)]  # α = 0: forward KL
        [0.9957, 0.6889]
    """
    return dense_divergence(student_logits, teacher_logits, "skl", skew_alpha=skew_alpha, temperature=temperature,
                            mask=mask, reduction=reduction)


def skew_reverse_kl(
    student_logits, teacher_logits, skew_alpha=0.1, temperature=1.0, mask=None, reduction="mean"
) -> Reduced:
    """Skew reverse KL of DistiLLM: KL(q ‖ (1−α)p + αq), q the student, p the teacher; α = 0 is reverse KL.

        >>> s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]])  # student, teacher logits
        >>> [round(float(skew_reverse_kl(s, t, skew_alpha=alpha)), 4) for alpha in (0.0, 0.1)]  # α = 0: reverse KL
        [0.7299, 0.5938]
    """
    return dense_divergence(student_logits, teacher_logits, "srkl", skew_alpha=skew_alpha, temperature=temperature,
                            mask=mask, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# sparse form: the teacher as top-K ids and log-probs


class TeacherTopK(NamedTuple):
    """A sparse teacher: `ids (..., K)` sorted by decreasing log-prob, `logprobs (..., K)` over the full vocabulary,
    `tail_logprob (...)` = log of the mass outside the K ids."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012); x is clamped to ≤ 0 first."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """The sparse form of a teacher from its logits `(..., V)`: what a cache stores and an online teacher feeds.

    Log-probs are at `temperature` and in float32 (or float64 for float64 logits); `tail_logprob` is computed from
    the full distribution, not from the K log-probs, so it stays exact when their sum rounds to 1.
    """
    check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, V={vocab}].")
    logprobs = F.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, top.indices, float("-inf"))
    return TeacherTopK(top.indices, top.values, torch.logsumexp(rest, dim=-1))


def sparse_buckets(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    missing_mass: str = "tail",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student bucket log-probs `(log_p, log_q)` for a sparse teacher, rows flattened or not.

    `renormalize`: K buckets, both distributions restricted to the teacher's K ids and renormalised there.
    `tail`: K + 1 buckets, the K ids plus one bucket holding each side's mass outside them. The student's tail is
    computed from its full distribution (log-sum-exp over the other V − K logits); with K = V both tails are 0.
    """
    dtype = _compute_dtype(student_logits)
    scaled = student_logits.to(dtype) / temperature
    teacher_lp = teacher_topk_logprobs.to(dtype)
    gathered = scaled.gather(-1, teacher_topk_ids.long())
    if missing_mass == "renormalize":
        return teacher_lp - torch.logsumexp(teacher_lp, -1, keepdim=True), F.log_softmax(gathered, dim=-1)
    if missing_mass != "tail":
        raise ValueError(f"missing_mass={missing_mass!r} is not one of {MISSING_MASS}.")
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    if teacher_topk_ids.shape[-1] == scaled.shape[-1]:
        # K = V: no token is outside, both tails are exactly 0 (a tail derived from the K log-probs would be
        # rounding noise, and noise against an exact 0 is an infinite KL).
        no_tail = torch.full_like(lse, float("-inf"))
        log_p = torch.cat([teacher_lp, no_tail], dim=-1)
        return log_p, torch.cat([gathered - lse, no_tail], dim=-1)
    outside = scaled.scatter(-1, teacher_topk_ids.long(), float("-inf"))
    student_tail = torch.logsumexp(outside, dim=-1, keepdim=True) - lse
    if teacher_tail_logprob is None:
        teacher_tail = log1mexp(torch.logsumexp(teacher_lp, dim=-1, keepdim=True))
    else:
        teacher_tail = teacher_tail_logprob.to(dtype).unsqueeze(-1)
    log_p = torch.cat([teacher_lp, teacher_tail], dim=-1)
    log_q = torch.cat([gathered - lse, student_tail], dim=-1)
    return log_p, log_q


def sparse_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    loss: str = "fkl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    missing_mass: str = "tail",
    teacher_tail_logprob: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> Reduced:
    """Divergence `loss` between a sparse teacher (top-K) and the student's full distribution.

    Args:
        student_logits: (..., V) student logits (q), divided by `temperature`.
        teacher_topk_ids: (..., K) the teacher's top-K token ids.
        teacher_topk_logprobs: (..., K) the teacher's log-probs at those ids, over the full vocabulary, already at
            the loss temperature (a cache records the temperature it was built with).
        teacher_tail_logprob: (...) log of the teacher's mass outside the K ids; when None it is log(1 − Σ p_K).
        missing_mass: "tail" (K+1 buckets, exact for fkl up to the tail's inner shape) or "renormalize" (K buckets).
        loss, beta, skew_alpha, mask, reduction: as in `dense_divergence`.

    Reverse KL, JSD, TVD and the skews on a sparse teacher are defined on the buckets only: the divergence between
    the two distributions *coarsened* to the K ids (+ tail), a lower bound of the full-vocabulary value.

    Example:
        >>> s, t = torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 0.0, 0.0]])
        >>> top = teacher_topk(t, k=2)  # the teacher's 2 best ids, their log-probs and the tail's log-mass
        >>> loss = sparse_divergence(s, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob)
        >>> round(float(loss), 4), round(float(forward_kl(s, t)), 4)  # 2 ids + tail vs. the full vocabulary
        (2.1739, 2.1821)
    """
    check_loss_options(loss, beta, skew_alpha, temperature)
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass={missing_mass!r} is not one of {MISSING_MASS}.")
    check_sparse_teacher(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, mask)
    tensors = (student_logits, teacher_topk_ids, teacher_topk_logprobs)
    if teacher_tail_logprob is not None:
        tensors = tensors + (teacher_tail_logprob,)

    def per_token(student, ids, logprobs, tail=None):
        log_p, log_q = sparse_buckets(student, ids, logprobs, tail, temperature=temperature, missing_mass=missing_mass)
        return bucket_divergence(log_p, log_q, loss, beta=beta, skew_alpha=skew_alpha)

    return masked_token_loss(per_token, tensors, student_logits.shape[:-1], mask, reduction)
