"""The trainer's cross-tokenizer path: a teacher whose tokenizer (`teacher_tokenizer_name_or_path`) differs from the
student's. Each of the three steps gets a cross-tokenizer version (rlkd_onpolicy/cross_tokenizer/,
docs/cross_tokenizer.md):

1. rollout: the student's rollout as usual (off_policy, on_policy, mixed), or the teacher's samples re-tokenised for the
   student (seq_kd); then the teacher's tokenization of each completion and the aligned spans (`CrossRollout`);
2. teacher signal: the teacher's logits on its own tokens (`CrossTokenizerTeacher`);
3. student loss: the span losses (`cross_tokenizer_loss`) on the student's logits.
The dataset is tokenised on both sides once: the student's prompt and completion ids as on the same-tokenizer path,
the teacher's prompt ids (its own chat template and special tokens), and the completion text.
"""

import warnings
from dataclasses import replace

import torch
from transformers import AutoTokenizer

from rlkd_onpolicy.cross_tokenizer import (
    CrossTokenizerSpec,
    CrossTokenizerTeacher,
    VocabularyMap,
    cross_tokenizer_loss,
    teacher_view,
)
from rlkd_onpolicy.cross_tokenizer.views import pad_token, side_rollout, student_completions_from_teacher
from rlkd_onpolicy.data.prompt_completion import (
    _is_conversational,
    check_prompt_not_empty,
    split_messages,
    tokenize_example,
)
from rlkd_onpolicy.losses import DistillationLoss
from rlkd_onpolicy.sampling import SOURCE_TEACHER, RolloutSampler
from rlkd_onpolicy.trainer.config import RLKDConfig
from rlkd_onpolicy.trainer.data import PromptCompletionCollator
from rlkd_onpolicy.trainer.deepspeed import teacher_for_generation
from rlkd_onpolicy.trainer.rollout import Rollouts
from rlkd_onpolicy.trainer.student_loss import StudentLoss, StudentOutputs

CROSS_TOKENIZER_MODES = ("off_policy", "on_policy", "mixed", "seq_kd")


def teacher_tokenizer_for(args: RLKDConfig, student_tokenizer):
    """The teacher's tokenizer when it differs from the student's (the cross-tokenizer path), else None."""
    if args.teacher_tokenizer_name_or_path is None:
        return None
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_tokenizer_name_or_path)
    if teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab():
        if args.use_uld_loss:
            warnings.warn(f"teacher_tokenizer_name_or_path={args.teacher_tokenizer_name_or_path!r} has the "
                          f"student's vocabulary: the same-tokenizer path runs with loss={args.loss!r}, and "
                          "use_uld_loss and the uld_* fields are not used.", stacklevel=3)  # fmt: skip
        return None
    check_cross_tokenizer_args(args)
    teacher_field = f"teacher_tokenizer_name_or_path={args.teacher_tokenizer_name_or_path!r}"
    for what, tokenizer in (("the student's processing_class", student_tokenizer), (teacher_field, teacher_tokenizer)):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{what} is a slow tokenizer; the alignment needs a fast one's character offsets (a "
                             "tokenizer.json).")
    return teacher_tokenizer


def check_cross_tokenizer_args(args: RLKDConfig) -> None:
    """What the cross-tokenizer path does not do, refused before any model is loaded."""
    name = args.teacher_tokenizer_name_or_path
    why = f"with a teacher of another tokenizer (teacher_tokenizer_name_or_path={name!r})"
    if args.sampling_mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"RLKDConfig.sampling_mode={args.sampling_mode!r} is not supported {why}: speculative KD "
                         "verifies the student's tokens in the teacher's top-K, which has no meaning across "
                         f"vocabularies. Use one of {CROSS_TOKENIZER_MODES}.")
    refused = {
        "teacher_cache": "a cache stores the teacher's top-K at the student's token positions; the teacher must "
                         "score its own tokenization online",
        "teacher_server": "a served teacher is scored on the student's token ids; use a local teacher_model",
        "teacher_top_k": "the span losses need the teacher's full distribution (ULD sorts all of it)",
    }  # fmt: skip
    for field_name, reason in refused.items():
        if getattr(args, field_name) is not None:
            raise ValueError(f"RLKDConfig.{field_name}={getattr(args, field_name)!r} is not supported {why}: "
                             f"{reason}. Leave it unset.")
    if args.loss_backend == "fused":
        raise ValueError(f"RLKDConfig.loss_backend='fused' is not supported {why}: the span losses read the "
                         "student's logits; use 'logits' or 'auto'.")
    if args.rank_dynamic_weighting:
        raise ValueError(f"RLKDConfig.rank_dynamic_weighting=True is not supported {why}: leave it False.")


