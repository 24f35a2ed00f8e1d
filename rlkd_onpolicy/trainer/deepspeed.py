"""The teacher under DeepSpeed: an inference-only engine, sharded under ZeRO-3, a plain replica otherwise.

Mirrors what TRL's `prepare_deepspeed` does for reference models (read there, written here) and adds parameter
offload to the CPU, for teachers that fit neither on one GPU nor sharded beside the student.
"""

from contextlib import contextmanager
from copy import deepcopy

import torch


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) == 3


def prepare_teacher(teacher: torch.nn.Module, accelerator, offload_to_cpu: bool = False):
    """Wrap `teacher` in a DeepSpeed inference engine built from the run's DeepSpeed config."""
    import deepspeed

    config = deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    # No optimizer for the teacher: drop the training-only blocks, or DeepSpeed would build them.
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero.pop("offload_optimizer", None)
    # The batch size means nothing to an engine that only runs forward passes, but DeepSpeed checks that
    # train = micro × accumulation × world; the filled-in value may predate the launch's world size.
    config.pop("train_batch_size", None)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(config.get(key), int):
            config[key] = 1
    if zero.get("stage", 0) == 3:
        hidden = getattr(teacher.config, "hidden_size", None)
        if hidden is not None:
            zero.update(
                reduce_bucket_size=hidden * hidden,
                stage3_param_persistence_threshold=10 * hidden,
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            )
        if offload_to_cpu:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        if offload_to_cpu:
            raise ValueError(
                "teacher_offload_to_cpu needs DeepSpeed ZeRO-3 (configs/accelerate/zero3_teacher_offload.yaml); "
                f"this run uses stage {zero.get('stage', 0)}."
            )
        zero["stage"] = 0  # below ZeRO-3 the teacher is a replica on every rank
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


@contextmanager
def teacher_for_generation(teacher, accelerator):
    """Yield the teacher module with full weights for decoding: gathered once under ZeRO-3 rather than per layer
    per decoding step. TRL's `unwrap_model_for_generation` cannot be used: it needs an engine with an optimizer."""
    module = accelerator.unwrap_model(teacher)
    if is_zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield module
    else:
        yield module
