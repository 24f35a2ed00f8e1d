"""`RLKDTrainer` with use_vllm: the student's rollouts from a real dev-mode vLLM server (conftest.py `vllm_student`,
started on stale weights), its weights synced before the rollouts.

- greedy on-policy training equals the in-process sampler step by step (the same rollouts, losses and weights);
- every generating mode trains (mixed, speculative with a local and with a served teacher, seq_kd);
- faults stop the run before the optimizer step with an error naming the URL and the step: a server that goes
  away, a server restarted mid-run (back on its start-up weights), a server that cannot be reached at construction,
  a served model of another architecture or vocabulary;
- a SIGKILLed run resumes to exactly the uninterrupted run; the CLI trains from configs/train/vllm_student.yaml.
Cost: the server starts once per session (~65 s on 2 idle cores; 2-4 min with other jobs); the tests take ~3 min
more on shared cores (the SIGKILL test ~1 min of it). The teacher-server test shares tests/teacher's server.
"""

import copy
import json
import signal
import urllib.request
from pathlib import Path

import pytest
import torch
from loopback_proxy import LoopbackProxy
from reliability.test_resume_kill import _finish, _start, _steps
from transformers import TrainerCallback

from rlkd_onpolicy.sampling.vllm_client import StudentServerError
from rlkd_onpolicy.teacher.vllm_server import free_port
from rlkd_onpolicy.trainer import RLKDConfig, RLKDTrainer

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    {"prompt": "Translate to French: The cat sleeps.", "completion": " Le chat dort."},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "Once upon a time there lived", "completion": " an old fisherman."},
    {"prompt": "Hello, my name is", "completion": " Anna and I like tea."},
]
COMPARED = ("loss", "kd_loss", "rank_loss", "grad_norm", "completion_tokens", "on_policy_fraction")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stale_teacher(vllm_student):
    """The local teacher of these tests: the server's stale 1-layer model (close to the student, cheap to run)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_student[2].parent / "stale").eval()


def _trainer(tmp_path, smollm2, student, mode, url=None, teacher_server=None, teacher=None,
             **overrides) -> RLKDTrainer:  # fmt: skip
    tokenizer = smollm2[1]
    teacher = teacher if teacher is not None else smollm2[0]
    fields = dict(
        output_dir=str(tmp_path / mode), sampling_mode=mode, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_steps=3, learning_rate=3e-3, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, max_new_tokens=8, temperature=0.0, rank_k=3, metric_ks=[1, 3], skd_top_k=5,
        skd_draft_len=3, teacher_sampling_temperature=0.0, lmbda=0.5 if mode == "mixed" else None, disable_tqdm=True,
        use_vllm=url is not None, vllm_server_base_url=url, vllm_server_timeout=30.0,
    )  # fmt: skip
    if teacher_server is not None:
        fields.update(teacher_server=teacher_server, teacher_top_k=20)
    args = RLKDConfig(**{**fields, **overrides})
    return RLKDTrainer(model=copy.deepcopy(student), teacher_model=None if teacher_server else teacher, args=args,
                       train_dataset=PAIRS, processing_class=tokenizer)  # fmt: skip


def _recording(trainer) -> list:
    """The rollouts of each training step, in order (the trainer's `_rollout` wrapped on the instance)."""
    rollouts, rollout = [], trainer._rollout

    def record(batch):
        out = rollout(batch)
        rollouts.append(out)
        return out

    trainer._rollout = record
    return rollouts


def _logged(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if k in COMPARED} for h in trainer.state.log_history if "loss" in h]


def _greedy_on_server(url: str, prompt: list[int], n: int) -> list[int]:
    body = {"model": _served_model(url), "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["choices"][0]["token_ids"]


def _served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as reply:
        return json.loads(reply.read())["data"][0]["id"]


def _post(url: str, path: str, body: dict) -> None:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).read()


def _restart_state(server, stale_dir: Path) -> None:
    """Put the server in the state a restart leaves it in: its start-up weights, weight version "default"."""
    _post(server.url, "/collective_rpc", {"method": "reload_weights",
                                          "kwargs": {"weights_path": str(stale_dir), "is_checkpoint_format": True}})
    _post(server.url, "/update_weight_version", {"new_version": "default"})


