"""Test-wide settings and fixtures: the `gpu` marker skips without CUDA; `cache_dir`, a teacher top-k cache.

The tiny models, tokenizer and data these build on live in tests/tiny_models.py.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A top-`CACHE_K` cache of `tiny_teacher()` on `tiny_pairs(12)`, built once per test module that uses it."""
    from tiny_models import CACHE_K, tiny_pairs, tiny_teacher, tiny_tokenizer

    from rlkd_onpolicy.cache import build_cache

    out = tmp_path_factory.mktemp("cache") / "teacher-top8"
    build_cache(tiny_teacher(), tiny_tokenizer(), tiny_pairs(12), str(out), k=CACHE_K, temperature=1.0,
                dtype="float32", batch_size=4, max_length=32, max_prompt_length=16, shard_size=5,
                teacher_name="tiny-teacher", progress=False)  # fmt: skip
    return out
