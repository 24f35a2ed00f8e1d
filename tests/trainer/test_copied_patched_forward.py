"""A model whose forward runs another model object (a deep copy of a model trl's SFTTrainer trained) is refused
before training: otherwise its weights get no gradients and the run changes nothing, silently."""

import copy

import pytest
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer
from trl.trainer.utils import add_fused_lm_head

from rlkd_onpolicy import RLKDConfig, RLKDTrainer
from rlkd_onpolicy.trainer.guards import check_own_forward


def _patched_copy():
    trained = tiny_llama(64, seed=0)
    add_fused_lm_head(trained)  # what SFTTrainer does to the model it trains, and leaves in place
    return trained, copy.deepcopy(trained)


def test_the_failure_is_real_a_copy_of_a_patched_model_trains_the_original():
    # the premise of the check, shown with trl's own patch: the copy's parameters get no gradient
    trained, clone = _patched_copy()
    ids = torch.tensor([[5, 6, 7, 8]])
    clone(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in clone.parameters())
    assert any(p.grad is not None for p in trained.parameters())


def test_check_own_forward_refuses_the_copy_and_accepts_the_rest():
    trained, clone = _patched_copy()
    with pytest.raises(ValueError, match=r"student\.forward was replaced .*`del student\.forward`"):
        check_own_forward(clone, "student")
    check_own_forward(trained, "student")  # the patched model itself runs its own weights
    check_own_forward(tiny_llama(64, seed=0), "student")  # an unpatched model
    del clone.forward  # the fix the message gives
    check_own_forward(clone, "student")
    ids = torch.tensor([[5, 6, 7, 8]])
    clone(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in clone.parameters())


@pytest.mark.parametrize("role", ["model", "teacher_model"])
def test_trainer_refuses_a_patched_copy_before_training(tmp_path, role):
    _, clone = _patched_copy()
    models = {"model": tiny_llama(64, seed=0), "teacher_model": tiny_llama(64, seed=1)} | {role: clone}
    args = RLKDConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, save_strategy="no",
                      per_device_train_batch_size=2, max_new_tokens=4)
    with pytest.raises(ValueError, match=rf"{role}\.forward was replaced"):
        RLKDTrainer(**models, args=args, train_dataset=tiny_pairs(4), processing_class=tiny_tokenizer())
    assert not (tmp_path / "out").exists()
