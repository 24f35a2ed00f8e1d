"""Importance of a decoder's units, from its activations on calibration data (Minitron, arXiv 2407.14679).

One pass over the calibration data with forward hooks collects, per unit, the mean of a squared activation over every
real (unmasked) token:

- MLP neuron j of layer l: the j-th input of `down_proj`, i.e. `act(gate_proj x) * up_proj x`. A neuron whose input
  to the down projection is zero on every token contributes nothing to the output.
- Attention head h of layer l: the squared norm of its slice of `o_proj`'s input (the head's attention output).
- Embedding channel c: the c-th output of every RMSNorm (the two of each layer and the final one), summed over them.
  A residual-stream channel that is zero everywhere has zero norm outputs, whatever the norms' weights.
- Layer l: block influence (ShortGPT, arXiv 2403.03853), the mean over tokens of 1 − cos(layer input, layer output).
  A layer that leaves the residual stream unchanged scores 0.

Minitron aggregates over the batch by mean and over the sequence by L2 norm; a mean of squares over all real tokens
ranks the same way for equal-length sequences and does not let long sequences dominate.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Importance", "calibration_batches", "decoder_layers", "measure_importance"]


@dataclass
class Importance:
    """Per-unit scores, higher = more important. Shapes: `mlp (L, intermediate)`, `heads (L, num_attention_heads)`,
    `hidden (hidden_size,)`, `layers (L,)`; `tokens` is the number of real tokens they were measured on."""

    mlp: torch.Tensor
    heads: torch.Tensor
    hidden: torch.Tensor
    layers: torch.Tensor
    tokens: int


def decoder_layers(model) -> torch.nn.ModuleList:
    """`model.model.layers` of a Llama-like causal LM; a clear error for anything else."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no `model.layers`; pruning supports Llama, Qwen2, Qwen3 and "
            "Mistral-style decoders."
        )
    return layers


def _as_batch(item, device) -> dict:
    """A calibration item (a 1-D or 2-D tensor of ids, a list of ids, or a dict of model inputs) as model kwargs."""
    if isinstance(item, dict):
        batch = dict(item)
    else:
        ids = torch.as_tensor(item)
        batch = {"input_ids": ids}
    ids = batch.get("input_ids")
    if ids is None:
        raise ValueError(f"A calibration dict needs 'input_ids'; got keys {sorted(batch)}.")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        if "attention_mask" in batch:
            batch["attention_mask"] = torch.as_tensor(batch["attention_mask"]).unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"Calibration input_ids must be a non-empty 1-D or 2-D integer tensor; got shape "
            f"{tuple(ids.shape)} of {ids.dtype}."
        )
    batch["input_ids"] = ids
    mask = batch.get("attention_mask")
    batch["attention_mask"] = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def measure_importance(model, calibration: Iterable) -> Importance:
    """Run `model` over `calibration` (tensors of ids or dicts of model inputs) and score every unit."""
    layers = decoder_layers(model)
    config = model.config
    n_layers, n_heads = len(layers), config.num_attention_heads
    device = next(model.parameters()).device
    mlp = torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    hidden = torch.zeros(config.hidden_size, dtype=torch.float64)
    influence = torch.zeros(n_layers, dtype=torch.float64)
    state = {"mask": None}  # the current batch's real tokens, (B, T) bool

    def masked(x):  # (B, T, D) -> (N, D) float64 rows of real tokens
        return x[state["mask"]].double()

    def on_down_proj(index):
        def hook(module, args):
            mlp[index] += masked(args[0]).pow(2).sum(0).cpu()

        return hook

    def on_o_proj(index):
        def hook(module, args):
            x = masked(args[0])
            heads[index] += x.view(x.shape[0], n_heads, x.shape[-1] // n_heads).pow(2).sum(-1).sum(0).cpu()

        return hook

    def on_norm(module, args, output):
        hidden.add_(masked(output).pow(2).sum(0).cpu())

    def on_layer(index):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(masked(before), masked(after), dim=-1)
            influence[index] += (1 - cos).sum().cpu()

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
            handles.append(layer.input_layernorm.register_forward_hook(on_norm))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
            handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        handles.append(model.model.norm.register_forward_hook(on_norm))
        tokens = 0
        was_training = model.training
        model.eval()
        try:
            for item in calibration:
                batch = _as_batch(item, device)
                mask = batch["attention_mask"].bool()
                state["mask"] = mask
                # Positions over real tokens, as generation counts them, so left padding changes nothing.
                batch.setdefault("position_ids", (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0))
                model(**batch, use_cache=False)
                tokens += int(mask.sum())
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError(
            "The calibration data has no real token (empty, or every attention_mask is 0); give a few "
            "dozen texts of the kind the student will see."
        )
    return Importance(
        mlp=mlp / tokens, heads=heads / tokens, hidden=hidden / tokens, layers=influence / tokens, tokens=tokens
    )


def calibration_batches(tokenizer, examples: Iterable, *, max_length: int = 256, batch_size: int = 8):
    """Tokenised calibration batches (`input_ids`, `attention_mask`, right-padded) from examples in the trainer's
    formats: `{"text": str}`, `{"prompt", "completion"}` (strings or chat messages) or `{"messages": [...]}`; the
    text is what the model reads when distilled, chat template included. A list is returned so it can be reused."""
    from rlkd_onpolicy.data.prompt_completion import tokenize_example

    rows = []
    for example in examples:
        if isinstance(example, str):
            example = {"text": example}
        if "text" in example:
            ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"][:max_length]
        else:
            ids = tokenize_example(tokenizer, example, max_length=max_length).input_ids[:max_length]
        if ids:
            rows.append(ids)
    if not rows:
        raise ValueError("No calibration example has a token; give texts or prompt–completion examples.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
