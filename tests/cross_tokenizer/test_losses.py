"""The span losses against plain references (loops over spans and vocabulary strings, float64), the identical-tokenizer
equivalence with the same-vocabulary loss, and the degenerate cases (no span: 0 and zero gradients)."""

import math

import pytest
import torch
from xtok_fixtures import char_tokenizer, word_tokenizer

from rlkd_onpolicy.cross_tokenizer import (
    CrossTokenizerSpec,
    SpanIndex,
    VocabularyMap,
    align_spans,
    cross_tokenizer_loss,
    encode_with_offsets,
    merged_span_logprobs,
    uld_distance,
)
from rlkd_onpolicy.losses import LossSpec, distillation_loss, ranking_loss

TEXT = "the cat sees a dog . a bird , the tree !"


# -- plain references ----------------------------------------------------------------------------------------------


def reference_merged(logprobs, ids, start, end):
    """log q_first(v) + Σ log q_t(x_t) over the span's later tokens, one span at a time."""
    rows = []
    for s, e in zip(start.tolist(), end.tolist(), strict=True):
        continuation = sum(float(logprobs[t, ids[t]]) for t in range(s + 1, e))
        rows.append(logprobs[s] + continuation)
    return torch.stack(rows)


def reference_uld(p_student: list[float], p_teacher: list[float]) -> float:
    a, b = sorted(p_student, reverse=True), sorted(p_teacher, reverse=True)
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def shared_pairs(student_tok, teacher_tok):
    """(student id, teacher id) of every string both vocabularies hold, in teacher-id order."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    return sorted(((s[w], t[w]) for w in s if w in t), key=lambda pair: pair[1])


def reference_fkl_with_rest(m_student: torch.Tensor, m_teacher: torch.Tensor, pairs) -> float:
    """KL(p ‖ q) over the shared entries plus one bucket for the rest of each side's mass, by loops."""
    p = [math.exp(float(m_teacher[t])) for _, t in pairs]
    q = [math.exp(float(m_student[s])) for s, _ in pairs]
    p.append(1.0 - sum(p))
    q.append(1.0 - sum(q))
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


# -- a word-level teacher and a character-level student on one text ---------------------------------------------


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    student_tok, teacher_tok = char_tokenizer(), word_tokenizer()
    student, teacher = encode_with_offsets(student_tok, TEXT), encode_with_offsets(teacher_tok, TEXT)
    spans = align_spans(student.offsets, teacher.offsets, len(TEXT))
    index = SpanIndex(*(torch.tensor(c) for c in zip(*[(s.student[0], s.student[1], s.teacher[0], s.teacher[1])
                                                        for s in spans], strict=True)))  # fmt: skip
    vocabulary = VocabularyMap(student_tok, teacher_tok, len(student_tok), len(teacher_tok))
    student_logits = (3 * torch.randn(len(student), len(student_tok), dtype=torch.float64)).requires_grad_()
    teacher_logits = 3 * torch.randn(len(teacher), len(teacher_tok), dtype=torch.float64)
    return dict(student_tok=student_tok, teacher_tok=teacher_tok, student_ids=torch.tensor(student.ids),
                teacher_ids=torch.tensor(teacher.ids), spans=index, vocabulary=vocabulary,
                student_logits=student_logits, teacher_logits=teacher_logits)  # fmt: skip


def merged(pair, side: str, temperature: float = 1.0):
    logits = pair[f"{side}_logits"].detach()
    start, end = (pair["spans"].student_start, pair["spans"].student_end) if side == "student" else \
        (pair["spans"].teacher_start, pair["spans"].teacher_end)  # fmt: skip
    return reference_merged(torch.log_softmax(logits / temperature, -1), pair[f"{side}_ids"], start, end)


def test_the_pair_has_multi_token_spans_and_shared_entries(pair):
    spans = pair["spans"]
    assert int((spans.student_end - spans.student_start).max()) > 1  # words over several characters
    assert pair["vocabulary"].size >= 5  # specials, "a", punctuation


def test_merged_span_logprobs_matches_the_loop(pair):
    log_q = torch.log_softmax(pair["student_logits"].detach(), -1)
    got = merged_span_logprobs(log_q, pair["student_ids"], pair["spans"].student_start, pair["spans"].student_end)
    torch.testing.assert_close(got, merged(pair, "student"))


