"""Prompt–completion data: tokenisation with a truncation policy, validation and collation."""

from rlkd_onpolicy.data.prompt_completion import (
    TokenizedExample,
    collate_prompt_completion,
    tokenize_example,
    validate_prompt_completion_dataset,
)

__all__ = [
    "TokenizedExample",
    "collate_prompt_completion",
    "tokenize_example",
    "validate_prompt_completion_dataset",
]
