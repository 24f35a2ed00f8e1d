"""Distillation losses between two vocabularies, per aligned span (align.py).

Per span, each side's distribution is merged by GOLD's rule (TRL `uld_token_merge_strategy="observed"`, with each
distribution read where it predicts its token): the distribution predicting the span's first token, multiplied by the
probabilities the same model gives the span's later tokens,

    m(v) = q_first(v) · Π_{t > first in span} q_t(x_t),        log m = log q_first + Σ log q_t(x_t).

The entry of the observed first token is then the probability of the whole span; m sums to at most 1. Single-token
spans (most spans when the tokenizers are alike) are the plain next-token distribution. Then, per span (p = teacher):

- shared divergence (`use_uld_loss=False`, and the matched part of the hybrid): the configured divergence D
  (fkl, rkl, jsd, ...) between the two merged distributions coarsened to the S shared entries (VocabularyMap) plus one
  bucket holding the rest of each side's mass (1 − Σ_shared m), so both sides are proper distributions. GOLD compares
  the unnormalised shared entries; the extra bucket keeps D a divergence. With identical tokenizers there is no rest,
  and D is exactly the same-vocabulary loss.
- ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"):
  Σ_i |sort(m_student)_i − sort(m_teacher)_i|, both sorted descending and the shorter padded with zeros; the
  Wasserstein-1 distance between the two distributions with their entries as points ordered by probability.
- hybrid (GOLD): w_matched · D(shared + rest) + w_unmatched · ULD over the entries only one side has; by default
  w_matched = S / V_teacher and w_unmatched = 1 − w_matched (GOLD's adaptive weights).
- ranking (RLKD, Peng & Zhang 2024, across vocabularies: new here): 1 − Spearman of the soft ranks of the two merged
  distributions over the shared entries, on the union of each side's top-k of them (k capped at S). Ranks of log m
  are those of the first position's shared log-probs (the continuation is one factor per span).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlkd_onpolicy.losses import DistillationLoss, LossSpec, bucket_divergence, ranking_loss
from rlkd_onpolicy.losses.divergences import log1mexp

from .vocabulary import VocabularyMap


class SpanIndex(NamedTuple):
    """M spans over flattened token rows: tokens `student_start[i] : student_end[i]` of the student's rows and
    `teacher_start[i] : teacher_end[i]` of the teacher's rows, each (M,) int64."""

    student_start: torch.Tensor
    student_end: torch.Tensor
    teacher_start: torch.Tensor
    teacher_end: torch.Tensor


@dataclass(frozen=True)
class CrossTokenizerSpec:
    """TRL GOLDConfig's ULD fields (same names without the `uld_` prefix, same meanings and defaults)."""

    use_uld_loss: bool = False  # ULD (or the hybrid) instead of the shared divergence alone
    use_hybrid_loss: bool = False  # with use_uld_loss: D on shared entries + ULD on the rest
    hybrid_matched_weight: float | None = None  # None = adaptive, S / V_teacher
    hybrid_unmatched_weight: float | None = None  # None = adaptive, 1 − S / V_teacher
    crossentropy_weight: float = 0.0  # weight of the student's cross-entropy on its own tokens
    distillation_weight: float = 1.0  # weight of the distillation term (D, ULD or hybrid)
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0


def merged_span_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, start: torch.Tensor,
                         end: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """log m (M, V) of each span (see the module): `logprobs (N, V)` predicting tokens `token_ids (N,)`, spans of
    tokens start[i] : end[i] (each end > start)."""
    token_lp = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    lengths = end - start
    span_of = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths  # where each span's tokens begin in the flat list
    tokens = start[span_of] + torch.arange(span_of.numel(), device=start.device) - first[span_of]
    later = tokens > start[span_of]  # the continuation tokens of each span
    continuation = token_lp.new_zeros(start.numel()).index_add(0, span_of[later], token_lp[tokens[later]])
    return logprobs[start] + continuation.unsqueeze(-1)


def shared_divergence(log_student: torch.Tensor, log_teacher: torch.Tensor, vocabulary: VocabularyMap,
                      loss: str = "fkl", *, beta: float = 0.5, skew_alpha: float = 0.1) -> torch.Tensor:  # fmt: skip
    """D(p ‖ q) per span (M,) over the shared entries plus one bucket for the rest of each side's mass."""
    log_q, log_p = log_student[:, vocabulary.student_ids], log_teacher[:, vocabulary.teacher_ids]
    if not vocabulary.identical:
        log_q = torch.cat([log_q, log1mexp(torch.logsumexp(log_q, -1, keepdim=True))], dim=-1)
        log_p = torch.cat([log_p, log1mexp(torch.logsumexp(log_p, -1, keepdim=True))], dim=-1)
    return bucket_divergence(log_p, log_q, loss, beta=beta, skew_alpha=skew_alpha)


