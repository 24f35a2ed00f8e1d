"""The YAML configs map one to one onto RLKDConfig fields, and the CLI trains from a YAML on local files."""

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy.train import ModelDataArguments, main

ROOT = Path(__file__).resolve().parents[2]
TRAIN_YAMLS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
SERVED = "served_teacher"  # the teacher on a vLLM server (docs/served_teacher.md); every other YAML is a mode
VLLM_STUDENT = "vllm_student"  # on_policy with the student's rollouts on a vLLM server (docs/vllm_rollouts.md)


def test_one_yaml_per_sampling_mode():
    from rlkd_onpolicy.trainer import SAMPLING_MODES

    assert {p.stem for p in TRAIN_YAMLS} == {*SAMPLING_MODES, SERVED, VLLM_STUDENT}


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.stem)
def test_yaml_parses_into_the_config(path, tmp_path):
    from trl import TrlParser

    from rlkd_onpolicy.trainer import RLKDConfig

    text = path.read_text()
    assert text.startswith("# ") and "rlkd_onpolicy.train --config" in text.splitlines()[1]
    values = yaml.safe_load(text)
    assert "bf16" in "".join(line for line in text.splitlines() if line.startswith("#"))  # the opening says how
    values.update(output_dir=str(tmp_path))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(values))
    # The YAMLs set bf16 for a GPU: without one the config trains in float32 and says so (it used to stop).
    import torch

    def parse():
        return TrlParser((ModelDataArguments, RLKDConfig)).parse_args_and_config(["--config", str(config_file)])

    if torch.cuda.is_available():
        script_args, args = parse()
        assert args.bf16
    else:
        with pytest.warns(UserWarning, match="bf16=True but this machine has no GPU: training in float32"):
            script_args, args = parse()
        assert not args.bf16
    if path.stem == SERVED:  # a server stands for the teacher: no teacher_model
        assert args.teacher_server and args.teacher_top_k and script_args.teacher_model is None
    elif path.stem == VLLM_STUDENT:
        assert args.use_vllm and args.vllm_server_base_url and args.sampling_mode == "on_policy"
    else:
        assert args.sampling_mode == path.stem and script_args.teacher_model
    assert script_args.student_model


def test_help_lists_config(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--config YAML" in capsys.readouterr().out


def test_cli_trains_from_a_yaml_on_local_files(tmp_path):
    tok = tiny_tokenizer()
    for name, model in (("student", tiny_llama(64, seed=2)), ("teacher", tiny_llama(64, hidden=48, seed=1))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in tiny_pairs(8)))
    config = {
        "student_model": str(tmp_path / "student"), "teacher_model": str(tmp_path / "teacher"),
        "dataset_name": str(data), "output_dir": str(tmp_path / "out"), "sampling_mode": "speculative",
        "max_steps": 2, "per_device_train_batch_size": 4, "max_new_tokens": 4, "skd_top_k": 5, "rank_k": 3,
        "report_to": "none", "save_strategy": "no", "logging_steps": 1,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["--config", str(tmp_path / "run.yaml"), "--loss", "rkl"])  # a flag overrides the YAML
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_docs_list_every_config_field():
    import dataclasses

    from transformers import TrainingArguments

    from rlkd_onpolicy.trainer import RLKDConfig

    docs = (ROOT / "docs" / "trainer.md").read_text()
    ours = {f.name for f in dataclasses.fields(RLKDConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = [name for name in sorted(ours) if f"`{name}`" not in docs]
    assert not missing, f"docs/trainer.md does not describe {missing}"
