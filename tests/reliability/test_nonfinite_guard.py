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


def _nan_teacher_on_steps(trainer, steps: set[int]) -> None:
    """The teacher's logits are NaN on every training micro-batch of the optimizer steps in `steps` (1-based)."""

    def hook(module, inputs, output):
        if not module.training and trainer.model.training and trainer.state.global_step + 1 in steps:
            output.logits = torch.full_like(output.logits, float("nan"))
        return output

    trainer.teacher.register_forward_hook(hook)


def test_skip_policy_fails_a_run_whose_every_step_is_skipped(tmp_path):
    """Issue 15, defect 1: under "skip" a run whose every step was non-finite skipped them all and finished as if it
    had trained. It must stop at its last step, naming the count and the fix, and save no final model."""
    trainer = _trainer(tmp_path, nonfinite_policy="skip", max_steps=4)
    _nan_teacher_on_steps(trainer, {1, 2, 3, 4})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"every one of the 4 optimizer steps of this run was skipped.*"
                                             r"nonfinite_max_consecutive_skips"):
        trainer.train()
    assert trainer.state.global_step == 3  # it stopped at the 4th step, before finishing
    assert _same(before, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})


def test_skip_policy_fails_after_too_many_consecutive_skips(tmp_path):
    """Issue 15, defect 1: a run that starts well and then skips step after step stops once
    `nonfinite_max_consecutive_skips` steps in a row were skipped, naming them; isolated skips before do not count."""
    trainer = _trainer(tmp_path, nonfinite_policy="skip", max_steps=8, nonfinite_max_consecutive_skips=3)
    _nan_teacher_on_steps(trainer, {2, 4, 5, 6, 7, 8})
    with pytest.raises(NonFiniteError, match=r"3 consecutive optimizer steps \(steps 4–6\) were skipped"):
        trainer.train()
    assert trainer.nonfinite_guard.skipped_steps == 4  # steps 2, 4, 5, 6


def test_a_teacher_with_minus_inf_logits_trains_with_the_ranking_loss(tmp_path):
    """Issue 15, defect 1, in the trainer: a teacher whose logits are −inf at some tokens (as a logits processor or
    a padding row sets them) made the ranking loss's gradient NaN, so the default policy stopped at step 1 advising
    a lower learning rate. With rank_weight=2 it must train every step with finite parameters."""
    trainer = _trainer(tmp_path, max_steps=3, rank_weight=2.0)
    suppressed = torch.arange(8, 64)  # the teacher allows only 8 tokens, fewer than rank_k + its own top-k union

    def hook(module, inputs, output):
        output.logits[..., suppressed] = float("-inf")
        return output

    trainer.teacher.register_forward_hook(hook)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    trainer.train()
    assert len(snapshots.params) == 4
    for step in (1, 2, 3):
        assert not _same(snapshots.params[step], snapshots.params[step - 1]), f"step {step} did not train"
    logs = [e for e in trainer.state.log_history if "rank_loss" in e]
    assert len(logs) == 3 and all(e["rank_loss"] > 0 for e in logs)  # the ranking loss is on and finite
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
