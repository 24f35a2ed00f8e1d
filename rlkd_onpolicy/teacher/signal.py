"""The typed teacher signal and the interface every teacher implements.

Shapes use the rollout's completion columns: for a rollout with prompt width P and T columns, C = T − P, and
position j of a signal is the teacher's distribution over completion token j (predicted from columns < P + j).
Positions the rollout's completion mask leaves out may hold anything finite; they are never read.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from rlkd_onpolicy.sampling.rollout import Rollout


@dataclass(frozen=True)
class DenseTeacher:
    """The teacher's full logits `(B, C, V)` at the completion positions, cut to the shared vocabulary."""

    logits: torch.Tensor

    def loss_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `distillation_loss` for this teacher."""
        return {"teacher_logits": self.logits}


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-K at the completion positions, as a cache stores it and a server returns it.

    ids (B, C, K) int64, sorted by decreasing log-prob; logprobs (B, C, K) float32, log-probabilities over the full
    vocabulary at the loss temperature; tail_logprob (B, C) the log of the mass outside the K ids (−inf when the
    K ids hold all of it).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def loss_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `distillation_loss` / `fused_topk_loss` for this teacher."""
        return {
            "teacher_topk_ids": self.ids,
            "teacher_topk_logprobs": self.logprobs,
            "teacher_tail_logprob": self.tail_logprob,
        }


TeacherSignal = DenseTeacher | SparseTeacher


class Teacher(Protocol):
    """Anything the trainer can distil from: a local model (local.py), a top-k cache (cached.py), a served model
    (served.py)."""

    def score(
        self, rollout: Rollout, example_index: torch.Tensor | None = None, *, step: int | None = None
    ) -> TeacherSignal:
        """The teacher's distributions at `rollout`'s completion positions. `example_index (B,)` says which
        dataset example each row came from (a cache looks its rows up by it; other teachers ignore it); `step`,
        the training step, is named in errors (None outside training)."""
        ...
