"""Distillation from a teacher with another tokenizer (GOLD / ULD style, with the RLKD ranking loss).

align.py aligns two tokenizations of one text into spans; vocabulary.py maps the entries both vocabularies share;
losses.py holds the span losses (the shared divergence, ULD, GOLD's hybrid, the ranking loss on shared entries);
views.py builds the teacher's tokenization of a student rollout; teacher.py scores it. docs/cross_tokenizer.md.
"""

from .align import Span, Tokens, align_spans, decode_with_offsets, encode_with_offsets, normalize_offsets
from .losses import CrossTokenizerSpec, SpanIndex, cross_tokenizer_loss, merged_span_logprobs, uld_distance
from .teacher import CrossTeacherSignal, CrossTokenizerTeacher
from .views import CrossRollout, teacher_view
from .vocabulary import VocabularyMap

__all__ = [
    "CrossRollout",
    "CrossTeacherSignal",
    "CrossTokenizerSpec",
    "CrossTokenizerTeacher",
    "Span",
    "SpanIndex",
    "Tokens",
    "VocabularyMap",
    "align_spans",
    "cross_tokenizer_loss",
    "decode_with_offsets",
    "encode_with_offsets",
    "merged_span_logprobs",
    "normalize_offsets",
    "teacher_view",
    "uld_distance",
]