def test_greedy_on_policy_through_vllm_equals_the_in_process_sampler_step_by_step(tmp_path, vllm_student, smollm2,
                                                                                   stale_teacher):
    server, student, folder = vllm_student
    tokenizer = smollm2[1]
    _restart_state(server, folder.parent / "stale")  # a server on stale weights, whatever ran before
    # The stale server's greedy continuation differs from the student's: a rollout without a sync would show it.
    prompt = tokenizer(PAIRS[1]["prompt"])["input_ids"]
    with torch.no_grad():
        local = student.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    assert _greedy_on_server(server.url, prompt, 8) != local
    served = _trainer(tmp_path / "vllm", smollm2, student, "on_policy", url=server.url, teacher=stale_teacher)
    in_process = _trainer(tmp_path / "local", smollm2, student, "on_policy", teacher=stale_teacher)
    got, expected = _recording(served), _recording(in_process)
    served.train()
    in_process.train()
    assert len(got) == len(expected) == 3
    for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        assert torch.equal(a.sequences, b.sequences), f"step {step}: other rollouts"
        assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.token_source, b.token_source)
        assert "vllm_sync_seconds" in a.stats, f"step {step}: no weight sync before the rollout"
    for step, (a, b) in enumerate(zip(_logged(served), _logged(in_process), strict=True), start=1):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), f"step {step} {key}: {a[key]} vs {b[key]}"
    for (name, p), q in zip(served.model.named_parameters(), in_process.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    logged = [h for h in served.state.log_history if "loss" in h]
    assert all(h["vllm_sync_seconds"] > 0 and h["rollout_seconds"] > 0 for h in logged)


# What each case is for: mixed (coins + server rows), speculative with a local teacher verifying the server's drafts,
# seq_kd (the teacher generates: the server is never synced).
@pytest.mark.parametrize("mode", ["mixed", "speculative", "seq_kd"])
def test_every_mode_trains_with_the_student_on_vllm(tmp_path, vllm_student, smollm2, stale_teacher, mode):
    server, student, _ = vllm_student
    trainer = _trainer(tmp_path, smollm2, student, mode, url=server.url, max_steps=1, temperature=1.0,
                       teacher=stale_teacher)
    rollouts = _recording(trainer)
    trainer.train()
    logged = _logged(trainer)
    assert len(logged) == 1 and torch.isfinite(torch.tensor(logged[0]["loss"]))
    assert int(rollouts[0].sequences.max()) < len(smollm2[1])  # no padding row of the output layer
    assert ("vllm_sync_seconds" in rollouts[0].stats) == (mode != "seq_kd")
    if mode == "speculative":
        assert all(0 <= r.stats["acceptance_rate"] <= 1 for r in rollouts)


# speculative: drafts from the student's server, verification by the teacher's; seq_kd: the teacher's server samples
# and the student's is never synced.
@pytest.mark.parametrize("mode", ["speculative", "seq_kd"])
def test_the_student_and_the_teacher_both_on_vllm(tmp_path, vllm_student, vllm_server, smollm2, mode):
    server, student, _ = vllm_student
    trainer = _trainer(tmp_path, smollm2, student, mode, url=server.url, teacher_server=vllm_server.url,
                       max_steps=1, temperature=1.0)  # fmt: skip
    rollouts = _recording(trainer)
    trainer.train()
    if mode == "speculative":
        assert rollouts[0].stats["teacher_requests"] > 0 and "vllm_sync_seconds" in rollouts[0].stats
    else:
        assert "vllm_sync_seconds" not in rollouts[0].stats and rollouts[0].stats["generated_tokens"] > 0
    assert torch.isfinite(torch.tensor(_logged(trainer)[0]["loss"]))


class _AfterStep(TrainerCallback):
    """Runs `action` after optimizer step `step` and keeps the weights of that step."""

    def __init__(self, step, action):
        self.step, self.action, self.weights = step, action, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.action()


def _unchanged_since(trainer, after: _AfterStep) -> None:
    assert trainer.state.global_step == after.step
    for name, param in trainer.model.named_parameters():  # the failing step's optimizer step never ran
        assert torch.equal(param, after.weights[name]), name


def test_server_gone_mid_run_stops_before_the_optimizer_step(tmp_path, vllm_student, smollm2, stale_teacher):
    server, student, _ = vllm_student
    proxy = LoopbackProxy(server.port)
    trainer = _trainer(tmp_path, smollm2, student, "on_policy", url=proxy.url, teacher=stale_teacher)
    after = _AfterStep(1, proxy.close)
    trainer.add_callback(after)
    with pytest.raises(StudentServerError, match=rf"vLLM server at {proxy.url}/weight_info did not answer at "
                       r"training step 2 after 3 attempt\(s\).*Connection ?Refused"):  # fmt: skip
        trainer.train()
    _unchanged_since(trainer, after)


def test_server_restarted_mid_run_is_caught(tmp_path, vllm_student, smollm2, stale_teacher):
    """A server restarted between two syncs (vllm_sync_steps=2) holds its start-up weights again: stop, not train
    on rollouts of other weights."""
    server, student, folder = vllm_student
    trainer = _trainer(tmp_path, smollm2, student, "on_policy", url=server.url, vllm_sync_steps=2,
                       teacher=stale_teacher)
    after = _AfterStep(2, lambda: _restart_state(server, folder.parent / "stale"))
    trainer.add_callback(after)
    with pytest.raises(StudentServerError, match=rf"vLLM server at {server.url} no longer holds the weights the "
                       r"trainer synced at training step 3: its weight version is 'default'"):  # fmt: skip
        trainer.train()
    _unchanged_since(trainer, after)


def test_construction_checks_the_server(tmp_path, vllm_student, smollm2):
    server, student, _ = vllm_student
    teacher, tokenizer, _ = smollm2
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StudentServerError, match=rf"{down} did not answer /health within vllm_server_timeout=2 s"):
        _trainer(tmp_path, smollm2, student, "on_policy", url=down, vllm_server_timeout=2.0)
    from rlkd_onpolicy.models import student_from_teacher

    two_layers = student_from_teacher(teacher, layers=2)
    two_layers.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)
    with pytest.raises(StudentServerError, match=r"num_hidden_layers: .* serves a model with num_hidden_layers=1, "
                       r"the student has num_hidden_layers=2"):  # fmt: skip
        _trainer(tmp_path, smollm2, two_layers, "on_policy", url=server.url)
    no_padding = student_from_teacher(teacher, layers=1)  # 49,152 output rows; the server's model has 49,216
    with pytest.raises(StudentServerError, match=r"vocab_size: .* serves a model with vocab_size=49216, the "
                       r"student has vocab_size=49152"):  # fmt: skip
        _trainer(tmp_path, smollm2, no_padding, "on_policy", url=server.url)


