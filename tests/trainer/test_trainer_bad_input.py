"""Bad input reaches a clear error before training starts."""

import pytest
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer


def _args(tmp_path, **kw):
    return RLKDConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, save_strategy="no",
                      per_device_train_batch_size=2, max_new_tokens=4, **kw)


def _trainer(tmp_path, train, student_vocab=64, teacher=None, tokenizer=None, **kw):
    return RLKDTrainer(
        model=tiny_llama(student_vocab, seed=0), teacher_model=teacher or tiny_llama(64, seed=1),
        args=_args(tmp_path, **kw), train_dataset=train, processing_class=tokenizer or tiny_tokenizer(),
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sampling_mode", "greedy", "sampling_mode='greedy' is invalid"),
        ("loss", "kl", "loss='kl' is invalid"),
        ("lmbda", 1.5, "lmbda=1.5 is invalid"),
        ("beta", -0.1, "beta=-0.1 is invalid"),
        ("loss_temperature", 0.0, "loss_temperature=0.0 is invalid"),
        ("temperature", -1.0, "temperature=-1.0 is invalid"),
        ("top_p", 0.0, "top_p=0.0 is invalid"),
        ("skd_top_k", 0, "skd_top_k=0 is invalid"),
        ("skd_draft_len", 0, "skd_draft_len=0 is invalid"),
        ("rank_weight", -1.0, "rank_weight=-1.0 is invalid"),
        ("skd_verify_on", "both", "skd_verify_on='both' is invalid"),
        ("missing_mass", "zero", "missing_mass='zero' is invalid"),
        ("generation_cache", "paged", "generation_cache='paged' is invalid"),
    ],
)
def test_config_range_checks_name_the_value(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **{field: value})


def test_rank_k_larger_than_sparse_teacher(tmp_path):
    with pytest.raises(ValueError, match="rank_k=9 is invalid.*teacher_top_k=4"):
        _args(tmp_path, teacher_top_k=4, rank_k=9)


def test_missing_columns(tmp_path):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['completion'\]"):
        _trainer(tmp_path, [{"prompt": "the cat", "answer": "le chat"}])


def test_empty_dataset(tmp_path):
    import datasets

    empty = datasets.Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match="train_dataset is empty"):
        _trainer(tmp_path, empty)


def test_vocabulary_mismatch_beyond_padding(tmp_path):
    # the student's output layer (40 rows) does not even cover the tokenizer (54 tokens): another tokenizer
    with pytest.raises(ValueError, match="student vocabulary size 40 != teacher vocabulary size 64"):
        _trainer(tmp_path, tiny_pairs(4), student_vocab=40)


def test_teacher_with_another_tokenizer(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_llama(64, seed=1).save_pretrained(teacher_dir)
    tiny_tokenizer(extra_words=("zebra",)).save_pretrained(teacher_dir)
    with pytest.raises(ValueError, match="has another tokenizer"):
        _trainer(tmp_path, tiny_pairs(4), teacher=str(teacher_dir))


def test_teacher_path_that_does_not_exist(tmp_path):
    with pytest.raises((OSError, ValueError)):
        _trainer(tmp_path, tiny_pairs(4), teacher=str(tmp_path / "no-such-teacher"))


def test_long_prompts_are_truncated_from_the_left(tmp_path):
    long = [{"prompt": "translate " + "the cat " * 40, "completion": "le chat"}] * 4
    trainer = _trainer(tmp_path, long, sampling_mode="off_policy", max_length=16, max_prompt_length=8)
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) == 8 and len(row["prompt_ids"]) + len(row["completion_ids"]) <= 16
    trainer.train()


def test_cuda_graph_generation_on_a_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cache_implementation='cuda_graph' needs the models on a CUDA device"):
        _trainer(tmp_path, tiny_pairs(4), generation_cache="cuda_graph")


def test_auto_generation_cache_is_dynamic_on_a_cpu(tmp_path):
    trainer = _trainer(tmp_path, tiny_pairs(4))
    assert trainer.generation_cache == "dynamic" and trainer.sampler.cache_implementation == "dynamic"


# Issue 15, defect 3: every value that used to pass RLKDConfig and fail at step 1 (or silently) is refused when the
# config or the trainer is built, naming the field, its value and the limit.
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rank_weight", float("nan"), "rank_weight=nan is invalid: it must be a finite number"),  # was: NonFiniteError
        ("rank_weight", float("inf"), "rank_weight=inf is invalid: it must be a finite number"),
        # was: a ranking loss of 0, silently
        ("rank_regularization_strength", float("inf"), "rank_regularization_strength=inf is invalid: it must be a "
                                                       "finite number"),
        ("loss_temperature", float("inf"), "loss_temperature=inf is invalid: it must be a finite number"),
        ("temperature", float("nan"), "temperature=nan is invalid: it must be a finite number"),
        ("teacher_sampling_temperature", float("inf"), "teacher_sampling_temperature=inf is invalid"),
        ("skew_alpha", float("nan"), "skew_alpha=nan is invalid"),
        ("top_p", float("nan"), "top_p=nan is invalid"),
    ],
)
def test_config_refuses_non_finite_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **{field: value})


def test_metric_ks_larger_than_sparse_teacher(tmp_path):
    # was: "ks=(1, 8) must be ... in [1, V=4]" at step 1, where 4 is K, not the vocabulary
    with pytest.raises(ValueError, match=r"metric_ks=\[1, 8\] exceeds teacher_top_k=4"):
        _args(tmp_path, teacher_top_k=4, rank_k=3, metric_ks=[1, 8])
    with pytest.raises(ValueError, match="rank_k=8 exceeds teacher_top_k=4"):
        _args(tmp_path, teacher_top_k=4, rank_k=8)


# each field bounded by the vocabulary (the tiny tokenizer's 54 tokens; the models have 64 output rows)
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rank_k=1000), r"rank_k=1000 exceeds the vocabulary \(54 tokens\)"),
        (dict(rank_k=60), r"rank_k=60 exceeds the vocabulary \(54 tokens\)"),  # fits the 64 rows, not the tokenizer
        (dict(metric_ks=[1, 1000]), r"metric_ks=\[1, 1000\] exceeds the vocabulary \(54 tokens\)"),
        (dict(teacher_top_k=1000, rank_k=3, metric_ks=[1]), r"teacher_top_k=1000 exceeds the vocabulary \(54 tokens\)"),
        (dict(sampling_mode="speculative", skd_top_k=1000), r"skd_top_k=1000 exceeds the vocabulary \(54 tokens\)"),
    ],
)
def test_fields_bounded_by_the_vocabulary_are_checked_at_construction(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, tiny_pairs(4), **options)
