"""The spec of the fused top-k loss: plain PyTorch, chunked over tokens, one chunk of logits alive at a time.

Per chunk of rows: logits = hidden @ W.T (+ bias), then the library's `sparse_divergence` and
`sparse_ranking_loss` per token. Each chunk runs under `torch.utils.checkpoint`, so the forward keeps no
logits and the backward recomputes one chunk's logits at a time. The Triton path is checked against this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlkd_onpolicy.losses import sparse_divergence, sparse_ranking_loss


@dataclass(frozen=True)
class TopKLossOptions:
    """The loss options shared by both backends (validated by `rlkd_onpolicy.kernels.fused_topk_loss`)."""

    loss: str = "fkl"
    missing_mass: str = "tail"
    beta: float = 0.5
    skew_alpha: float = 0.1
    rank_weight: float = 0.0
    rank_k: int = 5
    rank_union: str = "exact"
    regularization_strength: float = 1.0
    temperature: float = 1.0
    chunk_size: int = 1024


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    # At least one (possibly empty) chunk, so that an all-masked input still builds a graph with zero gradients.
    return [(start, min(start + chunk_size, n)) for start in range(0, max(n, 1), chunk_size)]


def _chunk_rows(hidden, weight, bias, ids, logprobs, tail, options: TopKLossOptions):
    logits = F.linear(hidden, weight, bias)
    kd = sparse_divergence(
        logits, ids, logprobs, loss=options.loss, beta=options.beta, skew_alpha=options.skew_alpha,
        temperature=options.temperature, missing_mass=options.missing_mass, teacher_tail_logprob=tail,
        reduction="none",
    )
    if options.rank_weight == 0.0:
        return kd, torch.zeros_like(kd)
    rank = sparse_ranking_loss(
        logits, ids, logprobs, teacher_tail_logprob=tail, k=options.rank_k, union=options.rank_union,
        regularization_strength=options.regularization_strength, temperature=options.temperature, reduction="none",
    )
    return kd, rank


def reference_topk_rows(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    options: TopKLossOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KD and ranking losses `(kd (n,), rank (n,))` of counted rows, differentiable.

    Args:
        student_hidden: (n, H) the student's last hidden states at counted tokens.
        lm_head_weight: (V, H) and lm_head_bias: (V,) or None, the student's output projection.
        teacher_topk_ids, teacher_topk_logprobs: (n, K) the sparse teacher (p), at the loss temperature.
        teacher_tail_logprob: (n,) log of the teacher mass outside its K ids.
    """
    kd, rank = [], []
    for start, end in chunk_bounds(student_hidden.shape[0], options.chunk_size):
        rows = slice(start, end)
        chunk_kd, chunk_rank = checkpoint(
            _chunk_rows, student_hidden[rows], lm_head_weight, lm_head_bias, teacher_topk_ids[rows],
            teacher_topk_logprobs[rows], teacher_tail_logprob[rows], options, use_reentrant=False,
        )
        kd.append(chunk_kd)
        rank.append(chunk_rank)
    return torch.cat(kd), torch.cat(rank)


def reference_topk_loss(
    student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
    options: TopKLossOptions, per_row: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend interface: `(loss, kd_rows, rank_rows)`, loss summed over rows unless `per_row`."""
    kd, rank = reference_topk_rows(
        student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
        options,
    )
    rows = kd + options.rank_weight * rank if options.rank_weight else kd
    return (rows if per_row else rows.sum()), kd.detach(), rank.detach()
