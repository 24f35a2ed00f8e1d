"""`RLKDTrainer`: distillation on `transformers.Trainer`, used the way TRL users use `GKDTrainer`.

One optimizer step, read top to bottom:
1. `get_batch_samples` fetches the step's micro-batches and builds every rollout first (generation needs the
   models in eval mode and no gradient), so that the number of completion tokens in the *whole step* (all
   micro-batches, all ranks) is known before the first backward;
2. `compute_loss` runs the student on the rollout, the teacher scores it under `no_grad` (full logits, or its
   top-K as a cache stores it and a vLLM server returns it: `teacher_server`), and `distillation_loss` gives the
   summed KD + ranking loss, divided by that count;
3. before `optimizer.step()`, a NaN/inf loss or gradient stops the run or skips the step (`nonfinite_policy`).
So gradient accumulation and data parallelism give exactly the gradient of one big batch. Checkpoints are written
atomically and hold the rollout generator too (reliability.py; guarantees and tests in docs/reliability.md).
"""

import math
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer

from rlkd_onpolicy.data.prompt_completion import (
    TokenizedExample,
    check_prompt_not_empty,
    collate_prompt_completion,
    tokenize_example,
    validate_prompt_completion_dataset,
)
from rlkd_onpolicy.kernels import fused_topk_loss
from rlkd_onpolicy.losses import DistillationLoss, distillation_loss, teacher_topk
from rlkd_onpolicy.metrics import topk_agreement, topk_overlap_from_ids, topk_overlap_metrics
from rlkd_onpolicy.models import check_own_forward
from rlkd_onpolicy.sampling import SOURCE_TEACHER, Rollout, RolloutSampler
from rlkd_onpolicy.sampling.generate import model_device
from rlkd_onpolicy.sampling.graphs import graphable
from rlkd_onpolicy.teacher.served_sampling import SERVED_SAMPLING_MODES, ServedRolloutSampler
from rlkd_onpolicy.trainer.config import RLKDConfig, check_against_vocabulary
from rlkd_onpolicy.trainer.deepspeed import is_zero3, prepare_teacher, teacher_for_generation
from rlkd_onpolicy.trainer.reliability import (
    NonFiniteGuard,
    check_output_dir_writable,
    remove_staging_folders,
    restore_rollout_generator,
    rollout_rng_file,
    save_checkpoint_atomically,
    skipped_steps_in,
)
from rlkd_onpolicy.vocab import cut_logits, vocabulary_size


def _load_model(model: str | PreTrainedModel, init_kwargs: dict | None, what: str) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))
    if init_kwargs:
        raise ValueError(f"{what}_init_kwargs are only used when {what} is a name or path; got a model object.")
    return model