@pytest.mark.slow
def test_sigkill_and_resume_with_vllm_rollouts_equals_the_uninterrupted_run(tmp_path, vllm_student):
    """On-policy at temperature 1 (vLLM's per-request seeds = the rollout RNG's row seeds), a checkpoint every 2
    steps: a run SIGKILLed after logging step 4 (uninterrupted up to there) and the same run resumed from its
    checkpoint-2 log the same rollouts (hashed) and losses at steps 3 and 4. Two processes, ~1 min."""
    server, _, folder = vllm_student
    args = ("--vllm-server", server.url, "--student-dir", str(folder), "--model-dir", str(folder.parent / "stale"),
            "--mode", "on_policy", "--steps", "5", "--save-steps", "2")  # fmt: skip
    killed = tmp_path / "killed"
    _finish(_start(killed, *args, "--kill-after-step", "4"), expect=-signal.SIGKILL)
    uninterrupted = _steps(killed)
    assert [s["step"] for s in uninterrupted] == [1, 2, 3, 4]
    _finish(_start(killed, *args, "--resume", str(killed / "run" / "checkpoint-2")))
    resumed = _steps(killed)[4:]
    assert [s["step"] for s in resumed] == [3, 4, 5]
    assert resumed[:2] == uninterrupted[2:], "steps 3 and 4 differ after resume"


def test_cli_trains_from_the_vllm_student_yaml(tmp_path, vllm_student, smollm2):
    """configs/train/vllm_student.yaml with the models and data pointed at local files and the test server."""
    from rlkd_onpolicy.train import main

    server, _, folder = vllm_student
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in PAIRS))
    main(["--config", str(ROOT / "configs" / "train" / "vllm_student.yaml"), "--student_model", str(folder),
          "--teacher_model", str(folder.parent / "stale"), "--dataset_name", str(data),
          "--output_dir", str(tmp_path / "out"),
          "--vllm_server_base_url", server.url, "--max_steps", "1", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "1", "--max_new_tokens", "4", "--bf16", "false",
          "--save_strategy", "no"])  # fmt: skip
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_sync_failing_stops_before_the_optimizer_step(tmp_path, vllm_student, smollm2, stale_teacher):
    """The server answers but cannot reload (the weight file is corrupt): the reload's error. Last in this file: a
    failed reload leaves vLLM 0.32's engine dead, so the session's server is unusable afterwards."""
    server, student, _ = vllm_student
    trainer = _trainer(tmp_path, smollm2, student, "on_policy", url=server.url, teacher=stale_teacher)
    sync = trainer.rollouts.weight_sync
    after = _AfterStep(1, lambda: setattr(sync, "_write", lambda module: sync.folder.joinpath("model.safetensors")
                                          .write_bytes(b"not a safetensors file")))  # fmt: skip
    trainer.add_callback(after)
    with pytest.raises(StudentServerError, match=rf"Syncing the student's weights failed at training step 2: .*"
                       rf"{server.url}/collective_rpc"):  # fmt: skip
        trainer.train()
    _unchanged_since(trainer, after)
