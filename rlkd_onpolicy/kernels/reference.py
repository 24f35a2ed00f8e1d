"""The spec of the fused top-k loss: plain PyTorch, chunked over tokens, one chunk of logits alive at a time.

Per chunk of rows: logits = hidden @ W.T (+ bias), then the library's `sparse_divergence` and
`sparse_ranking_loss` per token. Each chunk runs under `torch.utils.checkpoint`, so the forward keeps no
logits and the backward recomputes one chunk's logits at a time. The Triton path is checked against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlkd_onpolicy.losses import sparse_divergence, sparse_ranking_loss
from rlkd_onpolicy.losses.spec import LossSpec


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    # At least one (possibly empty) chunk, so that an all-masked input still builds a graph with zero gradients.
    return [(start, min(start + chunk_size, n)) for start in range(0, max(n, 1), chunk_size)]


def _chunk_rows(hidden, weight, bias, ids, logprobs, tail, spec: LossSpec):
    logits = F.linear(hidden, weight, bias)
    kd = sparse_divergence(
        logits, ids, logprobs, loss=spec.loss, beta=spec.beta, skew_alpha=spec.skew_alpha,
        temperature=spec.temperature, missing_mass=spec.missing_mass, teacher_tail_logprob=tail,
        reduction="none",
    )
    if spec.rank_weight == 0.0:
        return kd, torch.zeros_like(kd)
    rank = sparse_ranking_loss(
        logits, ids, logprobs, teacher_tail_logprob=tail, rank_k=spec.rank_k, rank_union=spec.rank_union,
        regularization_strength=spec.regularization_strength, temperature=spec.temperature, reduction="none",
    )
    return kd, rank


def reference_topk_rows(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    spec: LossSpec,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KD and ranking losses `(kd (n,), rank (n,))` of counted rows, differentiable.

    Args:
        student_hidden: (n, H) the student's last hidden states at counted tokens.
        lm_head_weight: (V, H) and lm_head_bias: (V,) or None, the student's output projection.
        teacher_topk_ids, teacher_topk_logprobs: (n, K) the sparse teacher (p), at the loss temperature.
        teacher_tail_logprob: (n,) log of the teacher mass outside its K ids.
        spec: the objective (validated by `fused_topk_loss`); chunk_size: rows per chunk of logits.
    """
    kd, rank = [], []
    for start, end in chunk_bounds(student_hidden.shape[0], chunk_size):
        rows = slice(start, end)
        chunk_kd, chunk_rank = checkpoint(
            _chunk_rows, student_hidden[rows], lm_head_weight, lm_head_bias, teacher_topk_ids[rows],
            teacher_topk_logprobs[rows], teacher_tail_logprob[rows], spec, use_reentrant=False,
        )
        kd.append(chunk_kd)
        rank.append(chunk_rank)
    return torch.cat(kd), torch.cat(rank)


def reference_topk_loss(
    student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
    spec: LossSpec, chunk_size: int, per_row: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend interface: `(loss, kd_rows, rank_rows)`, loss summed over rows unless `per_row`."""
    kd, rank = reference_topk_rows(
        student_hidden, lm_head_weight, lm_head_bias, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob,
        spec, chunk_size,
    )
    rows = kd + spec.rank_weight * rank if spec.rank_weight else kd
    return (rows if per_row else rows.sum()), kd.detach(), rank.detach()
