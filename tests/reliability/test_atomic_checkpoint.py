"""Checkpoints are written atomically: a save that fails midway leaves the previous checkpoint the last one.

(A real SIGKILL in the middle of a save is in test_resume_kill.py.)
"""

import json
import os

import pytest
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from rlkd_onpolicy import RLKDConfig, RLKDTrainer
from rlkd_onpolicy.trainer.reliability import publish_checkpoint, remove_staging_folders


def _args(out, **overrides) -> RLKDConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3, logging_steps=1,
                save_strategy="steps", save_steps=2, report_to="none", seed=0, sampling_mode="off_policy",
                max_new_tokens=4, rank_k=3, metric_ks=[1, 3], disable_tqdm=True)
    base.update(overrides)
    return RLKDConfig(**base)


def _trainer(args, cls=RLKDTrainer, **kw) -> RLKDTrainer:
    return cls(model=tiny_llama(64, seed=2), teacher_model=tiny_llama(64, hidden=48, seed=1, sharpen=4.0),
               args=args, train_dataset=tiny_pairs(12), processing_class=tiny_tokenizer(), **kw)


class _DiskFullAtStep6(RLKDTrainer):
    """The optimizer file of checkpoint 6 fails to write, after its model file was written."""

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == 6:
            raise OSError(28, "No space left on device (injected)")
        super()._save_optimizer_and_scheduler(output_dir)


class _ListAtTrainBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.names = sorted(os.listdir(args.output_dir))


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_failed_save_keeps_the_previous_checkpoint_and_resume_skips_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        _trainer(_args(out), cls=_DiskFullAtStep6).train()
    assert sorted(p.name for p in out.iterdir()) == ["_staging-checkpoint-6", "checkpoint-2", "checkpoint-4"]
    assert (out / "_staging-checkpoint-6" / "model.safetensors").is_file()  # the failure was midway
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    at_start = _ListAtTrainBegin()
    resumed = _trainer(_args(out), callbacks=[at_start])
    resumed.train(resume_from_checkpoint=True)
    assert at_start.names == ["checkpoint-2", "checkpoint-4"]  # the leftover is gone before the first step
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]

    uninterrupted = _trainer(_args(tmp_path / "full"))
    uninterrupted.train()
    full = _weights(uninterrupted)
    for name, value in _weights(resumed).items():
        assert torch.equal(value, full[name]), name


def test_files_rotation_and_best_checkpoint_match_the_stock_trainer(tmp_path):
    """Same files, same rotation (save_total_limit), same best_model_checkpoint as transformers' own save."""

    class StockSave(RLKDTrainer):
        _save_checkpoint = Trainer._save_checkpoint

    # greater_is_better on eval_loss makes an early checkpoint the best one, so rotation must keep it
    overrides = dict(max_steps=5, save_steps=1, eval_strategy="steps", eval_steps=1, save_total_limit=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    runs = {}
    for name, cls in (("atomic", RLKDTrainer), ("stock", StockSave)):
        trainer = _trainer(_args(tmp_path / name, **overrides), cls=cls, eval_dataset=tiny_pairs(4, seed=1))
        trainer.train()
        folder = tmp_path / name
        runs[name] = {
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*")),
            "best": trainer.state.best_model_checkpoint.replace(str(folder), ""),
            "states": {p.parent.name: json.loads(p.read_text())
                       for p in folder.glob("checkpoint-*/trainer_state.json")},
        }
    best = runs["stock"]["best"]
    assert best != "/checkpoint-5", "the test needs a best checkpoint that is not the last one"
    assert sorted(runs["stock"]["states"]) == sorted({"checkpoint-5", best.strip("/")})
    for key in ("files", "best"):
        assert runs["atomic"][key] == runs["stock"][key], key
    for folder, state in runs["stock"]["states"].items():
        atomic = runs["atomic"]["states"][folder]
        assert atomic["best_model_checkpoint"].endswith(state["best_model_checkpoint"].split("/stock")[-1])
        for key in ("global_step", "best_global_step", "best_metric"):
            assert atomic[key] == state[key], (folder, key)
        assert _untimed(atomic["log_history"]) == _untimed(state["log_history"]), folder


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if not k.endswith(("_runtime", "_per_second"))} for e in history]


def test_publish_replaces_an_existing_checkpoint_whole(tmp_path):
    # a resumed run saving a step it had saved before: the new folder replaces the old one, nothing is merged
    final, staging = tmp_path / "checkpoint-4", tmp_path / "_staging-checkpoint-4"
    final.mkdir()
    (final / "old_only.bin").write_text("old")
    (final / "trainer_state.json").write_text("old")
    staging.mkdir()
    (staging / "trainer_state.json").write_text("new")
    publish_checkpoint(str(staging), str(final))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert sorted(p.name for p in final.iterdir()) == ["trainer_state.json"]
    assert (final / "trainer_state.json").read_text() == "new"


def test_only_leftover_staging_folders_are_removed(tmp_path):
    from accelerate import PartialState

    for name in ("checkpoint-3", "_staging-checkpoint-8", "_stale-checkpoint-4", "_staging-notes", "runs"):
        (tmp_path / name).mkdir()
    removed = remove_staging_folders(str(tmp_path), PartialState(), should_save=True)
    assert removed == ["_staging-checkpoint-8", "_stale-checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_staging-notes", "checkpoint-3", "runs"]
