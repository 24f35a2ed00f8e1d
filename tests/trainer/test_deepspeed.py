"""DeepSpeed ZeRO-3 in two processes on the CPU (gloo) against one process without DeepSpeed.

Both runs see the same 3 optimizer steps of 4 sequences (2 ranks × 2, or 1 × 4) and the same AdamW
(`torch_adam`). The loss is normalised by the global completion-token count, so the two must agree up to float
rounding of the sharded reductions: we allow 1e-5 on the weights (seen: ~3e-7) and 1e-5 relative on the losses.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "trainer" / "deepspeed_worker.py"
CONFIG = ROOT / "configs" / "deepspeed" / "zero3.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def _torchrun(out: Path, *extra: str) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    _run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER),
          "--out", str(out), "--deepspeed", str(CONFIG), *extra])


@pytest.mark.slow
def test_zero3_two_processes_match_one_process(tmp_path):
    _torchrun(tmp_path / "zero3")
    _run([sys.executable, str(WORKER), "--out", str(tmp_path / "single"), "--batch", "4"])
    sharded = torch.load(tmp_path / "zero3" / "weights.pt")
    single = torch.load(tmp_path / "single" / "weights.pt")
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        assert sharded[name].shape == value.shape, name
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5, msg=name)
    losses_sharded = json.loads((tmp_path / "zero3" / "losses.json").read_text())["losses"]
    losses_single = json.loads((tmp_path / "single" / "losses.json").read_text())["losses"]
    assert len(losses_single) == 3 and losses_single[0] != losses_single[-1]
    torch.testing.assert_close(torch.tensor(losses_sharded), torch.tensor(losses_single), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zero3_speculative_generation_gathers_the_teacher(tmp_path):
    # SKD decodes with both models under ZeRO-3: the sharded teacher must be gathered for generation
    _torchrun(tmp_path / "skd", "--mode", "speculative")
    record = json.loads((tmp_path / "skd" / "losses.json").read_text())
    assert len(record["losses"]) == 3 and all(torch.isfinite(torch.tensor(record["losses"])))
    assert all(0.0 <= e["acceptance_rate"] <= 1.0 for e in record["extras"])
