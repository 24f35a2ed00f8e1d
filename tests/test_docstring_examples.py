"""The docstring examples of the losses, the metrics, the served teacher and the trainer run and show their output.

Examples that need a model or a vLLM server are marked `# doctest: +SKIP`; a module with other examples must
attempt some, so that the check cannot pass with every example skipped.
"""

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    ("module_name", "runs_examples"),
    [
        ("rlkd_onpolicy.losses.divergences", True),
        ("rlkd_onpolicy.losses.ranking", True),
        ("rlkd_onpolicy.metrics", True),
        ("rlkd_onpolicy.teacher.served", False),  # needs a running vLLM server
        ("rlkd_onpolicy.trainer.trainer", True),  # builds an RLKDConfig; the trainer needs models
        ("rlkd_onpolicy.cross_tokenizer.align", True),
        ("rlkd_onpolicy.cross_tokenizer.losses", True),
        ("rlkd_onpolicy.cross_tokenizer.vocabulary", True),
    ],
)
def test_docstring_examples_run(module_name, runs_examples):
    result = doctest.testmod(importlib.import_module(module_name))
    assert result.failed == 0
    if runs_examples:
        assert result.attempted > 0
