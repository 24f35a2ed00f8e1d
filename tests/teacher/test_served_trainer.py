"""`RLKDTrainer` with `teacher_server`: training against the session's real vLLM server (conftest.py) equals training
with the same model as a local teacher cut to the same top-K with its tail, in every sampling mode; a server that
goes away mid-run stops it before the optimizer step, naming the URL and the step; a SIGKILLed run with a served
teacher resumes to exactly the uninterrupted run (tests/reliability/reliability_worker.py, as for a local teacher).
"""

import signal
from pathlib import Path

import pytest
import torch
from loopback_proxy import LoopbackProxy
from reliability.test_resume_kill import _assert_same_weights, _finish, _start, _steps
from transformers import TrainerCallback

from rlkd_onpolicy.models import student_from_teacher
from rlkd_onpolicy.teacher import TeacherServerError
from rlkd_onpolicy.trainer import RLKDConfig, RLKDTrainer

ROOT = Path(__file__).resolve().parents[2]
K = 20
PAIRS = [
    {"prompt": "Translate to French: The cat sleeps.", "completion": " Le chat dort."},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "Once upon a time there lived", "completion": " an old fisherman."},
    {"prompt": "Hello, my name is", "completion": " Anna and I like tea."},
]
# Logged per step and compared between the served and the local teacher (timings excluded).
COMPARED = ("loss", "kd_loss", "rank_loss", "grad_norm", "completion_tokens", "acceptance_rate", "on_policy_fraction")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, smollm2, mode, server=None, **overrides) -> RLKDTrainer:
    teacher, tokenizer, _ = smollm2
    # One row per micro-batch: the trainer's local teacher runs the padded batch with position ids 0…T-1, while the
    # server gets each row without its padding; with one row there is no padding and both see the same positions.
    fields = dict(
        output_dir=str(tmp_path / mode), sampling_mode=mode, per_device_train_batch_size=1,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-4, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, max_new_tokens=6, teacher_top_k=K, skd_top_k=5, skd_draft_len=3, rank_k=3,
        metric_ks=[1, 3], teacher_sampling_temperature=0.0, lmbda=0.5 if mode == "mixed" else None, disable_tqdm=True,
        teacher_server=server,
        teacher_server_retries=1, teacher_server_backoff=0.1,
    )  # fmt: skip
    args = RLKDConfig(**{**fields, **overrides})
    return RLKDTrainer(model=student_from_teacher(teacher, layers=1), teacher_model=None if server else teacher,
                       args=args, train_dataset=PAIRS, processing_class=tokenizer)  # fmt: skip


def _logged(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if k in COMPARED} for h in trainer.state.log_history if "loss" in h]


# Greedy teacher samples (teacher_sampling_temperature=0): seq_kd and the SKD replacements are then the same tokens
# whether the server or the local model draws them; the student's samples come from the same row seeds either way.
@pytest.mark.parametrize("mode", ["off_policy", "on_policy", "mixed", "seq_kd", "speculative"])
def test_training_with_a_served_teacher_equals_the_local_sparse_teacher(tmp_path, vllm_server, smollm2, mode):
    served = _trainer(tmp_path / "served", smollm2, mode, server=vllm_server.url)
    local = _trainer(tmp_path / "local", smollm2, mode)
    assert served.teacher is None and served.served_teacher.info.url == vllm_server.url
    served.train()
    local.train()
    got, expected = _logged(served), _logged(local)
    assert len(got) == 2 and [h.keys() for h in got] == [h.keys() for h in expected]
    for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        assert a["completion_tokens"] == b["completion_tokens"], f"step {step}: other rollouts"
        for key in a:  # the tail from the top-K vs from the full distribution: ~1e-4 relative (docs)
            assert a[key] == pytest.approx(b[key], rel=2e-3, abs=1e-5), f"step {step} {key}: {a[key]} vs {b[key]}"
    if mode == "speculative":
        assert 0 < got[0]["acceptance_rate"] < 1  # drafts kept and drafts replaced by the teacher


class _CloseAfterStep(TrainerCallback):
    """Stops the server (closes the proxy's port) after optimizer step `step`; keeps the weights of that step."""

    def __init__(self, proxy, step):
        self.proxy, self.step, self.weights = proxy, step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.proxy.close()


def test_server_stopped_mid_run_stops_before_the_optimizer_step(tmp_path, vllm_server, smollm2):
    proxy = LoopbackProxy(vllm_server.port)
    trainer = _trainer(tmp_path, smollm2, "on_policy", server=proxy.url, max_steps=3)
    closer = _CloseAfterStep(proxy, step=1)
    trainer.add_callback(closer)
    with pytest.raises(TeacherServerError, match=rf"{proxy.url}/v1/completions did not answer at training step 2 "
                       r"after 2 attempt\(s\).*Connection ?Refused"):  # fmt: skip
        trainer.train()
    assert trainer.state.global_step == 1
    for name, param in trainer.model.named_parameters():  # step 2's optimizer step never ran
        assert torch.equal(param, closer.weights[name]), name


@pytest.mark.slow
def test_sigkill_and_resume_with_a_served_teacher_equals_the_uninterrupted_run(tmp_path, vllm_server, smollm2):
    """Speculative KD with sampled teacher replacements (server-side seeds derived from the rollout RNG's row seeds)
    and student drafts: 6 steps, a checkpoint every 2, killed after step 3, resumed from checkpoint-2."""
    served = ("--teacher-server", vllm_server.url, "--model-dir", str(smollm2[2]), "--mode", "speculative",
              "--steps", "6", "--save-steps", "2")  # fmt: skip
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    running = _start(reference, *served)  # in parallel with the run to be killed (two cores)
    _finish(_start(killed, *served, "--kill-after-step", "3"), expect=-signal.SIGKILL)
    assert [s["step"] for s in _steps(killed)] == [1, 2, 3]
    _finish(_start(killed, *served, "--resume", str(killed / "run" / "checkpoint-2")))
    _finish(running)
    expected = _steps(reference)
    got = _steps(killed)
    assert [s["step"] for s in got] == [1, 2, 3, 3, 4, 5, 6]
    assert [s["step"] for s in expected] == list(range(1, 7))
    for line in got:
        assert line == expected[line["step"] - 1], f"step {line['step']} differs after resume"
    _assert_same_weights(killed, reference)


def test_cli_trains_from_the_served_teacher_yaml_against_the_server(tmp_path, vllm_server, smollm2):
    """configs/train/served_teacher.yaml with the model, data and server flags pointed at local files and the test
    server: `python -m rlkd_onpolicy.train --config … --teacher_server URL --teacher_top_k 20` trains and saves."""
    import json

    from rlkd_onpolicy.train import main

    teacher, tokenizer, _ = smollm2
    student_from_teacher(teacher, layers=1).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in PAIRS))
    yaml_file = ROOT / "configs" / "train" / "served_teacher.yaml"
    main(["--config", str(yaml_file), "--student_model", str(tmp_path / "student"), "--dataset_name", str(data),
          "--output_dir", str(tmp_path / "out"), "--teacher_server", vllm_server.url, "--teacher_top_k", "20",
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
          "--max_new_tokens", "4", "--bf16", "false", "--save_strategy", "no"])  # fmt: skip
    assert (tmp_path / "out" / "model.safetensors").exists()
