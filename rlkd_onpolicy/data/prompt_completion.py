"""TRL's prompt–completion format, tokenised for distillation.

Two formats are accepted, as in TRL:
- standard: ``{"prompt": str, "completion": str}``;
- conversational: ``{"prompt": [messages], "completion": [messages]}``, rendered with the tokenizer's chat template;
- conversational as GKDTrainer takes it: ``{"messages": [messages]}``, whose last message (the assistant's) is the
  completion and the ones before it the prompt.

Truncation policy (one place, documented in docs/trainer.md): the prompt keeps its *last* `max_prompt_length`
tokens (the end of a prompt is what the completion follows), and at most its last `max_length`; then the completion
keeps its *first* tokens so that prompt + completion fit in `max_length`. The completion ends with EOS (appended
when missing) so that a student distilled on data learns to stop.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def completion_start(self) -> int:
        return len(self.prompt_ids)


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render(tokenizer, example: dict) -> tuple[str, str]:
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if _is_conversational(prompt) and _is_conversational(completion):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "A conversational example needs a tokenizer with a chat template; this tokenizer has none. "
                "Set tokenizer.chat_template or give 'prompt'/'completion' as plain strings."
            )
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "The chat template renders prompt + completion with a different prefix than the prompt alone, so the "
                "completion tokens cannot be located. Use the standard (string) format for this tokenizer."
            )
        return prompt_text, full_text[len(prompt_text) :]
    raise ValueError(
        f"'prompt' and 'completion' must both be strings or both lists of {{'role', 'content'}} messages; got "
        f"{type(prompt).__name__} and {type(completion).__name__}."
    )


def split_messages(messages: Any) -> dict[str, list]:
    """TRL's "messages" example -> prompt (every message but the last) and completion (the last, the assistant's)."""
    if not _is_conversational(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(
            "A 'messages' example must be a list of {'role', 'content'} messages ending with the assistant's reply "
            f"(the completion) after at least one other message (the prompt); got {messages!r:.120}."
        )
    return {"prompt": list(messages[:-1]), "completion": [messages[-1]]}


def tokenize_example(
    tokenizer, example: dict, *, max_length: int | None = None, max_prompt_length: int | None = None
) -> TokenizedExample:
    """Tokenise one prompt–completion example with the truncation policy of this module.

    The prompt gets the tokenizer's special tokens (e.g. BOS); the completion none, plus EOS at its end.
    """
    if "prompt" not in example and "messages" in example:
        example = split_messages(example["messages"])
    for column in ("prompt", "completion"):
        if column not in example:
            raise ValueError(f"An example has no '{column}' field (fields: {sorted(example)}).")
    prompt_text, completion_text = _render(tokenizer, example)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = completion_ids + [eos]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_length is not None and len(prompt_ids) > max_length:  # max_prompt_length None: prompt + completion ≤
        prompt_ids = prompt_ids[-max_length:]  # max_length still holds (the completion is then empty)
    if max_length is not None:
        completion_ids = completion_ids[: max(max_length - len(prompt_ids), 0)]
    return TokenizedExample(prompt_ids=list(prompt_ids), completion_ids=list(completion_ids))


def check_prompt_not_empty(example: TokenizedExample, row: int, name: str, prompt: Any = None) -> None:
    """Refuse an example whose prompt has no tokens: nothing predicts its first completion token, and generation
    has nothing to start from. `row` and `name` ("train_dataset") say where it is; `prompt` is the raw value."""
    if example.prompt_ids:
        return
    shown = "" if prompt is None else f" ({prompt!r:.60} tokenises to no tokens)"
    raise ValueError(
        f"{name} row {row} has an empty prompt{shown}: the first completion token has no position predicting it "
        "and generation has nothing to continue. Give every example a prompt (or use a tokenizer that adds BOS)."
    )


def validate_prompt_completion_dataset(dataset, name: str = "train_dataset") -> None:
    """Fail before training on an empty dataset or one without the prompt/completion columns."""
    if dataset is None:
        raise ValueError(f"{name} is None; pass a dataset with 'prompt' and 'completion' columns.")
    columns = getattr(dataset, "column_names", None)
    if columns is None and len(dataset) > 0:
        columns = list(dataset[0].keys())
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; it needs at least one example with 'prompt' and 'completion'.")
    missing = [c for c in ("prompt", "completion") if c not in columns]
    if missing and "messages" in columns:
        return  # GKDTrainer's conversational format, split by `split_messages`
    if missing:
        raise ValueError(
            f"{name} lacks the column(s) {missing} (it has {list(columns)}). Rename your columns to TRL's "
            "prompt–completion format: 'prompt' and 'completion' (or give conversations as 'messages')."
        )


def collate_prompt_completion(
    examples: Sequence[TokenizedExample], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch: prompts on the LEFT (so generation appends at one column), completions on the RIGHT.

    Returns prompt_ids/prompt_mask (B, P) and completion_ids/completion_mask (B, C), masks as long 0/1.
    """
    if not examples:
        raise ValueError("Cannot collate an empty batch.")
    batch = len(examples)
    width_p = max(len(e.prompt_ids) for e in examples)
    width_c = max(max(len(e.completion_ids) for e in examples), 1)
    prompt_ids = torch.full((batch, width_p), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, width_p), dtype=torch.long)
    completion_ids = torch.full((batch, width_c), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, width_c), dtype=torch.long)
    for i, e in enumerate(examples):
        if e.prompt_ids:
            prompt_ids[i, width_p - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
            prompt_mask[i, width_p - len(e.prompt_ids) :] = 1
        if e.completion_ids:
            completion_ids[i, : len(e.completion_ids)] = torch.tensor(e.completion_ids)
            completion_mask[i, : len(e.completion_ids)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
