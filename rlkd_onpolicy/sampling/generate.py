"""Batched autoregressive decoding with KV caches, and its plain reference.

`decode` is the fast path: one prefill, then one single-token forward per step for the whole batch, with a
preallocated 2-D attention mask, explicit position ids, per-row counter-based randomness and no host sync inside
the loop except an "all finished?" check every `check_every` steps. `reference_generate` is the spec: one row at a
time, a full forward pass over the whole sequence per token, no cache.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .graphs import check_graphable, graph_bucket
from .hf import eos_tensor, forward_step, model_device, new_cache, position_ids_from_mask
from .rng import row_uniforms
from .rollout import first_eos_mask
from .warping import sample_from_logits


# --------------------------------------------------------------------------------------------------- fast decode
@dataclass
class DecodeOutput:
    """tokens (B, N) int64 (pad after the first EOS); completion_mask (B, N) bool; forward_passes: model calls."""

    tokens: torch.Tensor
    completion_mask: torch.Tensor
    forward_passes: int


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    row_seeds: torch.Tensor,
    *,
    stream: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    cache_implementation: str = "dynamic",
    check_every: int = 8,
    graph_sampling: bool = False,
) -> DecodeOutput:
    """Sample up to `max_new_tokens` per row from `model`, batched, with a KV cache.

    input_ids / attention_mask (B, P) left-padded; row_seeds (B,) int64. The token at output position t of row i
    uses the uniform `row_uniforms(row_seeds[i], t, stream)`, so a row's tokens do not depend on the rest of the
    batch. vocab_size cuts logits (padding rows of a larger output layer are never sampled). cache_implementation
    is one of CACHE_IMPLEMENTATIONS (sampling/spec.py). graph_sampling (with cache_implementation "cuda_graph")
    captures the sampling and bookkeeping in the step's graph too, so a step is one replay (graphs.SampledStep;
    same tokens; not yet measured on a GPU).
    """
    bsz, prompt_len = input_ids.shape
    device = input_ids.device
    eos = eos_tensor(eos_token_id, device)
    total = prompt_len + max_new_tokens
    # bucket the static cache length so that varying prompt lengths reuse a handful of shapes
    cache_len = total if cache_implementation == "dynamic" else -(-total // 64) * 64
    if graph_sampling and cache_implementation != "cuda_graph":
        raise ValueError(f"graph_sampling=True needs cache_implementation='cuda_graph', got {cache_implementation!r}")
    bucket = None
    if cache_implementation == "cuda_graph":
        check_graphable(model)
        bucket = graph_bucket(model, bsz, cache_len, device)
        bucket.reset(attention_mask)
        mask, cache = bucket.mask, bucket.cache
    else:
        mask = torch.zeros(bsz, cache_len, dtype=torch.long, device=device)
        mask[:, :prompt_len] = attention_mask
        cache = new_cache(model, cache_implementation, cache_len)

    logits = forward_step(model, input_ids, mask, position_ids_from_mask(attention_mask), cache, prompt_len, True)
    passes = 1
    next_pos = attention_mask.long().sum(-1, keepdim=True)  # (B, 1) position of the next token per row
    if graph_sampling:
        return _decode_sampled(model, bucket, logits, row_seeds, next_pos, eos, stream=stream,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               pad_token_id=pad_token_id, vocab_size=vocab_size, check_every=check_every)  # fmt: skip
    tokens = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        step_logits = logits[:, -1, :vocab_size]
        tok = sample_from_logits(step_logits, row_uniforms(row_seeds, t, stream), temperature, top_p)
        tok = torch.where(done, pad_token_id, tok)
        tokens[:, t] = tok
        if eos is not None:
            done |= torch.isin(tok, eos)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        mask[:, prompt_len + t] = 1
        if bucket is not None:
            logits = bucket.step(model, tok, next_pos)
        else:
            logits = forward_step(model, tok[:, None], mask, next_pos, cache, prompt_len + t + 1)
        passes += 1
        next_pos = next_pos + 1
    completion_mask = first_eos_mask(tokens, eos)
    tokens = torch.where(completion_mask, tokens, pad_token_id)
    return DecodeOutput(tokens=tokens, completion_mask=completion_mask, forward_passes=passes)


def _decode_sampled(model, bucket, logits, row_seeds, next_pos, eos, *, stream, max_new_tokens, temperature, top_p,
                    pad_token_id, vocab_size, check_every) -> DecodeOutput:  # fmt: skip
    """`decode`'s loop with every step one `SampledStep` (sampling, bookkeeping and forward in one graph)."""
    sampled = bucket.sampled_step(logits, stream=stream, temperature=temperature, top_p=top_p,
                                  vocab_size=vocab_size, eos=eos, pad=pad_token_id)  # fmt: skip
    sampled.start(logits, row_seeds, next_pos)
    passes = 1
    for t in range(max_new_tokens):
        sampled.step(model)  # samples token t, then feeds it forward (the last forward is not needed, but cheap)
        passes += 1
        if (t + 1) % check_every == 0 and bool(sampled.done.all()):
            break
    tokens = sampled.tokens[:, :max_new_tokens].clone()
    completion_mask = first_eos_mask(tokens, eos)
    tokens = torch.where(completion_mask, tokens, pad_token_id)
    return DecodeOutput(tokens=tokens, completion_mask=completion_mask, forward_passes=passes)


# -------------------------------------------------------------------------------------------------- the reference
@torch.no_grad()
def reference_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    row_seeds: torch.Tensor,
    *,
    stream: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
) -> DecodeOutput:
    """The spec for `decode`: each row alone, without padding, one full forward pass (no cache) per token."""
    bsz = input_ids.shape[0]
    eos = eos_tensor(eos_token_id, input_ids.device)
    tokens = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    passes = 0
    for i in range(bsz):
        seq = input_ids[i][attention_mask[i].bool()].tolist()
        for t in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([seq], device=model_device(model))).logits[0, -1, :vocab_size]
            passes += 1
            u = row_uniforms(row_seeds[i : i + 1], t, stream)
            tok = int(sample_from_logits(logits[None].to(input_ids.device), u, temperature, top_p)[0])
            tokens[i, t] = tok
            seq.append(tok)
            if eos is not None and tok in eos.tolist():
                break
    completion_mask = first_eos_mask(tokens, eos)
    return DecodeOutput(
        tokens=torch.where(completion_mask, tokens, pad_token_id),
        completion_mask=completion_mask,
        forward_passes=passes,
    )
