"""RLKDTrainer end to end on tiny random models, one test per sampling mode, plus gradient accumulation."""

import pytest
import torch
from tiny_models import student_and_teacher as _models
from tiny_models import tiny_pairs, tiny_tokenizer
from transformers import TrainerCallback

from rlkd_onpolicy import RLKDConfig, RLKDTrainer


def _config(tmp_path, **overrides) -> RLKDConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, max_new_tokens=6, skd_top_k=5,
        skd_draft_len=3, rank_k=3, metric_ks=[1, 3], disable_tqdm=True,
    )
    base.update(overrides)
    return RLKDConfig(**base)


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("off_policy", {}),
        ("seq_kd", {}),
        ("on_policy", {}),
        ("mixed", {"lmbda": 0.5}),
        ("speculative", {}),
        ("on_policy", {"teacher_top_k": 8, "loss": "jsd"}),  # a sparse teacher (top-K on the device) and JSD
    ],
)
def test_each_mode_trains(tmp_path, mode, extra):
    student, teacher = _models()
    before_s = {n: p.detach().clone() for n, p in student.named_parameters()}
    before_t = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer = RLKDTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, sampling_mode=mode, **extra),
        train_dataset=tiny_pairs(12), processing_class=tiny_tokenizer(),
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    for name, p in student.named_parameters():
        assert not torch.equal(p, before_s[name]), f"student parameter {name} did not change"
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before_t[name]), f"teacher parameter {name} changed"
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for key in ("kd_loss", "rank_loss", "cr@1", "mor@3", "completion_tokens"):
        assert key in logged[-1], key
    assert all(0.0 <= entry["mor@3"] <= 1.0 for entry in logged)
    if mode != "off_policy":
        assert logged[-1]["tokens_per_second"] > 0
    if mode == "speculative":
        assert 0.0 <= logged[-1]["acceptance_rate"] <= 1.0
    if mode == "mixed":
        assert 0.0 <= logged[-1]["on_policy_fraction"] <= 1.0


def test_conversational_dataset(tmp_path):
    student, teacher = _models()
    trainer = RLKDTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, sampling_mode="off_policy", max_steps=2),
        train_dataset=tiny_pairs(8, conversational=True), processing_class=tiny_tokenizer(),
    )
    trainer.train()
    assert trainer.state.log_history[0]["completion_tokens"] > 0


@pytest.mark.parametrize("mode", ["off_policy", "on_policy"])  # data completions, and sampled ones
def test_gradient_accumulation_gives_the_same_update(tmp_path, mode):
    """One step of 8 sequences == 4 micro-batches of 2 (normalised by the step's token count, SGD)."""
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        student, teacher = _models()
        args = _config(tmp_path / f"{batch}", sampling_mode=mode, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
                       lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_pairs(8),
                              processing_class=tiny_tokenizer())
        trainer.train()
        results.append({n: p.detach().clone() for n, p in student.named_parameters()})
    untouched = dict(_models()[0].named_parameters())
    for name, value in results[0].items():
        assert not torch.equal(value, untouched[name])
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_vocabulary_padding_rows_are_accepted_and_cut(tmp_path):
    # teacher with 16 more padding rows than the student, both beyond the tokenizer's 54 tokens
    student, teacher = _models(student_vocab=64, teacher_vocab=80)
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, sampling_mode="off_policy",
                          max_steps=1), train_dataset=tiny_pairs(4), processing_class=tiny_tokenizer())
    assert trainer.vocab_size == len(tiny_tokenizer())
    trainer.train()


