"""`LocalTeacher`: a teacher model in this process, run under no_grad on each rollout."""

import torch

from rlkd_onpolicy.losses import teacher_topk
from rlkd_onpolicy.sampling.rollout import Rollout
from rlkd_onpolicy.teacher.signal import DenseTeacher, SparseTeacher, TeacherSignal
from rlkd_onpolicy.vocab import cut_logits


class LocalTeacher:
    """The teacher's full logits (a `DenseTeacher`), or, with `top_k`, their top-K at `temperature` (a
    `SparseTeacher`, what a cache would store for the same rollout).

    `model` is called as it is (an accelerate-prepared module or a DeepSpeed engine: ZeRO-3 gathers its layers
    during the forward); `vocab_size` cuts the logits to the vocabulary the student and tokenizer share.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, top_k: int | None = None, temperature: float = 1.0):
        self.model, self.vocab_size, self.top_k, self.temperature = model, vocab_size, top_k, temperature

    @torch.no_grad()
    def score(
        self, rollout: Rollout, example_index: torch.Tensor | None = None, *, step: int | None = None
    ) -> TeacherSignal:
        """See `Teacher.score`; `example_index` and `step` are not needed (a local forward names no step)."""
        start = rollout.prompt_length
        # Logits at column t predict token t+1: columns P-1 … T-2 predict the completion tokens P … T-1.
        logits = self.model(**rollout.model_inputs()).logits
        logits = cut_logits(logits[:, start - 1 : -1], self.vocab_size)
        if self.top_k is None:
            return DenseTeacher(logits)
        top = teacher_topk(logits, self.top_k, temperature=self.temperature)
        return SparseTeacher(top.ids, top.logprobs, top.tail_logprob)
