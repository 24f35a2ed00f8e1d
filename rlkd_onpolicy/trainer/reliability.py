"""What keeps a long distillation run safe: atomic checkpoints and the non-finite loss/gradient guard.

`RLKDTrainer` calls into this module from these hooks (see docs/reliability.md for the guarantees and their tests):
- `__init__` -> `check_output_dir_writable`: an output_dir that cannot be written is refused before any work;
- `_save_checkpoint` -> `save_checkpoint_atomically`: a checkpoint is written into a staging folder that
  `get_last_checkpoint` cannot see and renamed to `checkpoint-N` only once every file is on disk;
- `train` -> `remove_staging_folders`: what a killed save left behind is removed before anything else;
- `compute_loss` / the optimizer's `step` -> `NonFiniteGuard`: a step whose loss or gradient is NaN/inf raises
  (or is skipped and counted) before `optimizer.step()`, so the parameters never see it.
"""

import contextlib
import fnmatch
import functools
import json
import logging
import os
import re
import shutil
import tempfile

import torch
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
# Neither name matches `get_last_checkpoint`'s `^checkpoint-(\d+)$` nor rotation's `checkpoint-*` glob, and
# `push_to_hub` ignores `_*` in output_dir.
STAGING_PREFIX = "_staging-"
STALE_PREFIX = "_stale-"
_LEFTOVER = re.compile(rf"^({STAGING_PREFIX}|{STALE_PREFIX}){PREFIX_CHECKPOINT_DIR}-\d+$")


# -- checks before any work ----------------------------------------------------------------------------------------


def check_output_dir_writable(output_dir: str) -> None:
    """Refuse an output_dir that checkpoints cannot be written to, before any model is loaded or step taken.

    Probes by creating and removing a file in it (or, while it does not exist, a folder in its nearest existing
    parent, where it would be created), since permission bits say nothing for root or on read-only mounts; nothing
    is left behind. Every process calls this: each writes its own files (rollout RNG states, DeepSpeed shards).
    """
    path = os.path.abspath(output_dir)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        where = "is a file" if parent == path else f"is under {parent}, which is a file"
        raise ValueError(f"output_dir={output_dir!r} {where}, not a folder: checkpoints and the final model are "
                         "written into it. Choose another output_dir.")
    try:
        if parent == path:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".rlkd-write-probe-"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".rlkd-write-probe-"))
    except OSError as error:
        raise ValueError(
            f"output_dir={output_dir!r} is not writable ({error.strerror}: {error.filename}), so the first checkpoint "
            "would fail after training had started. Choose a writable output_dir or fix its permissions."
        ) from error


# -- the rollout generator in checkpoints -----------------------------------------------------------------------


def rollout_rng_file(checkpoint: str, rank: int) -> str:
    return os.path.join(checkpoint, f"rollout_rng_state_{rank}.pth")


def restore_rollout_generator(generator: torch.Generator, checkpoint: str, rank: int) -> bool:
    """Load this rank's rollout generator state from `checkpoint`; without the file, warn naming it and go on.

    A warning, not an error: the resumed run is still a correct run, only not the uninterrupted one's twin, and
    the file is legitimately absent when resuming with more processes than the checkpoint was saved with (as
    transformers treats its own RNG files). Returns whether the state was restored.
    """
    path = rollout_rng_file(checkpoint, rank)
    if os.path.isfile(path):
        with checkpoint_errors(checkpoint, [os.path.basename(path)], "the rollout generator's state"):
            generator.set_state(torch.load(path, weights_only=True))
        return True
    present = sorted(name for name in os.listdir(checkpoint) if re.fullmatch(r"rollout_rng_state_\d+\.pth", name))
    logger.warning(
        f"Resuming from {checkpoint} without {path}: the rollouts (sampled completions, mixed-mode coins) will not be "
        "those of the uninterrupted run; they come from the generator as seeded at the start (seed + rank). "
        f"The checkpoint holds {present or 'no rollout RNG state'}"
        f"{' (saved with another number of processes?)' if present else ' (saved by another version?)'}."
    )
    return False


