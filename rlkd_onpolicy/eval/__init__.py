"""Evaluation: greedy translation and sacrebleu scores, teacher-forced agreement with a teacher, a translator for
a saved student (`load_translator`), and the statistics that compare methods over seeds (`rlkd_onpolicy.eval.stats`)."""

from rlkd_onpolicy.eval.translation import (
    bleu_chrf,
    evaluate_translation,
    generate_translations,
    kl_sum,
    load_translator,
    teacher_forced_agreement,
    translate,
)

__all__ = [
    "bleu_chrf",
    "evaluate_translation",
    "generate_translations",
    "kl_sum",
    "load_translator",
    "teacher_forced_agreement",
    "translate",
]
