"""`RLKDTrainer`: distillation on `transformers.Trainer`, used the way TRL users use `GKDTrainer`.

One optimizer step, read top to bottom:
1. `get_batch_samples` fetches the step's micro-batches and builds every rollout first (rollout.py: generation needs
   the models in eval mode and no gradient), so that the number of completion tokens in the *whole step* (all
   micro-batches, all ranks) is known before the first backward;
2. `compute_loss` runs the student on the rollout, the teacher scores it under `no_grad` (rlkd_onpolicy/teacher/: a
   local model's full logits or top-K, a cache's top-K, a vLLM server's top-K), and the student loss step
   (student_loss.py) gives the summed KD + ranking loss, divided by that count;
3. before `optimizer.step()`, a NaN/inf loss or gradient stops the run or skips the step (`nonfinite_policy`).
So gradient accumulation and data parallelism give exactly the gradient of one big batch. Checkpoints are written
atomically and hold the rollout generator too (reliability.py; guarantees and tests in docs/reliability.md).
"""

import os
import warnings
from collections import defaultdict

import torch
from transformers import PreTrainedModel, Trainer, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from rlkd_onpolicy.cross_tokenizer import CrossTeacherSignal
from rlkd_onpolicy.losses import DistillationLoss
from rlkd_onpolicy.metrics import topk_agreement, topk_overlap_from_ids, topk_overlap_metrics
from rlkd_onpolicy.sampling import SOURCE_TEACHER, Rollout
from rlkd_onpolicy.teacher import SparseTeacher, TeacherSignal
from rlkd_onpolicy.trainer.config import RLKDConfig
from rlkd_onpolicy.trainer.cross_tokenizer import CrossTokenizerCollator, cross_tokenizer_steps, tokenize_cross_dataset
from rlkd_onpolicy.trainer.data import PromptCompletionCollator, prepare_dataset
from rlkd_onpolicy.trainer.loading import load_and_check, placed_teacher, scoring_teacher
from rlkd_onpolicy.trainer.reliability import (
    TRAINER_STATE_NAME,
    NonFiniteGuard,
    checkpoint_errors,
    checkpoint_files,
    remove_staging_folders,
    restore_rollout_generator,
    rollout_rng_file,
    save_checkpoint_atomically,
    skipped_steps_in,
)
from rlkd_onpolicy.trainer.rollout import Rollouts, resolve_generation_cache, rollout_mode
from rlkd_onpolicy.trainer.student_loss import StudentLoss, StudentOutputs, rank_diagnostics, resolve_loss_backend
from rlkd_onpolicy.vocab import cut_logits


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
        processing_class: the student's tokenizer, which the teacher shares unless `args.teacher_tokenizer_name_or_path`
            names another (docs/cross_tokenizer.md); loaded from `model` when it is a name and this is None.
        peft_config: a `peft` config to train adapters on the student (needs `pip install peft`).

    Example (the models and the dataset are the caller's, so building and training are skipped as doctests):
        >>> args = RLKDConfig(output_dir="out", sampling_mode="speculative", loss="fkl", rank_weight=2.0, rank_k=5)
        >>> trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
        ...                       processing_class=tokenizer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
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
        args = RLKDConfig(output_dir="rlkd-output") if args is None else args
        if not isinstance(args, RLKDConfig):
            raise TypeError(f"args must be an RLKDConfig, got {type(args).__name__}.")
        if args.remove_unused_columns:  # GKDTrainer forces it too: the tokenised columns are not forward's arguments
            warnings.warn("RLKDConfig.remove_unused_columns=True: set to False, as GKDTrainer does (the trainer's "
                          "tokenised prompt/completion columns are not arguments of the model's forward, so Trainer "
                          "would drop them all).", stacklevel=2)  # fmt: skip
            args.remove_unused_columns = False
        loaded = load_and_check(model, teacher_model, args, processing_class, train_dataset, eval_dataset,
                                peft_config)  # fmt: skip
        cross = loaded.teacher_tokenizer is not None  # a teacher with another tokenizer: cross_tokenizer.py
        self.teacher_tokenizer = loaded.teacher_tokenizer
        collator = CrossTokenizerCollator if cross else PromptCompletionCollator
        self.vocab_size = loaded.vocab_size
        super().__init__(
            model=loaded.student,
            args=args,
            data_collator=data_collator or collator(loaded.tokenizer.pad_token_id),
            train_dataset=loaded.train_dataset,
            eval_dataset=loaded.eval_dataset,
            processing_class=loaded.tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # compute_loss divides by the step's token count itself: training_step must not divide again.
        self.loss_is_scaled_for_ga = True
        self.teacher = None if loaded.teacher is None else placed_teacher(
            loaded.teacher, self.accelerator, self.is_deepspeed_enabled, args.teacher_offload_to_cpu)  # fmt: skip
        self.teacher_cache, self.served_teacher = loaded.cache, loaded.served  # None unless the teacher is one
        # The three steps: rollout (rollout.py), teacher signal (rlkd_onpolicy/teacher/), student loss.
        mode = rollout_mode(args)
        student = self.accelerator.unwrap_model(self.model)
        teacher = None if self.teacher is None else self.accelerator.unwrap_model(self.teacher)
        self.loss_backend = resolve_loss_backend(args, self.teacher_cache is not None, self.accelerator)
        self.generation_cache = resolve_generation_cache(args.generation_cache, mode, student, teacher,
                                                         self.accelerator.distributed_type)  # fmt: skip
        if cross:
            self.rollouts, self.scoring_teacher, self.student_loss = cross_tokenizer_steps(
                args, mode, loaded, self.teacher, self.generation_cache)  # fmt: skip
        else:
            self.rollouts = Rollouts(args, mode, served_teacher=self.served_teacher, vocab_size=self.vocab_size,
                                     cache_implementation=self.generation_cache,
                                     eos_token_id=loaded.tokenizer.eos_token_id,
                                     pad_token_id=loaded.tokenizer.pad_token_id,
                                     student_server=loaded.student_server, student=student)  # fmt: skip
            self.scoring_teacher = scoring_teacher(
                args, self.teacher, self.teacher_cache, self.served_teacher, self.vocab_size
            )
            self.student_loss = StudentLoss(args, self.loss_backend, self.vocab_size)
        self.sampler = self.rollouts.sampler(student, teacher)  # its settings checked now; each rollout makes its own
        if getattr(self.rollouts, "weight_sync", None) is not None:  # use_vllm: a first push proves it loads them
            self.rollouts.weight_sync.before_rollout(student, self.accelerator, 0, " (at construction)")
        # Row seeds and mixed-mode coins come from this generator; one stream per rank.
        self.rollout_generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self._eval_generator = self._new_eval_generator()
        self._evaluating = False
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite_guard = NonFiniteGuard(args.nonfinite_policy, args.nonfinite_max_consecutive_skips)

    @property
    def teacher_model(self):
        """TRL's name (GKDTrainer.teacher_model) for `self.teacher`: the placed teacher model, None with a cache or a
        server."""
        return self.teacher

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

    def _rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        # Evaluation draws from its own generator so that evaluating never shifts the training rollouts. (Not
        # `model.training`: the next step's rollouts are built before Trainer puts the model back in train mode.)
        generator = self._eval_generator if self._evaluating else self.rollout_generator
        step = None if self._evaluating else self.state.global_step + 1  # named in a vLLM server's errors
        return self.rollouts(batch, self.model_wrapped, self.teacher, self.accelerator, generator,
                             weights_step=self.state.global_step, step=step)  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rollout: Rollout = inputs.get("rollout") or self._rollout(inputs)
        head_model = self.accelerator.unwrap_model(self.model)  # whose output layer the fused loss reads
        student = self.student_loss.forward(model, head_model, rollout)
        step = None if self._evaluating else self.state.global_step + 1  # named in a teacher's errors
        teacher = self.scoring_teacher.score(rollout, inputs.get("example_index"), step=step)
        rank_stats = {} if self._diagnosing() and student.logits is not None else None
        out = self.student_loss.loss(student, teacher, head_model, rank_stats)
        if rank_stats is not None:
            diagnostics = rank_diagnostics(student.logits, student.mask, out, rank_stats, self.args.rank_weight)
            for key, value in diagnostics.items():
                self._metrics["train"][key].append(value)
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            loss = out.loss / out.num_tokens.clamp_min(1)
        else:
            # DDP and DeepSpeed average gradients over ranks; the count is global, so undo that average. A step
            # without a single completion token (all masked) gives 0, not 0/0.
            loss = out.loss / num_items_in_batch.clamp_min(1) * self.accelerator.num_processes
            self.nonfinite_guard.check_loss(loss, self)
        self._record(student, teacher, out, rollout, head_model)
        return (loss, {"rollout": rollout}) if return_outputs else loss

    def _diagnosing(self) -> bool:
        """Whether this training micro-batch measures the ranking-loss diagnostics (the steps that log)."""
        args = self.args
        if not (args.rank_diagnostics and args.rank_weight > 0) or self._evaluating or not torch.is_grad_enabled():
            return False
        return (self.state.global_step + 1) % max(int(args.logging_steps), 1) == 0

    # -- evaluation: the same rollout + loss on the eval set, from a generator reset at every evaluation -------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset given here is checked and tokenised as the constructor's are (a raw prompt–completion one used
        # to fail with KeyError 'prompt_ids'); Trainer calls back here once per entry of a dict, prefix eval_<name>.
        if eval_dataset is not None and not isinstance(eval_dataset, dict | str):
            eval_dataset = self._prepare_dataset(eval_dataset, "eval_dataset")
        self._evaluating = True  # until after Trainer logs the returned metrics, so `log` adds no training ones
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating = False

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        # as evaluate(): a raw prompt–completion dataset is checked and tokenised first
        test_dataset = self._prepare_dataset(test_dataset, "test_dataset")
        return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    def _prepare_dataset(self, dataset, name: str):
        """A dataset given to evaluate()/predict(), tokenised as the constructor's are (both tokenizers' columns on
        the cross-tokenizer path)."""
        if self.teacher_tokenizer is None:
            return prepare_dataset(dataset, self.processing_class, self.args, name)
        if "teacher_prompt_ids" in (getattr(dataset, "column_names", None) or []):
            return dataset
        return tokenize_cross_dataset(dataset, self.processing_class, self.teacher_tokenizer, self.args, name)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):  # fmt: skip
        # Here, not in `evaluate`, so that `predict` evaluates the same way; the distillation metrics join the
        # returned ones, so that evaluate() returns them and metric_for_best_model can name them (eval_mor@5).
        self._eval_generator = self._new_eval_generator()
        evaluating, self._evaluating = self._evaluating, True
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)  # fmt: skip
            averaged = self._averaged_metrics("eval")
        finally:
            self._evaluating = evaluating
        # eval_loss included: Trainer's is a mean of per-batch means, which changes with per_device_eval_batch_size
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in averaged.items()})
        return output

    def _new_eval_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.args.seed + 1_000_003 + self.accelerator.process_index)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, logits, labels) as transformers' Trainer gives `compute_metrics`: the student's logits (B, T, V) on
        the evaluated sequence (the rollout: generated or the dataset's, per sampling_mode) and its token ids as
        labels, -100 outside the completion, unshifted. Only with `compute_metrics` (one more student forward)."""
        batch, inputs = inputs, self._prepare_inputs(inputs)
        with torch.no_grad():
            rollout = self._rollout(inputs)
            # include_for_metrics=["inputs"]: Trainer reads the main input from the batch after this call (it used to
            # raise KeyError 'input_ids'): the evaluated sequence, prompt and completion, whose ids the labels hold
            batch["input_ids"] = rollout.sequences
            loss = self.compute_loss(model, {**inputs, "rollout": rollout})
            if prediction_loss_only:
                return loss.detach(), None, None
            logits = model(**rollout.model_inputs()).logits
        labels = rollout.sequences.masked_fill(~rollout.completion_mask, -100)
        return loss.detach(), cut_logits(logits, self.vocab_size), labels

    # -- checkpoints (atomic, see reliability.py); the rollout generator is part of the training state -----------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        # Before `resume_from_checkpoint=True` looks for the last checkpoint: drop what a killed save left behind.
        remove_staging_folders(self.args.output_dir, self.accelerator, self.args.should_save)
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str) and os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
            with checkpoint_errors(checkpoint, [TRAINER_STATE_NAME], "the training state"):
                TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # Each of Trainer's readers, so that a damaged file is named with the fix (reliability.checkpoint_errors).
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        files = checkpoint_files(resume_from_checkpoint, "model*.safetensors*", "pytorch_model*.bin*", "adapter_model*")
        with checkpoint_errors(resume_from_checkpoint, files, "the model weights"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        files = checkpoint_files(checkpoint, "optimizer.pt", "scheduler.pt", "scaler.pt")
        with checkpoint_errors(checkpoint, files, "the optimizer and scheduler states"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return super()._load_rng_state(checkpoint)
        with checkpoint_errors(checkpoint, checkpoint_files(checkpoint, "rng_state*.pth"), "the RNG states"):
            return super()._load_rng_state(checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        save_checkpoint_atomically(self, trial)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if not self.is_deepspeed_enabled:  # DeepSpeed steps inside backward: the guard checks losses there
            self.nonfinite_guard.install(self)
        if getattr(self.rollouts, "weight_sync", None) is not None:  # use_vllm: push the resumed weights first
            self.rollouts.weight_sync.reset()
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
    def _record(self, student: StudentOutputs, teacher: TeacherSignal, out: DistillationLoss, rollout: Rollout,
                head_model) -> None:  # fmt: skip
        # Training logs the mean over micro-batches of each; evaluation keeps (sum, weight) pairs so that each metric
        # is normalised once over the whole eval set (per_device_eval_batch_size changes nothing).
        evaluating = self._evaluating
        metrics = self._metrics["eval" if evaluating else "train"]

        def add(key: str, value: float, weight: float) -> None:  # `value` a mean over `weight` units
            metrics[key].append((value * weight, weight) if evaluating else value)

        n = float(out.num_tokens)
        tokens = max(n, 1.0)
        if evaluating:  # replaces Trainer's eval_loss, a mean of per-batch means (training: Trainer logs its own)
            add("loss", out.loss.item() / tokens, n)
        add("kd_loss", out.kd.item() / tokens, n)
        add("rank_loss", out.rank.item() / tokens, n)
        if evaluating:
            metrics["completion_tokens"].append((n, None))  # the eval set's total
        else:
            metrics["completion_tokens"].append(n)
        ks, mask = tuple(self.args.metric_ks), student.mask
        if isinstance(teacher, CrossTeacherSignal):  # no common ids to compare top-k in (docs/cross_tokenizer.md)
            agreement = {}
        elif student.logits is None:  # fused loss: the student's top ids, one chunk of logits at a time
            top = self.student_loss.top_ids(head_model, student, max(ks))
            agreement = topk_overlap_from_ids(top, teacher.ids[mask], ks=ks)
        elif isinstance(teacher, SparseTeacher):
            agreement = topk_overlap_metrics(student.logits, teacher.ids, ks=ks, mask=mask)
        else:
            agreement = topk_agreement(student.logits, teacher.logits, ks=ks, mask=mask)
        for key, value in agreement.items():
            add(key, value, n)  # means over the counted tokens
        stats = rollout.stats
        generated = float(stats.get("generated_tokens", n))
        weights = {"acceptance_rate": generated, "tokens_per_second": float(stats.get("seconds", 1.0)),
                   "on_policy_fraction": float(rollout.sequences.shape[0]),
                   "rollout_seconds": 1.0, "vllm_sync_seconds": 1.0}  # fmt: skip
        for key, weight in weights.items():
            if key in stats:
                add(key, float(stats[key]), weight)
        replaced = (rollout.token_source == SOURCE_TEACHER) & rollout.completion_mask
        if self.args.sampling_mode == "speculative":
            add("teacher_token_fraction", float(replaced.sum()) / tokens, n)

    def _averaged_metrics(self, mode: str) -> dict[str, float]:
        """Each metric recorded since the last call, over micro-batches and ranks; then forgets them. Training: the
        mean of the micro-batches' values. Evaluation: the sum of each metric's numerators over its weights (tokens,
        rows, seconds), over the whole eval set and all ranks; completion_tokens the total."""
        recorded = {key: values for key, values in sorted(self._metrics[mode].items()) if values}
        self._metrics[mode].clear()
        if mode == "train":
            averaged = {key: sum(values) / len(values) for key, values in recorded.items()}
            if self.accelerator.num_processes > 1 and averaged:
                # Every rank logs at the same step with the same keys (they depend on the config only): average them.
                local = torch.tensor(list(averaged.values()), device=self.accelerator.device, dtype=torch.float64)
                gathered = self.accelerator.gather(local.unsqueeze(0)).mean(0)
                averaged = dict(zip(averaged, gathered.tolist(), strict=True))
            return averaged
        sums = [[sum(v for v, _ in values), sum(w or 0.0 for _, w in values)] for values in recorded.values()]
        totals = torch.tensor(sums, dtype=torch.float64).reshape(-1, 2)
        if self.accelerator.num_processes > 1 and recorded:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        averaged = {}
        for (key, values), (total, weight) in zip(recorded.items(), totals.tolist(), strict=True):
            is_total = values[0][1] is None
            averaged[key] = total if is_total else (total / weight if weight > 0 else 0.0)
        return averaged

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Evaluation metrics are already in `logs` (evaluation_loop put them there); training ones are added here.
        if not self._evaluating:
            logs = {**logs, **self._averaged_metrics("train")}
            if self.args.nonfinite_policy == "skip":
                logs["nonfinite_skipped_steps"] = self.nonfinite_guard.skipped_steps  # cumulative
        super().log(logs, start_time)