# -- reading a checkpoint back ------------------------------------------------------------------------------------


class CorruptCheckpointError(ValueError):
    """A checkpoint file could not be read on resume; the message names the checkpoint, the file and the fix."""


def checkpoint_files(checkpoint: str, *patterns: str) -> list[str]:
    """The names in `checkpoint` matching any of `patterns` (all of them when none match: still something to name)."""
    names = sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else []
    found = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return found or list(patterns)


@contextlib.contextmanager
def checkpoint_errors(checkpoint: str, files: list[str], what: str):
    """Re-raise any error while reading `files` of `checkpoint` (a truncated or overwritten file gives torch's
    unpickling advice, safetensors' header errors or a JSON error, none naming the file) as one that names them."""
    try:
        yield
    except CorruptCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - every reader's own error type; re-raised with the file named
        detail = " ".join(str(error).split())[:300]
        raise CorruptCheckpointError(
            f"Resuming from {checkpoint}: {what} ({', '.join(files)}) could not be read: {type(error).__name__}: "
            f"{detail}. The checkpoint is damaged (a copy or a disk that failed?) or belongs to another model: resume "
            "from an earlier checkpoint (resume_from_checkpoint='<output_dir>/checkpoint-N'), or delete this one."
        ) from error


# -- atomic checkpoints --------------------------------------------------------------------------------------------


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file under `root`, and the folders' entries, to the disk (a rename is only as durable as this)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        if os.name == "posix":  # folders cannot be opened for fsync on Windows
            _fsync(folder)


def publish_checkpoint(staging: str, final: str) -> None:
    """Rename a complete staging folder to `final`. An existing `final` (the same step saved again by a resumed run)
    is swapped out first, never merged into: at every instant `final` is absent or complete."""
    parent = os.path.dirname(final)
    if os.path.exists(final):
        stale = os.path.join(parent, STALE_PREFIX + os.path.basename(final))
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(staging, final)
        shutil.rmtree(stale)
    else:
        os.rename(staging, final)
    if os.name == "posix":
        _fsync(parent)


def remove_staging_folders(run_dir: str, accelerator, should_save: bool) -> list[str]:
    """Delete the staging/stale folders a killed save left in `run_dir` (on the saving process, then a barrier)."""
    removed = []
    if should_save and os.path.isdir(run_dir):
        for name in sorted(os.listdir(run_dir)):
            if _LEFTOVER.match(name) and os.path.isdir(os.path.join(run_dir, name)):
                logger.warning(f"Removing {name} in {run_dir}: an incomplete checkpoint left by an interrupted save.")
                shutil.rmtree(os.path.join(run_dir, name))
                removed.append(name)
    accelerator.wait_for_everyone()
    return removed


