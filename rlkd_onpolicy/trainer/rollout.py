"""The rollout step: a batch's prompts (and dataset completions) become a `Rollout`, built with the models as they
generate (unwrapped; under ZeRO-3 the student's and, where the teacher decodes, the teacher's weights gathered)."""

import torch
from accelerate.utils import DistributedType

from rlkd_onpolicy.sampling import Rollout, RolloutSampler
from rlkd_onpolicy.sampling.generate import model_device
from rlkd_onpolicy.sampling.graphs import graphable
from rlkd_onpolicy.sampling.spec import SamplingSpec
from rlkd_onpolicy.teacher.served import ServedTeacher
from rlkd_onpolicy.teacher.served_sampling import SERVED_SAMPLING_MODES, ServedRolloutSampler
from rlkd_onpolicy.trainer.config import RLKDConfig
from rlkd_onpolicy.trainer.deepspeed import teacher_for_generation

TEACHER_DECODES = ("seq_kd", "speculative")  # the modes in which the teacher takes part in sampling
STUDENT_GENERATES = ("on_policy", "mixed", "speculative")  # the modes in which the student generates (use_vllm)


def rollout_mode(args: RLKDConfig) -> str:
    """The sampler's mode: with a cache both off_policy and seq_kd train on the cached (dataset or teacher-made)
    completions, so the rollout is the dataset's."""
    return "off_policy" if args.teacher_cache is not None else args.sampling_mode


def resolve_generation_cache(setting: str, mode: str, student, teacher, distributed_type) -> str:
    """RLKDConfig.generation_cache -> the sampler's cache_implementation. "auto" picks "cuda_graph" when the
    student (and, for seq_kd / speculative, the teacher) sits on a CUDA device whole, i.e. one process or DDP,
    and its decode step can be captured (sdpa/eager attention, full-attention layers); else "dynamic"."""
    if setting != "auto":
        return setting
    models = [student] + ([teacher] if mode in TEACHER_DECODES and teacher is not None else [])
    whole = distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
    if whole and all(model_device(m).type == "cuda" and graphable(m) for m in models):
        return "cuda_graph"
    return "dynamic"


def build_sampler(
    spec: SamplingSpec,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    *,
    served_teacher: ServedTeacher | None,
    vocab_size: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    student_server=None,
    where: str = "",
) -> RolloutSampler | ServedRolloutSampler:
    """The sampler of `spec` for these models: a `ServedRolloutSampler` where a served teacher takes part in
    sampling, else a `RolloutSampler` (`teacher` the local teacher module, or None); with `student_server` (use_vllm)
    their vLLM variants, whose student generations come from that server (sampling/vllm_sampler.py)."""
    if student_server is not None and spec.mode in STUDENT_GENERATES:
        from rlkd_onpolicy.sampling import vllm_sampler

        kwargs = dict(server=student_server, where=where, vocab_size=vocab_size, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id)  # fmt: skip
        if spec.mode != "speculative":
            return vllm_sampler.VLLMRolloutSampler(spec, student, teacher, **kwargs)
        if served_teacher is not None:
            return vllm_sampler.VLLMServedSpeculativeSampler(spec, student, served_teacher, **kwargs)
        return vllm_sampler.VLLMSpeculativeSampler(spec, student, teacher, **kwargs)
    if served_teacher is not None and spec.mode in SERVED_SAMPLING_MODES:
        return ServedRolloutSampler(spec, student, served_teacher, vocab_size=vocab_size, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id)  # fmt: skip
    return RolloutSampler(spec, student, teacher, vocab_size=vocab_size, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id)  # fmt: skip


class Rollouts:
    """Builds each rollout with a sampler made for that call from the models as they generate: the samplers hold
    their models, and the models are only gathered (ZeRO-3) inside the call. Making one is cheap (settings and
    shape checks; CUDA graphs are kept per model, not per sampler)."""

    def __init__(self, args: RLKDConfig, mode: str, *, served_teacher: ServedTeacher | None, vocab_size: int,
                 cache_implementation: str, eos_token_id: int | None, pad_token_id: int | None,
                 student_server=None, student: torch.nn.Module | None = None):  # fmt: skip
        self.spec = args.sampling_spec(mode, cache_implementation)  # validated once, shared by every rollout
        self.mode, self.served_teacher, self.vocab_size = mode, served_teacher, vocab_size
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        # use_vllm: the student generates on its server, whose weights are pushed first (vllm_sync.py); seq_kd and
        # off_policy rollouts have no student generation, so nothing is pushed for them.
        self.student_server, self.weight_sync, self._where = student_server, None, ""
        if student_server is not None and mode in STUDENT_GENERATES:
            from rlkd_onpolicy.trainer.vllm_sync import weight_sync

            self.weight_sync = weight_sync(args, student_server, student)

    def sampler(
        self, student: torch.nn.Module, teacher: torch.nn.Module | None
    ) -> RolloutSampler | ServedRolloutSampler:
        return build_sampler(self.spec, student, teacher, served_teacher=self.served_teacher,
                             vocab_size=self.vocab_size, eos_token_id=self.eos_token_id,
                             pad_token_id=self.pad_token_id, student_server=self.student_server,
                             where=self._where)  # fmt: skip

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], student, teacher, accelerator, generator,
                 weights_step: int = 0, step: int | None = None) -> Rollout:  # fmt: skip
        """`student` the trained (wrapped) model, `teacher` the placed local teacher or None; row seeds and mixed
        mode's coins come from `generator`. With use_vllm, `weights_step` (optimizer steps applied) decides whether
        the weights are pushed first, and `step` (the training step, None in evaluation) is named in errors."""
        from trl.models.utils import unwrap_model_for_generation

        if self.weight_sync is not None:
            self._where = " (evaluation)" if step is None else f" at training step {step}"
            seconds = self.weight_sync.before_rollout(accelerator.unwrap_model(student), accelerator, weights_step,
                                                      self._where)  # fmt: skip
            # the server generates: the student module only gives the sampler its settings (no ZeRO-3 gather)
            local_teacher = None if teacher is None else accelerator.unwrap_model(teacher)
            if self.mode == "speculative" and teacher is not None:
                with teacher_for_generation(teacher, accelerator) as local_teacher:
                    rollout = self._sample(batch, accelerator.unwrap_model(student), local_teacher, generator)
            else:
                rollout = self._sample(batch, accelerator.unwrap_model(student), local_teacher, generator)
            rollout.stats["rollout_seconds"] = rollout.stats.get("seconds", 0.0)
            if seconds is not None:
                rollout.stats["vllm_sync_seconds"] = seconds
            return rollout
        with unwrap_model_for_generation(student, accelerator) as student:
            if self.mode in TEACHER_DECODES and teacher is not None:
                with teacher_for_generation(teacher, accelerator) as teacher:
                    return self._sample(batch, student, teacher, generator)
            return self._sample(batch, student, None if teacher is None else accelerator.unwrap_model(teacher),
                                generator)  # fmt: skip

    def _sample(self, batch, student, teacher, generator) -> Rollout:
        return self.sampler(student, teacher).rollout(
            batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"],
            generator=generator,
        )  # fmt: skip
