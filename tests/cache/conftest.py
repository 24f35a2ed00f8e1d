"""Fixtures of the cache tests: the tiny teacher and dataset saved once to a temporary folder."""

import json

import pytest
from cache_fixtures import make_examples, make_teacher, make_tokenizer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(teacher folder, dataset .jsonl, tokenizer, teacher) saved once for the cache tests."""
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = make_tokenizer()
    teacher = make_teacher(len(tokenizer))
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in make_examples(11)))
    return folder, data, tokenizer, teacher