def _tokenized_examples(dataset):
    return (TokenizedExample(p, c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"], strict=True))


class PromptCompletionCollator:
    """Collates tokenised examples: prompts left-padded for generation, dataset completions right-padded."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [TokenizedExample(list(f["prompt_ids"]), list(f["completion_ids"])) for f in features]
        batch = collate_prompt_completion(examples, self.pad_token_id)
        if "example_index" in features[0]:  # where a teacher cache keeps this example
            batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        return batch


class RLKDTrainer(Trainer):
    """Distil `teacher_model` into `model` with any sampling mode, KD divergence and the RLKD ranking loss.

    Args:
        model: the student, a causal LM or a name/path (loaded with `args.model_init_kwargs`).
        teacher_model: the teacher, a causal LM or a name/path (`args.teacher_model_init_kwargs`); None with
            `args.teacher_cache` (its top-K read from a cache) or `args.teacher_server` (a vLLM server scores).
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
        preprocess_logits_for_metrics=None,
    ):
        if args is None:
            args = RLKDConfig(output_dir="rlkd-output")
        if not isinstance(args, RLKDConfig):
            raise TypeError(f"args must be an RLKDConfig, got {type(args).__name__}.")
        teacher_model = _teacher_from_args(teacher_model, args)
        if teacher_model is None and args.teacher_cache is None and args.teacher_server is None:
            raise ValueError("teacher_model is required (a causal LM or a name/path, or "
                             "args.teacher_model_name_or_path) unless args.teacher_cache or args.teacher_server is "
                             "set.")
        if teacher_model is not None and args.teacher_server is not None:
            raise ValueError(f"teacher_model and args.teacher_server={args.teacher_server!r} are two teachers: pass "
                             "teacher_model=None to distil from the server, or leave teacher_server unset.")
        check_output_dir_writable(args.output_dir)
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("processing_class (the tokenizer) is required when model is a model object.")
            processing_class = AutoTokenizer.from_pretrained(model)
        tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
            tokenizer.pad_token = tokenizer.eos_token
        self.teacher_cache = None
        if args.teacher_cache is not None:
            self.teacher_cache = _open_cache(args, tokenizer, teacher_model, train_dataset, eval_dataset)
            teacher_model = None  # the cache stands for the teacher: it is never loaded
        if isinstance(teacher_model, str):
            _check_same_tokenizer(tokenizer, teacher_model)
        # Validate everything cheap before loading or tokenising anything heavy.
        validate_prompt_completion_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            validate_prompt_completion_dataset(eval_dataset, "eval_dataset")
        model = _load_model(model, args.model_init_kwargs, "model")
        teacher = None if teacher_model is None else _load_model(teacher_model, args.teacher_model_init_kwargs,
                                                                  "teacher_model")
        check_own_forward(model, "model")
        if teacher is not None:
            check_own_forward(teacher, "teacher_model")
        self.vocab_size = vocabulary_size(model, teacher, tokenizer)  # the tokenizer's ids, for everything
        check_against_vocabulary(args, self.vocab_size, None if self.teacher_cache is None else
                                 self.teacher_cache.header.k)  # fmt: skip
        self.served_teacher = None
        if args.teacher_server is not None:  # checks the server (answers, tokenizer, top-K) now, before training
            from rlkd_onpolicy.teacher.served import ServedTeacher

            self.served_teacher = ServedTeacher(
                args.teacher_server, tokenizer=tokenizer, top_k=args.teacher_top_k, vocab_size=self.vocab_size,
                model=args.teacher_server_model, temperature=args.loss_temperature,
                options=args.teacher_server_options(),
            )  # fmt: skip
        if self.teacher_cache is not None and self.teacher_cache.header.vocab_size < self.vocab_size:
            raise ValueError(
                f"The cache's teacher has {self.teacher_cache.header.vocab_size} vocabulary rows, fewer than the "
                f"{self.vocab_size} tokens the student and tokenizer use: it comes from another tokenizer family."
            )
        if peft_config is not None:
            from rlkd_onpolicy._imports import require

            require("peft")
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            _disable_dropout(model)

        train_dataset = self._tokenize(train_dataset, tokenizer, args, "train_dataset")
        if self.teacher_cache is not None:  # every example against the cache's hashes, before any work
            self.teacher_cache.check_examples(_tokenized_examples(train_dataset), tokenizer=tokenizer,
                                              max_length=args.max_length, max_prompt_length=args.max_prompt_length)
        if eval_dataset is not None:
            eval_dataset = self._tokenize(eval_dataset, tokenizer, args, "eval_dataset")
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
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # compute_loss divides by the step's token count itself: training_step must not divide again.
        self.loss_is_scaled_for_ga = True

        self.teacher = None
        if teacher is None:
            pass
        elif self.is_deepspeed_enabled:
            self.teacher = prepare_teacher(teacher, self.accelerator, offload_to_cpu=args.teacher_offload_to_cpu)
        else:
            if args.teacher_offload_to_cpu:
                raise ValueError("teacher_offload_to_cpu=True needs DeepSpeed ZeRO-3 (see configs/accelerate/).")
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        if self.teacher is not None:
            self.teacher.eval()
            self.teacher.requires_grad_(False)
        # with a cache both off_policy and seq_kd train on the cached (dataset or teacher-made) completions
        mode = "off_policy" if self.teacher_cache is not None else args.sampling_mode
        student = self.accelerator.unwrap_model(self.model)
        teacher_model = None if self.teacher is None else self.accelerator.unwrap_model(self.teacher)
        self.loss_backend = resolve_loss_backend(args, self.teacher_cache is not None, self.accelerator)
        self._fused_head_checked = False
        self.generation_cache = resolve_generation_cache(
            args.generation_cache, mode, student, teacher_model, self.accelerator.distributed_type
        )
        if self.served_teacher is not None and mode in SERVED_SAMPLING_MODES:
            self.sampler = ServedRolloutSampler(
                mode, student, self.served_teacher, vocab_size=self.vocab_size, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p,
                teacher_temperature=(args.temperature if args.teacher_sampling_temperature is None
                                     else args.teacher_sampling_temperature), skd_top_k=args.skd_top_k,
                skd_draft_len=args.skd_draft_len, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        else:
            self.sampler = self._local_sampler(args, mode, student, teacher_model, tokenizer)
        # Row seeds and mixed-mode coins come from this generator; one stream per rank.
        self.rollout_generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self._eval_generator = self._new_eval_generator()
        self._evaluating = False
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite_guard = NonFiniteGuard(args.nonfinite_policy, args.nonfinite_max_consecutive_skips)

    def _local_sampler(self, args: RLKDConfig, mode: str, student, teacher_model, tokenizer) -> RolloutSampler:
        return RolloutSampler(
            mode,
            student,
            teacher_model,
            cache_implementation=self.generation_cache,
            lmbda=args.lmbda if args.lmbda is not None else 0.5,  # read in mixed mode only, where it is set
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            teacher_temperature=(args.temperature if args.teacher_sampling_temperature is None
                                 else args.teacher_sampling_temperature),  # fmt: skip
            vocab_size=self.vocab_size,
            skd_top_k=args.skd_top_k,
            skd_draft_len=args.skd_draft_len,
            verify_on=args.skd_verify_on,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    # -- data ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _tokenize(dataset, tokenizer, args: RLKDConfig, name: str):
        import datasets

        if isinstance(dataset, list):
            dataset = datasets.Dataset.from_list(dataset)

        def tokenize(example, index):
            tokenized = tokenize_example(
                tokenizer, example, max_length=args.max_length, max_prompt_length=args.max_prompt_length
            )
            check_prompt_not_empty(tokenized, index, name, example.get("prompt", example.get("messages")))
            return {"prompt_ids": tokenized.prompt_ids, "completion_ids": tokenized.completion_ids,
                    "example_index": index}

        return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names,
                           desc="Tokenizing prompt–completion pairs")

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

        mode = self.sampler.mode  # off_policy when a cache stands for the teacher
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as student:
            self.sampler.student = student
            if mode in ("seq_kd", "speculative") and self.teacher is not None:
                with teacher_for_generation(self.teacher, self.accelerator) as teacher:
                    self.sampler.teacher = teacher
                    return self._sample(batch)
            return self._sample(batch)

    def _sample(self, batch: dict[str, torch.Tensor]) -> Rollout:
        # Evaluation draws from its own generator so that evaluating never shifts the training rollouts. (Not
        # `model.training`: the next step's rollouts are built before Trainer puts the model back in train mode.)
        generator = self._eval_generator if self._evaluating else self.rollout_generator
        return self.sampler.rollout(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
            generator=generator,
        )

    # -- evaluation: the same rollout + loss on the eval set, from a generator reset at every evaluation -------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._evaluating = True  # until after Trainer logs the returned metrics, so `log` adds no training ones
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating = False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        # Here, not in `evaluate`, so that `predict` evaluates the same way; the distillation metrics join the
        # returned ones, so that evaluate() returns them and metric_for_best_model can name them (eval_mor@5).
        self._eval_generator = self._new_eval_generator()
        evaluating, self._evaluating = self._evaluating, True
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            averaged = self._averaged_metrics("eval")
        finally:
            self._evaluating = evaluating
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in averaged.items()})
        return output

    def _new_eval_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.args.seed + 1_000_003 + self.accelerator.process_index)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, logits, labels) as transformers' Trainer gives `compute_metrics`: the student's logits (B, T, V) on
        the evaluated sequence (the rollout: generated or the dataset's, per sampling_mode) and its token ids as
        labels, -100 outside the completion, unshifted. Only with `compute_metrics` (one more student forward)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            rollout = self._rollout(inputs)
            loss = self.compute_loss(model, {**inputs, "rollout": rollout})
            if prediction_loss_only:
                return loss.detach(), None, None
            logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits
        labels = rollout.sequences.masked_fill(~rollout.completion_mask, -100)
        return loss.detach(), cut_logits(logits, self.vocab_size), labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rollout: Rollout = inputs.get("rollout") or self._rollout(inputs)
        args = self.args
        start = rollout.prompt_length
        # Logits at column t predict token t+1: columns P-1 … T-2 predict the completion tokens P … T-1.
        mask = rollout.completion_mask[:, start:]
        student_logits = student_hidden = None
        if self.loss_backend == "fused":
            # Only the last position's logits are made (the model's forward needs some); the loss reads the
            # final hidden states and the output layer chunk by chunk.
            outputs = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                            output_hidden_states=True, logits_to_keep=1)  # fmt: skip
            self._check_fused_head(outputs)
            student_hidden = outputs.hidden_states[-1][:, start - 1 : -1]
        else:
            student_logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits
            student_logits = cut_logits(student_logits[:, start - 1 : -1], self.vocab_size)
        teacher_logits = None
        teacher_kwargs: dict[str, Any] = {}
        if self.teacher_cache is not None:
            teacher_kwargs = self._cached_teacher(inputs["example_index"], rollout)
        elif self.served_teacher is not None:  # a SparseTeacher, as the cache's; an error names the URL and step
            step = None if self._evaluating else self.state.global_step + 1
            teacher_kwargs = self.served_teacher.score(rollout, step=step).loss_inputs()
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=rollout.sequences, attention_mask=rollout.attention_mask)
                teacher_logits = cut_logits(teacher_logits.logits[:, start - 1 : -1], self.vocab_size)
        if teacher_logits is None:
            pass
        elif args.teacher_top_k is None:
            teacher_kwargs["teacher_logits"] = teacher_logits
        else:
            top = teacher_topk(teacher_logits, args.teacher_top_k, temperature=args.loss_temperature)
            teacher_kwargs.update(
                teacher_topk_ids=top.ids, teacher_topk_logprobs=top.logprobs, teacher_tail_logprob=top.tail_logprob
            )
        if student_hidden is not None:
            out = self._fused_loss(student_hidden, teacher_kwargs, mask)
        else:
            rank_stats = {} if self._diagnosing() else None
            out = self._logits_loss(student_logits, teacher_kwargs, mask, rank_stats)
            if rank_stats is not None:
                self._record_rank_diagnostics(student_logits, mask, out, rank_stats)
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            loss = out.loss / out.num_tokens.clamp_min(1)
        else:
            # DDP and DeepSpeed average gradients over ranks; the count is global, so undo that average. A step
            # without a single completion token (all masked) gives 0, not 0/0.
            loss = out.loss / num_items_in_batch.clamp_min(1) * self.accelerator.num_processes
            self.nonfinite_guard.check_loss(loss, self)
        self._record(student_logits, student_hidden, teacher_logits, teacher_kwargs, mask, out, rollout)
        return (loss, {"rollout": rollout}) if return_outputs else loss

    def _loss_options(self) -> dict[str, Any]:
        """The objective's settings, shared by both loss paths."""
        args = self.args
        beta = 0.5 if args.beta is None else args.beta  # None unless loss="jsd", where the loss reads it
        return dict(loss=args.loss, beta=beta, skew_alpha=args.skew_alpha, temperature=args.loss_temperature,
                    missing_mass=args.missing_mass, rank_weight=args.rank_weight, rank_k=args.rank_k,
                    rank_union=args.rank_union, regularization_strength=args.rank_regularization_strength)  # fmt: skip

    def _logits_loss(self, student_logits, teacher_kwargs, mask, rank_stats=None) -> DistillationLoss:
        return distillation_loss(
            student_logits,
            **teacher_kwargs,
            **self._loss_options(),
            rank_dynamic_weighting=self.args.rank_dynamic_weighting,
            mask=mask,
            reduction="sum",
            rank_stats=rank_stats,
        )

    def _diagnosing(self) -> bool:
        """Whether this training micro-batch measures the ranking-loss diagnostics (the steps that log)."""
        args = self.args
        if not (args.rank_diagnostics and args.rank_weight > 0) or self._evaluating or not torch.is_grad_enabled():
            return False
        return (self.state.global_step + 1) % max(int(args.logging_steps), 1) == 0

    def _record_rank_diagnostics(self, student_logits, mask, out: DistillationLoss, stats: dict) -> None:
        """Why the ranking loss does (not) move the student: each term's gradient on the logits, per counted token,
        and how many tokens' soft ranks are hard (no gradient at this regularization strength) or undefined."""
        metrics = self._metrics["train"]
        rows = max(stats.get("rows", 0), 1)
        metrics["rank_hard_fraction"].append(stats.get("hard_rows", 0) / rows)
        metrics["rank_undefined_fraction"].append(stats.get("undefined_rows", 0) / rows)
        if not bool(mask.any()):
            return
        # One call per term (a call with both would sum them); the graph is kept for the training backward.
        for name, term in (("kd_logit_grad_norm", out.kd), ("rank_logit_grad_norm", self.args.rank_weight * out.rank)):
            (grad,) = torch.autograd.grad(term, student_logits, retain_graph=True, allow_unused=True)
            value = 0.0 if grad is None else float(grad[mask].float().norm(dim=-1).mean())
            metrics[name].append(value)

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's output projection (V, H) cut to the shared vocabulary, and its bias."""
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        bias = getattr(head, "bias", None)
        return head.weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size]

    def _fused_loss(self, hidden, teacher_kwargs, mask) -> DistillationLoss:
        weight, bias = self._output_layer()
        loss, parts = fused_topk_loss(
            hidden,
            weight,
            teacher_kwargs["teacher_topk_ids"],
            teacher_kwargs["teacher_topk_logprobs"],
            mask,
            lm_head_bias=bias,
            teacher_tail_logprob=teacher_kwargs.get("teacher_tail_logprob"),
            **self._loss_options(),
            reduction="sum",
            return_parts=True,
        )
        return DistillationLoss(loss=loss, kd=parts["kd"], rank=parts["rank"], num_tokens=mask.sum())

    @torch.no_grad()
    def _student_top_ids(self, hidden, mask, chunk: int = 1024) -> torch.Tensor:
        """The student's sorted top-max(metric_ks) ids at counted tokens (n, k), from hidden states in chunks."""
        weight, bias = self._output_layer()
        rows = hidden[mask]
        k = max(self.args.metric_ks)
        tops = [torch.nn.functional.linear(rows[i : i + chunk], weight, bias).topk(k, dim=-1).indices
                for i in range(0, rows.shape[0], chunk)]  # fmt: skip
        return torch.cat(tops) if tops else rows.new_zeros(0, k, dtype=torch.long)

    def _check_fused_head(self, outputs) -> None:
        """Once: the model's logits must be its output layer applied to its last hidden state (no softcapping or
        scaling in between), else the fused loss would train another objective."""
        if self._fused_head_checked:
            return
        weight, bias = self._output_layer()
        with torch.no_grad():
            mine = torch.nn.functional.linear(outputs.hidden_states[-1][:, -1:], weight, bias).float()
            theirs = cut_logits(outputs.logits[:, -1:], self.vocab_size).detach().float()
            same = torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max().clamp_min(1)))
        if not same:
            raise ValueError(
                f"loss_backend={self.args.loss_backend!r}: this student's logits are not its output layer applied to "
                "its last hidden state (softcapping or logit scaling?), so the fused loss cannot stand in for them; "
                "set loss_backend='logits'."
            )
        self._fused_head_checked = True

    def _cached_teacher(self, example_index: torch.Tensor, rollout: Rollout) -> dict[str, torch.Tensor]:
        """The cache's top-K for the batch, laid out like the completion columns `(B, C, K)`."""
        start = rollout.prompt_length
        batch, width = rollout.sequences.shape[0], rollout.sequences.shape[1] - start
        k = self.teacher_cache.header.k
        device = rollout.sequences.device
        # Rows past a completion's end are never read (the mask drops them); fill them with valid distinct ids.
        ids = torch.arange(k, device=device).expand(batch, width, k).clone()
        logprobs = torch.full((batch, width, k), -math.log(k), device=device)
        tail = torch.full((batch, width), float("-inf"), device=device)
        for row, index in enumerate(example_index.tolist()):
            entry = self.teacher_cache[index]
            prompt = rollout.sequences[row, :start][rollout.attention_mask[row, :start].bool()].cpu()
            completion = rollout.sequences[row, start:][rollout.completion_mask[row, start:]].cpu()
            cached = entry["input_ids"]
            cs = entry["completion_start"]
            if not (torch.equal(cached[:cs], prompt) and torch.equal(cached[cs:], completion)):
                raise ValueError(
                    f"Example {index} is tokenised differently from the cache's copy ({len(prompt)}+{len(completion)} "
                    f"vs {cs}+{len(cached) - cs} tokens): build the cache from this dataset with the same "
                    "max_length and max_prompt_length as the trainer."
                )
            n = len(completion)
            ids[row, :n] = entry["topk_ids"].to(device)
            logprobs[row, :n] = entry["topk_logprobs"].to(device)
            tail[row, :n] = entry["tail_logprob"].to(device)
        return {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs, "teacher_tail_logprob": tail}

    # -- checkpoints (atomic, see reliability.py); the rollout generator is part of the training state -----------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        # Before `resume_from_checkpoint=True` looks for the last checkpoint: drop what a killed save left behind.
        remove_staging_folders(self.args.output_dir, self.accelerator, self.args.should_save)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        save_checkpoint_atomically(self, trial)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if not self.is_deepspeed_enabled:  # DeepSpeed steps inside backward: the guard checks losses there
            self.nonfinite_guard.install(self)
        if resume_from_checkpoint is not None:
            # Restored here, before the first step and on every backend (DeepSpeed loads its checkpoint here too):
            # Trainer restores its own RNG states only after fetching the first batches on resume, and fetching a
            # batch is where our rollouts draw from this generator.
            restore_rollout_generator(self.rollout_generator, resume_from_checkpoint, self.accelerator.process_index)
            self.nonfinite_guard.skipped_steps = skipped_steps_in(resume_from_checkpoint)
        return model, train_dataloader

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        torch.save(self.rollout_generator.get_state(), rollout_rng_file(output_dir, self.accelerator.process_index))

    # -- logging -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record(self, student_logits, student_hidden, teacher_logits, teacher_kwargs, mask, out, rollout) -> None:
        metrics = self._metrics["eval" if self._evaluating else "train"]
        tokens = max(int(out.num_tokens), 1)
        metrics["kd_loss"].append(out.kd.item() / tokens)
        metrics["rank_loss"].append(out.rank.item() / tokens)
        metrics["completion_tokens"].append(float(out.num_tokens))
        if student_logits is None:  # fused loss: the student's top ids, one chunk of logits at a time
            teacher_top = teacher_kwargs["teacher_topk_ids"][mask]
            agreement = topk_overlap_from_ids(self._student_top_ids(student_hidden, mask), teacher_top,
                                              ks=tuple(self.args.metric_ks))  # fmt: skip
        elif "teacher_topk_ids" in teacher_kwargs:
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

    def _averaged_metrics(self, mode: str) -> dict[str, float]:
        """The mean of each metric recorded since the last call, over batches and ranks; then forgets them."""
        averaged = {key: sum(values) / len(values) for key, values in sorted(self._metrics[mode].items()) if values}
        if self.accelerator.num_processes > 1 and averaged:
            # Every rank logs at the same step with the same keys (they depend on the config only): average them.
            local = torch.tensor(list(averaged.values()), device=self.accelerator.device, dtype=torch.float64)
            gathered = self.accelerator.gather(local.unsqueeze(0)).mean(0)
            averaged = dict(zip(averaged, gathered.tolist(), strict=True))
        self._metrics[mode].clear()
        return averaged

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Evaluation metrics are already in `logs` (evaluation_loop put them there); training ones are added here.
        if not self._evaluating:
            logs = {**logs, **self._averaged_metrics("train")}
            if self.args.nonfinite_policy == "skip":
                logs["nonfinite_skipped_steps"] = self.nonfinite_guard.skipped_steps  # cumulative
        super().log(logs, start_time)


