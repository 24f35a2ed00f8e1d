"""The trainer's fused loss (`loss_backend="fused"`): the same training as the logits path, without the logits."""

import pytest
import torch
from tiny_models import student_and_teacher as _models
from tiny_models import tiny_pairs, tiny_tokenizer
from transformers import LlamaForCausalLM

from rlkd_onpolicy import RLKDConfig, RLKDTrainer


def _config(tmp_path, **overrides) -> RLKDConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, max_new_tokens=6, rank_k=3,
        metric_ks=[1, 3], disable_tqdm=True, teacher_top_k=8, sampling_mode="on_policy",
    )  # fmt: skip
    base.update(overrides)
    return RLKDConfig(**base)


def _train(tmp_path, student, teacher, **overrides):
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, **overrides),
                          train_dataset=tiny_pairs(8), processing_class=tiny_tokenizer())  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "options",
    [
        dict(loss="fkl", rank_weight=2.0),  # RLKD's objective
        dict(loss="jsd", beta=0.3, rank_weight=0.0, loss_temperature=2.0, missing_mass="renormalize"),
        dict(loss="rkl", rank_weight=1.0, rank_union="concat", student_vocab=70),  # padding rows beyond the tokenizer
    ],
)
def test_fused_loss_trains_like_the_logits_path(tmp_path, options):
    options = dict(options)
    student_vocab = options.pop("student_vocab", 64)
    runs = {}
    for backend in ("logits", "fused"):
        student, teacher = _models(student_vocab)
        trainer = _train(tmp_path / backend, student, teacher, loss_backend=backend, **options)
        assert trainer.loss_backend == backend
        logs = [e for e in trainer.state.log_history if "loss" in e]
        runs[backend] = (dict(student.named_parameters()), logs)
    (logit_params, logit_logs), (fused_params, fused_logs) = runs["logits"], runs["fused"]
    for name, value in logit_params.items():
        torch.testing.assert_close(fused_params[name], value, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(logit_logs, fused_logs, strict=True):
        for key in ("loss", "kd_loss", "rank_loss", "cr@1", "mor@3"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_fused_step_never_makes_full_logits(tmp_path):
    """The student's output layer runs on one position per row (the model's forward); the loss reads its weight."""
    student, teacher = _models()
    widths = []
    student.lm_head.register_forward_hook(lambda module, args, output: widths.append(output.shape[1]))
    trainer = _train(tmp_path, student, teacher)  # auto: a sparse teacher -> fused
    assert trainer.loss_backend == "fused"
    assert widths and set(widths) == {1}


def test_auto_keeps_the_logits_path_for_a_dense_teacher(tmp_path):
    student, teacher = _models()
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, teacher_top_k=None),
                          train_dataset=tiny_pairs(4), processing_class=tiny_tokenizer())  # fmt: skip
    assert trainer.loss_backend == "logits"


class _SoftcappedLlama(LlamaForCausalLM):
    """Logits = 5·tanh(lm_head(h)/5), as Gemma 2 does: not the output layer alone."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 5 * torch.tanh(out.logits / 5)
        return out


def test_fused_refuses_a_model_whose_logits_are_not_the_output_layer(tmp_path):
    student, teacher = _models()
    capped = _SoftcappedLlama(student.config)
    capped.load_state_dict(student.state_dict())
    with torch.no_grad():
        capped.lm_head.weight.mul_(20)  # logits large enough for the cap to matter
    with pytest.raises(ValueError, match="not its output layer applied to its last hidden state"):
        _train(tmp_path, capped, teacher, loss_backend="fused")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_backend="fused", teacher_top_k=None), "needs a sparse teacher"),
        (dict(loss_backend="fused", rank_dynamic_weighting=True), "no rank_dynamic_weighting"),
        (dict(loss_backend="chunked"), "loss_backend='chunked' is invalid"),
    ],
)
def test_fused_loss_bad_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)