class _StopAfter(TrainerCallback):
    """Interrupts a run after `step` optimizer steps, as a crash would (the checkpoint of that step is saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("mode", ["mixed", "speculative"])  # λ coins and row seeds come from the rollout generator
def test_resume_from_checkpoint_reproduces_the_run(tmp_path, mode):
    def run(out, stop=None, resume=None):
        student, teacher = _models()
        args = _config(tmp_path / out, sampling_mode=mode, max_steps=4, save_strategy="steps", save_steps=2,
                       per_device_train_batch_size=2)
        trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_pairs(12),
                              processing_class=tiny_tokenizer(), callbacks=[_StopAfter(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return {n: p.detach().clone() for n, p in student.named_parameters()}, losses

    full, full_losses = run("full")
    run("partial", stop=2)
    resumed, resumed_losses = run("partial", resume=str(tmp_path / "partial" / "out" / "checkpoint-2"))
    assert len(full_losses) == 4
    assert resumed_losses == full_losses  # the checkpoint brings the first two entries of the log history
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


def test_evaluation_scores_rollouts_without_shifting_training(tmp_path):
    def run(out, evaluate):
        student, teacher = _models()
        extra = {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4} if evaluate else {}
        trainer = RLKDTrainer(model=student, teacher_model=teacher, processing_class=tiny_tokenizer(),
                              args=_config(tmp_path / out, sampling_mode="mixed", **extra),
                              train_dataset=tiny_pairs(12), eval_dataset=tiny_pairs(6, seed=1) if evaluate else None)
        trainer.train()
        return trainer

    with_eval, without = run("eval", True), run("plain", False)
    train_losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (with_eval, without)]
    assert train_losses[0] == train_losses[1]  # evaluation draws from its own generator
    evals = [e for e in with_eval.state.log_history if "eval_loss" in e]
    assert len(evals) == 3
    assert all(k in evals[0] for k in ("eval_kd_loss", "eval_rank_loss", "eval_mor@3", "eval_on_policy_fraction"))
    first, second = with_eval.evaluate(), with_eval.evaluate()
    assert first["eval_loss"] == second["eval_loss"]  # the eval generator restarts at every evaluation


def test_peft_adapters_train_and_the_base_stays(tmp_path):
    from peft import LoraConfig

    student, teacher = _models()
    base = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = RLKDTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, sampling_mode="on_policy", max_steps=2),
        train_dataset=tiny_pairs(8), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora_before
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(p, lora_before[name]), name  # B starts at zero: it must have moved
        elif "lora_" not in name:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[plain]), name


def _diagnosed(tmp_path, **overrides) -> list[dict]:
    student, teacher = _models()
    trainer = RLKDTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, sampling_mode="off_policy", max_steps=2,
                                                           **overrides),
        train_dataset=tiny_pairs(8), processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_ranking_diagnostics_are_logged_and_show_when_the_rank_term_passes_no_gradient(tmp_path):
    keys = ("kd_logit_grad_norm", "rank_logit_grad_norm", "rank_hard_fraction", "rank_undefined_fraction")
    for entry in _diagnosed(tmp_path / "eps1", rank_weight=2.0, rank_regularization_strength=1.0):
        assert all(key in entry for key in keys), sorted(entry)
        assert entry["kd_logit_grad_norm"] > 0 and entry["rank_logit_grad_norm"] >= 0
        assert 0.0 <= entry["rank_hard_fraction"] <= 1.0 and 0.0 <= entry["rank_undefined_fraction"] <= 1.0
    # ε → 0: every soft rank is a hard rank, so the ranking term's gradient on the logits is exactly 0
    for entry in _diagnosed(tmp_path / "eps0", rank_weight=2.0, rank_regularization_strength=1e-6):
        assert entry["rank_hard_fraction"] == 1.0 and entry["rank_logit_grad_norm"] == 0.0, entry
    # ε large: soft ranks pool, no row is hard, the ranking term pushes
    for entry in _diagnosed(tmp_path / "eps100", rank_weight=2.0, rank_regularization_strength=100.0):
        assert entry["rank_hard_fraction"] == 0.0 and entry["rank_logit_grad_norm"] > 0, entry
    # off: no ranking loss, or asked not to
    for overrides in (dict(rank_weight=0.0), dict(rank_weight=2.0, rank_diagnostics=False)):
        assert not any(key in entry for entry in _diagnosed(tmp_path / "off", **overrides) for key in keys)
