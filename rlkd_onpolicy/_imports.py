"""Answers `is_X_available()` for optional dependencies, and `require_X()` that fails with the pip command."""

import importlib.util
from functools import cache


@cache
def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_triton_available() -> bool:
    return _available("triton")


def is_liger_available() -> bool:
    return _available("liger_kernel")


def is_torchsort_available() -> bool:
    return _available("torchsort")


def require(module: str, pip_name: str | None = None) -> None:
    """Raise an ImportError naming the `pip install` to run when `module` is missing."""
    if not _available(module):
        raise ImportError(
            f"This feature needs the optional package '{module}'. Install it with: pip install {pip_name or module}"
        )