def test_shared_divergence_matches_the_reference(pair):
    out = cross_tokenizer_loss(pair["student_logits"], pair["teacher_logits"], pair["student_ids"],
                               pair["teacher_ids"], pair["spans"], pair["vocabulary"],
                               spec=LossSpec(loss="fkl", rank_weight=0.0), cross=CrossTokenizerSpec())  # fmt: skip
    pairs = shared_pairs(pair["student_tok"], pair["teacher_tok"])
    m_s, m_t = merged(pair, "student"), merged(pair, "teacher")
    expected = sum(reference_fkl_with_rest(m_s[i], m_t[i], pairs) for i in range(m_s.shape[0]))
    assert float(out.kd.detach()) == pytest.approx(expected, rel=1e-9)
    assert int(out.num_tokens) == len(pair["student_ids"])


@pytest.mark.parametrize(("temperatures", "ce_weight", "distill_weight"), [
    ((1.0, 1.0), 0.0, 1.0),  # TRL's defaults
    ((2.0, 0.5), 0.3, 0.7),  # each weight and temperature read where TRL reads it
])  # fmt: skip
def test_uld_matches_the_reference(pair, temperatures, ce_weight, distill_weight):
    cross = CrossTokenizerSpec(use_uld_loss=True, student_temperature=temperatures[0],
                               teacher_temperature=temperatures[1], crossentropy_weight=ce_weight,
                               distillation_weight=distill_weight)  # fmt: skip
    out = cross_tokenizer_loss(pair["student_logits"], pair["teacher_logits"], pair["student_ids"],
                               pair["teacher_ids"], pair["spans"], pair["vocabulary"],
                               spec=LossSpec(rank_weight=0.0), cross=cross)  # fmt: skip
    m_s, m_t = merged(pair, "student", temperatures[0]), merged(pair, "teacher", temperatures[1])
    uld = sum(reference_uld(m_s[i].exp().tolist(), m_t[i].exp().tolist()) for i in range(m_s.shape[0]))
    log_q = torch.log_softmax(pair["student_logits"].detach(), -1)  # cross-entropy at temperature 1, as TRL
    ce = -sum(float(log_q[i, t]) for i, t in enumerate(pair["student_ids"].tolist()))
    assert float(out.loss.detach()) == pytest.approx(distill_weight * uld + ce_weight * ce, rel=1e-9)


@pytest.mark.parametrize("weights", [(None, None), (0.25, 2.0)])  # GOLD's adaptive weights; fixed ones
def test_hybrid_matches_the_reference(pair, weights):
    cross = CrossTokenizerSpec(use_uld_loss=True, use_hybrid_loss=True, hybrid_matched_weight=weights[0],
                               hybrid_unmatched_weight=weights[1])  # fmt: skip
    out = cross_tokenizer_loss(pair["student_logits"], pair["teacher_logits"], pair["student_ids"],
                               pair["teacher_ids"], pair["spans"], pair["vocabulary"],
                               spec=LossSpec(loss="fkl", rank_weight=0.0), cross=cross)  # fmt: skip
    pairs = shared_pairs(pair["student_tok"], pair["teacher_tok"])
    shared_s, shared_t = {s for s, _ in pairs}, {t for _, t in pairs}
    m_s, m_t = merged(pair, "student"), merged(pair, "teacher")
    matched = weights[0] if weights[0] is not None else len(pairs) / len(pair["teacher_tok"])
    unmatched = weights[1] if weights[1] is not None else 1.0 - matched
    expected = 0.0
    for i in range(m_s.shape[0]):
        rest_s = [math.exp(float(x)) for v, x in enumerate(m_s[i]) if v not in shared_s]
        rest_t = [math.exp(float(x)) for v, x in enumerate(m_t[i]) if v not in shared_t]
        expected += matched * reference_fkl_with_rest(m_s[i], m_t[i], pairs) + unmatched * reference_uld(rest_s, rest_t)
    assert float(out.kd.detach()) == pytest.approx(expected, rel=1e-9)


