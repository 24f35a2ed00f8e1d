"""The `Rollout`: a batch of prompt + completion sequences, which tokens count, and who produced each one."""

from dataclasses import dataclass, field

import torch

from .hf import position_ids_from_mask

SOURCE_NONE = -1  # prompt, padding, and tokens after the first EOS
SOURCE_DATA = 0  # the dataset's completion (off_policy, and the data rows of mixed)
SOURCE_STUDENT = 1  # sampled by the student (on_policy, mixed, accepted SKD proposals)
SOURCE_TEACHER = 2  # sampled by the teacher (seq_kd, SKD replacements)


@dataclass
class Rollout:
    """A batch of sequences for the trainer.

    sequences (B, T) int64: the left-padded prompt (width `prompt_length`), then the completion, right-padded with
        the pad token; tokens after a completion's first EOS are pad.
    attention_mask (B, T) int64: 1 on real prompt tokens and on the counted completion tokens.
    completion_mask (B, T) bool: True exactly at the completion tokens the loss counts (generated tokens up to and
        including the first EOS, or the data completion's real tokens). Logits at t-1 predict the token at t.
    token_source (B, T) int8: SOURCE_DATA / SOURCE_STUDENT / SOURCE_TEACHER at completion tokens, SOURCE_NONE elsewhere.
    prompt_length: P, the padded prompt width; completions start at column P.
    stats: floats such as generated_tokens, seconds, tokens_per_second, on_policy_fraction (mixed), and for
        speculative acceptance_rate, tokens_replaced, teacher_forward_passes.
    row_seeds (B,) int64: the per-row seeds the sampling used (pass them back to reproduce a row on its own).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    token_source: torch.Tensor
    prompt_length: int
    stats: dict[str, float] = field(default_factory=dict)
    mode: str = ""
    row_seeds: torch.Tensor | None = None

    @property
    def completion_ids(self) -> torch.Tensor:
        """(B, T - P) the completion columns of `sequences`."""
        return self.sequences[:, self.prompt_length :]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword inputs of every forward on `sequences`: input_ids, attention_mask and position_ids (B, T)
        counted over real tokens only. Generation, evaluation, the cache writer (right padding) and a served teacher
        (no padding) count positions so; counted from column 0 instead, a left-padded row's pads would shift its
        positions, which moves models with absolute position embeddings (GPT-2, OPT) off the positions they generate
        and are evaluated at (RoPE's constant shift cancels, up to rounding)."""
        return {"input_ids": self.sequences, "attention_mask": self.attention_mask,
                "position_ids": position_ids_from_mask(self.attention_mask)}  # fmt: skip


def first_eos_mask(tokens: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, N) bool: True at tokens up to and including each row's first EOS (everything when eos_ids is None)."""
    if eos_ids is None or eos_ids.numel() == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, eos_ids).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def assemble_rollout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    completion_source: torch.Tensor,
    *,
    pad_token_id: int,
    stats: dict[str, float],
    mode: str,
    row_seeds: torch.Tensor | None = None,
) -> Rollout:
    """Join prompts (B, P) with completions (B, C) into a Rollout.

    completion_mask (B, C) bool marks the counted tokens; completion_source (B, C) the producer of each token
    (ignored where the mask is False). Columns past the longest completion are dropped, and uncounted completion
    tokens become pad, so a trainer never sees stale tokens.
    """
    width = int(completion_mask.sum(1).max().item()) if completion_mask.numel() else 0
    completion_mask = completion_mask[:, :width].bool()
    completion_ids = torch.where(completion_mask, completion_ids[:, :width], pad_token_id)
    source = torch.where(completion_mask, completion_source[:, :width].to(torch.int8), SOURCE_NONE)
    prompt_source = torch.full_like(prompt_ids, SOURCE_NONE, dtype=torch.int8)
    return Rollout(
        sequences=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask.long(), completion_mask.long()], dim=1),
        completion_mask=torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), completion_mask], dim=1),
        token_source=torch.cat([prompt_source, source.to(torch.int8)], dim=1),
        prompt_length=prompt_ids.shape[1],
        stats=stats,
        mode=mode,
        row_seeds=row_seeds,
    )
