"""Issue 31: ten inputs a new user gives that the library accepted and then crashed on deep inside, or silently
mishandled. Each test fails on the code before the fix: the input is now refused at construction with a message
naming the value and the fix, or it just works."""

import json
import math
import warnings

import datasets
import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_pairs, tiny_teacher, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer

N_TOKENS = len(tiny_tokenizer())  # 54: the tiny tokenizer's ids


def _args(tmp_path, **kw) -> RLKDConfig:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, save_strategy="no",
                per_device_train_batch_size=2, per_device_eval_batch_size=2, max_new_tokens=4, rank_k=3,
                metric_ks=[1, 3], disable_tqdm=True, seed=0)
    base.update(kw)
    return RLKDConfig(**base)


def _trainer(tmp_path, *, student=None, teacher=None, train=None, eval_dataset=None, hooks=None, **kw):
    return RLKDTrainer(model=tiny_llama(64, layers=1, seed=2) if student is None else student,
                       teacher_model=tiny_teacher() if teacher is None else teacher, args=_args(tmp_path, **kw),
                       train_dataset=tiny_pairs(8) if train is None else train, eval_dataset=eval_dataset,
                       processing_class=tiny_tokenizer(), **(hooks or {}))  # fmt: skip


# -- 1. the student object passed as teacher_model ------------------------------------------------------------------


def test_1_the_student_as_its_own_teacher_is_refused_and_left_trainable(tmp_path):
    student = tiny_llama(64, layers=1, seed=2)
    with pytest.raises(ValueError, match="teacher_model and model are the same object"):
        _trainer(tmp_path, student=student, teacher=student)
    assert all(p.requires_grad for p in student.parameters())  # it used to stay frozen after the refusal
    # a separate object that shares the student's parameters' storage (its body assigned from the student)
    teacher = tiny_llama(64, layers=1, seed=3)
    teacher.model = student.model
    with pytest.raises(ValueError, match="shares .* parameter"):
        _trainer(tmp_path, student=student, teacher=teacher)
    assert all(p.requires_grad for p in student.parameters())


# -- 2. the CLI's splits for file datasets --------------------------------------------------------------------------


def test_2_cli_splits_are_honoured_for_files_and_saved_folders(tmp_path):
    from rlkd_onpolicy.train import load_prompt_completion

    rows = tiny_pairs(4)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_prompt_completion(str(path), None, "train")) == 4
    with pytest.raises(ValueError, match=r"no split .no_such_split.*has only \['train'\]"):
        load_prompt_completion(str(path), None, "no_such_split")
    with pytest.raises(ValueError, match=r"no split .test.*has only \['train'\]"):
        load_prompt_completion(str(path), None, "test")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(folder))
    assert len(load_prompt_completion(str(folder), None, "validation")) == 2
    with pytest.raises(ValueError, match=r"no split .test.*has only \['train', 'validation'\]"):
        load_prompt_completion(str(folder), None, "test")


# -- 3. vocabulary padding of any size --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["on_policy", "seq_kd", "speculative"])  # every sampler that holds both models
def test_3_padding_rows_beyond_the_tokenizer_are_cut_whatever_their_number(tmp_path, mode):
    # A teacher 400 rows wider than the student (as Qwen2.5-7B's 152,064 rows beside a student resized to its
    # 151,665-token tokenizer): both cover the tokenizer's 54 ids, so the rest is padding and is cut.
    teacher = tiny_llama(N_TOKENS + 400, hidden=48, seed=1, sharpen=4.0)
    trainer = _trainer(tmp_path, teacher=teacher, sampling_mode=mode, skd_top_k=5)
    assert trainer.vocab_size == trainer.sampler.vocab_size == N_TOKENS
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_3_a_real_mismatch_below_the_tokenizer_is_still_refused(tmp_path):
    from rlkd_onpolicy.sampling import RolloutSampler

    with pytest.raises(ValueError, match=r"teacher vocabulary size 40"):
        _trainer(tmp_path, teacher=tiny_llama(40, seed=1), sampling_mode="speculative")
    # the sampler alone: rows differing by 400 are fine with the tokenizer's length, refused below it
    student, teacher = tiny_llama(64, seed=2), tiny_llama(N_TOKENS + 400, seed=1)
    assert RolloutSampler("seq_kd", student, teacher, vocab_size=N_TOKENS).vocab_size == N_TOKENS
    with pytest.raises(ValueError, match=r"vocab_size=60 .*student.s output layer has only 58 rows"):
        RolloutSampler("seq_kd", tiny_llama(58, seed=2), teacher, vocab_size=60)


