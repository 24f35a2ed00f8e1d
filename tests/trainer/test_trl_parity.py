"""A GKD user's script ported by swapping TRL's `GKDConfig` / `GKDTrainer` for `RLKDConfig` / `RLKDTrainer` means
the same (issue 15, "TRL parity"): every field TRL 1.16's GKDConfig has and the port sets is checked for TRL's
meaning, and a field set where it would be ignored is refused. Tiny local models, no download.
"""

import math

import pytest
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer
from rlkd_onpolicy.sampling import SOURCE_DATA, SOURCE_STUDENT, SOURCE_TEACHER

# TRL's GKD docs train on one chat example repeated; these are its words, added to the tiny tokenizer (68 tokens,
# below the models' 80 output rows, so the vocabulary cut is part of the port too).
DOCS_WORDS = ("Hi,", "how", "are", "you?", "I'm", "great", "thanks", "What", "colour", "is", "sky?", "The", "sky",
              "blue")  # fmt: skip


def _tokenizer():
    return tiny_tokenizer(extra_words=DOCS_WORDS)


def _models():
    return tiny_llama(80, seed=0), tiny_llama(80, hidden=48, seed=1, sharpen=3.0)


def _docs_datasets():
    from datasets import Dataset

    def chat(user, assistant, n):
        return Dataset.from_dict({"messages": [[{"role": "user", "content": user},
                                                {"role": "assistant", "content": assistant}]] * n})  # fmt: skip

    return chat("Hi, how are you?", "I'm great thanks", 8), chat("What colour is the sky?", "The sky is blue", 4)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "gkd-model"), report_to="none", save_strategy="no", max_steps=2,
                per_device_train_batch_size=2, logging_steps=1, max_new_tokens=4, rank_weight=0.0, disable_tqdm=True)
    return RLKDConfig(**{**base, **kw})


def test_gkd_docs_example_ported(tmp_path):
    # TRL's docs: GKDConfig(output_dir="gkd-model", per_device_train_batch_size=1) with a "messages" dataset and
    # an eval set; GKDConfig's own defaults spelled out (temperature 0.9, lmbda 0.5, beta 0.5, disable_dropout).
    train, dev = _docs_datasets()
    student, teacher = _models()
    args = _args(tmp_path, per_device_train_batch_size=1, temperature=0.9, lmbda=0.5, beta=0.5, seq_kd=False,
                 disable_dropout=True, max_new_tokens=6)  # fmt: skip
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, eval_dataset=dev,
                          processing_class=_tokenizer())  # fmt: skip
    # lmbda given without sampling_mode: TRL's mix; beta: the generalised JSD; temperature: the sampling one
    assert (args.sampling_mode, args.lmbda, args.loss, args.beta) == ("mixed", 0.5, "jsd", 0.5)
    assert trainer.sampler.temperature == 0.9 and trainer.sampler.teacher_temperature == 0.9
    assert args.loss_temperature == 1.0  # TRL's GKD loss runs at temperature 1
    # the "messages" row: the user turn (with the generation prompt) is the prompt, the assistant's the completion
    tok = _tokenizer()
    row = trainer.train_dataset[0]
    assert tok.decode(row["prompt_ids"]) == "<user> Hi, how are you? <assistant>"
    assert tok.decode(row["completion_ids"]) == "I'm great thanks <eos>"
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "eval_loss" in trainer.evaluate()


def test_prompt_completion_dataset_ported(tmp_path):
    # DistillationTrainer-style prompt–completion data, standard and conversational, train the same way
    student, teacher = _models()
    for conversational in (False, True):
        args = _args(tmp_path, lmbda=1.0, beta=0.0)  # TRL: fully on-policy, forward KL
        assert (args.sampling_mode, args.loss, args.beta) == ("on_policy", "jsd", 0.0)
        trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=_tokenizer(),
                              train_dataset=tiny_pairs(4, conversational=conversational))  # fmt: skip
        trainer.train()
        assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize(
    "options, mode, sources",
    [
        (dict(lmbda=0.0), "off_policy", {SOURCE_DATA}),  # TRL: never on-policy, the dataset's completions
        (dict(lmbda=1.0), "on_policy", {SOURCE_STUDENT}),  # TRL: always on-policy
        (dict(lmbda=0.0, seq_kd=True), "seq_kd", {SOURCE_TEACHER}),  # TRL: the off-policy share is the teacher's
        (dict(seq_kd=True, sampling_mode="seq_kd"), "seq_kd", {SOURCE_TEACHER}),
    ],
)
def test_lmbda_and_seq_kd_select_the_mode(tmp_path, options, mode, sources):
    student, teacher = _models()
    args = _args(tmp_path, **options)
    assert args.sampling_mode == mode
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_pairs(4),
                          processing_class=_tokenizer())  # fmt: skip
    rollout = trainer._rollout(next(iter(trainer.get_train_dataloader())))
    assert set(rollout.token_source[rollout.completion_mask].tolist()) == sources


