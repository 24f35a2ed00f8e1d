"""The package's imports point one way: train.py → trainer/ → (sampling/, teacher/, losses/ + kernels/, cache/) →
data/, vocab.py, metrics.py. Read from the source (module- and function-level imports), so nothing is imported."""

import ast
from pathlib import Path

import rlkd_onpolicy

ROOT = Path(rlkd_onpolicy.__file__).parent
TOP = ("rlkd_onpolicy.train", "rlkd_onpolicy.trainer")
ALIASES: set[tuple[str, str]] = set()  # (module, module above it it may import): none


def _imports(path: Path, module: str, is_package: bool):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = module.split(".")[: None if is_package else -1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        graph[module] = {name for name in _imports(path, module, is_package) if name.startswith("rlkd_onpolicy.")}
    return graph


def _is_top(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in TOP)


def test_nothing_below_the_trainer_imports_it():
    upward = {(module, name) for module, names in _graph().items() if not _is_top(module)
              for name in names if _is_top(name)}  # fmt: skip
    assert upward == ALIASES


def test_the_trainer_does_not_import_the_cli():
    assert not {m for m, names in _graph().items() if m.startswith("rlkd_onpolicy.trainer") and
                any(n == "rlkd_onpolicy.train" or n.startswith("rlkd_onpolicy.train.") for n in names)}  # fmt: skip
