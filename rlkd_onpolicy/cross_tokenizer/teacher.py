"""`CrossTokenizerTeacher`: a teacher model with its own tokenizer, run under no_grad on its view of each rollout."""

from dataclasses import dataclass

import torch

from .losses import SpanIndex
from .views import CrossRollout


@dataclass(frozen=True)
class CrossTeacherSignal:
    """The teacher on its tokenization of a rollout's completions: `logits (N_t, V_t)` at its counted completion
    tokens `teacher_ids (N_t,)` (rows flattened in order), the student's counted tokens `student_ids (N_s,)`, and the
    aligned `spans` as indices into both."""

    logits: torch.Tensor
    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    spans: SpanIndex


class CrossTokenizerTeacher:
    """Scores a `CrossRollout` (views.py): the teacher's logits, cut to its tokenizer's `vocab_size`, at the positions
    predicting each of its completion tokens."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size

    @torch.no_grad()
    def score(self, rollout: CrossRollout, example_index: torch.Tensor | None = None, *,
              step: int | None = None) -> CrossTeacherSignal:  # fmt: skip
        """See `Teacher.score`; `example_index` and `step` are not needed."""
        view = rollout.teacher_rollout
        start = view.prompt_length
        # Logits at column t predict token t+1: columns P-1 … T-2 predict the completion tokens P … T-1.
        logits = self.model(**view.model_inputs()).logits[:, start - 1 : -1, : self.vocab_size]
        mask = view.completion_mask[:, start:]
        student_mask = rollout.completion_mask[:, rollout.prompt_length :]
        return CrossTeacherSignal(logits[mask], view.sequences[:, start:][mask],
                                  rollout.sequences[:, rollout.prompt_length :][student_mask],
                                  rollout.span_index())  # fmt: skip
