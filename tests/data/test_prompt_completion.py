"""Tokenisation with the truncation policy, validation and collation of prompt–completion data."""

import pytest
import torch
from tiny_models import tiny_tokenizer

from rlkd_onpolicy.data import (
    TokenizedExample,
    collate_prompt_completion,
    tokenize_example,
    validate_prompt_completion_dataset,
)


def test_standard_example_gets_eos_and_keeps_prompt_and_completion_apart():
    tok = tiny_tokenizer()
    ex = tokenize_example(tok, {"prompt": "translate the cat", "completion": "le chat"})
    assert tok.decode(ex.prompt_ids) == "translate the cat"
    assert ex.completion_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.completion_ids[:-1]) == "le chat"
    assert ex.input_ids == ex.prompt_ids + ex.completion_ids and ex.completion_start == 3


def test_conversational_example_uses_the_chat_template():
    tok = tiny_tokenizer()
    ex = tokenize_example(tok, {"prompt": [{"role": "user", "content": "translate the cat"}],
                                "completion": [{"role": "assistant", "content": "le chat"}]})
    assert tok.decode(ex.prompt_ids) == "<user> translate the cat <assistant>"
    assert tok.decode(ex.completion_ids) == "le chat <eos>"


def test_truncation_policy():
    tok = tiny_tokenizer()
    ex = tokenize_example(tok, {"prompt": "one two three the cat", "completion": "le chat dort"},
                          max_length=6, max_prompt_length=3)
    assert tok.decode(ex.prompt_ids) == "three the cat"  # the prompt keeps its end
    assert tok.decode(ex.completion_ids) == "le chat dort"  # 3 + 3 tokens: the EOS no longer fits
    assert len(ex.input_ids) == 6


def test_collation_pads_prompts_left_and_completions_right():
    batch = collate_prompt_completion([TokenizedExample([5, 6, 7], [8, 3]), TokenizedExample([9], [10, 11, 3])], 0)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["completion_ids"].tolist() == [[8, 3, 0], [10, 11, 3]]
    assert batch["completion_mask"].dtype == torch.long and batch["completion_mask"].sum() == 5


def test_validation_errors():
    with pytest.raises(ValueError, match="empty"):
        validate_prompt_completion_dataset([])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]"):
        validate_prompt_completion_dataset([{"question": "x", "completion": "y"}])
    with pytest.raises(ValueError, match="both be strings or both lists"):
        tokenize_example(tiny_tokenizer(), {"prompt": "the cat", "completion": [{"role": "assistant", "content": "x"}]})