def check_shared_vocabulary(args: RLKDConfig, vocabulary: VocabularyMap) -> None:
    """The shared entries must carry what the configured loss reads from them."""
    if vocabulary.size == 0 and not (args.use_uld_loss and not args.uld_use_hybrid_loss):
        raise ValueError("The student's and the teacher's vocabularies share no entry, so the divergence on shared "
                         "entries and the ranking loss have nothing to compare: set use_uld_loss=True (ULD over "
                         "sorted probabilities needs no shared entry) and rank_weight=0.")  # fmt: skip
    if args.rank_weight > 0 and vocabulary.size < 2:
        raise ValueError(f"RLKDConfig.rank_weight={args.rank_weight} ranks the shared vocabulary, but the two "
                         f"vocabularies share {vocabulary.size} entry: set rank_weight=0.")  # fmt: skip
    if args.rank_weight > 0 and vocabulary.size < args.rank_k:
        warnings.warn(f"RLKDConfig.rank_k={args.rank_k} exceeds the {vocabulary.size} entries the two vocabularies "
                      f"share: the ranking loss uses each side's top-{vocabulary.size} of them.", stacklevel=3)


def cross_spec(args: RLKDConfig) -> CrossTokenizerSpec:
    uld = args.use_uld_loss  # without ULD, both sides at the loss temperature
    return CrossTokenizerSpec(
        use_uld_loss=uld, use_hybrid_loss=args.uld_use_hybrid_loss,
        hybrid_matched_weight=args.uld_hybrid_matched_weight, hybrid_unmatched_weight=args.uld_hybrid_unmatched_weight,
        crossentropy_weight=args.uld_crossentropy_weight, distillation_weight=args.uld_distillation_weight,
        student_temperature=args.uld_student_temperature if uld else args.loss_temperature,
        teacher_temperature=args.uld_teacher_temperature if uld else args.loss_temperature,
    )  # fmt: skip


# -- data ----------------------------------------------------------------------------------------------------------


def _completion_text(example: dict) -> str:
    completion = example["completion"]
    if isinstance(completion, str):
        return completion
    if _is_conversational(completion):  # the assistant's words; each side's template markup is not aligned
        return "".join(str(m["content"]) for m in completion)
    raise ValueError(f"'completion' must be a string or a list of messages; got {type(completion).__name__}.")


def tokenize_cross_dataset(dataset, student_tokenizer, teacher_tokenizer, args: RLKDConfig, name: str):
    """The same-tokenizer columns (prompt_ids, completion_ids, example_index) plus `teacher_prompt_ids` (the prompt
    by the teacher's tokenizer and chat template) and `completion_text` (the completion the two sides share: the
    string, or the completion messages' contents; each side tokenises it without its chat template's markup)."""
    import datasets

    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)

    def tokenize(example, index):
        if "prompt" not in example and "messages" in example:
            example = split_messages(example["messages"])
        text, sides = _completion_text(example), []
        for tokenizer in (student_tokenizer, teacher_tokenizer):
            prompt = example["prompt"]
            if _is_conversational(prompt):  # each side's own chat template renders the prompt
                if getattr(tokenizer, "chat_template", None) is None:
                    raise ValueError(f"{name} row {index} is conversational but a tokenizer has no chat template; "
                                     "give the prompt as a string or set tokenizer.chat_template.")  # fmt: skip
                prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            tokenized = tokenize_example(tokenizer, {"prompt": prompt, "completion": text},
                                         max_length=args.max_length, max_prompt_length=args.max_prompt_length)
            check_prompt_not_empty(tokenized, index, name, example["prompt"])
            sides.append(tokenized)
        student, teacher = sides
        return {"prompt_ids": student.prompt_ids, "completion_ids": student.completion_ids, "example_index": index,
                "teacher_prompt_ids": teacher.prompt_ids, "completion_text": text}  # fmt: skip

    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names,
                       desc="Tokenizing prompt–completion pairs for both tokenizers")  # fmt: skip


