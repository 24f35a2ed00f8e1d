"""Temperature / top-p warping and inverse-CDF sampling from one uniform number per row.

The plain reference sampler, the batched decoder and SKD's verification all sample through `sample_from_logits`,
so that every path turns the same logits and the same uniform into the same token.
"""

import torch


def warp_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities after temperature and top-p (nucleus) warping, computed in float32.

    logits (..., V) -> probs (..., V). temperature == 0 gives a point mass at the argmax (first index on ties).
    top_p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one token).
    """
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass strictly before it is below top_p: the token that crosses top_p stays
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def warp_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """log of `warp_probs` (-inf outside the nucleus). logits (..., V) -> (..., V) float32."""
    return warp_probs(logits, temperature, top_p).log()


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the smallest index whose cumulative mass exceeds u * total.

    probs (N, V) non-negative (need not be normalised); uniforms (N,) in [0, 1). Returns (N,) int64.
    The cumulative sum runs in float64 so that u * total < total always holds, and `right=True` never lands on a
    zero-probability token (its cumulative value equals its predecessor's).
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def sample_from_logits(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0
) -> torch.Tensor:
    """One token per row from warped logits. logits (N, V); uniforms (N,) in [0, 1); returns (N,) int64.

    temperature == 0 is greedy (the uniform is ignored).
    """
    if temperature == 0:
        return logits.argmax(-1)
    return sample_from_probs(warp_probs(logits, temperature, top_p), uniforms)
