"""`RLKDTrainer`: distillation on `transformers.Trainer`, used the way TRL users use `GKDTrainer`.

One optimizer step, read top to bottom:
1. `get_batch_samples` fetches the step's micro-batches and builds every rollout first (generation needs the
   models in eval mode and no gradient), so that the number of completion tokens in the *whole step* (all
   micro-batches, all ranks) is known before the first backward;
2. `compute_loss` runs the student on the rollout, the teacher scores it under `no_grad` (full logits, or its
   top-K as a cache stores it), and `distillation_loss` gives the summed KD + ranking loss, divided by that count.
So gradient accumulation and data parallelism give exactly the gradient of one big batch.
"""

import os
from collections import defaultdict
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer

from rlkd_onpolicy.data.prompt_completion import (
    TokenizedExample,
    collate_prompt_completion,
    tokenize_example,
    validate_prompt_completion_dataset,
)
from rlkd_onpolicy.losses import distillation_loss, teacher_topk
from rlkd_onpolicy.metrics import topk_agreement, topk_overlap_metrics
from rlkd_onpolicy.sampling import SOURCE_TEACHER, Rollout, RolloutSampler
from rlkd_onpolicy.trainer.config import RLKDConfig
from rlkd_onpolicy.trainer.deepspeed import prepare_teacher, teacher_for_generation


def _load_model(model: str | PreTrainedModel, init_kwargs: dict | None, what: str) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))
    if init_kwargs:
        raise ValueError(f"{what}_init_kwargs are only used when {what} is a name or path; got a model object.")
    return model


def output_vocab_size(model: torch.nn.Module) -> int:
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 `shape` is the local (empty) partition


def check_vocabularies(student: PreTrainedModel, teacher: PreTrainedModel | None, tokenizer) -> int:
    """The vocabulary the loss compares over: the tokenizer's length, when both output layers cover it.

    Teacher and student may differ only by padding rows beyond the tokenizer (Qwen2.5-0.5B has 151,936 rows and
    Qwen2.5-7B 152,064, one tokenizer of 151,665 entries); those rows are cut from the logits.
    """
    n_tokens = len(tokenizer)
    student_rows = output_vocab_size(student)
    if teacher is None:
        return min(n_tokens, student_rows)
    teacher_rows = output_vocab_size(teacher)
    if student_rows != teacher_rows and min(student_rows, teacher_rows) < n_tokens:
        raise ValueError(
            f"student vocabulary size {student_rows} != teacher vocabulary size {teacher_rows}, and the difference "
            f"is not padding beyond the tokenizer's {n_tokens} tokens: the two models do not share a tokenizer. "
            "Distil between models of one tokenizer family."
        )
    if min(student_rows, teacher_rows) < n_tokens:
        raise ValueError(
            f"the tokenizer has {n_tokens} tokens but the models' output layers only {min(student_rows, teacher_rows)}"
            " rows: this tokenizer does not belong to these models."
        )
    return n_tokens


