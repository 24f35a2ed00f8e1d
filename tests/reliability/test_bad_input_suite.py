"""Every kind of bad input, in one place: a clear error naming the value and the fix, raised by RLKDConfig or
RLKDTrainer's constructor (before any step), and nothing written to output_dir.

(Some of these are also tested next to the code that checks them: tests/trainer/test_trainer_bad_input.py and
tests/trainer/test_trainer_cache.py.)
"""

import os
import re
import tempfile

import datasets
import pytest
from tiny_models import corrupted_cache_copy, tiny_llama, tiny_pairs, tiny_teacher, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer


def _config(out, **kw) -> RLKDConfig:
    base = dict(output_dir=str(out), report_to="none", max_steps=2, save_strategy="steps", save_steps=1,
                per_device_train_batch_size=2, max_new_tokens=4, rank_k=3, metric_ks=[1, 3], max_length=32,
                max_prompt_length=16)
    base.update(kw)
    return RLKDConfig(**base)


def _build(out, *, teacher="model", train=None, tokenizer=None, student_vocab=64, **kw):
    """Config and trainer with one thing changed; `teacher=None` with a cache, a str for a teacher by path."""
    args = _config(out, **kw)
    return RLKDTrainer(model=tiny_llama(student_vocab, seed=2), teacher_model=tiny_teacher() if teacher == "model" else
                       teacher, args=args, train_dataset=tiny_pairs(12) if train is None else train,
                       processing_class=tokenizer or tiny_tokenizer())


def _teacher_with_other_tokenizer(tmp_path) -> str:
    folder = tmp_path / "teacher"
    tiny_teacher().save_pretrained(folder)
    tiny_tokenizer(extra_words=("zebra",)).save_pretrained(folder)
    return str(folder)


def _inside_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    return tmp_path / "notes.txt" / "run"


def _edited(rows: list[dict], row: int) -> list[dict]:
    """`rows` with the first word of one completion replaced (the same number of tokens)."""
    rows = [dict(r) for r in rows]
    rows[row]["completion"] = " ".join(["fleuve"] + rows[row]["completion"].split()[1:])
    return rows


