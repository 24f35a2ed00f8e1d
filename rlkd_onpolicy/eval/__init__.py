"""Evaluation: greedy translation and sacrebleu scores, teacher-forced agreement with a teacher, a translator for
a saved student (`load_translator`), and the statistics that compare methods over seeds (`rlkd_onpolicy.eval.stats`).
Documented in docs/data_and_eval.md.

Example:
    >>> from rlkd_onpolicy.data.parallel import load_bible_pairs
    >>> from rlkd_onpolicy.eval import evaluate_translation
    >>> pairs = load_bible_pairs("fr", "en", "test", limit=20)
    >>> scores = evaluate_translation(student, tokenizer, pairs, "fr", "en", teacher=teacher)  # doctest: +SKIP
    >>> scores["bleu"], scores["chrf"], scores["kl"], scores["mor@5"]  # doctest: +SKIP
"""

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
