"""The student's weights pushed to its vLLM server (use_vllm): when, how, and what a failure says.

Before a rollout that generates with the student, when the weights the server holds are `vllm_sync_steps` or more
optimizer steps old (or were never pushed by this run), the main process
1. gathers the student's parameters (under ZeRO-3, `deepspeed.zero.GatheredParameters`, on every rank; PEFT adapters
   merged into a copy of the names vLLM knows),
2. writes them as one safetensors file into the sync folder (tmpfs /dev/shm where there is one),
3. asks the server to reload them (`StudentServer.sync_from_folder`: /pause, reload_weights, /resume) and tags them
   with a version unique to this run and step.
Before every rollout the server's weight version is compared with the last one pushed: a server that restarted (and
so came back with its start-up weights) stops the run with an error naming the URL and the step, raised while the
step's rollouts are built, i.e. before its optimizer step. All ranks wait for the main process.

On a GPU vLLM also has an NCCL weight-transfer engine (/init_weight_transfer_engine; /pause, /start_weight_update,
/update_weights, /finish_weight_update, /resume), which TRL ≥ 1.11 uses. It is not implemented here (it needs a
CUDA process group between trainer and server, which cannot be tested on this CPU machine); the file sync works on
any device (docs/vllm_rollouts.md has the measured cost).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch

from rlkd_onpolicy.sampling.vllm_client import StudentServer, StudentServerError
from rlkd_onpolicy.trainer.deepspeed import is_zero3

WEIGHTS_FILE = "model.safetensors"


def sync_folder(configured: str | None) -> Path:
    """A fresh folder for the weight files: under `configured` when set, else on tmpfs (/dev/shm) when writable,
    else in the system's temporary folder. Removed when the trainer is garbage-collected or the process exits."""
    base = configured or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    if configured is not None:
        Path(configured).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="rlkd-vllm-sync-", dir=base))


def checkpoint_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights under the names of its Hugging Face checkpoint (what vLLM's loader reads), on the CPU,
    contiguous, a tied output layer included under its own name (`_distinct`).
    A PEFT model gives its base model's weights with the adapters merged in (merged, read, unmerged)."""
    if hasattr(module, "merge_adapter") and hasattr(module, "get_base_model"):
        module.merge_adapter()
        try:
            # copies: unmerging may change the merged tensors in place
            state = _peft_names(module.get_base_model().state_dict())
            return {name: tensor.clone() for name, tensor in _distinct(state).items()}
        finally:
            module.unmerge_adapter()
    return _distinct(module.state_dict())


def _peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if "lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        out[name] = tensor
    return out


def _distinct(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every name with its own tensor (safetensors refuses shared storage): a tensor seen under an earlier name (a
    tied output layer) is written again as a copy. vLLM's in-place reload needs it: a tied LM head that gets no
    weights of its own is put back with its old ones (vLLM 0.32's layerwise reload, "ParallelLMHead: Failed to load
    weights"), so the head would stay stale while the embedding moves."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        tensor = tensor.detach().to("cpu")
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


class WeightSync:
    """Pushes the student's weights to `server` on the schedule above; `seconds` of the last push (None if none)."""

    def __init__(self, server: StudentServer, every: int, folder: str | None):
        self.server, self.every = server, every
        self.folder = sync_folder(folder)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self.run_id = uuid.uuid4().hex[:8]
        self.synced_step: int | None = None  # the optimizer step whose weights the server holds
        self.version: str | None = None

    def reset(self) -> None:
        """Forget what the server holds (a new train() or a resumed run): the next rollout pushes the weights."""
        self.synced_step = None

    def due(self, weights_step: int) -> bool:
        last = self.synced_step
        return last is None or weights_step < last or weights_step - last >= self.every

    def before_rollout(self, student: torch.nn.Module, accelerator, weights_step: int, where: str) -> float | None:
        """Push the weights if due (returns the seconds it took), after checking the server still holds the last
        push. `weights_step` = optimizer steps applied to `student`; `where` names the step in errors."""
        main = accelerator.is_main_process
        if main and self.version is not None:
            self.server.check_version(self.version, where)
        if not self.due(weights_step):
            return None
        start = time.perf_counter()
        gather = nullcontext()
        if is_zero3(accelerator):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(student.parameters()))
        with gather:
            if main:
                self._write(student)
        if main:
            version = f"rlkd-{self.run_id}-step{weights_step}"
            try:
                self.server.sync_from_folder(str(self.folder), version, where)
            except StudentServerError as error:
                raise StudentServerError(f"Syncing the student's weights failed{where}: {error}") from None
            self.version = version
        accelerator.wait_for_everyone()
        self.synced_step = weights_step
        return time.perf_counter() - start

    def _write(self, student: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        state = checkpoint_state_dict(student)
        partial = self.folder / (WEIGHTS_FILE + ".partial")
        save_file(state, str(partial), metadata={"format": "pt"})
        os.replace(partial, self.folder / WEIGHTS_FILE)