CASES = {
    # -- models and tokenizers
    "teacher with another tokenizer": (
        lambda out, tmp, cache: _build(out, teacher=_teacher_with_other_tokenizer(tmp)), "has another tokenizer"),
    "teacher with another vocabulary": (
        lambda out, tmp, cache: _build(out, student_vocab=40), "student vocabulary size 40 != teacher vocabulary"),
    # -- teacher cache
    "cache from another teacher": (
        lambda out, tmp, cache: _build(out, teacher="other/teacher", teacher_cache=str(cache),
                                       sampling_mode="off_policy"),
        "holds teacher 'tiny-teacher', not 'other/teacher'"),
    "cache with another K": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="off_policy",
                                       teacher_top_k=16), "stores k=8, not the k=16"),
    "cache with another temperature": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="off_policy",
                                       loss_temperature=2.0), "temperature=1.0, not 2.0"),
    "cache with another tokenizer": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="off_policy",
                                       tokenizer=tiny_tokenizer(extra_words=("zebra",))), "another tokenizer"),
    "cache of another dataset": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="off_policy",
                                       train=tiny_pairs(5)), "holds 12 examples but train_dataset has 5"),
    # issue 15, defect 5: another version of the dataset (same length) was found only when its batch came up
    "cache of an edited dataset": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="off_policy",
                                       train=_edited(tiny_pairs(12), row=7)),
        r"another version of train_dataset: 1 of 12 examples .*first: example 7; its completion has \d+ tokens here "
        r"and \d+ in the cache and first differs at token 0: 'fleuve' here"),
    "cache of a shuffled dataset": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="off_policy",
                                       train=tiny_pairs(12)[::-1]),
        r"first: example 0; it is the cache's example 11.*reordered or shuffled"),
    "corrupted cache shard": (
        lambda out, tmp, cache: _build(out, teacher=None, sampling_mode="off_policy",
                                       teacher_cache=str(corrupted_cache_copy(cache, tmp / "broken-cache"))),
        "(?i)checksum|sha"),
    "cache with a generating mode": (
        lambda out, tmp, cache: _build(out, teacher=None, teacher_cache=str(cache), sampling_mode="on_policy"),
        "sampling_mode='on_policy' is invalid.*need an online teacher_model"),
    # -- unknown names and out-of-range options (RLKDConfig)
    "unknown sampling mode": (lambda out, tmp, cache: _config(out, sampling_mode="greedy"),
                              r"sampling_mode='greedy' is invalid: use one of \('off_policy'"),
    "unknown loss": (lambda out, tmp, cache: _config(out, loss="kl"), r"loss='kl' is invalid: use one of \('fkl'"),
    "unknown non-finite policy": (lambda out, tmp, cache: _config(out, nonfinite_policy="ignore"),
                                  r"nonfinite_policy='ignore' is invalid: use one of \('error', 'skip'\)"),
    "skip with DeepSpeed": (
        lambda out, tmp, cache: _config(out, nonfinite_policy="skip", deepspeed="configs/deepspeed/zero3.json"),
        "nonfinite_policy='skip' is invalid: DeepSpeed applies the optimizer step inside backward"),
    "lmbda above 1": (lambda out, tmp, cache: _config(out, lmbda=1.5), r"lmbda=1.5 is invalid: it must be in \[0, 1\]"),
    "zero loss temperature": (lambda out, tmp, cache: _config(out, loss_temperature=0.0),
                              "loss_temperature=0.0 is invalid"),
    "zero max_new_tokens": (lambda out, tmp, cache: _config(out, max_new_tokens=0), "max_new_tokens=0 is invalid"),
    "prompt as long as max_length": (lambda out, tmp, cache: _config(out, max_prompt_length=32),
                                     "max_prompt_length=32 is invalid: it must be < max_length=32"),
    "rank_k above a sparse teacher's K": (lambda out, tmp, cache: _config(out, teacher_top_k=2, rank_k=3),
                                          "rank_k=3 is invalid: rank_k=3 exceeds teacher_top_k=2"),
    "teacher offload without DeepSpeed": (lambda out, tmp, cache: _build(out, teacher_offload_to_cpu=True),
                                          "teacher_offload_to_cpu=True needs DeepSpeed ZeRO-3"),
    # -- output_dir (issue 15, defect 6: an unwritable one trained, then crashed at the first save)
    "output_dir inside a file": (
        lambda out, tmp, cache: _build(_inside_a_file(tmp)),
        r"output_dir='.*/notes.txt/run' is under .*/notes.txt, which is a file"),
    "output_dir that is a file": (
        lambda out, tmp, cache: _build(_inside_a_file(tmp).parent), r"output_dir='.*/notes.txt' is a file"),
    # -- datasets
    "dataset without a completion column": (
        lambda out, tmp, cache: _build(out, train=[{"prompt": "the cat", "answer": "le chat"}]),
        r"train_dataset lacks the column\(s\) \['completion'\]"),
    "empty dataset": (
        lambda out, tmp, cache: _build(out, train=datasets.Dataset.from_dict({"prompt": [], "completion": []})),
        "train_dataset is empty"),
    # issue 15, defect 4: an empty prompt was accepted and crashed mid-run, after checkpoints were written
    "empty prompt": (
        lambda out, tmp, cache: _build(out, train=tiny_pairs(4) + [{"prompt": "", "completion": "le chat"}]),
        "train_dataset row 4 has an empty prompt"),
    "prompt of only whitespace, in the eval dataset": (
        lambda out, tmp, cache: RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=tiny_teacher(),
                                            args=_config(out), train_dataset=tiny_pairs(4),
                                            processing_class=tiny_tokenizer(),
                                            eval_dataset=tiny_pairs(2) + [{"prompt": "   ", "completion": "le"}]),
        r"eval_dataset row 2 has an empty prompt \('   ' tokenises to no tokens\)"),
    "eval dataset without a prompt column": (
        lambda out, tmp, cache: RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=tiny_teacher(),
                                            args=_config(out), train_dataset=tiny_pairs(4),
                                            eval_dataset=[{"completion": "le chat"}],
                                            processing_class=tiny_tokenizer()),
        r"eval_dataset lacks the column\(s\) \['prompt'\]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_early_and_writes_nothing(tmp_path, cache_dir, case):
    make, message = CASES[case]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        make(out, tmp_path, cache_dir)
    # Trainer creates output_dir in its constructor; nothing may be in it.
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def _read_only_folder(tmp_path) -> str:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def _system_folder(tmp_path) -> str:
    """A folder that even root cannot write (sysfs), for a test run as root, where permission bits do not bind."""
    for folder in ("/sys/kernel", "/sys"):
        try:
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError:
            return folder
    pytest.skip("no folder here refuses writes to root")


# a folder without write permission (as a normal user), and one on a filesystem that refuses writes to root too
@pytest.mark.parametrize("make_folder", [
    pytest.param(_read_only_folder, marks=pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")),
    pytest.param(_system_folder, marks=pytest.mark.skipif(os.geteuid() != 0, reason="the read-only folder covers it")),
])
@pytest.mark.parametrize("below", ["", "run/1"])  # the folder itself; a folder that would be created in it
def test_an_unwritable_output_dir_is_refused_before_any_work(tmp_path, make_folder, below):
    """Issue 15, defect 6: an output_dir that cannot be written passed the constructor, trained, and crashed at the
    first save. It must be refused at construction, naming the path, and nothing may be left behind."""
    folder = make_folder(tmp_path)
    before = sorted(os.listdir(folder))
    output_dir = os.path.join(folder, below) if below else folder
    refused = rf"output_dir='{re.escape(output_dir)}' is not writable \((Permission denied|Operation not permitted)"
    with pytest.raises(ValueError, match=refused):
        _build(output_dir)
    assert sorted(os.listdir(folder)) == before