def test_mixed_lmbda_is_the_on_policy_share(tmp_path):
    student, teacher = _models()
    args = _args(tmp_path, lmbda=0.3, per_device_train_batch_size=4)
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_pairs(4),
                          processing_class=_tokenizer())  # fmt: skip
    assert args.sampling_mode == "mixed" and trainer.sampler.lmbda == 0.3
    # TRL flips one coin per batch, here one per sequence: over many sequences the share is lmbda either way
    batch = next(iter(trainer.get_train_dataloader()))
    fractions = [trainer._rollout(batch).stats["on_policy_fraction"] for _ in range(50)]
    assert abs(sum(fractions) / len(fractions) - 0.3) < 0.1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sampling_mode="on_policy", lmbda=0.5), r"lmbda=0.5 is invalid: sampling_mode='on_policy' does not use"),
        (dict(sampling_mode="speculative", lmbda=0.0), "lmbda=0.0 is invalid: sampling_mode='speculative'"),
        (dict(loss="fkl", beta=0.3), r"beta=0.3 is invalid: .*loss='fkl' does not use it"),
        (dict(seq_kd=True), "seq_kd=True is invalid: with TRL's default lmbda=0.5"),
        (dict(seq_kd=True, lmbda=1.0), "seq_kd=True is invalid"),  # TRL never reaches seq_kd at lmbda=1
        (dict(seq_kd=True, lmbda=0.5), "seq_kd=True is invalid: mixing student and teacher generations"),
        (dict(seq_kd=True, sampling_mode="off_policy"), "seq_kd=True is invalid"),
        (dict(lmbda=float("nan")), "lmbda=nan is invalid"),
    ],
)
def test_set_but_ignored_fields_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **options)


def test_beta_means_trls_generalised_jsd(tmp_path):
    # The loss of an off-policy batch equals TRL's own GKDTrainer.generalized_jsd_loss on the same logits, cut to
    # the tokenizer (TRL keeps the padding rows; here no id beyond the tokenizer is ever compared, vocab.py).
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _models()
    tok = _tokenizer()
    for beta in (0.0, 0.3, 1.0):
        args = _args(tmp_path, lmbda=0.0, beta=beta)
        trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_pairs(4),
                              processing_class=tok)  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        rollout = trainer._rollout(batch)
        with torch.no_grad():
            ours = trainer.compute_loss(trainer.model, {**batch, "rollout": rollout})
            inputs = dict(input_ids=rollout.sequences, attention_mask=rollout.attention_mask)
            s = student(**inputs).logits[:, :-1, : len(tok)]
            t = teacher(**inputs).logits[:, :-1, : len(tok)]
            labels = rollout.sequences.masked_fill(~rollout.completion_mask, -100)[:, 1:]
            theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, reduction="batchmean")
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_temperature_is_the_sampling_temperature(tmp_path):
    student, teacher = _models()
    tok = _tokenizer()

    def trainer_and_batch(**kw):
        trainer = RLKDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, **kw),
                              train_dataset=tiny_pairs(4), processing_class=tok)  # fmt: skip
        return trainer, next(iter(trainer.get_train_dataloader()))

    def loss(**kw):
        trainer, batch = trainer_and_batch(**kw)
        with torch.no_grad():
            return float(trainer.compute_loss(trainer.model, {**batch, "rollout": trainer._rollout(batch)}))

    # off-policy: temperature (sampling) leaves the loss alone; loss_temperature changes it
    base = loss(sampling_mode="off_policy", temperature=1.0)
    assert loss(sampling_mode="off_policy", temperature=0.3) == base
    assert loss(sampling_mode="off_policy", loss_temperature=2.0) != pytest.approx(base)
    # on-policy: temperature=0 is greedy, so two draws (new row seeds each) give the same completions; 1 does not
    for temperature, same in ((0.0, True), (1.0, False)):
        trainer, batch = trainer_and_batch(sampling_mode="on_policy", temperature=temperature, max_new_tokens=8)
        assert trainer.sampler.temperature == temperature
        draws = [trainer._rollout(batch).sequences for _ in range(2)]
        assert torch.equal(draws[0], draws[1]) == same


def test_teacher_model_name_or_path(tmp_path):
    student, teacher = _models()
    teacher.save_pretrained(tmp_path / "teacher")
    _tokenizer().save_pretrained(tmp_path / "teacher")
    args = _args(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"))
    trainer = RLKDTrainer(model=student, args=args, train_dataset=tiny_pairs(4), processing_class=_tokenizer())
    loaded = trainer.accelerator.unwrap_model(trainer.teacher)
    assert torch.equal(loaded.lm_head.weight, teacher.lm_head.weight)
    with pytest.raises(ValueError, match="name different teachers"):
        RLKDTrainer(model=student, teacher_model="other/teacher", args=args, train_dataset=tiny_pairs(4),
                    processing_class=_tokenizer())  # fmt: skip


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout(tmp_path, disable):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=80, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.2,
                            embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=2, eos_token_id=3, pad_token_id=0)
        return GPT2LMHeadModel(config)

    trainer = RLKDTrainer(model=gpt2(0), teacher_model=gpt2(1), args=_args(tmp_path, disable_dropout=disable),
                          train_dataset=tiny_pairs(4), processing_class=_tokenizer())  # fmt: skip
    rates = {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == ({0.0} if disable else {0.2})


def test_docs_map_every_trl_field():
    # docs/trainer.md, "Coming from TRL", names every field of TRL's GKDConfig and DistillationConfig that is not
    # plain TrainingArguments (or whose default they change), read from the installed trl
    import dataclasses
    from pathlib import Path

    from transformers import TrainingArguments
    from trl import DistillationConfig
    from trl.experimental.gkd import GKDConfig

    docs = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    section = docs[docs.index("## Coming from TRL") : docs.index("## Every `RLKDConfig` field")]
    base = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    missing = [
        f.name
        for config in (GKDConfig, DistillationConfig)
        for f in dataclasses.fields(config)
        if (f.name not in base or f.default != base[f.name].default) and f"`{f.name}`" not in section
    ]
    assert not missing, f"docs/trainer.md's TRL table lacks {missing}"
