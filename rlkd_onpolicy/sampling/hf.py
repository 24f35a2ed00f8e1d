"""The samplers' leaf: the checks on their inputs and what they need to know about transformers models.

Checks shared by every sampler (prompts left-padded, EOS and pad ids), the eval-mode
context, and the shim over transformers' causal LMs: the KV cache's keyword (renamed in transformers 5), a fresh
cache, and one cached forward step. Imports nothing from the rest of `rlkd_onpolicy.sampling`.
"""

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache, StaticCache


# ------------------------------------------------------------------------------------------------------ the checks
def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Raise ValueError unless input_ids / attention_mask are matching (B, P) tensors of a LEFT-padded batch."""
    if input_ids.ndim != 2 or attention_mask.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, P) "
            "with the same shape"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt batch {tuple(input_ids.shape)}: need at least one row and one column")
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must contain only 0 and 1")
    # left padding: zeros then ones in every row, and every row ends with a real token
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool((mask[:, -1] == 1).all()):
        raise ValueError(
            "prompts must be LEFT-padded (each attention_mask row is 0...0 1...1 and ends with 1); "
            "set tokenizer.padding_side = 'left' when batching prompts"
        )


def eos_tensor(eos_token_id: int | Sequence[int] | None, device) -> torch.Tensor | None:
    """EOS id(s) as a (E,) int64 tensor, or None (no stopping at EOS)."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.int64, device=device) if ids else None


def resolve_pad(pad_token_id: int | None, eos_token_id: int | Sequence[int] | None) -> int:
    """pad_token_id, else the (first) EOS id, else 0."""
    if pad_token_id is not None:
        return int(pad_token_id)
    if eos_token_id is None:
        return 0
    return int(eos_token_id) if isinstance(eos_token_id, int) else int(next(iter(eos_token_id), 0))


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (dropout off) for a rollout, then restore each one's previous mode."""
    previous = [(m, m.training) for m in models if m is not None]
    try:
        for m, _ in previous:
            m.eval()
        yield
    finally:
        for m, was_training in previous:
            m.train(was_training)


# ----------------------------------------------------------------------------------------------- model plumbing
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting only real tokens (pads get 0; their outputs are never used)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@functools.cache
def _forward_params(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's keyword for the KV cache: transformers 5.x renames `past_key_values` to `cache`; older causal
    LMs only know the former."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def new_cache(model: torch.nn.Module, implementation: str, max_len: int):
    """A fresh KV cache: DynamicCache, or StaticCache of `max_len` columns (for fixed shapes / torch.compile)."""
    if implementation in ("static", "cuda_graph"):
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def forward_step(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask_buffer: torch.Tensor,
    position_ids: torch.Tensor,
    cache,
    used_columns: int,
    last_only: bool = False,
) -> torch.Tensor:
    """One cached forward. input_ids / position_ids (B, q); mask_buffer (B, L) covers cache + new tokens, of which
    the first `used_columns` are meaningful. A StaticCache gets the whole buffer (its mask width is fixed; later
    columns are 0), a DynamicCache the used prefix. Returns float logits (B, q or 1, V) on the caller's device."""
    device = model_device(model)
    mask = mask_buffer if isinstance(cache, StaticCache) else mask_buffer[:, :used_columns]
    kwargs = {cache_kwarg(model): cache}
    if last_only and "logits_to_keep" in _forward_params(type(model)):
        kwargs["logits_to_keep"] = 1
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=True,
        **kwargs,
    )
    logits = out.logits[:, -1:] if last_only else out.logits
    return logits.to(input_ids.device)
