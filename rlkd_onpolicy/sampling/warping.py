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


_BLOCK = 256  # tokens per block of the two-level inverse CDF


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the smallest index whose cumulative mass exceeds u * total.

    probs (N, V) non-negative (need not be normalised); uniforms (N,) in [0, 1). Returns (N,) int64.
    Two levels, so that no scan runs along a whole 150k-token row (a GPU scans a long row in one block, which
    took milliseconds per decoding step): cumulative sums inside blocks of 256 tokens (many short rows, parallel),
    a cumulative sum of the block totals, then the block and the token inside it. The sums run in float64 and
    every comparison is `right=True`, so a zero-probability token (or block) is never chosen: its cumulative value
    equals its predecessor's. The block totals are the in-block sums' last entries, so both levels agree.
    """
    n, vocab = probs.shape
    blocks = -(-vocab // _BLOCK)
    padded = probs.new_zeros(n, blocks * _BLOCK, dtype=torch.float64)
    padded[:, :vocab] = probs
    inner = padded.view(n, blocks, _BLOCK).cumsum(-1)  # (N, blocks, BLOCK)
    outer = inner[:, :, -1].cumsum(-1)  # (N, blocks): mass up to the end of each block
    target = uniforms.to(torch.float64).unsqueeze(-1) * outer[:, -1:]  # (N, 1), < total for u < 1
    block = torch.searchsorted(outer, target, right=True).clamp_max(blocks - 1)  # (N, 1)
    before = torch.where(block > 0, outer.gather(1, (block - 1).clamp_min(0)), 0.0)
    local = inner.gather(1, block[:, :, None].expand(n, 1, _BLOCK)).squeeze(1)  # (N, BLOCK)
    offset = torch.searchsorted(local, target - before, right=True)
    # rounding in `target - before` may land at the block's end: stay on its last token with mass
    last_positive = torch.searchsorted(local, local[:, -1:].contiguous(), right=False)
    offset = torch.minimum(offset, last_positive)
    return (block * _BLOCK + offset).squeeze(-1).clamp_max(vocab - 1)


def sample_from_logits(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0
) -> torch.Tensor:
    """One token per row from warped logits. logits (N, V); uniforms (N,) in [0, 1); returns (N,) int64.

    temperature == 0 is greedy (the uniform is ignored).
    """
    if temperature == 0:
        return logits.argmax(-1)
    return sample_from_probs(warp_probs(logits, temperature, top_p), uniforms)
