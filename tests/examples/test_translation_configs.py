"""Every YAML in configs/translation/ is a valid preset of the translation example: known keys, valid values."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted((ROOT / "configs" / "translation").glob("*.yaml"))


def _example():
    spec = importlib.util.spec_from_file_location("distill_translation", ROOT / "examples" / "distill_translation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_translation_configs():
    assert YAMLS, "configs/translation/ has no YAML file"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_translation_config_parses_and_names_known_methods(path):
    example = _example()
    cfg = example.parse_args(["--config", str(path)])
    methods = example.method_names(cfg)
    assert methods, path
    # every method but the SFT baseline must make a valid RLKDConfig (what main() checks before training)
    for _, mode, weight in methods:
        if mode != example.SFT_BASELINE:
            example.rlkd_config(cfg, sampling_mode=mode, rank_weight=weight, seed=cfg.seeds[0], output_dir=Path("x"))


def test_unknown_key_in_a_translation_config_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student_sft_step: 10\n")  # typo of student_sft_steps
    with pytest.raises(ValueError, match="student_sft_step"):
        _example().parse_args(["--config", str(bad)])


def test_negative_student_sft_steps_is_refused():
    with pytest.raises(ValueError, match="student_sft_steps=-1"):
        _example().parse_args(["--student-sft-steps", "-1"])