def _teacher_from_args(teacher_model, args: RLKDConfig):
    """TRL's `teacher_model_name_or_path` names the teacher when `teacher_model` is not given; two different
    names are refused rather than one of them ignored."""
    name = args.teacher_model_name_or_path
    if name is None or teacher_model is None:
        return teacher_model if teacher_model is not None else name
    if isinstance(teacher_model, str) and teacher_model != name:
        raise ValueError(
            f"teacher_model={teacher_model!r} and args.teacher_model_name_or_path={name!r} name different teachers; "
            "give one of them."
        )
    return teacher_model


def _disable_dropout(model: torch.nn.Module) -> None:
    """TRL's `disable_dropout`: every dropout module of the student gets p = 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


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


def _open_cache(args: RLKDConfig, tokenizer, teacher_model, train_dataset, eval_dataset):
    """Open and fully verify the teacher cache before anything is loaded or trained."""
    from rlkd_onpolicy.cache import TeacherCache

    if eval_dataset is not None:
        raise ValueError("Evaluation needs an online teacher: with teacher_cache, pass no eval_dataset.")
    cache = TeacherCache.open(
        args.teacher_cache,
        tokenizer=tokenizer,
        expect_teacher=teacher_model if isinstance(teacher_model, str) else None,
        expect_k=args.teacher_top_k,
        expect_temperature=args.loss_temperature,
    )
    cache.verify()  # every shard's checksum now, not halfway through training
    if train_dataset is not None and len(cache) != len(train_dataset):
        raise ValueError(
            f"The cache at {args.teacher_cache} holds {len(cache)} examples but train_dataset has "
            f"{len(train_dataset)}: build it from this dataset."
        )
    return cache


def resolve_generation_cache(setting: str, mode: str, student, teacher, distributed_type) -> str:
    """RLKDConfig.generation_cache -> the sampler's cache_implementation. "auto" picks "cuda_graph" when the
    student (and, for seq_kd / speculative, the teacher) sits on a CUDA device whole, i.e. one process or DDP,
    and its decode step can be captured (sdpa/eager attention, full-attention layers); else "dynamic"."""
    if setting != "auto":
        return setting
    models = [student] + ([teacher] if mode in ("seq_kd", "speculative") and teacher is not None else [])
    whole = distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
    if whole and all(model_device(m).type == "cuda" and graphable(m) for m in models):
        return "cuda_graph"
    return "dynamic"


def resolve_loss_backend(args: RLKDConfig, cached_teacher: bool, accelerator) -> str:
    """RLKDConfig.loss_backend -> "fused" or "logits" (see the field's help)."""
    sparse = cached_teacher or args.teacher_top_k is not None
    fits = sparse and not args.rank_dynamic_weighting and not is_zero3(accelerator)
    if args.loss_backend == "fused" and is_zero3(accelerator):
        raise ValueError(
            "loss_backend='fused' reads the whole output layer, which DeepSpeed ZeRO-3 partitions across ranks; "
            "use loss_backend='logits' (or 'auto') with ZeRO-3."
        )
    if args.loss_backend == "auto":
        return "fused" if fits else "logits"
    return args.loss_backend

