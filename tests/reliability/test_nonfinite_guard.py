"""A NaN/inf loss or gradient never reaches the parameters: the run stops naming the step, or skips and counts it.

NaNs are injected into real models with real hooks: a teacher whose logits turn NaN on one micro-batch (a NaN loss),
or a hook on one student weight's gradient (a NaN gradient under a finite loss).
"""

import pytest
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer
from transformers import TrainerCallback

from rlkd_onpolicy import RLKDConfig, RLKDTrainer
from rlkd_onpolicy.trainer.reliability import NonFiniteError


def _trainer(tmp_path, **overrides) -> RLKDTrainer:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=5, learning_rate=5e-3,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, sampling_mode="on_policy",
                max_new_tokens=4, rank_k=3, metric_ks=[1, 3], disable_tqdm=True, max_grad_norm=1.0)
    base.update(overrides)
    return RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=tiny_llama(64, hidden=48, seed=1, sharpen=4.0),
                       args=RLKDConfig(**base), train_dataset=tiny_pairs(12), processing_class=tiny_tokenizer())


class _Snapshots(TrainerCallback):
    """The student's parameters after every optimizer step (index 0 = before training)."""

    def __init__(self):
        self.params: list[dict[str, torch.Tensor]] = []

    def _take(self, model):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(model)


def _nan_teacher_at(trainer, step: int, micro_batch: int = 1) -> None:
    """The teacher's logits are NaN on one micro-batch of optimizer step `step` (1-based)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not module.training and trainer.model.training and trainer.state.global_step == step - 1:
            calls["n"] += 1
            if calls["n"] == micro_batch:
                output.logits = torch.full_like(output.logits, float("nan"))
        return output

    trainer.teacher.register_forward_hook(hook)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("accumulation", [1, 2])  # 2: the NaN is in the last micro-batch of the step
def test_nan_loss_stops_before_the_optimizer_step(tmp_path, accumulation):
    trainer = _trainer(tmp_path, gradient_accumulation_steps=accumulation,
                       per_device_train_batch_size=2 // accumulation)
    _nan_teacher_at(trainer, step=3, micro_batch=accumulation)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    with pytest.raises(NonFiniteError, match=rf"loss \(loss=nan in micro-batch {accumulation}\) at optimizer step 3"):
        trainer.train()
    assert len(snapshots.params) == 3  # before training, after steps 1 and 2
    assert not _same(snapshots.params[1], snapshots.params[2])  # the steps before did train
    now = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert _same(now, snapshots.params[2]), "step 3 changed the parameters"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nan_gradient_under_a_finite_loss_stops_the_step(tmp_path):
    trainer = _trainer(tmp_path)
    weight = trainer.model.model.layers[0].mlp.down_proj.weight

    def poison(grad):  # one weight's gradient turns NaN at step 2, the loss stays finite
        return grad * float("nan") if trainer.state.global_step == 1 else grad

    weight.register_hook(poison)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    with pytest.raises(NonFiniteError, match="Non-finite gradient at optimizer step 2"):
        trainer.train()
    now = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert len(snapshots.params) == 2 and _same(now, snapshots.params[1])


def test_skip_policy_skips_counts_and_goes_on(tmp_path):
    trainer = _trainer(tmp_path, nonfinite_policy="skip", lr_scheduler_type="linear")
    _nan_teacher_at(trainer, step=3)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    trainer.train()
    params = snapshots.params  # before training, then after steps 1 … 5
    assert len(params) == 6
    assert _same(params[3], params[2]), "the skipped step 3 changed the parameters"
    for step in (1, 2, 4, 5):
        assert not _same(params[step], params[step - 1]), f"step {step} did not train"
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["nonfinite_skipped_steps"] for e in logs] == [0, 0, 1, 1, 1]
    # neither AdamW nor the LR schedule advanced on the skipped step
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {4}
    assert trainer.lr_scheduler.last_epoch == 4
    assert logs[3]["learning_rate"] == logs[2]["learning_rate"] > logs[4]["learning_rate"]