def save_checkpoint_atomically(trainer, trial=None) -> str:
    """`Trainer._save_checkpoint` (transformers 5.24) with the same files, rotation and best-checkpoint bookkeeping,
    but written into `_staging-checkpoint-N` and renamed to `checkpoint-N` only when complete and fsynced.

    Every rank writes into the staging folder (DeepSpeed ZeRO-3 writes per-rank shards); the rename happens on the
    saving process after a barrier, and a second barrier keeps any rank from going on before it is published.
    Returns the path of the published checkpoint.
    """
    args, state, accelerator = trainer.args, trainer.state, trainer.accelerator
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    run_dir = trainer._get_output_dir(trial=trial)
    final = os.path.join(run_dir, name)
    staging = os.path.join(run_dir, STAGING_PREFIX + name)
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # a previous attempt at this very step, killed midway
    accelerator.wait_for_everyone()

    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    trainer.save_model(staging, _internal_call=True)
    if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and state.best_global_step:
        # Recorded under its final name: this checkpoint is the best one if its step is, even before the rename.
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        if state.best_global_step == state.global_step or os.path.exists(best):
            state.best_model_checkpoint = best
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(staging)
        trainer._save_scaler(staging)
        trainer._save_rng_state(staging)  # RLKDTrainer adds its rollout generator here
    if args.should_save:
        exportable = [cb for cb in trainer.callback_handler.callbacks + [trainer.control]
                      if isinstance(cb, ExportableState)]
        for callback in exportable:
            key = callback.__class__.__name__
            if isinstance(state.stateful_callbacks[key], list):
                state.stateful_callbacks[key].append(callback.state())
            else:
                state.stateful_callbacks[key] = callback.state()
        state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))  # written last: its presence means complete

    if os.path.isdir(staging):
        fsync_tree(staging)  # each rank flushes, so its own shards are durable before the rename
    accelerator.wait_for_everyone()
    if args.should_save:
        publish_checkpoint(staging, final)
    accelerator.wait_for_everyone()

    if args.push_to_hub:
        trainer._push_from_checkpoint(final)
    if args.should_save:
        rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
    return final


