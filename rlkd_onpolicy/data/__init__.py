"""Data: TRL prompt–completion tokenisation with a truncation policy, validation and collation
(`rlkd_onpolicy.data.prompt_completion`), and the translation example's parallel text: the embedded Bible corpus,
hub/local parallel datasets and translation prompts (`rlkd_onpolicy.data.parallel`, docs/data_and_eval.md)."""

from rlkd_onpolicy.data.parallel import (
    BIBLE_TRANSLATIONS,
    LANGUAGE_NAMES,
    load_bible_pairs,
    load_parallel_dataset,
    to_prompt_completion,
)
from rlkd_onpolicy.data.prompt_completion import (
    TokenizedExample,
    check_prompt_not_empty,
    collate_prompt_completion,
    tokenize_example,
    validate_prompt_completion_dataset,
)

__all__ = [
    "BIBLE_TRANSLATIONS",
    "LANGUAGE_NAMES",
    "TokenizedExample",
    "check_prompt_not_empty",
    "collate_prompt_completion",
    "load_bible_pairs",
    "load_parallel_dataset",
    "to_prompt_completion",
    "tokenize_example",
    "validate_prompt_completion_dataset",
]
