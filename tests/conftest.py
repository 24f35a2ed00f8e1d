"""Test-wide settings: the `gpu` marker skips without CUDA; shared tiny fixtures live in tests/tiny_models.py."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