# -- the non-finite guard ------------------------------------------------------------------------------------------


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN/inf; the step was stopped before the optimizer touched the parameters."""


def _any_rank(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


class NonFiniteGuard:
    """Checks each micro-batch's loss and, before `optimizer.step()`, the accumulated gradients.

    policy "error": raise `NonFiniteError` naming the optimizer step; "skip": drop the step (zero the gradients, no
    optimizer or scheduler update) and count it in `skipped_steps`. Skipping is for rare bad batches: a run that
    skips `max_consecutive_skips` steps in a row, or reaches its last step having taken none, raises
    `NonFiniteError` too, since it is learning nothing (a teacher whose logits are always non-finite, a learning
    rate that diverged), and finishing would save an untrained model as if it were trained.

    Where each check sits: without DeepSpeed the decision is taken once per optimizer step, inside a wrapper around
    the optimizer's `step` (after the last micro-batch's backward and the clipping, where a NaN loss has made the
    gradients NaN too; one all-reduce makes all ranks agree). DeepSpeed applies its optimizer step *inside* the last
    micro-batch's backward, so there the loss is checked on every micro-batch before its backward (policy "error"
    only, which RLKDConfig enforces); its gradients are not checked.
    """

    def __init__(self, policy: str, max_consecutive_skips: int = 10):
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0  # over the whole run, restored on resume
        self._consecutive_skips = 0
        self._taken_steps = 0  # optimizer steps taken by this `train()` call
        self._micro_batch = 0
        self._bad_loss: str | None = None  # the first non-finite loss of the current step, described

    def check_loss(self, loss: torch.Tensor, trainer) -> None:
        """Called on every training micro-batch's loss, before its backward."""
        self._micro_batch += 1
        bad = not bool(torch.isfinite(loss.detach()).all())
        if bad and self._bad_loss is None:
            self._bad_loss = f"loss={loss.detach().float().item()} in micro-batch {self._micro_batch}"
        if trainer.is_deepspeed_enabled and _any_rank(bad, trainer.accelerator):
            raise self._error(trainer, f"loss ({self._bad_loss or 'on another rank'})")

    def install(self, trainer) -> None:
        """Wrap the (prepared) optimizer's `step` so that every optimizer step passes through `_before_step`."""
        self._consecutive_skips = self._taken_steps = 0
        optimizer = trainer.optimizer
        if getattr(optimizer, "_nonfinite_guard", None) is self:
            return  # train() called again on the same optimizer
        original_step = optimizer.step

        # wraps: keeps the marker torch's LR scheduler put on the step it wrapped (else it warns of an override)
        @functools.wraps(original_step)
        def step(*args, **kwargs):
            if self._before_step(trainer):
                return original_step(*args, **kwargs)
            return None

        optimizer.step = step
        optimizer._nonfinite_guard = self

    def _before_step(self, trainer) -> bool:
        """True: take the step. False: skip it. Raises under policy "error"."""
        bad_loss, self._bad_loss, self._micro_batch = self._bad_loss, None, 0
        # the local shard of a sharded (FSDP2 DTensor) gradient; `_any_rank` below combines the shards' verdicts
        grads = [getattr(p.grad, "to_local", lambda g=p.grad: g)() for group in trainer.optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        grads_finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        problem = None
        if bad_loss is not None:
            problem = f"loss ({bad_loss})"
        elif not grads_finite:
            # No parameter names: Trainer's norm computation (clip_grad_norm_, even with max_grad_norm=0) has already
            # multiplied every gradient by the NaN norm, so every parameter looks guilty.
            problem = "gradient"
        if not _any_rank(problem is not None, trainer.accelerator):
            _mark_skipped(trainer.optimizer, False)
            self._consecutive_skips = 0
            self._taken_steps += 1
            return True
        problem = problem or "loss or gradient on another rank"
        if self.policy == "error":
            raise self._error(trainer, problem)
        trainer.optimizer.zero_grad(set_to_none=True)
        _mark_skipped(trainer.optimizer, True)  # the Trainer then leaves the LR scheduler where it is
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self._check_still_learning(trainer, problem)
        logger.warning(f"Skipped optimizer step {trainer.state.global_step + 1}: non-finite {problem}; the "
                       f"parameters are unchanged ({self.skipped_steps} step(s) skipped so far).")
        return False

    def _check_still_learning(self, trainer, problem: str) -> None:
        """Under "skip": raise when the last `max_consecutive_skips` steps, or every step of this run, were skipped."""
        step = trainer.state.global_step + 1
        last_step = step >= trainer.state.max_steps > 0
        if self._consecutive_skips >= self.max_consecutive_skips:
            what = f"{self._consecutive_skips} consecutive optimizer steps (steps {step - self._consecutive_skips + 1}"
            what += f"–{step}) were skipped"
        elif last_step and self._taken_steps == 0:
            what = f"every one of the {self._consecutive_skips} optimizer steps of this run was skipped"
        else:
            return
        raise NonFiniteError(
            f"nonfinite_policy='skip': {what}, the last for a non-finite {problem}, so the model is not learning "
            "and the run stops rather than save it as trained. Skipping is for rare bad batches; find what makes "
            "every step non-finite (a teacher whose logits are NaN/inf, a bad example, a learning rate that "
            "diverged; nonfinite_policy='error' stops at the first one and names it), or raise "
            f"nonfinite_max_consecutive_skips (now {self.max_consecutive_skips}) if longer runs of bad batches are "
            "expected."
        )

    def _error(self, trainer, problem: str) -> NonFiniteError:
        return NonFiniteError(
            f"Non-finite {problem} at optimizer step {trainer.state.global_step + 1}: training stopped before the "
            "optimizer step, so the parameters are those after the previous step. Lower the learning rate or look "
            "for a bad example, or set nonfinite_policy='skip' to drop such steps and count them."
        )


def _mark_skipped(optimizer, skipped: bool) -> None:
    # accelerate's own signal for a skipped step (fp16 overflow): `Trainer` reads `optimizer_step_was_skipped` and
    # then does not advance the LR scheduler. Reset on a taken step, where without a grad scaler nothing else would.
    if hasattr(optimizer, "_is_overflow"):
        optimizer._is_overflow = skipped


def skipped_steps_in(checkpoint: str) -> int:
    """The `nonfinite_skipped_steps` count a checkpoint's log history ends with (0 when it logged none)."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        history = json.load(f).get("log_history", [])
    counts = [entry["nonfinite_skipped_steps"] for entry in history if "nonfinite_skipped_steps" in entry]
    return int(counts[-1]) if counts else 0
