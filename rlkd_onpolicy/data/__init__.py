"""Prompt–completion data: tokenisation with a truncation policy, validation and collation."""

from rlkd_onpolicy.data.prompt_completion import (
    TokenizedExample,
    check_prompt_not_empty,
    collate_prompt_completion,
    tokenize_example,
    validate_prompt_completion_dataset,
)

__all__ = [
    "TokenizedExample",
    "check_prompt_not_empty",
    "collate_prompt_completion",
    "tokenize_example",
    "validate_prompt_completion_dataset",
]
