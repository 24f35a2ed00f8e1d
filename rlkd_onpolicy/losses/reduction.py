"""Masking and reduction shared by every loss.

Masked tokens are dropped *before* a loss is computed, so whatever sits in a padded row (garbage logits,
-inf) can never reach the result or its gradient. Reductions:

- ``"mean"``: sum over counted tokens / their number (0 when no token counts, with zero gradients);
- ``"sum"``: the sum over counted tokens;
- ``"none"``: per-token values in the mask's shape, 0 at masked tokens;
- ``"sum_count"``: the tuple ``(sum, count)``, so a trainer divides once by the number of tokens in the whole
  optimizer step (right under gradient accumulation and data parallelism; see torchtitan's loss).
"""

from collections.abc import Callable

import torch

REDUCTIONS = ("mean", "sum", "none", "sum_count")

Reduced = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")


def check_mask(mask: torch.Tensor | None, lead_shape: torch.Size, what: str = "logits") -> None:
    if mask is None:
        return
    if mask.shape != lead_shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the {what} have leading shape {tuple(lead_shape)}; "
            "the mask must have one entry per token (the logits' shape without the vocabulary dimension)."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = the token counts); got dtype {mask.dtype}.")


def masked_token_loss(
    per_token_fn: Callable[..., torch.Tensor],
    tensors: tuple[torch.Tensor, ...],
    lead_shape: torch.Size,
    mask: torch.Tensor | None,
    reduction: str,
) -> Reduced:
    """Run `per_token_fn` on the counted rows of `tensors` (each shaped `lead_shape + (...)`) and reduce.

    `per_token_fn(*rows)` receives each tensor flattened to `(n, ...)` with only counted rows and returns `(n,)`.
    """
    check_reduction(reduction)
    n_lead = len(lead_shape)
    flat = [t.reshape(-1, *t.shape[n_lead:]) for t in tensors]
    if mask is None:
        rows = flat
        index = None
    else:
        index = mask.reshape(-1).nonzero().squeeze(-1)
        rows = [t.index_select(0, index) for t in flat]
    values = per_token_fn(*rows)
    count = torch.tensor(values.shape[0], device=values.device, dtype=torch.long)
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "sum_count":
        return total, count
    if reduction == "mean":
        return total / count.clamp_min(1)
    full = values.new_zeros(flat[0].shape[0]) if index is not None else None
    if full is None:
        return values.reshape(lead_shape)
    return full.index_put((index,), values).reshape(lead_shape)
