"""One tiny RLKD run in its own process, which can SIGKILL itself; tests/reliability/test_resume_kill.py launches it.

    python tests/reliability/reliability_worker.py --out /tmp/r --mode mixed --kill-after-step 6
    python tests/reliability/reliability_worker.py --out /tmp/r --mode mixed --resume /tmp/r/run/checkpoint-4
    python tests/reliability/reliability_worker.py --out /tmp/r --teacher-server http://127.0.0.1:8000 \
        --model-dir <the served model's folder>       # the teacher on a vLLM server (tests/teacher/)
    python tests/reliability/reliability_worker.py --out /tmp/r --vllm-server http://127.0.0.1:8001 \
        --student-dir <the student's folder> --model-dir <the teacher's folder>   # the student's rollouts on vLLM

Appends one JSON line per optimizer step to `<out>/steps.jsonl` (fsynced, so a SIGKILL loses nothing written):
the step, its logged loss and a SHA-256 of the step's rollouts (sequences, masks, token sources). At the end
writes the student's weights to `<out>/weights.pt`.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rlkd_onpolicy import RLKDConfig, RLKDTrainer  # noqa: E402


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush: as the OOM killer would


class RecordingTrainer(RLKDTrainer):
    """Hashes each step's rollouts; optionally dies in the middle of writing one checkpoint."""

    kill_in_save_at: int | None = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        digest = hashlib.sha256()
        for batch in batches:
            rollout = batch["rollout"]
            for tensor in (rollout.sequences, rollout.completion_mask, rollout.token_source):
                digest.update(tensor.cpu().contiguous().numpy().tobytes())
        self.step_rollout_hash = digest.hexdigest()
        return batches, num_items

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # Model, optimizer, scheduler and RNG files are written, trainer_state.json is not: die mid-save.
        if self.state.global_step == self.kill_in_save_at:
            _kill_self()


class StepRecorder(TrainerCallback):
    def __init__(self, trainer: RecordingTrainer, path: Path, kill_after_step: int | None):
        self.trainer, self.path, self.kill_after_step = trainer, path, kill_after_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        line = {"step": state.global_step, "loss": logs["loss"], "rollouts": self.trainer.step_rollout_hash}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if state.global_step == self.kill_after_step:
            _kill_self()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="mixed")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--kill-after-step", type=int, default=None, help="SIGKILL right after logging this step")
    parser.add_argument("--kill-in-save", type=int, default=None, help="SIGKILL midway through saving this step")
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'last' (resume_from_checkpoint=True)")
    parser.add_argument("--teacher-server", default=None, help="distil from this vLLM server, not a local teacher")
    parser.add_argument("--model-dir", default=None, help="with --teacher-server: the served model's folder (its "
                        "tokenizer, and a 1-layer student cut from it)")
    parser.add_argument("--vllm-server", default=None, help="use_vllm: the student's rollouts from this vLLM server "
                        "(tests/teacher/), the student from --student-dir, the local teacher from --model-dir")
    parser.add_argument("--student-dir", default=None, help="with --vllm-server: the student's folder")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the runs compared bit for bit must reduce in the same order
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    served = {}
    if args.teacher_server:
        served = dict(teacher_server=args.teacher_server, teacher_top_k=8, teacher_sampling_temperature=1.0)
    if args.vllm_server:
        # the weight file's folder under --out: a SIGKILLed run cannot remove it, the test's tmp folder goes
        served = dict(use_vllm=True, vllm_server_base_url=args.vllm_server, vllm_server_timeout=30.0,
                      vllm_sync_dir=str(out / "vllm_sync"))
    config = RLKDConfig(
        output_dir=str(out / "run"), sampling_mode=args.mode, per_device_train_batch_size=2, max_steps=args.steps,
        learning_rate=5e-3, logging_steps=1, save_strategy="steps", save_steps=args.save_steps, report_to="none",
        seed=0, max_new_tokens=6, skd_top_k=5, skd_draft_len=3, rank_k=3, metric_ks=[1, 3], disable_tqdm=True,
        lmbda=0.5 if args.mode == "mixed" else None, **served,  # lmbda: mixed only (set-but-ignored is refused)
    )
    if args.vllm_server:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        student = AutoModelForCausalLM.from_pretrained(args.student_dir)
        teacher = AutoModelForCausalLM.from_pretrained(args.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    elif args.teacher_server:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlkd_onpolicy.models import student_from_teacher

        student = student_from_teacher(AutoModelForCausalLM.from_pretrained(args.model_dir), layers=1)
        teacher, tokenizer = None, AutoTokenizer.from_pretrained(args.model_dir)
    else:
        student = tiny_llama(64, hidden=32, layers=1, seed=2)
        teacher = tiny_llama(64, hidden=48, layers=2, seed=1, sharpen=4.0)
        tokenizer = tiny_tokenizer()
    trainer = RecordingTrainer(model=student, teacher_model=teacher, args=config, train_dataset=tiny_pairs(12),
                               processing_class=tokenizer)
    trainer.kill_in_save_at = args.kill_in_save
    trainer.add_callback(StepRecorder(trainer, out / "steps.jsonl", args.kill_after_step))
    resume = True if args.resume == "last" else args.resume
    trainer.train(resume_from_checkpoint=resume)
    torch.save({n: p.detach().clone() for n, p in student.named_parameters()}, out / "weights.pt")


if __name__ == "__main__":
    main()
