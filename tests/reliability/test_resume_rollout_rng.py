"""Resuming from a checkpoint that lacks this rank's rollout RNG state warns, naming the file."""

import logging

import pytest
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer


def _run(out, max_steps: int, resume=None) -> RLKDTrainer:
    args = RLKDConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=5e-3,
                      logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", seed=0,
                      sampling_mode="mixed", lmbda=0.5, max_new_tokens=4, rank_k=3, metric_ks=[1, 3],
                      disable_tqdm=True)
    trainer = RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=tiny_llama(64, hidden=48, seed=1, sharpen=4.0),
                          args=args, train_dataset=tiny_pairs(12), processing_class=tiny_tokenizer())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("missing", [False, True])  # control: with the file there is nothing to warn about
def test_resume_without_the_rollout_rng_state_warns_naming_the_file(tmp_path, caplog, missing):
    """Issue 15, defect 7: a checkpoint without rollout_rng_state_<rank>.pth resumed silently, and its rollouts
    (mixed-mode coins, sampling seeds) then diverge from the uninterrupted run's. It must warn, naming the file."""
    out = tmp_path / "run"
    _run(out, max_steps=2)
    checkpoint = out / "checkpoint-2"
    state = checkpoint / "rollout_rng_state_0.pth"
    assert state.is_file()
    if missing:
        state.unlink()
    with caplog.at_level(logging.WARNING, logger="rlkd_onpolicy"):
        trainer = _run(out, max_steps=3, resume=str(checkpoint))
    assert trainer.state.global_step == 3  # it resumed and trained on
    warned = [r.getMessage() for r in caplog.records if "rollout_rng_state_0.pth" in r.getMessage()]
    if not missing:
        assert not warned
        return
    assert len(warned) == 1
    assert f"without {state}" in warned[0] and "will not be those of the uninterrupted run" in warned[0]
    assert "holds no rollout RNG state" in warned[0]