# -- 4. the standard evaluation APIs ----------------------------------------------------------------------------


def test_4_evaluate_takes_a_raw_dataset_a_dict_of_datasets_and_include_for_metrics_inputs(tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["inputs"] = prediction.inputs
        return {"n": float(len(prediction.label_ids))}

    trainer = _trainer(tmp_path, eval_dataset={"a": tiny_pairs(4, seed=1), "b": tiny_pairs(2, seed=2)},
                       sampling_mode="off_policy", include_for_metrics=["inputs"],
                       hooks={"compute_metrics": compute_metrics})
    metrics = trainer.evaluate()
    for name, n in (("a", 4), ("b", 2)):
        for key in ("loss", "kd_loss", "mor@3", "n"):
            assert f"eval_{name}_{key}" in metrics, (name, key)
        assert metrics[f"eval_{name}_n"] == n
    assert seen["inputs"] is not None and seen["inputs"].shape[0] == 2  # the last evaluated set's sequences
    # a raw prompt–completion dataset given to evaluate() is tokenised as the constructor's are
    raw = datasets.Dataset.from_list(tiny_pairs(3, seed=3))
    assert metrics.keys() >= {"eval_a_loss"}
    assert "eval_loss" in trainer.evaluate(eval_dataset=raw)
    assert "eval_c_loss" in trainer.evaluate(eval_dataset={"c": tiny_pairs(3, seed=3)})
    assert "test_kd_loss" in trainer.predict(raw).metrics  # predict() too


# -- 5. JSON dict fields on the command line --------------------------------------------------------------------


def test_5_model_init_kwargs_parse_from_json_on_the_command_line(tmp_path):
    from trl import TrlParser

    from rlkd_onpolicy.train import ModelDataArguments

    argv = ["--student_model", "s", "--dataset_name", "d", "--output_dir", str(tmp_path),
            "--model_init_kwargs", '{"dtype": "bfloat16"}', "--teacher_model_init_kwargs", '{"dtype":"float32"}']
    _, args = TrlParser((ModelDataArguments, RLKDConfig)).parse_args_and_config(argv)[:2]
    assert args.model_init_kwargs == {"dtype": "bfloat16"}
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}
    with pytest.raises(ValueError, match="model_init_kwargs"):
        RLKDConfig(output_dir=str(tmp_path), model_init_kwargs="dtype=bfloat16")
    # and the parsed kwargs reach from_pretrained
    folder = tmp_path / "student"
    tiny_llama(64, seed=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    trainer = RLKDTrainer(model=str(folder), teacher_model=tiny_teacher(),
                          args=_args(tmp_path, model_init_kwargs={"dtype": "bfloat16"}), train_dataset=tiny_pairs(4))
    assert trainer.model.dtype == torch.bfloat16


# -- 6. absolute positions ------------------------------------------------------------------------------------------


def test_6_sequences_longer_than_absolute_positions_are_refused_naming_the_field(tmp_path):
    long_prompts = [{"prompt": "translate " + "the cat " * 50, "completion": "le chat"}] * 4  # 101 tokens
    with pytest.raises(ValueError, match=r"model .*n_positions=64.*max_prompt_length"):
        _trainer(tmp_path, student=tiny_gpt2(64, seed=2), train=long_prompts, sampling_mode="on_policy",
                 max_prompt_length=100, max_length=120)
    with pytest.raises(ValueError, match=r"teacher_model .*n_positions=64.*max_new_tokens=200"):
        _trainer(tmp_path, teacher=tiny_gpt2(64, seed=1), sampling_mode="on_policy", max_new_tokens=200)
    medium = [{"prompt": "translate " + "the cat " * 40, "completion": "le chat"}] * 4  # 81 + 3 tokens
    with pytest.raises(ValueError, match=r"n_positions=64.*up to 84 tokens \(max_length=100\)"):
        _trainer(tmp_path, student=tiny_gpt2(64, seed=2), train=medium, sampling_mode="off_policy",
                 max_prompt_length=None, max_length=100)
    # within its positions a GPT-2 trains (RoPE models such as Llama have no such limit and are not checked)
    trainer = _trainer(tmp_path, student=tiny_gpt2(64, seed=2), sampling_mode="on_policy", max_new_tokens=8)
    trainer.train()


# -- 7. nothing left to train on --------------------------------------------------------------------------------


def test_7_truncation_honours_max_length_and_a_dataset_without_completion_tokens_is_refused(tmp_path):
    from rlkd_onpolicy.data import tokenize_example

    long = {"prompt": "translate " + "the cat " * 10, "completion": "le chat"}  # a 21-token prompt
    example = tokenize_example(tiny_tokenizer(), long, max_length=8, max_prompt_length=None)
    assert len(example.prompt_ids) + len(example.completion_ids) <= 8
    with pytest.raises(ValueError, match=r"no completion token.*4 examples.*max_length=8"):
        _trainer(tmp_path, train=[long] * 4, sampling_mode="off_policy", max_length=8, max_prompt_length=None)


# -- 8. streaming datasets ------------------------------------------------------------------------------------------


def test_8_an_iterable_dataset_is_refused_with_the_fix(tmp_path):
    streaming = datasets.Dataset.from_list(tiny_pairs(4)).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"train_dataset is an IterableDataset.*streaming"):
        _trainer(tmp_path, train=streaming)
    with pytest.raises(ValueError, match=r"eval_dataset is an IterableDataset"):
        _trainer(tmp_path, eval_dataset=streaming)


