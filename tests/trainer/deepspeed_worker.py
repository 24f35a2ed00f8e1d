"""One tiny RLKD training run, with or without DeepSpeed; tests/trainer/test_deepspeed.py launches it.

    torchrun --nproc_per_node 2 tests/trainer/deepspeed_worker.py --out /tmp/ds --deepspeed configs/deepspeed/zero3.json
    python tests/trainer/deepspeed_worker.py --out /tmp/single --batch 4

Writes `weights.pt` (the student's full weights after training, gathered under ZeRO-3) and `losses.json`.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer  # noqa: E402

from rlkd_onpolicy import RLKDConfig, RLKDTrainer  # noqa: E402


def configure_cpu_deepspeed_state() -> None:
    """Tell accelerate about a DeepSpeed launch on CPUs.

    accelerate only picks a communication backend for DeepSpeed on an accelerator (on a CPU-only machine it falls
    back to "no distribution" and a world size of 1). We start DeepSpeed's gloo process group ourselves and hand
    accelerate the resulting state (`use_configured_state`); DeepSpeed ZeRO-3 itself runs unchanged.
    """
    import deepspeed
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState()
    state.backend = "gloo"
    state.distributed_type = DistributedType.DEEPSPEED
    state.num_processes = torch.distributed.get_world_size()
    state.process_index = torch.distributed.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))
    state.device = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config")
    parser.add_argument("--batch", type=int, default=2, help="per-device batch size")
    parser.add_argument("--mode", default="off_policy")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    out = Path(args.out)
    cpu_deepspeed = bool(args.deepspeed) and not torch.cuda.is_available()
    if cpu_deepspeed:
        configure_cpu_deepspeed_state()
    config = RLKDConfig(
        output_dir=str(out / "run"), sampling_mode=args.mode, per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=0, max_new_tokens=5,
        skd_top_k=5, skd_draft_len=3, rank_k=3, metric_ks=[1, 3], deepspeed=args.deepspeed,
        accelerator_config={"use_configured_state": True} if cpu_deepspeed else None, disable_tqdm=True,
    )
    student = tiny_llama(64, hidden=32, layers=2, seed=2)
    teacher = tiny_llama(64, hidden=48, layers=2, seed=1, sharpen=4.0)
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=tiny_pairs(16),
                          processing_class=tiny_tokenizer())
    trainer.train()

    params = list(trainer.model.parameters())
    if args.deepspeed:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    else:
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, out / "weights.pt")
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        extras = [{k: v for k, v in e.items() if k in ("acceptance_rate", "kd_loss")}
                  for e in trainer.state.log_history if "loss" in e]
        (out / "losses.json").write_text(json.dumps({"losses": losses, "extras": extras}))


if __name__ == "__main__":
    main()
