"""Structured pruning of a Llama-like teacher into a smaller model of the same class (Minitron, arXiv 2407.14679).

`prune` keeps, in every layer, the most important MLP neurons, key/value groups of attention heads and embedding
channels (scores from `measure_importance`), and the most influential layers; the result is a fresh model of the
teacher's class whose config carries the new widths, so it saves, loads and trains like any other.

What is sliced, for kept neurons `n`, query heads `q` (whole GQA groups), key/value heads `kv` and channels `c`:
`embed_tokens[:, c]`, `lm_head[:, c]`, every norm `[c]`, `q_proj[q, c]`, `k_proj / v_proj[kv, c]`, `o_proj[c, q]`,
`gate_proj / up_proj[n, c]`, `down_proj[c, n]` (biases follow their rows). `head_dim` is written into the config, since
transformers otherwise derives it as hidden_size / num_attention_heads.

Dropping embedding channels shrinks the RMSNorms' mean over channels by c = old / new hidden size. The kept norm
weights are scaled by sqrt(c) and `rms_norm_eps` by c, which makes the pruned model exact when the dropped channels are
zero (x / sqrt(c·m + c·eps) · sqrt(c) = x / sqrt(m + eps)) and keeps the norms' output scale otherwise. Qwen3's
per-head q/k norms share that eps; there it grows by c (e.g. 1e-6 to 1.3e-6), a change far below float32 rounding.
"""

import copy
import math
import re
from collections.abc import Iterable

import torch

from rlkd_onpolicy.pruning.importance import Importance, decoder_layers, measure_importance