def uld_distance(log_student: torch.Tensor, log_teacher: torch.Tensor) -> torch.Tensor:
    """ULD per row (M,): Σ_i |sort(p_s)_i − sort(p_t)_i| over probabilities sorted descending, zero-padded.

        >>> p_student, p_teacher = torch.tensor([[0.1, 0.7, 0.2]]), torch.tensor([[0.4, 0.6]])
        >>> round(float(uld_distance(p_student.log(), p_teacher.log())), 4)  # |.7-.6| + |.2-.4| + |.1-0|
        0.4
    """
    student, teacher = log_student.exp(), log_teacher.exp()
    # Only the shorter side's length k of the longer side's sorted entries meets a nonzero partner; its other entries
    # meet the zero padding and add their plain sum. So the longer side needs its top-k, not a full sort (a CPU sort
    # of 49,152 entries per span dominated a step): the same value and gradient.
    short, long = (student, teacher) if student.shape[-1] <= teacher.shape[-1] else (teacher, student)
    k = short.shape[-1]
    short_sorted = short.sort(dim=-1, descending=True).values
    top = long.topk(k, dim=-1)
    rest = long.scatter(-1, top.indices, 0.0).sum(-1)
    return (short_sorted - top.values).abs().sum(-1) + rest


def shared_ranking(log_student: torch.Tensor, log_teacher: torch.Tensor, vocabulary: VocabularyMap, spec: LossSpec,
                   stats: dict | None = None) -> torch.Tensor:  # fmt: skip
    """The RLKD ranking loss per span (M,) over the shared entries, each side's top-min(rank_k, S) of them."""
    if vocabulary.size < 2:
        return log_student.new_zeros(log_student.shape[0]) + 0.0 * log_student.sum()
    return ranking_loss(log_student[:, vocabulary.student_ids], log_teacher[:, vocabulary.teacher_ids],
                        rank_k=min(spec.rank_k, vocabulary.size), rank_union=spec.rank_union,
                        regularization_strength=spec.regularization_strength, reduction="none",
                        stats=stats)  # fmt: skip


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    spans: SpanIndex,
    vocabulary: VocabularyMap,
    *,
    spec: LossSpec,
    cross: CrossTokenizerSpec,
    rank_stats: dict | None = None,
) -> DistillationLoss:
    """The summed loss over spans: distillation_weight · (D | ULD | hybrid) + rank_weight · ranking per span, plus
    crossentropy_weight · the student's cross-entropy per student token. `num_tokens` = student tokens (N_s).

    Args:
        student_logits: (N_s, V_s) the student's logits predicting `student_ids (N_s,)` (q), its counted tokens.
        teacher_logits: (N_t, V_t) the teacher's logits predicting `teacher_ids (N_t,)` (p); no gradient needed.
        spans: the aligned spans (align.py) as indices into those rows; vocabulary: the shared entries.
        spec: the objective's LossSpec (divergence, β, ranking options; its temperature is not read here: the
            `cross` spec's two temperatures are); cross: the ULD options.

    Example: a student spelling "ab" as "a", "b" and a teacher with the one token "ab" (one span of 2 and 1 tokens):
        >>> vocab = VocabularyMap.from_vocabularies({"a": 0, "b": 1, "</s>": 2}, {"ab": 0, "a": 1, "</s>": 2})
        >>> spans = SpanIndex(*(torch.tensor([i]) for i in (0, 2, 0, 1)))
        >>> out = cross_tokenizer_loss(torch.randn(2, 3, requires_grad=True), torch.randn(1, 3), torch.tensor([0, 1]),
        ...                            torch.tensor([0]), spans, vocab, spec=LossSpec(rank_k=2),
        ...                            cross=CrossTokenizerSpec(use_uld_loss=True, use_hybrid_loss=True))
        >>> out.loss.backward()
    """
    dtype = torch.float32 if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits.dtype
    log_q = F.log_softmax(student_logits.to(dtype) / cross.student_temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.detach().to(dtype) / cross.teacher_temperature, dim=-1)
        merged_p = merged_span_logprobs(log_p, teacher_ids, spans.teacher_start, spans.teacher_end)
    merged_q = merged_span_logprobs(log_q, student_ids, spans.student_start, spans.student_end)
    shared = lambda: shared_divergence(merged_q, merged_p, vocabulary, spec.loss, beta=spec.beta,  # noqa: E731
                                       skew_alpha=spec.skew_alpha)  # fmt: skip
    if not cross.use_uld_loss:
        kd = shared()
    elif not cross.use_hybrid_loss:
        kd = uld_distance(merged_q, merged_p)
    else:
        matched = cross.hybrid_matched_weight
        if matched is None:
            matched = vocabulary.size / max(vocabulary.teacher_vocab_size, 1)
            unmatched = 1.0 - matched
        else:
            unmatched = cross.hybrid_unmatched_weight
        rest = uld_distance(merged_q[:, vocabulary.unshared("student")], merged_p[:, vocabulary.unshared("teacher")])
        kd = matched * shared() + unmatched * rest
    kd = cross.distillation_weight * kd
    if spec.rank_weight > 0:
        rank = shared_ranking(merged_q, merged_p, vocabulary, spec, rank_stats)
    else:
        rank = torch.zeros_like(kd)
    total = kd.sum() + spec.rank_weight * rank.sum()
    kd_sum = kd.sum()
    if cross.crossentropy_weight > 0:
        ce = -F.log_softmax(student_logits.to(dtype), dim=-1).gather(-1, student_ids.unsqueeze(-1)).sum()
        total = total + cross.crossentropy_weight * ce
        kd_sum = kd_sum + cross.crossentropy_weight * ce
    count = torch.tensor(student_ids.numel(), device=student_logits.device)
    return DistillationLoss(total, kd_sum, rank.sum(), count)