class PromptCompletionCollator:
    """Collates tokenised examples: prompts left-padded for generation, dataset completions right-padded."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [TokenizedExample(list(f["prompt_ids"]), list(f["completion_ids"])) for f in features]
        return collate_prompt_completion(examples, self.pad_token_id)


class RLKDTrainer(Trainer):
    """Distil `teacher_model` into `model` with any sampling mode, KD divergence and the RLKD ranking loss.

    Args:
        model: the student, a causal LM or a name/path (loaded with `args.model_init_kwargs`).
        teacher_model: the teacher, a causal LM or a name/path (`args.teacher_model_init_kwargs`).
        args: an `RLKDConfig`.
        train_dataset / eval_dataset: TRL prompt–completion datasets, standard (`prompt`, `completion` strings) or
            conversational (lists of messages, rendered with the chat template). The loss covers completion
            tokens only.
        processing_class: the tokenizer both models share (loaded from `model` when it is a name and this is None).
        peft_config: a `peft` config to train adapters on the student (needs `pip install peft`).

    Example:
        >>> args = RLKDConfig(output_dir="out", sampling_mode="speculative", loss="fkl", rank_weight=2.0, rank_k=5)
        >>> trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
        ...                       processing_class=tokenizer)
        >>> trainer.train()
    """

    _tag_names = ["trl", "rlkd"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: RLKDConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
        compute_metrics=None,
    ):
        if args is None:
            args = RLKDConfig(output_dir="rlkd-output")
        if not isinstance(args, RLKDConfig):
            raise TypeError(f"args must be an RLKDConfig, got {type(args).__name__}.")
        if teacher_model is None:
            raise ValueError("teacher_model is required: a causal LM or a name/path of one.")
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("processing_class (the tokenizer) is required when model is a model object.")
            processing_class = AutoTokenizer.from_pretrained(model)
        tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
            tokenizer.pad_token = tokenizer.eos_token
        if isinstance(teacher_model, str):
            _check_same_tokenizer(tokenizer, teacher_model)
        # Validate everything cheap before loading or tokenising anything heavy.
        validate_prompt_completion_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            validate_prompt_completion_dataset(eval_dataset, "eval_dataset")
        model = _load_model(model, args.model_init_kwargs, "model")
        teacher = _load_model(teacher_model, args.teacher_model_init_kwargs, "teacher_model")
        self.vocab_size = check_vocabularies(model, teacher, tokenizer)
        if peft_config is not None:
            from rlkd_onpolicy._imports import require

            require("peft")
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)

        train_dataset = self._tokenize(train_dataset, tokenizer, args)
        if eval_dataset is not None:
            eval_dataset = self._tokenize(eval_dataset, tokenizer, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or PromptCompletionCollator(tokenizer.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=compute_metrics,
        )
        # compute_loss divides by the step's token count itself: training_step must not divide again.
        self.loss_is_scaled_for_ga = True

        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            self.teacher = prepare_teacher(teacher, self.accelerator, offload_to_cpu=args.teacher_offload_to_cpu)
        else:
            if args.teacher_offload_to_cpu:
                raise ValueError("teacher_offload_to_cpu=True needs DeepSpeed ZeRO-3 (see configs/accelerate/).")
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.sampler = RolloutSampler(
            args.sampling_mode,
            self.accelerator.unwrap_model(self.model),
            self.accelerator.unwrap_model(self.teacher),
            lmbda=args.lmbda,
            max_new_tokens=args.max_new_tokens,
            temperature=args.sampling_temperature,
            top_p=args.top_p,
            teacher_temperature=args.teacher_sampling_temperature,
            skd_top_k=args.skd_top_k,
            skd_draft_len=args.skd_draft_len,
            verify_on=args.skd_verify_on,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        # Row seeds and mixed-mode coins come from this generator; one stream per rank.
        self.rollout_generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # -- data ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _tokenize(dataset, tokenizer, args: RLKDConfig):
        import datasets

        if isinstance(dataset, list):
            dataset = datasets.Dataset.from_list(dataset)

        def tokenize(example):
            tokenized = tokenize_example(
                tokenizer, example, max_length=args.max_length, max_prompt_length=args.max_prompt_length
            )
            return {"prompt_ids": tokenized.prompt_ids, "completion_ids": tokenized.completion_ids}

        return dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing prompt–completion pairs")

    # -- one optimizer step --------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batches:
            batch["rollout"] = self._rollout(batch)
        if not batches:
            return batches, None
        tokens = sum(int(b["rollout"].completion_mask.sum()) for b in batches)
        num_items = torch.tensor(tokens, device=device, dtype=torch.long)
        if self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items).sum()
        return batches, num_items

    @torch.no_grad()
    def _rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        from trl.models.utils import unwrap_model_for_generation

        mode = self.args.sampling_mode
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as student:
            self.sampler.student = student
            if mode in ("seq_kd", "speculative"):
                with teacher_for_generation(self.teacher, self.accelerator) as teacher:
                    self.sampler.teacher = teacher
                    return self._sample(batch)
            return self._sample(batch)

    def _sample(self, batch: dict[str, torch.Tensor]) -> Rollout:
        return self.sampler.rollout(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
            generator=self.rollout_generator,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rollout: Rollout = inputs.get("rollout") or self._rollout(inputs)
        args = self.args
        start = rollout.prompt_length
        # Logits at column t predict token t+1: columns P-1 … T-2 predict the completion tokens P … T-1.
        student_logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits
        student_logits = student_logits[:, start - 1 : -1, : self.vocab_size]
        mask = rollout.completion_mask[:, start:]
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits
            teacher_logits = teacher_logits[:, start - 1 : -1, : self.vocab_size]
        teacher_kwargs: dict[str, Any] = {}
        if args.teacher_top_k is None:
            teacher_kwargs["teacher_logits"] = teacher_logits
        else:
            top = teacher_topk(teacher_logits, args.teacher_top_k, temperature=args.temperature)
            teacher_kwargs.update(
                teacher_topk_ids=top.ids, teacher_topk_logprobs=top.logprobs, teacher_tail_logprob=top.tail_logprob
            )
        out = distillation_loss(
            student_logits,
            **teacher_kwargs,
            loss=args.loss,
            beta=args.beta,
            skew_alpha=args.skew_alpha,
            temperature=args.temperature,
            missing_mass=args.missing_mass,
            rank_weight=args.rank_weight,
            rank_k=args.rank_k,
            rank_union=args.rank_union,
            rank_dynamic_weighting=args.rank_dynamic_weighting,
            regularization_strength=args.rank_regularization_strength,
            mask=mask,
            reduction="sum",
        )
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            loss = out.loss / out.num_tokens.clamp_min(1)
        else:
            # DDP and DeepSpeed average gradients over ranks; the count is global, so undo that average.
            loss = out.loss / num_items_in_batch * self.accelerator.num_processes
        self._record(student_logits.detach(), teacher_logits, teacher_kwargs, mask, out, rollout)
        return (loss, {"rollout": rollout}) if return_outputs else loss

    # -- checkpoints: the rollout generator is part of the training state ---------------------------------------

    def _rollout_rng_file(self, folder: str) -> str:
        return os.path.join(folder, f"rollout_rng_state_{self.accelerator.process_index}.pth")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        torch.save(self.rollout_generator.get_state(), self._rollout_rng_file(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Restored here, before the first step: Trainer restores its own RNG states only after fetching the first
        # batches on resume, and fetching a batch is where our rollouts draw from this generator.
        path = self._rollout_rng_file(resume_from_checkpoint)
        if os.path.isfile(path):
            self.rollout_generator.set_state(torch.load(path, weights_only=True))

    # -- logging -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record(self, student_logits, teacher_logits, teacher_kwargs, mask, out, rollout: Rollout) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        tokens = max(int(out.num_tokens), 1)
        metrics["kd_loss"].append(out.kd.item() / tokens)
        metrics["rank_loss"].append(out.rank.item() / tokens)
        metrics["completion_tokens"].append(float(out.num_tokens))
        if "teacher_topk_ids" in teacher_kwargs:
            agreement = topk_overlap_metrics(student_logits, teacher_kwargs["teacher_topk_ids"],
                                             ks=tuple(self.args.metric_ks), mask=mask)
        else:
            agreement = topk_agreement(student_logits, teacher_logits, ks=tuple(self.args.metric_ks), mask=mask)
        for key, value in agreement.items():
            metrics[key].append(value)
        for key in ("acceptance_rate", "tokens_per_second", "on_policy_fraction"):
            if key in rollout.stats:
                metrics[key].append(float(rollout.stats[key]))
        replaced = (rollout.token_source == SOURCE_TEACHER) & rollout.completion_mask
        if self.args.sampling_mode == "speculative":
            metrics["teacher_token_fraction"].append(float(replaced.sum()) / tokens)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {key: sum(values) / len(values) for key, values in sorted(self._metrics[mode].items()) if values}
        if self.accelerator.num_processes > 1 and averaged:
            # Every rank logs at the same step with the same keys (they depend on the config only): average them.
            local = torch.tensor(list(averaged.values()), device=self.accelerator.device, dtype=torch.float64)
            gathered = self.accelerator.gather(local.unsqueeze(0)).mean(0)
            averaged = dict(zip(averaged, gathered.tolist(), strict=True))
        if mode == "eval":
            averaged = {f"eval_{key}": value for key, value in averaged.items()}
        logs = {**logs, **averaged}
        self._metrics[mode].clear()
        super().log(logs, start_time)


def _check_same_tokenizer(tokenizer, teacher_name_or_path: str) -> None:
    """A teacher given by name brings its own tokenizer: it must be the student's, or the distillation is void."""
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name_or_path)
    except (OSError, ValueError):
        return  # no tokenizer files next to the teacher: the vocabulary-size check still runs
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The teacher {teacher_name_or_path!r} has another tokenizer ({len(teacher_tokenizer)} tokens) than the "
            f"student's processing_class ({len(tokenizer)} tokens); token-level distillation needs one tokenizer."
        )
