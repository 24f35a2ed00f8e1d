"""Evaluation: greedy generation and sacrebleu scores for translation, teacher-forced agreement with a teacher."""

from rlkd_onpolicy.eval.translation import (
    bleu_chrf,
    evaluate_translation,
    generate_translations,
    kl_sum,
    teacher_forced_agreement,
)

__all__ = ["bleu_chrf", "evaluate_translation", "generate_translations", "kl_sum", "teacher_forced_agreement"]
