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

On a GPU, `NCCLWeightSync` (vllm_sync_backend "nccl", or "auto" when the student is on CUDA, vLLM is importable in
the training environment and the server was started with `--weight-transfer-config '{"backend": "nccl"}'`) streams
the tensors instead, in the protocol TRL ≥ 1.11 uses: once /init_weight_transfer_engine (the trainer joins the
workers' NCCL group as rank 0), then per sync /pause, /start_weight_update, /update_weights (names, dtypes, shapes;
the tensors broadcast over NCCL meanwhile), /finish_weight_update (with the version), /resume. It is written against
vLLM 0.32's `vllm.distributed.weight_transfer` and TRL's client, and is UNTESTED here (no GPU on the machine it was
written on; benchmarks/gpu_session.sh exercises it on a lent GPU). The file sync works on any device.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
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


def checkpoint_state_dict(module: torch.nn.Module, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The student's weights under the names of its Hugging Face checkpoint (what vLLM's loader reads), on the CPU,
    contiguous, a tied output layer included under its own name (`_distinct`).
    A PEFT model gives its base model's weights with the adapters merged in (merged, read, unmerged)."""
    if hasattr(module, "merge_adapter") and hasattr(module, "get_base_model"):
        module.merge_adapter()
        try:
            # copies: unmerging may change the merged tensors in place
            state = _peft_names(module.get_base_model().state_dict())
            return {name: tensor.clone() for name, tensor in _distinct(state, to_cpu).items()}
        finally:
            module.unmerge_adapter()
    return _distinct(module.state_dict(), to_cpu)


def _peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if "lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        out[name] = tensor
    return out


def _distinct(state: dict[str, torch.Tensor], to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Every name with its own tensor (safetensors refuses shared storage): a tensor seen under an earlier name (a
    tied output layer) is written again as a copy. vLLM's in-place reload needs it: a tied LM head that gets no
    weights of its own is put back with its old ones (vLLM 0.32's layerwise reload, "ParallelLMHead: Failed to load
    weights"), so the head would stay stale while the embedding moves."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        tensor = tensor.detach().to("cpu") if to_cpu else tensor.detach()
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
                version = f"rlkd-{self.run_id}-step{weights_step}"
                try:
                    self._push(student, version, where)
                except StudentServerError as error:
                    raise StudentServerError(f"Syncing the student's weights failed{where}: {error}") from None
                self.version = version
        accelerator.wait_for_everyone()
        self.synced_step = weights_step
        return time.perf_counter() - start

    def _push(self, student: torch.nn.Module, version: str, where: str) -> None:
        self._write(student)
        self.server.sync_from_folder(str(self.folder), version, where)

    def _write(self, student: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        state = checkpoint_state_dict(student)
        partial = self.folder / (WEIGHTS_FILE + ".partial")
        save_file(state, str(partial), metadata={"format": "pt"})
        os.replace(partial, self.folder / WEIGHTS_FILE)


class NCCLWeightSync(WeightSync):
    """The sync over vLLM's NCCL weight-transfer engine (CUDA only; UNTESTED here, see the module docstring). Needs
    vLLM importable in the training process and the server started with --weight-transfer-config
    '{"backend": "nccl"}'; `group_port` is the rendezvous port on this host (TRL's vllm_group_port)."""

    def __init__(self, server: StudentServer, every: int, folder: str | None, group_port: int):
        super().__init__(server, every, folder)
        self.group_port, self.communicator = group_port, None

    def _connect(self, device: torch.device) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init
        from vllm.utils.network_utils import get_ip

        if device.type != "cuda":
            raise StudentServerError(f"vllm_sync_backend='nccl' needs the student on a CUDA device, not {device}.")
        world = int(self.server.request("/get_world_size", where=" (/get_world_size)")["world_size"])
        # the trainer joins the server's workers as rank 0; they are offset by one
        init_info = {"master_address": get_ip(), "master_port": self.group_port, "rank_offset": 1,
                     "world_size": world + 1, "packed": True}  # fmt: skip
        torch.cuda.set_device(device)
        with ThreadPoolExecutor(max_workers=1) as pool:  # the server blocks in the rendezvous while answering
            reply = pool.submit(self.server.request, "/init_weight_transfer_engine", {"init_info": init_info},
                                where=" (/init_weight_transfer_engine)", retries=0)  # fmt: skip
            self.communicator = trainer_init(init_info)
            reply.result()

    def _push(self, student: torch.nn.Module, version: str, where: str) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        state = checkpoint_state_dict(student, to_cpu=False)
        if self.communicator is None:
            self._connect(next(iter(state.values())).device)
        update_info = {"names": list(state), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in
                       state.values()], "shapes": [list(t.shape) for t in state.values()]}  # fmt: skip
        request = self.server.request
        request("/pause?mode=wait", {}, where=f" (pausing for the weight sync{where})")
        try:
            request("/start_weight_update", {}, where=where, retries=0)
            with ThreadPoolExecutor(max_workers=1) as pool:  # the workers receive while the request is handled
                reply = pool.submit(request, "/update_weights", {"update_info": update_info}, where=where, retries=0)
                packed_nccl_broadcast_producer(iterator=iter(state.items()), group=self.communicator, src=0,
                                               post_iter_func=lambda item: item[1])  # fmt: skip
                reply.result()
            request("/finish_weight_update", {"weight_version": version}, where=where, retries=0)
        finally:
            request("/resume", {}, where=f" (resuming after the weight sync{where})")


def nccl_available(server: StudentServer, student: torch.nn.Module) -> bool:
    """Whether "auto" picks the NCCL sync: the student on CUDA, vLLM importable here, and the server started with a
    weight-transfer engine (its /server_info reports one)."""
    import importlib.util

    if next(student.parameters()).device.type != "cuda" or importlib.util.find_spec("vllm") is None:
        return False
    try:
        info = server.request("/server_info?config_format=json", where=" (/server_info)")
    except StudentServerError:
        return False
    return bool((info or {}).get("vllm_config", {}).get("weight_transfer_config"))


def weight_sync(args, server: StudentServer, student: torch.nn.Module) -> WeightSync:
    """The sync `args.vllm_sync_backend` names ("auto": NCCL where `nccl_available`, else the file sync)."""
    backend = args.vllm_sync_backend
    if backend == "auto":
        backend = "nccl" if nccl_available(server, student) else "file"
    if backend == "nccl":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ImportError("vllm_sync_backend='nccl' joins vLLM's NCCL group from the training process, which needs "
                              "vLLM installed here too: `pip install vllm` (the version the server runs), or use "
                              "vllm_sync_backend='file'.")
        return NCCLWeightSync(server, args.vllm_sync_steps, args.vllm_sync_dir, args.vllm_group_port)
    return WeightSync(server, args.vllm_sync_steps, args.vllm_sync_dir)
