"""Batched autoregressive decoding with KV caches, its plain reference, and the checks shared by all samplers.

`decode` is the fast path: one prefill, then one single-token forward per step for the whole batch, with a
preallocated 2-D attention mask, explicit position ids, per-row counter-based randomness and no host sync inside
the loop except an "all finished?" check every `check_every` steps. `reference_generate` is the spec: one row at a
time, a full forward pass over the whole sequence per token, no cache.
"""

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from rlkd_onpolicy.vocab import output_rows as output_vocab_size

from .graphs import check_graphable, graph_bucket
from .rng import row_uniforms
from .rollout import first_eos_mask
from .warping import sample_from_logits

# dynamic: transformers' DynamicCache; static: a preallocated StaticCache (fixed shapes, for torch.compile);
# cuda_graph: a StaticCache and the single-token step replayed as a CUDA graph (graphs.py; CUDA only)
CACHE_IMPLEMENTATIONS = ("dynamic", "static", "cuda_graph")


# ----------------------------------------------------------------------------------------------------- validation
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


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, name: str = "") -> None:
    """Range checks shared by every sampler."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"{name}temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{name}top_p must be in (0, 1], got {top_p}")


def shared_vocab_size(student: torch.nn.Module, teacher: torch.nn.Module, max_vocab_padding: int = 256) -> int:
    """The vocabulary both models can sample from: the smaller output size, after checking they differ by padding.

    Models of one family pad their embedding matrices differently (Qwen2.5-0.5B 151,936 rows vs Qwen2.5-7B 152,064
    for the same 151,665-token tokenizer); logits are cut to the smaller size. That still leaves the padding rows
    beyond the tokenizer: pass the tokenizer's length as `vocab_size` to the samplers to cut those too
    (rlkd_onpolicy/vocab.py).
    """
    student_v, teacher_v = output_vocab_size(student), output_vocab_size(teacher)
    if abs(student_v - teacher_v) > max_vocab_padding:
        raise ValueError(
            f"student vocabulary ({student_v} output rows) and teacher vocabulary ({teacher_v}) differ by "
            f"{abs(student_v - teacher_v)} rows, more than padding (max_vocab_padding={max_vocab_padding}); "
            "use a teacher and student that share a tokenizer, or raise max_vocab_padding if the extra rows are padding"
        )
    return min(student_v, teacher_v)


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


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.x renames `past_key_values` to `cache`; older causal LMs only know the former
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
    base = getattr(model, "_orig_mod", model)  # a torch.compile wrapper keeps the model's signature here
    if base is not model:
        # a new CUDA-graph step: the previous step's outputs have been consumed (tokens sampled) before this call
        torch.compiler.cudagraph_mark_step_begin()
    kwargs = {_cache_kwarg(base): cache}
    if last_only and "logits_to_keep" in _forward_params(type(base)):
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
    compile_step: bool = False,
    graph_sampling: bool = False,
) -> DecodeOutput:
    """Sample up to `max_new_tokens` per row from `model`, batched, with a KV cache.

    input_ids / attention_mask (B, P) left-padded; row_seeds (B,) int64. The token at output position t of row i
    uses the uniform `row_uniforms(row_seeds[i], t, stream)`, so a row's tokens do not depend on the rest of the
    batch. vocab_size cuts logits (padding rows of a larger output layer are never sampled). compile_step wraps
    the single-token step in torch.compile (CUDA and a static cache only: fixed shapes give one graph per
    (batch, cache length) bucket, and mode "reduce-overhead" replays it as a CUDA graph). graph_sampling (with
    cache_implementation "cuda_graph") captures the sampling and bookkeeping in the step's graph too, so a step is
    one replay (graphs.SampledStep; same tokens; not yet measured on a GPU).
    """
    bsz, prompt_len = input_ids.shape
    device = input_ids.device
    eos = eos_tensor(eos_token_id, device)
    total = prompt_len + max_new_tokens
    # bucket the static cache length so that varying prompt lengths reuse a handful of shapes
    cache_len = total if cache_implementation == "dynamic" else -(-total // 64) * 64
    check_compile(compile_step, cache_implementation, device)
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
    step = compiled_forward(model) if compile_step else model

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
            logits = forward_step(step, tok[:, None], mask, next_pos, cache, prompt_len + t + 1)
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


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def compiled_forward(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of the model for fixed-shape cached steps ("reduce-overhead": CUDA-graph replay), built once
    per model object and reused across rollouts; each (batch, cache length, query length) bucket compiles once."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, mode="reduce-overhead", fullgraph=False, dynamic=False)
    return _COMPILED[model]


def check_compile(compile_step: bool, cache_implementation: str, device: torch.device) -> None:
    if compile_step and (cache_implementation != "static" or device.type != "cuda"):
        raise ValueError(
            f"compile_step=True needs cache_implementation='static' on a CUDA device, got "
            f"cache_implementation={cache_implementation!r} on {device.type}; leave compile_step=False on the CPU"
        )


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
