"""RLKDTrainer with a teacher of another tokenizer: a word-level teacher and a character-level student train in every
supported mode through RLKDConfig(teacher_tokenizer_name_or_path=...), with the ranking loss; identical tokenizers
take the same-tokenizer path; what the path does not do is refused at construction."""

import math
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from xtok_fixtures import char_tokenizer, llama_for, word_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer
from rlkd_onpolicy.cross_tokenizer import CrossTokenizerTeacher
from rlkd_onpolicy.teacher import LocalTeacher

DATA = [
    {"prompt": "the cat", "completion": " sees a dog ."},
    {"prompt": "a bird", "completion": " sleeps in the tree ."},
    {"prompt": "le chat", "completion": " voit un chien ."},
    {"prompt": "the dog", "completion": " runs to the red house , and a bird sleeps ."},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    word_tokenizer().save_pretrained(root / "word")
    char_tokenizer().save_pretrained(root / "char")
    return root


def args_for(tmp_path, folders, **fields):
    base = dict(output_dir=str(tmp_path / "out"), teacher_tokenizer_name_or_path=str(folders / "word"),
                rank_weight=2.0, rank_k=5, max_new_tokens=10, per_device_train_batch_size=2, max_steps=2,
                learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)  # fmt: skip
    return RLKDConfig(**(base | fields))


def train_and_check(args, student_tokenizer=None, eval_dataset=None):
    student_tokenizer = student_tokenizer or char_tokenizer()
    teacher, student = llama_for(word_tokenizer(), seed=1), llama_for(student_tokenizer, seed=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=DATA,
                          eval_dataset=eval_dataset, processing_class=student_tokenizer)  # fmt: skip
    assert isinstance(trainer.scoring_teacher, CrossTokenizerTeacher)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert all(math.isfinite(entry[k]) for k in ("loss", "kd_loss", "rank_loss", "grad_norm"))
        if args.rank_weight > 0:
            assert entry["rank_loss"] > 0  # the ranking term is there
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    return trainer


# each mode the cross-tokenizer path supports, with the ranking loss
@pytest.mark.parametrize("mode", ["off_policy", "on_policy", "mixed", "seq_kd"])
def test_word_teacher_char_student_trains(tmp_path, folders, mode):
    train_and_check(args_for(tmp_path, folders, sampling_mode=mode))


@pytest.mark.parametrize("fields", [
    dict(use_uld_loss=True),  # ULD over the sorted vocabularies
    dict(use_uld_loss=True, uld_use_hybrid_loss=True, loss="jsd", uld_crossentropy_weight=0.1),  # GOLD's hybrid
])  # fmt: skip
def test_uld_and_hybrid_train_on_policy(tmp_path, folders, fields):
    train_and_check(args_for(tmp_path, folders, sampling_mode="on_policy", **fields))


def test_student_tokenizer_without_a_decoder(tmp_path, folders):
    """Its decode joins tokens with spaces: the teacher scores that text, and training still works."""
    train_and_check(args_for(tmp_path, folders, sampling_mode="on_policy"), char_tokenizer(decoder=False))


def test_evaluation(tmp_path, folders):
    trainer = train_and_check(args_for(tmp_path, folders, sampling_mode="off_policy"), eval_dataset=DATA[:2])
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0


def test_identical_tokenizers_take_the_same_tokenizer_path(tmp_path, folders):
    tokenizer = char_tokenizer()
    args = args_for(tmp_path, folders, teacher_tokenizer_name_or_path=str(folders / "char"))
    trainer = RLKDTrainer(model=llama_for(tokenizer, seed=2), teacher_model=llama_for(tokenizer, seed=1), args=args,
                          train_dataset=DATA, processing_class=tokenizer)  # fmt: skip
    assert isinstance(trainer.scoring_teacher, LocalTeacher)


def build(args, student_tokenizer=None, teacher_tokenizer=None, teacher=None):
    student_tokenizer, teacher_tokenizer = student_tokenizer or char_tokenizer(), teacher_tokenizer or word_tokenizer()
    return RLKDTrainer(model=llama_for(student_tokenizer, seed=2), args=args, train_dataset=DATA,
                       teacher_model=teacher if teacher is not None else llama_for(teacher_tokenizer, seed=1),
                       processing_class=student_tokenizer)  # fmt: skip


# what the cross-tokenizer path refuses at construction, each naming the field
@pytest.mark.parametrize(("fields", "match"), [
    (dict(sampling_mode="speculative"), "sampling_mode='speculative' is not supported"),
    (dict(teacher_top_k=8), "teacher_top_k=8 is not supported"),
    (dict(teacher_top_k=8, loss_backend="fused"), "teacher_top_k=8 is not supported"),
    (dict(rank_dynamic_weighting=True), "rank_dynamic_weighting=True is not supported"),
])  # fmt: skip
def test_refused_at_construction(tmp_path, folders, fields, match):
    with pytest.raises(ValueError, match=match):
        build(args_for(tmp_path, folders, **fields))


@pytest.mark.parametrize(("fields", "match"), [
    (dict(uld_crossentropy_weight=0.5), "uld_crossentropy_weight=0.5 is invalid: it configures the ULD loss"),
    (dict(uld_use_hybrid_loss=True), "uld_use_hybrid_loss=True is invalid"),
    (dict(use_uld_loss=True, teacher_tokenizer_name_or_path=None), "use_uld_loss=True is invalid"),
    (dict(use_uld_loss=True, uld_use_hybrid_loss=True, uld_hybrid_matched_weight=0.5), "both None"),
    (dict(use_uld_loss=True, uld_student_temperature=0.0), "uld_student_temperature=0.0 is invalid"),
])  # fmt: skip
def test_config_refuses_ignored_or_bad_uld_fields(tmp_path, folders, fields, match):
    with pytest.raises(ValueError, match=match):
        args_for(tmp_path, folders, **fields)


def test_vocabularies_sharing_nothing(tmp_path, folders):
    """No shared entry: the divergence on shared entries and the ranking loss are refused; ULD alone trains."""
    letters = sorted(set("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))  # the char tokenizer's are lower case
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + letters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    upper = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                    eos_token="[EOS]")  # fmt: skip
    upper.save_pretrained(folders / "upper")
    fields = dict(teacher_tokenizer_name_or_path=str(folders / "upper"))
    with pytest.raises(ValueError, match="share no entry"):
        build(args_for(tmp_path, folders, **fields), teacher_tokenizer=upper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(args_for(tmp_path, folders, use_uld_loss=True, rank_weight=0.0, **fields), teacher_tokenizer=upper)


def test_teacher_by_name_with_another_tokenizer_names_the_field(tmp_path, folders):
    teacher_folder = folders / "teacher_model"
    llama_for(word_tokenizer(), seed=1).save_pretrained(teacher_folder)
    word_tokenizer().save_pretrained(teacher_folder)
    args = args_for(tmp_path, folders, teacher_tokenizer_name_or_path=None)
    with pytest.raises(ValueError, match="teacher_tokenizer_name_or_path"):
        build(args, teacher=str(teacher_folder))
    # and with the field, the teacher given by name trains
    args = args_for(tmp_path, folders, teacher_model_name_or_path=str(teacher_folder), max_steps=1)
    trainer = RLKDTrainer(model=llama_for(char_tokenizer(), seed=2), args=args, train_dataset=DATA,
                          processing_class=char_tokenizer())  # fmt: skip
    trainer.train()


def test_conversational_data_with_each_sides_chat_template(tmp_path, folders):
    """Each side renders the prompt with its own chat template; the completion text is the assistant's content."""
    template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")  # fmt: skip
    teacher_tokenizer, student_tokenizer = word_tokenizer(), char_tokenizer()
    teacher_tokenizer.chat_template = student_tokenizer.chat_template = template
    teacher_tokenizer.save_pretrained(folders / "word_chat")
    messages = [{"messages": [{"role": "user", "content": d["prompt"]},
                              {"role": "assistant", "content": d["completion"]}]} for d in DATA]  # fmt: skip
    args = args_for(tmp_path, folders, sampling_mode="mixed", teacher_tokenizer_name_or_path=str(folders / "word_chat"))
    trainer = RLKDTrainer(model=llama_for(student_tokenizer, seed=2), args=args, train_dataset=messages,
                          teacher_model=llama_for(teacher_tokenizer, seed=1),
                          processing_class=student_tokenizer)  # fmt: skip
    row, prompt = trainer.train_dataset[0], messages[0]["messages"][:1]
    for ids, tokenizer in ((row["prompt_ids"], student_tokenizer), (row["teacher_prompt_ids"], teacher_tokenizer)):
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert ids == tokenizer(rendered)["input_ids"]
    assert row["completion_text"] == DATA[0]["completion"]
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