def test_ranking_on_the_shared_vocabulary_matches_the_reference(pair):
    """The ranking term is RLKD's loss on the merged log-probabilities of the shared entries, gathered by string."""
    spec = LossSpec(rank_weight=2.0, rank_k=5)
    out = cross_tokenizer_loss(pair["student_logits"], pair["teacher_logits"], pair["student_ids"],
                               pair["teacher_ids"], pair["spans"], pair["vocabulary"], spec=spec,
                               cross=CrossTokenizerSpec())  # fmt: skip
    pairs = shared_pairs(pair["student_tok"], pair["teacher_tok"])
    m_s, m_t = merged(pair, "student"), merged(pair, "teacher")
    columns_s, columns_t = [s for s, _ in pairs], [t for _, t in pairs]
    expected = ranking_loss(m_s[:, columns_s], m_t[:, columns_t], rank_k=5, reduction="sum")
    assert float(out.rank.detach()) == pytest.approx(float(expected), rel=1e-9)
    assert float(out.rank.detach()) > 0
    out.loss.backward()  # the ranking term reaches every logit of the student
    assert pair["student_logits"].grad is not None and bool(pair["student_logits"].grad.abs().sum() > 0)
    pair["student_logits"].grad = None


def identical_setting(seed: int = 1):
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    ids = torch.tensor(encode_with_offsets(tokenizer, TEXT).ids)
    vocab = len(tokenizer)
    spans = SpanIndex(torch.arange(len(ids)), torch.arange(len(ids)) + 1, torch.arange(len(ids)),
                      torch.arange(len(ids)) + 1)  # fmt: skip
    student = (2 * torch.randn(len(ids), vocab, dtype=torch.float64)).requires_grad_()
    teacher = 2 * torch.randn(len(ids), vocab, dtype=torch.float64)
    return tokenizer, ids, spans, VocabularyMap(tokenizer, tokenizer, vocab, vocab), student, teacher


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("cross", [
    CrossTokenizerSpec(),  # the divergence on shared entries
    CrossTokenizerSpec(use_uld_loss=True, use_hybrid_loss=True),  # GOLD's hybrid, adaptive weights (1 and 0 here)
])  # fmt: skip
def test_identical_tokenizers_give_the_same_vocabulary_loss(loss, cross):
    _, ids, spans, vocabulary, student, teacher = identical_setting()
    assert vocabulary.identical
    spec = LossSpec(loss=loss, rank_weight=2.0, rank_k=5)
    got = cross_tokenizer_loss(student, teacher, ids, ids, spans, vocabulary, spec=spec, cross=cross)
    expected = distillation_loss(student, teacher, spec=spec, reduction="sum")
    for a, b in zip(got[:3], expected[:3], strict=True):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-9, abs=1e-12)
    grad_got = torch.autograd.grad(got.loss, student)[0]
    grad_expected = torch.autograd.grad(expected.loss, student)[0]
    torch.testing.assert_close(grad_got, grad_expected)


def test_no_span_gives_zero_and_zero_gradients():
    _, ids, _, vocabulary, student, teacher = identical_setting()
    empty = SpanIndex(*(torch.zeros(0, dtype=torch.long) for _ in range(4)))
    for cross in (CrossTokenizerSpec(), CrossTokenizerSpec(use_uld_loss=True),
                  CrossTokenizerSpec(use_uld_loss=True, use_hybrid_loss=True)):  # fmt: skip
        out = cross_tokenizer_loss(student, teacher, ids, ids, empty, vocabulary, spec=LossSpec(), cross=cross)
        assert float(out.loss.detach()) == 0.0
        (grad,) = torch.autograd.grad(out.loss, student, allow_unused=True)
        assert grad is None or bool((grad == 0).all())


@pytest.mark.parametrize("widths", [(7, 300), (300, 7), (50, 50)])  # student shorter, longer, equal
def test_uld_top_k_equals_the_full_sort(widths):
    """uld_distance takes only the longer side's top-k: value and gradient equal the full sort and zero padding."""
    torch.manual_seed(2)
    log_s = torch.log_softmax(3 * torch.randn(4, widths[0], dtype=torch.float64), -1).requires_grad_()
    log_t = torch.log_softmax(3 * torch.randn(4, widths[1], dtype=torch.float64), -1)
    got = uld_distance(log_s, log_t)
    expected = [reference_uld(log_s[i].exp().tolist(), log_t[i].exp().tolist()) for i in range(4)]
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=torch.float64))
    a = log_s.exp().sort(-1, descending=True).values
    b = log_t.exp().sort(-1, descending=True).values
    width = max(widths)
    full = (torch.nn.functional.pad(a, (0, width - a.shape[-1])) - torch.nn.functional.pad(b, (0, width - b.shape[-1])))
    (grad,) = torch.autograd.grad(got.sum(), log_s)
    (grad_full,) = torch.autograd.grad(full.abs().sum(), log_s)
    torch.testing.assert_close(grad, grad_full)
