"""rlkd_onpolicy: on-policy, speculative and ranking-loss knowledge distillation for language models.

`import rlkd_onpolicy` stays light: the losses and metrics are plain torch; heavy optional dependencies
(triton, deepspeed) are imported only where used.
"""

__version__ = "0.1.0"

_LAZY = {"RLKDConfig": "rlkd_onpolicy.trainer", "RLKDTrainer": "rlkd_onpolicy.trainer"}
__all__ = ["RLKDConfig", "RLKDTrainer", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in transformers and trl: load it on first use, not on `import rlkd_onpolicy`.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlkd_onpolicy' has no attribute {name!r}")
