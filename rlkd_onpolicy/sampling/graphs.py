"""CUDA-graph replay of decode steps: the sampler's fast path on a GPU.

A decode step of a small model at batch 64 is a few hundred small kernels; launched one by one from Python they
cost 24 ms a step on an H200 for a Qwen2.5-0.5B-shaped model, while reading its weights once takes ~0.3 ms.
`torch.compile(mode="reduce-overhead")` removes the overhead but compiled for 38 s there, and again for every new
shape. Here the step is captured as a CUDA graph directly (no compiler): capture costs one forward pass, and a
step then took ~6 ms there; by estimate (not yet profiled) most of that is the eager sampling around the replay
(docs/performance.md).

One `GraphBucket` per (batch size, cache length, step width) holds everything the graph reads at a fixed address: a
`StaticCache`, the step's input ids, position ids and the (B, L) 0/1 attention mask. `decode` buckets cache
lengths to multiples of 64, so batches of varying prompt widths reuse a handful of graphs. Between rollouts the
cache is zeroed in place (its write position is a device tensor that the graph advances itself).

The captured forward is the model's own (any transformers causal LM with `sdpa` or `eager` attention and only
full-attention layers): only the attention mask is built here, as the 4-D mask transformers passes through
unchanged, so that no host synchronisation happens inside the step. SKD uses two kinds of bucket: the student's
single-token draft step and the teacher's draft_len-token verification step. On a CPU the same static-buffer step runs
without capture; the tests use that path to check the bookkeeping token for token.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from transformers import StaticCache

from .hf import cache_kwarg
from .rng import row_uniforms
from .warping import sample_from_logits

GRAPH_ATTENTION = ("sdpa", "eager")


def check_graphable(model: torch.nn.Module) -> None:
    """Raise ValueError unless `model`'s decode step can be captured as a CUDA graph by `GraphBucket`."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in GRAPH_ATTENTION:
        raise ValueError(
            f"cache_implementation='cuda_graph' needs attn_implementation in {GRAPH_ATTENTION}, the model uses "
            f"{impl!r}; load it with attn_implementation='sdpa' or use cache_implementation='static'"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(
            f"cache_implementation='cuda_graph' supports full-attention layers only, the model has "
            f"{sorted(layer_types)}; use cache_implementation='static' or 'dynamic'"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "cache_implementation='cuda_graph' cannot capture a DeepSpeed ZeRO-3 partitioned model (its forward "
            "gathers parameters); use cache_implementation='dynamic'"
        )


def graphable(model: torch.nn.Module) -> bool:
    try:
        check_graphable(model)
    except ValueError:
        return False
    return True


def _run_then_capture(run, device: torch.device):
    """First use of a step: run it eagerly on a side stream (this is the real step; it also warms up cuBLAS), then
    capture the same step. Capture records kernels without running them, so no state advances twice.
    Returns (the eager run's result, the graph, the captured run's output buffers)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        result = run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    return result, graph, captured


class GraphBucket:
    """Static buffers, a StaticCache and (on CUDA) a captured q-token step for one batch size and cache length.

    Use: `reset(prompt_mask)` before a rollout (zeroes the cache, writes the prompt's mask and sets the write
    column to its width), a prefill of exactly that many columns through the model with `cache`, then
    `step(model, tokens, positions)` per step; the caller sets `mask[:, column] = 1` for the tokens it feeds before
    each step (or passes its own (B, L) mask to copy in). A step's queries see the columns whose mask is 1, up to
    their own column (causal within a q-token block), so columns filled in advance stay invisible until reached.
    """

    def __init__(self, model, bsz: int, cache_len: int, q: int, device: torch.device, capture: bool):
        self.capture, self.keep_last = capture, q == 1  # (no reference to the model: the pool is keyed weakly by it)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.mask = torch.zeros(bsz, cache_len, dtype=torch.long, device=device)
        self.ids = torch.zeros(bsz, q, dtype=torch.long, device=device)
        self.pos = torch.zeros(bsz, q, dtype=torch.long, device=device)
        self.column = torch.zeros((), dtype=torch.long, device=device)  # the cache's next write column, on device
        self.columns = torch.arange(cache_len, device=device)
        self.offsets = torch.arange(q, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.eager_mask = (getattr(model.config, "_attn_implementation", None) or "eager") == "eager"
        self.cache_kwarg = cache_kwarg(model)
        self.sampled_steps: dict[tuple, SampledStep] = {}

    def sampled_step(self, logits: torch.Tensor, *, stream, temperature, top_p, vocab_size, eos, pad) -> SampledStep:
        """This bucket's whole-step graph for these sampling settings (built once per setting)."""
        key = (stream, temperature, top_p, vocab_size, pad, None if eos is None else tuple(eos.tolist()),
               logits.dtype, logits.shape[-1])  # fmt: skip
        if key not in self.sampled_steps:
            self.sampled_steps[key] = SampledStep(self, logits, stream=stream, temperature=temperature, top_p=top_p,
                                                  vocab_size=vocab_size, eos=eos, pad=pad)  # fmt: skip
        return self.sampled_steps[key]

    def reset(self, prompt_mask: torch.Tensor) -> None:
        self.cache.reset()  # zeroes keys, values and the write position in place: the graph's addresses stay
        self.mask.zero_()
        self.mask[:, : prompt_mask.shape[1]] = prompt_mask
        self.column.fill_(prompt_mask.shape[1])

    def _forward(self, model: torch.nn.Module) -> torch.Tensor:
        causal = self.columns[None, :] <= (self.column + self.offsets)[:, None]  # (q, L)
        allowed = self.mask[:, None, None, :].bool() & causal  # (B, 1, q, L)
        if self.eager_mask:  # eager attention adds the mask to the scores
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        else:  # sdpa: boolean, True = attend
            mask = allowed
        out = model(
            input_ids=self.ids,
            attention_mask=mask,
            position_ids=self.pos,
            use_cache=True,
            logits_to_keep=1 if self.keep_last else 0,
            **{self.cache_kwarg: self.cache},
        )
        self.column.add_(self.ids.shape[1])
        return out.logits

    def step(
        self,
        model: torch.nn.Module,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed tokens (B,) or (B, q) at positions (B, q); returns logits (B, 1 or q, V), valid until the next step."""
        self.ids.copy_(tokens.view(self.ids.shape))
        self.pos.copy_(positions.view(self.pos.shape))
        if mask is not None and mask is not self.mask:
            self.mask.copy_(mask)
        if not self.capture:
            return self._forward(model)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        logits, self.graph, self.logits = _run_then_capture(lambda: self._forward(model), self.ids.device)
        return logits


class SampledStep:
    """A whole decode step in one graph: sample from the previous step's logits, record the token, feed it forward.

    Built on a `GraphBucket` (its cache, mask, ids and positions) for one set of sampling settings, which the graph
    bakes in. The step counter, the row seeds, the next positions, the finished rows and the tokens live in device
    buffers the graph reads and advances, so that a decoding step is one replay and no eager op. `start` loads a
    rollout's prefill logits, seeds and positions; `tokens[:, :t]` holds the sampled tokens after t steps.
    """

    def __init__(self, bucket: GraphBucket, logits: torch.Tensor, *, stream, temperature, top_p, vocab_size, eos,
                 pad: int):  # fmt: skip
        bsz, device = bucket.ids.shape[0], bucket.ids.device
        self.bucket, self.capture = bucket, bucket.capture
        self.settings = (stream, temperature, top_p, vocab_size, pad)
        self.logits = torch.zeros_like(logits[:, -1:])
        self.tokens = torch.full((bsz, bucket.mask.shape[1]), pad, dtype=torch.long, device=device)
        self.done = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.seeds = torch.zeros(bsz, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        self.eos = None if eos is None else eos.to(device).clone()
        self.graph: torch.cuda.CUDAGraph | None = None

    def start(self, logits: torch.Tensor, row_seeds: torch.Tensor, next_pos: torch.Tensor) -> None:
        _, _, _, _, pad = self.settings
        self.logits.copy_(logits[:, -1:])
        self.seeds.copy_(row_seeds)
        self.next_pos.copy_(next_pos)
        self.done.zero_()
        self.step_index.zero_()
        self.tokens.fill_(pad)

    def _run(self, model: torch.nn.Module) -> None:
        stream, temperature, top_p, vocab_size, pad = self.settings
        bucket, bsz = self.bucket, self.tokens.shape[0]
        uniforms = row_uniforms(self.seeds, self.step_index.expand(bsz), stream)
        tok = sample_from_logits(self.logits[:, -1, :vocab_size], uniforms, temperature, top_p)
        tok = torch.where(self.done, pad, tok)
        self.tokens.scatter_(1, self.step_index.view(1, 1).expand(bsz, 1), tok[:, None])
        if self.eos is not None:
            self.done |= (tok[:, None] == self.eos).any(-1)
        bucket.mask.scatter_(1, bucket.column.view(1, 1).expand(bsz, 1), 1)  # the fed token's column
        bucket.ids.copy_(tok[:, None])
        bucket.pos.copy_(self.next_pos)
        self.logits.copy_(bucket._forward(model))
        self.next_pos.add_(1)
        self.step_index.add_(1)

    def step(self, model: torch.nn.Module) -> None:
        """One decoding step (replayed once captured; the first call runs it eagerly, then captures it)."""
        if not self.capture:
            self._run(model)
        elif self.graph is not None:
            self.graph.replay()
        else:
            _, self.graph, _ = _run_then_capture(lambda: self._run(model), self.tokens.device)


class GraphPool:
    """Buckets of one model, least recently used dropped beyond `max_buckets` (each holds a KV cache)."""

    def __init__(self, model: torch.nn.Module, max_buckets: int = 4):
        self.model_ref = weakref.ref(model)
        self.max_buckets = max_buckets
        self.buckets: OrderedDict[tuple, GraphBucket] = OrderedDict()

    def get(self, bsz: int, cache_len: int, q: int, device: torch.device) -> GraphBucket:
        model = self.model_ref()
        param = next(model.parameters())
        key = (bsz, cache_len, q, str(device), param.dtype, str(param.device))
        if key in self.buckets:
            self.buckets.move_to_end(key)
            return self.buckets[key]
        while len(self.buckets) >= self.max_buckets:
            self.buckets.popitem(last=False)
        bucket = GraphBucket(model, bsz, cache_len, q, device, capture=device.type == "cuda")
        self.buckets[key] = bucket
        return bucket


_POOLS: weakref.WeakKeyDictionary[torch.nn.Module, GraphPool] = weakref.WeakKeyDictionary()


def graph_bucket(model: torch.nn.Module, bsz: int, cache_len: int, device: torch.device, q: int = 1) -> GraphBucket:
    """The model's bucket for this batch size, cache length and step width q (created, and captured at its first
    step, once)."""
    if model not in _POOLS:
        _POOLS[model] = GraphPool(model)
    return _POOLS[model].get(bsz, cache_len, q, device)


def release_graphs(model: torch.nn.Module | None = None) -> None:
    """Free the captured graphs and their KV caches of one model (or of every model)."""
    if model is None:
        _POOLS.clear()
    else:
        _POOLS.pop(model, None)
