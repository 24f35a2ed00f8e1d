"""The sparse teacher: its top-K ids and log-probs plus the log of the mass outside them."""

import torch


@torch.no_grad()
def topk_from_logits(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K of the teacher's tempered distribution, in float32, on the logits' device.

    Args:
        teacher_logits: (..., V) raw teacher logits (any float dtype).
        k: number of ids to keep, 1 <= k <= V.
        temperature: the log-probs are log_softmax(teacher_logits / temperature) over the full vocabulary.

    Returns:
        teacher_topk_ids (..., K) int64, sorted by decreasing log-prob;
        teacher_topk_logprobs (..., K) float32, not renormalised;
        teacher_tail_logprob (...) float32 = log Σ_{v not in top-K} p_v (-inf when K = V).

    The tail is a log-sum-exp over the non-top-K log-probs, not log(1 - Σ top-K), so it keeps its relative
    precision when the top-K holds almost all the mass.

    Example:
        >>> ids, logprobs, tail = topk_from_logits(torch.randn(2, 5, 100), k=8)
        >>> torch.allclose(torch.logaddexp(logprobs.logsumexp(-1), tail), torch.zeros(2, 5), atol=1e-5)
        True
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, V={vocab}] (V = the last dimension of teacher_logits).")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    logprobs = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    tail = logprobs.scatter(-1, topk_ids, float("-inf")).logsumexp(-1)
    return topk_ids, topk_logprobs, tail