# -- 9. eval metrics independent of the eval batch size ---------------------------------------------------------


def test_9_eval_metrics_do_not_depend_on_the_eval_batch_size(tmp_path):
    # prompts and completions of varied lengths (tiny_pairs: 2 to 5 words), an eval set of 8
    results = []
    for batch_size in (1, 2, 8):
        trainer = _trainer(tmp_path, eval_dataset=tiny_pairs(8, seed=5), sampling_mode="off_policy",
                           per_device_eval_batch_size=batch_size)
        results.append(trainer.evaluate())
    keys = [f"eval_{k}" for k in ("loss", "kd_loss", "rank_loss", "cr@1", "mor@3", "completion_tokens")]
    for key in keys:
        values = [r[key] for r in results]
        assert max(values) - min(values) <= 1e-5 * max(1.0, abs(values[0])), (key, values)


# -- 10. remove_unused_columns=True -----------------------------------------------------------------------------


def test_10_remove_unused_columns_is_forced_off_as_gkd_trainer_does(tmp_path):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, remove_unused_columns=True)
    assert trainer.args.remove_unused_columns is False
    trainer.train()
    assert trainer.state.global_step == 1


def test_teacher_model_is_trls_name_for_the_teacher(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.teacher_model is trainer.teacher is not None


# -- the smaller things of issue 31 ---------------------------------------------------------------------------------


def test_a_teacher_model_object_beside_a_teacher_cache_is_refused(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=r"teacher_model is a model object and args.teacher_cache="):
        _trainer(tmp_path, teacher=tiny_teacher(), teacher_cache=str(cache_dir), sampling_mode="off_policy")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("teacher_server_backoff", float("nan"), "teacher_server_backoff=nan is invalid"),  # no server: still checked
        ("teacher_server_timeout", float("inf"), "teacher_server_timeout=inf is invalid"),
        ("learning_rate", float("nan"), "learning_rate=nan is invalid"),  # used to fail inside train()
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps=0 is invalid"),
        ("model_init_kwargs", "dtype=bfloat16", "model_init_kwargs='dtype=bfloat16' is invalid"),
    ],
)
def test_config_refuses_what_used_to_fail_inside_train(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **{field: value})


