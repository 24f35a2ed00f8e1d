"""A run SIGKILLed midway resumes to exactly the run that was never interrupted (weights, losses, rollouts).

Each run is a separate process (tests/reliability/reliability_worker.py): 12 optimizer steps of 2 sequences over 12
examples (two epochs), a checkpoint every 4 steps. The worker writes one fsynced JSON line per step (loss and a hash
of that step's rollouts), so what a killed process wrote is on disk. One thread per process: bit-for-bit equality
needs the same reduction order in every run.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "reliability" / "reliability_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *extra], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, expect: int = 0) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == expect, f"worker exited with {process.returncode}, not {expect}:\n{output[-4000:]}"


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a / "weights.pt"), torch.load(b / "weights.pt")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted 12-step runs, one per mode, shared by the tests of this module; both start at once, in
    parallel with the runs to be killed (the machine has two cores)."""
    root = tmp_path_factory.mktemp("reference")
    running: dict[str, subprocess.Popen] = {}

    def start(mode: str) -> None:
        if mode not in running:
            running[mode] = _start(root / mode, "--mode", mode)

    def get(mode: str) -> Path:
        start(mode)
        if running[mode].returncode is None:
            _finish(running[mode])
        return root / mode

    for mode in ("mixed", "speculative"):
        start(mode)
    return get


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mixed", "speculative"])  # λ coins / SKD replacements draw from the rollout RNG
def test_sigkill_after_step_6_resumes_to_the_uninterrupted_run(tmp_path, references, mode):
    out = tmp_path / "killed"
    _finish(_start(out, "--mode", mode, "--kill-after-step", "6"), expect=-signal.SIGKILL)
    assert [s["step"] for s in _steps(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "run").iterdir()) == ["checkpoint-4"]

    _finish(_start(out, "--mode", mode, "--resume", str(out / "run" / "checkpoint-4")))
    reference = references(mode)
    expected = _steps(reference)
    assert [s["step"] for s in expected] == list(range(1, 13))
    # killed run: steps 1-6; resumed run: steps 5-12 again. Every line must equal the reference's line.
    got = _steps(out)
    assert [s["step"] for s in got] == [1, 2, 3, 4, 5, 6, *range(5, 13)]
    for line in got:
        assert line == expected[line["step"] - 1], f"step {line['step']} differs after resume"
    _assert_same_weights(out, reference)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, references):
    out = tmp_path / "killed"
    # dies after writing checkpoint 8's model, optimizer, scheduler and RNG files, before trainer_state.json
    _finish(_start(out, "--mode", "mixed", "--kill-in-save", "8"), expect=-signal.SIGKILL)
    run = out / "run"
    assert sorted(p.name for p in run.iterdir()) == ["_staging-checkpoint-8", "checkpoint-4"]
    assert (run / "_staging-checkpoint-8" / "model.safetensors").is_file()
    assert not (run / "_staging-checkpoint-8" / "trainer_state.json").exists()
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")

    _finish(_start(out, "--mode", "mixed", "--resume", "last"))  # resume_from_checkpoint=True
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    got = _steps(out)
    assert [s["step"] for s in got] == [*range(1, 9), *range(5, 13)]  # resumed from 4, not from the partial 8
    expected = _steps(references("mixed"))
    for line in got:
        assert line == expected[line["step"] - 1], f"step {line['step']} differs after resume"
    _assert_same_weights(out, references("mixed"))
