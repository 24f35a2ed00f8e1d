"""The trainer's data: its tokenizer, the prompt–completion datasets tokenised once, and the collator."""

import warnings
from typing import Any

import torch
from transformers import AutoTokenizer

from rlkd_onpolicy.data.prompt_completion import (
    TokenizedExample,
    check_prompt_not_empty,
    collate_prompt_completion,
    tokenize_example,
)
from rlkd_onpolicy.trainer.config import RLKDConfig


def resolve_tokenizer(model, processing_class):
    """The tokenizer both models share: `processing_class`, or the one saved with `model` when it is a name. A
    tokenizer without a pad token pads with EOS (the masks drop padding)."""
    if processing_class is None:
        if not isinstance(model, str):
            raise ValueError("processing_class (the tokenizer) is required when model is a model object.")
        processing_class = AutoTokenizer.from_pretrained(model)
    tokenizer = processing_class
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_dataset(dataset, tokenizer, args: RLKDConfig, name: str):
    """`prompt_ids`, `completion_ids` and `example_index` (where a teacher cache keeps the example) per example,
    truncated to `args.max_length` / `args.max_prompt_length`; an example left without a prompt is refused."""
    import datasets

    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)

    def tokenize(example, index):
        tokenized = tokenize_example(
            tokenizer, example, max_length=args.max_length, max_prompt_length=args.max_prompt_length
        )
        check_prompt_not_empty(tokenized, index, name, example.get("prompt", example.get("messages")))
        return {"prompt_ids": tokenized.prompt_ids, "completion_ids": tokenized.completion_ids,
                "example_index": index}  # fmt: skip

    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names,
                       desc="Tokenizing prompt–completion pairs")  # fmt: skip


def check_map_style(dataset, name: str) -> None:
    """Refuse a streaming `IterableDataset`: the trainer tokenises a dataset once, up front, and checks it whole
    (columns, lengths, a cache's hashes), which needs its length and random access."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset | datasets.IterableDatasetDict):
        raise ValueError(f"{name} is an IterableDataset (streaming=True): RLKDTrainer tokenises and checks the whole "
                         "dataset before training, which needs its length. Load it without streaming (e.g. "
                         "load_dataset(..., split='train')), or materialise the part you need: "
                         "Dataset.from_list(list(dataset.take(n))).")  # fmt: skip


def is_tokenized(dataset) -> bool:
    """Whether `dataset` is already one `tokenize_dataset` made (prompt_ids and completion_ids columns)."""
    columns = getattr(dataset, "column_names", None) or []
    return "prompt_ids" in columns and "completion_ids" in columns


def prepare_dataset(dataset, tokenizer, args: RLKDConfig, name: str):
    """A prompt–completion dataset (a `Dataset` or a list of dicts) checked and tokenised, as the constructor does
    for train_dataset and eval_dataset and `evaluate(eval_dataset=...)` for a dataset given there; one already
    tokenised is returned as it is."""
    from rlkd_onpolicy.data.prompt_completion import validate_prompt_completion_dataset

    check_map_style(dataset, name)
    if is_tokenized(dataset):
        return dataset
    validate_prompt_completion_dataset(dataset, name)
    return tokenize_dataset(dataset, tokenizer, args, name)


def check_completion_tokens(dataset, args: RLKDConfig, mode: str, name: str = "train_dataset") -> None:
    """In off_policy (the dataset's completions are all it trains on), refuse a tokenised dataset whose every
    completion was cut to nothing: the run would "succeed" with loss 0 and unchanged weights. Some empty ones, or
    all in mixed (its on-policy rows still train), are a warning."""
    lengths = [len(ids) for ids in dataset["completion_ids"]]
    empty = sum(n == 0 for n in lengths)
    if empty == 0 or mode not in ("off_policy", "mixed"):
        return
    longest_prompt = max(len(ids) for ids in dataset["prompt_ids"])
    why = (f"prompts of up to {longest_prompt} tokens fill max_length={args.max_length} "
           f"(max_prompt_length={args.max_prompt_length})")  # fmt: skip
    fix = ("raise max_length, or set max_prompt_length below it (e.g. max_length // 2) so that every completion "
           "keeps tokens")
    if empty == len(lengths) and mode == "off_policy":
        raise ValueError(f"{name} has no completion token left after truncation (all {empty} examples): {why}. "
                         f"sampling_mode='off_policy' would train on nothing (loss 0, weights unchanged): {fix}.")
    warnings.warn(f"{name}: {empty} of {len(lengths)} examples have no completion token left after truncation "
                  f"({why}); they add nothing to the {mode} loss: {fix}.", stacklevel=3)


def tokenized_examples(dataset):
    """The `TokenizedExample`s of a dataset `tokenize_dataset` made, in order."""
    return (TokenizedExample(p, c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"], strict=True))


class PromptCompletionCollator:
    """Collates tokenised examples: prompts left-padded for generation, dataset completions right-padded."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [TokenizedExample(list(f["prompt_ids"]), list(f["completion_ids"])) for f in features]
        batch = collate_prompt_completion(examples, self.pad_token_id)
        if "example_index" in features[0]:  # where a teacher cache keeps this example
            batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        return batch