def test_max_new_tokens_0_is_fine_in_off_policy_and_refused_where_it_generates(tmp_path):
    assert _args(tmp_path, sampling_mode="off_policy", max_new_tokens=0).max_new_tokens == 0
    with pytest.raises(ValueError, match="max_new_tokens=0 is invalid"):
        _args(tmp_path, sampling_mode="on_policy", max_new_tokens=0)


def test_the_default_max_prompt_length_follows_a_shorter_max_length(tmp_path):
    with pytest.warns(UserWarning, match="max_length // 2 = 96"):
        args = RLKDConfig(output_dir=str(tmp_path), max_length=192)
    assert args.max_prompt_length == 96
    with pytest.raises(ValueError, match="max_prompt_length=200 is invalid: it must be < max_length=192"):
        RLKDConfig(output_dir=str(tmp_path), max_length=192, max_prompt_length=200)  # one the user set: refused


def test_missing_cache_error_names_the_path(tmp_path):
    from rlkd_onpolicy.cache import TeacherCache

    with pytest.raises(ValueError, match=r"--out .*no-cache`") as error:
        TeacherCache.open(str(tmp_path / "no-cache"))
    assert "{path}" not in str(error.value)


@pytest.mark.parametrize(
    "damaged, what",
    [
        ("model.safetensors", "the model weights"),
        ("rollout_rng_state_0.pth", "the rollout generator's state"),
        ("trainer_state.json", "the training state"),
        ("optimizer.pt", "the optimizer and scheduler states"),
    ],
)
def test_a_damaged_checkpoint_file_is_named_on_resume(tmp_path, damaged, what):
    trainer = _trainer(tmp_path, sampling_mode="off_policy", save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    (checkpoint / damaged).write_bytes(b"not what was saved")
    resumed = _trainer(tmp_path, sampling_mode="off_policy", save_strategy="steps", save_steps=1, max_steps=2)
    with pytest.raises(ValueError, match=rf"checkpoint-1: {what} \(.*{damaged}.*\) could not be read") as error:
        resumed.train(resume_from_checkpoint=True)
    assert "weights_only=False" not in str(error.value)


def test_an_all_minus_inf_teacher_row_gives_a_finite_loss_and_gradient():
    from rlkd_onpolicy.losses import distillation_loss

    torch.manual_seed(0)
    student = torch.randn(2, 3, 16, requires_grad=True)
    teacher = torch.randn(2, 3, 16)
    teacher[0, 1] = float("-inf")  # every token suppressed
    out = distillation_loss(student, teacher, loss="jsd", rank_weight=2.0, rank_k=3, reduction="sum")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(student.grad).all() and int(out.num_tokens) == 5
    assert student.grad[0, 1].abs().sum() == 0  # the row counts as masked
    ids, logprobs = teacher.topk(4).indices, torch.randn(2, 3, 4).log_softmax(-1)
    logprobs[1, 2] = float("-inf")
    sparse = distillation_loss(student, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, rank_k=3)
    assert torch.isfinite(sparse.loss)


@pytest.mark.parametrize("shape", [(), (2, 3, 0)])  # a 0-D tensor; an empty vocabulary dimension
def test_a_logits_tensor_without_a_vocabulary_dimension_is_refused(shape):
    from rlkd_onpolicy.losses import distillation_loss

    with pytest.raises(ValueError, match=r"student_logits must be \(\.\.\., V\) with V ≥ 1"):
        distillation_loss(torch.zeros(shape), torch.zeros(shape))