__all__ = ["SUPPORTED_MODEL_TYPES", "WIDTHS", "count_parameters", "prune", "pruned_config", "widths_for_params"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
WIDTHS = ("intermediate_size", "num_attention_heads", "hidden_size", "num_hidden_layers")
# Widths a parameter target rounds to: MLP and embedding widths to multiples of 8 (tensor-core friendly).
_MULTIPLE = {"intermediate_size": 8, "hidden_size": 8}
# Configs whose validation wants hidden_size % num_attention_heads == 0 even with an explicit head_dim.
_HIDDEN_BY_HEADS = {"llama": True}


def check_supported(model) -> None:
    """Refuse, naming what is missing, a model this module cannot prune."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Pruning supports model types {SUPPORTED_MODEL_TYPES}; {type(model).__name__} has "
            f"model_type={model_type!r}. Cut such a model by depth with student_from_teacher, or "
            "convert it to one of those architectures."
        )
    layer = decoder_layers(model)[0]
    for path in (
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ):
        try:
            layer.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__}'s decoder layer has no {path}; it is not Llama-like.") from None
    if getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None):
        raise ValueError(f"{type(model).__name__} is a mixture of experts; pruning supports dense MLPs only.")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_widths(config, widths: dict) -> None:
    unknown = sorted(set(widths) - set(WIDTHS))
    if unknown:
        raise ValueError(f"Unknown widths {unknown}; prune takes {WIDTHS} (the config fields they set).")
    group = config.num_attention_heads // config.num_key_value_heads
    for name, value in widths.items():
        current = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= current:
            raise ValueError(
                f"{name}={value!r} must be an integer in [1, {current}] (the teacher's {name}); pruning "
                "only removes units."
            )
        if name == "num_attention_heads" and value % group:
            raise ValueError(
                f"num_attention_heads={value} must be a multiple of {group}: heads are pruned as whole "
                f"key/value groups ({config.num_attention_heads} query heads share "
                f"{config.num_key_value_heads} key/value heads), keeping {group} query heads per group."
            )
    hidden = widths.get("hidden_size", config.hidden_size)
    heads = widths.get("num_attention_heads", config.num_attention_heads)
    if _HIDDEN_BY_HEADS.get(config.model_type) and hidden % heads:
        raise ValueError(
            f"hidden_size={hidden} must be a multiple of num_attention_heads={heads}: transformers' "
            f"{type(config).__name__} refuses other sizes (its head_dim stays {_head_dim(config)})."
        )


def pruned_config(config, **widths):
    """A copy of `config` with the given widths (and the key/value heads and head_dim they imply)."""
    _check_widths(config, widths)
    new = copy.deepcopy(config)
    head_dim = _head_dim(config)
    group = config.num_attention_heads // config.num_key_value_heads
    for name, value in widths.items():
        setattr(new, name, value)
    new.num_key_value_heads = new.num_attention_heads // group
    new.head_dim = head_dim
    if getattr(new, "layer_types", None) is not None and len(new.layer_types) != new.num_hidden_layers:
        new.layer_types = list(new.layer_types[: new.num_hidden_layers])  # `prune` sets the kept layers' own types
    if getattr(new, "max_window_layers", None) is not None:
        new.max_window_layers = min(new.max_window_layers, new.num_hidden_layers)
    return new


def count_parameters(model_class, config) -> int:
    """Parameters of a fresh `model_class(config)`, built on the meta device (no memory); tied weights count once."""
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())


def _scaled(config, axis: str, scale: float, heads: int) -> int:
    """`axis` of `config` scaled by `scale` and rounded to a valid width; `heads` is the scaled head count."""
    current = getattr(config, axis)
    if axis == "num_attention_heads":
        group = current // config.num_key_value_heads
        return max(1, round(config.num_key_value_heads * scale)) * group
    multiple = _MULTIPLE.get(axis, 1) if current >= 4 * _MULTIPLE.get(axis, 1) else 1
    if axis == "hidden_size" and _HIDDEN_BY_HEADS.get(config.model_type):
        multiple = math.lcm(multiple, heads)
    rounded = max(multiple, round(current * scale / multiple) * multiple)
    return rounded if rounded <= current else current // multiple * multiple


def widths_for_params(model, params: float, axes: Iterable[str] = ("intermediate_size",)) -> dict:
    """The widths, one scale shared by every axis in `axes`, of the largest model of at most `params` parameters;
    with several axes, the MLP then grows back into what the coarser axes' rounding left of the budget.

    MLP and embedding widths are rounded to multiples of 8 (Llama: embedding widths to multiples of 8 and of the head
    count too), heads to whole key/value groups, layers to integers.
    Raises when `params` is not below the teacher's count or not reachable by shrinking `axes` alone.
    """
    check_supported(model)
    axes = tuple(axes)
    if not axes or set(axes) - set(WIDTHS):
        raise ValueError(f"axes={axes} must be a non-empty subset of {WIDTHS}.")
    config, cls = model.config, type(model)
    full = count_parameters(cls, config)
    if not 0 < params < full:
        raise ValueError(f"params={params:.4g} must be positive and below the teacher's {full:,} parameters.")

    def widths_at(scale):
        heads = (
            _scaled(config, "num_attention_heads", scale, 0)
            if "num_attention_heads" in axes
            else config.num_attention_heads
        )
        return {axis: _scaled(config, axis, scale, heads) for axis in axes}

    smallest = count_parameters(cls, pruned_config(config, **widths_at(0.0)))
    if smallest > params:
        raise ValueError(
            f"params={params:.4g} is out of reach by shrinking {axes}: their smallest widths still give "
            f"{smallest:,} parameters. Add axes (e.g. hidden_size, which also shrinks the embedding)."
        )

    def fits(widths):
        return count_parameters(cls, pruned_config(config, **widths)) <= params

    low, high = 0.0, 1.0  # fits(low), not fits(high): the count grows with the scale
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(widths_at(mid)) else (low, mid)
    widths = widths_at(low)
    if "intermediate_size" in axes and len(axes) > 1:
        # The coarse axes (heads, embedding, layers) round down; the MLP, the finest axis, takes what is left.
        step = _MULTIPLE["intermediate_size"] if config.intermediate_size >= 4 * _MULTIPLE["intermediate_size"] else 1
        units = config.intermediate_size // step
        low_units, high_units = widths["intermediate_size"] // step, units + 1
        while high_units - low_units > 1:
            mid = (low_units + high_units) // 2
            low_units, high_units = (
                (mid, high_units) if fits(dict(widths, intermediate_size=mid * step)) else (low_units, mid)
            )
        widths["intermediate_size"] = max(widths["intermediate_size"], low_units * step)
    return widths


def _keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores, in their original order (a stable sort breaks ties by position)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def prune(
    model,
    calibration: Iterable | None = None,
    *,
    importance: Importance | None = None,
    params: float | None = None,
    axes: Iterable[str] = ("intermediate_size",),
    **widths,
):
    """A smaller copy of `model` (Llama, Qwen2, Qwen3, Mistral), keeping its most important units.

    Args:
        model: the teacher, left unchanged; the result shares no storage with it.
        calibration: an iterable of input-id tensors (1-D or 2-D) or dicts of model inputs, scored with
            `measure_importance`; a few dozen texts of the student's task (Minitron uses 1024 samples).
        importance: scores measured before (skips the calibration pass; reuse them across several prunes).
        params: a parameter target; `widths_for_params` picks the widths along `axes`. Exclusive with widths.
        **widths: `intermediate_size`, `num_attention_heads` (a multiple of the query heads per key/value head),
            `hidden_size`, `num_hidden_layers`: the config fields they set. None given: an equal copy.

    Returns:
        A model of `type(model)` with the pruned config, in the teacher's dtype and on its device, in eval mode.

    Example:
        >>> student = prune(teacher, calibration, intermediate_size=512)  # doctest: +SKIP
        >>> student = prune(teacher, calibration, params=81e6, axes=("hidden_size",))  # doctest: +SKIP
    """
    check_supported(model)
    if params is not None:
        if widths:
            raise ValueError(f"Give either params= or widths {sorted(widths)}, not both.")
        widths = widths_for_params(model, params, axes)
    config = model.config
    widths = {name: value for name, value in widths.items() if value is not None}
    new_config = pruned_config(config, **widths)
    changed = {name for name in widths if getattr(config, name) != widths[name]}
    if changed and importance is None:
        if calibration is None:
            raise ValueError(f"Pruning {sorted(changed)} needs calibration data (or importance=) to rank the units.")
        importance = measure_importance(model, calibration)

    n_layers, group = config.num_hidden_layers, config.num_attention_heads // config.num_key_value_heads
    head_dim = _head_dim(config)
    everything = slice(None)
    layers = (
        _keep(importance.layers, new_config.num_hidden_layers)
        if "num_hidden_layers" in changed
        else torch.arange(n_layers)
    )
    channels = _keep(importance.hidden, new_config.hidden_size) if "hidden_size" in changed else everything
    norm_scale = math.sqrt(config.hidden_size / new_config.hidden_size)
    if "hidden_size" in changed:
        new_config.rms_norm_eps = config.rms_norm_eps * config.hidden_size / new_config.hidden_size
    if getattr(config, "layer_types", None) is not None:
        new_config.layer_types = [config.layer_types[i] for i in layers.tolist()]

    def rows_of_heads(heads: torch.Tensor) -> torch.Tensor:  # head indices -> rows of a (heads * head_dim, .) matrix
        return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

    def selection(source_layer: int | None, name: str) -> tuple:
        """(rows, columns) to keep of the source tensor `name` (a key inside the layer, or a top-level key)."""
        if source_layer is None:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                return everything, channels
            if name == "model.norm.weight":
                return (channels,)
            raise ValueError(f"prune does not know the tensor {name!r} of {type(model).__name__}.")
        neurons = (
            _keep(importance.mlp[source_layer], new_config.intermediate_size)
            if "intermediate_size" in changed
            else everything
        )
        if "num_attention_heads" in changed:
            groups = _keep(importance.heads[source_layer].view(-1, group).sum(-1), new_config.num_key_value_heads)
            queries = rows_of_heads((groups[:, None] * group + torch.arange(group)).reshape(-1))
            keys = rows_of_heads(groups)
        else:
            queries = keys = everything
        module, _, kind = name.rpartition(".")
        if module in ("input_layernorm", "post_attention_layernorm"):
            return (channels,)
        if module in ("self_attn.q_norm", "self_attn.k_norm"):  # over head_dim, which pruning keeps
            return (everything,)
        rows, columns = {
            "self_attn.q_proj": (queries, channels),
            "self_attn.k_proj": (keys, channels),
            "self_attn.v_proj": (keys, channels),
            "self_attn.o_proj": (channels, queries),
            "mlp.gate_proj": (neurons, channels),
            "mlp.up_proj": (neurons, channels),
            "mlp.down_proj": (channels, neurons),
        }.get(module, (None, None))
        if rows is None:
            raise ValueError(f"prune does not know the tensor {name!r} of {type(model).__name__}'s layers.")
        return (rows,) if kind == "bias" else (rows, columns)

    teacher_state = model.state_dict()
    student = type(model)(new_config)
    state = {}
    for key in student.state_dict():
        match = _LAYER_KEY.match(key)
        if match:
            source_layer = int(layers[int(match.group(1))])
            source, name = f"model.layers.{source_layer}.{match.group(2)}", match.group(2)
        else:
            source_layer, source, name = None, key, key
        tensor = teacher_state[source]
        for dim, index in enumerate(selection(source_layer, name)):
            if not isinstance(index, slice):
                tensor = tensor.index_select(dim, index.to(tensor.device))
        tensor = tensor.detach().clone()
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensor = tensor * norm_scale
        state[key] = tensor
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    if model.generation_config is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    parameter = next(model.parameters())
    return student.to(device=parameter.device, dtype=parameter.dtype).eval()
