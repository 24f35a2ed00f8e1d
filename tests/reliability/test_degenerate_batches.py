"""Degenerate batches have a defined behaviour (docs/reliability.md) and never give a NaN."""

import math

import pytest
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer

EOS = tiny_tokenizer().eos_token_id


def _trainer(tmp_path, train, student=None, **overrides) -> RLKDTrainer:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, learning_rate=5e-3,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, max_new_tokens=4, rank_k=3,
                metric_ks=[1, 3], disable_tqdm=True)
    base.update(overrides)
    return RLKDTrainer(model=student or tiny_llama(64, seed=2),
                       teacher_model=tiny_llama(64, hidden=48, seed=1, sharpen=4.0), args=RLKDConfig(**base),
                       train_dataset=train, processing_class=tiny_tokenizer())


def _logged(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


def test_every_completion_token_masked_gives_zero_loss_and_no_update(tmp_path):
    # prompts alone fill max_length (no max_prompt_length): every completion is cut to nothing, so the whole step
    # has no token to learn from. Loss 0 (not 0/0), zero gradients, so AdamW leaves the weights where they are.
    # A dataset with no completion token at all is refused at construction (issue 31), so the steps' batches are
    # taken from the examples without one of a dataset that also has one with a completion.
    long = [{"prompt": "translate " + "the cat " * 10, "completion": "le chat"}] * 4
    with pytest.warns(UserWarning, match="4 of 5 examples have no completion token left"):
        trainer = _trainer(tmp_path, long + [{"prompt": "the", "completion": "le"}], sampling_mode="off_policy",
                           max_length=8, max_prompt_length=None)
    trainer.train_dataset = trainer.train_dataset.select(range(4))
    assert all(len(row["completion_ids"]) == 0 for row in trainer.train_dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = _logged(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["loss"] == 0.0 and entry["completion_tokens"] == 0.0 and entry["grad_norm"] == 0.0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("mode", ["on_policy", "speculative"])  # the student's own samples; SKD's verified ones
def test_immediate_eos_completions_train_on_the_eos_token(tmp_path, mode):
    # a student whose first sampled token is always EOS: each completion is the one EOS token, which is counted
    student = tiny_llama(64, seed=2)
    eos_bias = torch.zeros(64)
    eos_bias[EOS] = 50.0
    student.lm_head.register_forward_hook(lambda module, inputs, logits: logits + eos_bias)
    # skd_top_k = the whole vocabulary (the tokenizer's 54 tokens; 64 output rows would now be refused)
    trainer = _trainer(tmp_path, tiny_pairs(4), student=student, sampling_mode=mode, skd_top_k=54)
    rollout = trainer._rollout(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    completion = rollout.sequences[:, rollout.prompt_length :]
    assert completion.shape[1] == 1 and (completion == EOS).all()
    trainer.train()
    for entry in _logged(trainer):
        assert entry["completion_tokens"] == 2.0  # one EOS per sequence
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0 and math.isfinite(entry["grad_norm"])


def test_sequences_longer_than_max_length_are_cut(tmp_path):
    # dataset sequences: the prompt keeps its last max_prompt_length tokens, the completion its first tokens up to
    # max_length (a cut completion loses its EOS); generated completions are bounded by max_new_tokens instead
    words = "le chat voit la maison " * 6
    long = [{"prompt": "translate to french " + "the cat sees the house " * 6, "completion": words}] * 4
    trainer = _trainer(tmp_path, long, sampling_mode="mixed", lmbda=0.5, max_length=12, max_prompt_length=5)
    tokenizer = tiny_tokenizer()
    full_prompt = tokenizer("translate to french " + "the cat sees the house " * 6)["input_ids"]
    full_completion = tokenizer(words, add_special_tokens=False)["input_ids"]
    for row in trainer.train_dataset:
        assert row["prompt_ids"] == full_prompt[-5:]
        assert row["completion_ids"] == full_completion[:7] and EOS not in row["completion_ids"]
    trainer.train()
    for entry in _logged(trainer):
        assert math.isfinite(entry["loss"]) and 0 < entry["completion_tokens"] <= 2 * 7  # 2 rows of ≤ 7 tokens
