"""The student loss step: the student's forward on a rollout and its summed distillation loss against the teacher
signal, on one of two paths (`loss_backend`, resolved once by `resolve_loss_backend`):

- logits: the student's logits `(B, C, V)` at the completion positions and `distillation_loss`;
- fused: its final hidden states `(B, C, H)` and output layer and `fused_topk_loss` (a `SparseTeacher` only), which
  never makes the `(B, C, V)` logits.
"""

from dataclasses import dataclass

import torch

from rlkd_onpolicy.kernels import fused_topk_loss
from rlkd_onpolicy.losses import DistillationLoss, distillation_loss
from rlkd_onpolicy.sampling import Rollout
from rlkd_onpolicy.teacher.signal import TeacherSignal
from rlkd_onpolicy.trainer.config import RLKDConfig
from rlkd_onpolicy.trainer.deepspeed import is_zero3
from rlkd_onpolicy.trainer.guards import check_fused_head
from rlkd_onpolicy.vocab import cut_logits


def resolve_loss_backend(args: RLKDConfig, cached_teacher: bool, accelerator) -> str:
    """RLKDConfig.loss_backend -> "fused" or "logits" (see the field's help)."""
    sparse = cached_teacher or args.teacher_top_k is not None
    fits = sparse and not args.rank_dynamic_weighting and not is_zero3(accelerator)
    if args.loss_backend == "fused" and is_zero3(accelerator):
        raise ValueError(
            "loss_backend='fused' reads the whole output layer, which DeepSpeed ZeRO-3 partitions across ranks; "
            "use loss_backend='logits' (or 'auto') with ZeRO-3."
        )
    if args.loss_backend == "auto":
        return "fused" if fits else "logits"
    return args.loss_backend


def output_layer(head_model: torch.nn.Module, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's output projection (V, H) cut to the shared vocabulary, and its bias."""
    head = head_model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight[:vocab_size], None if bias is None else bias[:vocab_size]


@dataclass(frozen=True)
class StudentOutputs:
    """The student at a rollout's completion positions: `logits (B, C, V)` on the logits path, `hidden (B, C, H)`
    on the fused path (the other one None), and `mask (B, C)`, the completion tokens the loss counts."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    mask: torch.Tensor


class StudentLoss:
    """Both halves of the step, for `backend` ("logits" or "fused"). `head_model` is the unwrapped student, whose
    output layer the fused path reads; `model` the one the trainer trains (possibly DDP-wrapped)."""

    def __init__(self, args: RLKDConfig, backend: str, vocab_size: int):
        self.args, self.backend, self.vocab_size = args, backend, vocab_size
        self.spec = args.loss_spec()  # the objective, validated once, shared by both paths
        self._head_checked = False  # the fused-head check runs on the first fused forward

    def forward(self, model, head_model, rollout: Rollout) -> StudentOutputs:
        start = rollout.prompt_length
        # Logits at column t predict token t+1: columns P-1 … T-2 predict the completion tokens P … T-1.
        mask = rollout.completion_mask[:, start:]
        if self.backend != "fused":
            logits = model(**rollout.model_inputs()).logits
            return StudentOutputs(cut_logits(logits[:, start - 1 : -1], self.vocab_size), None, mask)
        # Only the last position's logits are made (the model's forward needs some); the loss reads the final
        # hidden states and the output layer chunk by chunk.
        outputs = model(**rollout.model_inputs(), output_hidden_states=True, logits_to_keep=1)
        if not self._head_checked:
            check_fused_head(
                outputs, *output_layer(head_model, self.vocab_size), self.vocab_size, self.args.loss_backend
            )
            self._head_checked = True
        return StudentOutputs(None, outputs.hidden_states[-1][:, start - 1 : -1], mask)

    def loss(self, student: StudentOutputs, teacher: TeacherSignal, head_model, rank_stats=None) -> DistillationLoss:
        """The summed loss over `student.mask`; `rank_stats` (a dict, logits path) collects the ranking diagnostics."""
        if student.hidden is None:
            return distillation_loss(
                student.logits,
                **teacher.loss_inputs(),
                spec=self.spec,
                mask=student.mask,
                reduction="sum",
                rank_stats=rank_stats,
            )
        weight, bias = output_layer(head_model, self.vocab_size)  # a SparseTeacher here (resolve_loss_backend)
        loss, parts = fused_topk_loss(
            student.hidden,
            weight,
            teacher.ids,
            teacher.logprobs,
            student.mask,
            lm_head_bias=bias,
            teacher_tail_logprob=teacher.tail_logprob,
            spec=self.spec,
            reduction="sum",
            return_parts=True,
        )
        return DistillationLoss(loss=loss, kd=parts["kd"], rank=parts["rank"], num_tokens=student.mask.sum())

    @torch.no_grad()
    def top_ids(self, head_model, student: StudentOutputs, k: int, chunk: int = 1024) -> torch.Tensor:
        """The student's sorted top-k ids at counted tokens (n, k), from the fused path's hidden states in chunks."""
        weight, bias = output_layer(head_model, self.vocab_size)
        rows = student.hidden[student.mask]
        tops = [torch.nn.functional.linear(rows[i : i + chunk], weight, bias).topk(k, dim=-1).indices
                for i in range(0, rows.shape[0], chunk)]  # fmt: skip
        return torch.cat(tops) if tops else rows.new_zeros(0, k, dtype=torch.long)


def rank_diagnostics(student_logits, mask, out: DistillationLoss, stats: dict, rank_weight: float) -> dict[str, float]:
    """Why the ranking loss does (not) move the student: each term's gradient on the logits, per counted token,
    and how many tokens' soft ranks are hard (no gradient at this regularization strength) or undefined."""
    rows = max(stats.get("rows", 0), 1)
    metrics = {"rank_hard_fraction": stats.get("hard_rows", 0) / rows,
               "rank_undefined_fraction": stats.get("undefined_rows", 0) / rows}  # fmt: skip
    if not bool(mask.any()):
        return metrics
    # One call per term (a call with both would sum them); the graph is kept for the training backward.
    for name, term in (("kd_logit_grad_norm", out.kd), ("rank_logit_grad_norm", rank_weight * out.rank)):
        (grad,) = torch.autograd.grad(term, student_logits, retain_graph=True, allow_unused=True)
        metrics[name] = 0.0 if grad is None else float(grad[mask].float().norm(dim=-1).mean())
    return metrics
