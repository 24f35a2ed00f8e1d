"""Sampling for on-policy and speculative distillation: every mode produces a `Rollout`.

from rlkd_onpolicy.sampling import RolloutSampler, SamplingSpec
spec = SamplingSpec("speculative", skd_top_k=25, temperature=0.9)  # every option of the rollout, validated
sampler = RolloutSampler(spec, student, teacher, eos_token_id=eos, pad_token_id=pad)
rollout = sampler.rollout(prompt_ids, prompt_mask, generator=torch.Generator().manual_seed(0))
"""

from .generate import decode, reference_generate
from .modes import RolloutSampler
from .rng import STREAM_STUDENT, STREAM_TEACHER, draw_row_seeds, row_uniforms
from .rollout import SOURCE_DATA, SOURCE_NONE, SOURCE_STUDENT, SOURCE_TEACHER, Rollout
from .spec import CACHE_IMPLEMENTATIONS, SAMPLING_MODES, VERIFY_ON, SamplingSpec
from .speculative import reference_speculative_generate, speculative_generate, topk_accept, verify_drafts
from .warping import sample_from_logits, warp_probs

__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "SAMPLING_MODES",
    "SOURCE_DATA",
    "SOURCE_NONE",
    "SOURCE_STUDENT",
    "SOURCE_TEACHER",
    "STREAM_STUDENT",
    "STREAM_TEACHER",
    "VERIFY_ON",
    "Rollout",
    "RolloutSampler",
    "SamplingSpec",
    "decode",
    "draw_row_seeds",
    "reference_generate",
    "reference_speculative_generate",
    "row_uniforms",
    "sample_from_logits",
    "speculative_generate",
    "topk_accept",
    "verify_drafts",
    "warp_probs",
]
