"""Training from a teacher top-k cache: no teacher loaded, the same losses as an online sparse teacher."""

import pytest
import torch
from tiny_models import CACHE_K as K
from tiny_models import corrupted_cache_copy, tiny_llama, tiny_pairs, tiny_teacher, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", max_steps=3, seed=0,
                per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, rank_k=3, metric_ks=[1, 3],
                max_length=32, max_prompt_length=16, disable_tqdm=True, sampling_mode="off_policy")
    base.update(kw)
    return RLKDConfig(**base)


@pytest.mark.parametrize("mode", ["off_policy", "seq_kd"])
def test_cache_training_equals_an_online_sparse_teacher(tmp_path, cache_dir, mode):
    cached = RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=None, processing_class=tiny_tokenizer(),
                         args=_args(tmp_path / "c", sampling_mode=mode, teacher_cache=str(cache_dir)),
                         train_dataset=tiny_pairs(12))
    assert cached.teacher is None
    cached.train()
    online = RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=tiny_teacher(), processing_class=tiny_tokenizer(),
                         args=_args(tmp_path / "o", sampling_mode="off_policy", teacher_top_k=K),
                         train_dataset=tiny_pairs(12))
    online.train()
    for key in ("loss", "kd_loss", "rank_loss", "mor@3"):
        a = [e[key] for e in cached.state.log_history if "loss" in e]
        b = [e[key] for e in online.state.log_history if "loss" in e]
        assert len(a) == 3
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6, msg=key)


def test_cache_bad_input(tmp_path, cache_dir):
    def make(**kw):
        teacher = kw.pop("teacher_model", None)
        data = kw.pop("train_dataset", tiny_pairs(12))
        return RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=teacher, processing_class=tiny_tokenizer(),
                           args=_args(tmp_path, teacher_cache=str(cache_dir), **kw), train_dataset=data)

    with pytest.raises(ValueError, match="stores k=8, not the k=16"):
        make(teacher_top_k=16)
    with pytest.raises(ValueError, match="temperature=1.0, not 2.0"):
        make(loss_temperature=2.0)
    with pytest.raises(ValueError, match="holds teacher 'tiny-teacher', not 'other/teacher'"):
        make(teacher_model="other/teacher")
    with pytest.raises(ValueError, match="holds 12 examples but train_dataset has 5"):
        make(train_dataset=tiny_pairs(5))
    with pytest.raises(ValueError, match=r"does not match the trainer's tokenisation: 12 of 12 examples.*"
                                         r"max_length=8 \(the cache's 32\), max_prompt_length=4 \(the cache's 16\)"):
        make(max_length=8, max_prompt_length=4)  # at construction, not when the first batch comes up
    with pytest.raises(ValueError, match="need an online teacher_model"):
        _args(tmp_path, teacher_cache=str(cache_dir), sampling_mode="on_policy")
    with pytest.raises(ValueError, match="another tokenizer"):
        RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=None, train_dataset=tiny_pairs(12),
                    args=_args(tmp_path, teacher_cache=str(cache_dir)),
                    processing_class=tiny_tokenizer(extra_words=("zebra",)))


def test_corrupted_cache_fails_before_training(tmp_path, cache_dir):
    broken = corrupted_cache_copy(cache_dir, tmp_path / "broken")
    with pytest.raises(ValueError, match="(?i)checksum|sha"):
        RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=None, processing_class=tiny_tokenizer(),
                    args=_args(tmp_path, teacher_cache=str(broken)), train_dataset=tiny_pairs(12))


# Issue 15, defect 3: a cache's K bounds rank_k and metric_ks, checked when the trainer is built (was: at step 1,
# "must be in [1, V=8]" where 8 is K)
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rank_k=9), "rank_k=9 exceeds the teacher cache's K=8"),
        (dict(metric_ks=[1, 16]), r"metric_ks=\[1, 16\] exceeds the teacher cache's K=8"),
    ],
)
def test_fields_bounded_by_the_cache_k(tmp_path, cache_dir, options, message):
    with pytest.raises(ValueError, match=message):
        RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=None, processing_class=tiny_tokenizer(),
                    args=_args(tmp_path, teacher_cache=str(cache_dir), **options), train_dataset=tiny_pairs(12))
