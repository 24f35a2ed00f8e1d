"""Depth pruning: a student made of some of the teacher's decoder layers, chosen by position or by block influence.

`student_from_teacher` copies the chosen layers with the embeddings, final norm and LM head (DistilBERT's and
Minitron's depth baseline). `prune(..., num_hidden_layers=n)` picks the layers by measured influence instead.
Width pruning (`rlkd_onpolicy.pruning.width`) kept far more of a model than depth pruning at the same size in
Minitron's study and in ours (docs/pruning.md).
"""

import copy
from collections.abc import Sequence

import torch

__all__ = ["evenly_spaced_layers", "student_from_teacher"]


def evenly_spaced_layers(num_layers: int, keep: int) -> tuple[int, ...]:
    """`keep` layer indices out of `num_layers`, evenly spaced, first and last included: (30, 6) -> 0,6,12,17,23,29."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep={keep} layers must be between 1 and the teacher's {num_layers} layers.")
    if keep == 1:
        return (0,)
    return tuple(round(i * (num_layers - 1) / (keep - 1)) for i in range(keep))


def student_from_teacher(teacher, layers: Sequence[int] | int = 6) -> torch.nn.Module:
    """A smaller model on the teacher's tokenizer, initialised from some of the teacher's decoder layers.

    `layers` is either a count (evenly spaced, first and last included) or explicit teacher layer indices. The
    embeddings, final norm and LM head are copied; the student is a fresh model of the teacher's class with
    `num_hidden_layers=len(layers)`, so it saves and loads like any other. From SmolLM2-135M, 6 of 30 layers give
    ~49.6M parameters (the 28M-parameter embedding dominates).
    """
    inner = getattr(teacher, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(
            f"student_from_teacher needs a decoder-only model with `model.layers` (Llama, Qwen2, Mistral, ...); "
            f"got {type(teacher).__name__}."
        )
    num_layers = len(inner.layers)
    if isinstance(layers, int):
        layers = evenly_spaced_layers(num_layers, layers)
    layers = tuple(int(i) for i in layers)
    if not layers or any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers={layers} must be distinct indices in [0, {num_layers}) of the teacher's layers.")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    # Per-layer attributes (e.g. sliding-window layer types) must follow the kept layers.
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    student_state = {}
    for key in student.state_dict():
        source = key
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers.") :].split(".", 1)
            source = f"model.layers.{layers[int(index)]}.{rest}"
        student_state[key] = teacher_state[source].detach().clone()
    student.load_state_dict(student_state, strict=True)
    student.tie_weights()
    if teacher.generation_config is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).dtype)