class CrossTokenizerCollator(PromptCompletionCollator):
    """The same-tokenizer batch plus `teacher_prompt_ids` (a list of id lists) and `completion_text` (strings)."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["teacher_prompt_ids"] = [list(f["teacher_prompt_ids"]) for f in features]
        batch["completion_text"] = [f["completion_text"] for f in features]
        return batch


# -- the three steps -----------------------------------------------------------------------------------------------


class CrossTokenizerRollouts:
    """Builds each `CrossRollout`: the student's rollout (seq_kd: the teacher's samples, re-tokenised), then the
    teacher's view of it."""

    def __init__(self, args: RLKDConfig, mode: str, *, student_tokenizer, teacher_tokenizer, student_vocab_size: int,
                 teacher_vocab_size: int, cache_implementation: str):  # fmt: skip
        self.mode, self.student_tokenizer, self.teacher_tokenizer = mode, student_tokenizer, teacher_tokenizer
        student_mode = "off_policy" if mode == "seq_kd" else mode
        self.student_rollouts = Rollouts(args, student_mode, served_teacher=None, vocab_size=student_vocab_size,
                                         cache_implementation=cache_implementation,
                                         eos_token_id=student_tokenizer.eos_token_id,
                                         pad_token_id=pad_token(student_tokenizer))  # fmt: skip
        if mode == "seq_kd":  # the teacher samples as a student would, at the teacher's temperature and nucleus
            spec = args.sampling_spec("on_policy", cache_implementation)
            self.teacher_spec = replace(spec, temperature=spec.teacher_temperature, top_p=spec.teacher_top_p)
            self.teacher_vocab_size = teacher_vocab_size

    def sampler(self, student, teacher):
        """The student's sampler (the teacher takes no part in the student's sampling here)."""
        return self.student_rollouts.sampler(student, None)

    @torch.no_grad()
    def __call__(self, batch, student, teacher, accelerator, generator, weights_step: int = 0, step: int | None = None):
        # weights_step / step: the same-tokenizer Rollouts' signature (they only serve use_vllm, refused here)
        teacher_prompts = [list(p) for p in batch["teacher_prompt_ids"]]
        references = list(batch["completion_text"])
        if self.mode != "seq_kd":
            rollout = self.student_rollouts(batch, student, None, accelerator, generator)
            return teacher_view(rollout, teacher_prompts, references, self.student_tokenizer, self.teacher_tokenizer)
        device = batch["prompt_ids"].device
        prompts = side_rollout(teacher_prompts, [[] for _ in teacher_prompts], pad_token(self.teacher_tokenizer),
                               SOURCE_TEACHER, "seq_kd", device)  # fmt: skip
        with teacher_for_generation(teacher, accelerator) as model:
            sampler = RolloutSampler(self.teacher_spec, model, None, vocab_size=self.teacher_vocab_size,
                                     eos_token_id=self.teacher_tokenizer.eos_token_id,
                                     pad_token_id=pad_token(self.teacher_tokenizer))  # fmt: skip
            sampled = sampler.rollout(prompts.sequences, prompts.attention_mask, generator=generator)
        completions, texts = student_completions_from_teacher(sampled, self.student_tokenizer, self.teacher_tokenizer)
        prompt_rows = [ids[mask.bool()].tolist()
                       for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)]  # fmt: skip
        rollout = side_rollout(prompt_rows, completions, pad_token(self.student_tokenizer), SOURCE_TEACHER, "seq_kd",
                               device)  # fmt: skip
        rollout.stats.update(sampled.stats)
        return teacher_view(rollout, teacher_prompts, texts, self.student_tokenizer, self.teacher_tokenizer)


class CrossTokenizerStudentLoss(StudentLoss):
    """The student's forward as on the logits path; its loss the span losses against a `CrossTeacherSignal`."""

    def __init__(self, args: RLKDConfig, vocab_size: int, vocabulary: VocabularyMap):
        super().__init__(args, "logits", vocab_size)
        self.vocabulary, self.cross = vocabulary, cross_spec(args)

    def loss(self, student: StudentOutputs, teacher, head_model, rank_stats=None) -> DistillationLoss:
        logits = student.logits[student.mask]
        vocabulary = self.vocabulary.to(logits.device)
        return cross_tokenizer_loss(logits, teacher.logits, teacher.student_ids, teacher.teacher_ids, teacher.spans,
                                    vocabulary, spec=self.spec, cross=self.cross, rank_stats=rank_stats)  # fmt: skip


def cross_tokenizer_steps(args: RLKDConfig, mode: str, loaded, teacher_model, cache_implementation: str):
    """(rollouts, scoring teacher, student loss) of the cross-tokenizer path for the trainer."""
    vocabulary = VocabularyMap(loaded.tokenizer, loaded.teacher_tokenizer, loaded.vocab_size, loaded.teacher_vocab_size)
    check_shared_vocabulary(args, vocabulary)
    rollouts = CrossTokenizerRollouts(args, mode, student_tokenizer=loaded.tokenizer,
                                      teacher_tokenizer=loaded.teacher_tokenizer, student_vocab_size=loaded.vocab_size,
                                      teacher_vocab_size=loaded.teacher_vocab_size,
                                      cache_implementation=cache_implementation)  # fmt: skip
    scoring = CrossTokenizerTeacher(teacher_model, loaded.teacher_vocab_size)
    return rollouts, scoring, CrossTokenizerStudentLoss(args, loaded.vocab_size, vocabulary)
