"""SamplingSpec: one default per option, each range checked once, the error naming the field; the samplers take it."""

import pytest
import torch
from sampling_models import ragged_prompts, tiny_llama

from rlkd_onpolicy import RLKDConfig
from rlkd_onpolicy.sampling import RolloutSampler, SamplingSpec, speculative_generate


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("mode", "greedy", "unknown sampling mode; use one of"),
        ("lmbda", 1.5, r"it must be in \[0, 1\]"),
        ("max_new_tokens", 0, "it must be an int ≥ 1"),
        ("temperature", -0.5, r"it must be ≥ 0 \(0 = argmax\)"),
        ("top_p", 0.0, r"it must be in \(0, 1\]"),
        ("teacher_temperature", float("nan"), "it must be a finite number"),
        ("teacher_top_p", 1.5, r"it must be in \(0, 1\]"),
        ("skd_top_k", 0, "it must be an int ≥ 1"),
        ("skd_draft_len", 2.0, "it must be an int ≥ 1"),
        ("skd_verify_on", "both", r"use one of \('raw', 'warped'\)"),
        ("cache_implementation", "paged", "use one of"),
        ("graph_sampling", True, "graph_sampling=True needs cache_implementation='cuda_graph'"),  # with "dynamic"
    ],
)
def test_bad_field_is_named_with_its_value(field, value, rule):
    options = {"mode": "speculative", field: value}
    with pytest.raises(ValueError, match=rf"SamplingSpec\.{field}={value!r} is invalid: {rule}"):
        SamplingSpec(**options)


def test_samplers_take_the_spec_whole_and_read_its_fields():
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=64)
    spec = SamplingSpec("speculative", max_new_tokens=3, skd_top_k=4, skd_draft_len=2, temperature=0.8)
    sampler = RolloutSampler(spec, student, teacher)
    assert sampler.spec is spec and sampler.temperature == 0.8 and sampler.mode == "speculative"
    sampler.temperature = 0.5  # a validated copy replaces the spec
    assert sampler.spec == SamplingSpec("speculative", max_new_tokens=3, skd_top_k=4, skd_draft_len=2,
                                        temperature=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="SamplingSpec.temperature=-1 is invalid"):
        sampler.temperature = -1
    with pytest.raises(ValueError, match="not both"):
        RolloutSampler(spec, student, teacher, temperature=0.9)
    ids, mask = ragged_prompts([3, 2], seed=1)
    seeds = torch.tensor([5, 6])
    by_spec = speculative_generate(student, teacher, ids, mask, sampler.spec, row_seeds=seeds)
    by_keywords = speculative_generate(student, teacher, ids, mask, max_new_tokens=3, top_k=4, draft_len=2,
                                       temperature=0.5, row_seeds=seeds)  # fmt: skip
    assert torch.equal(by_spec.sequences, by_keywords.sequences)
    with pytest.raises(ValueError, match="mode='speculative', not 'on_policy'"):
        speculative_generate(student, teacher, ids, mask, SamplingSpec("on_policy"))


def test_config_builds_the_spec_and_names_its_own_fields(tmp_path):
    def config(**fields):
        return RLKDConfig(output_dir=str(tmp_path), report_to="none", **fields)

    args = config(sampling_mode="speculative", temperature=0.7, skd_top_k=10, generation_cache="static")
    spec = args.sampling_spec("speculative")
    assert spec == SamplingSpec("speculative", temperature=0.7, teacher_temperature=0.7, skd_top_k=10,
                                cache_implementation="static")  # fmt: skip
    assert config(teacher_sampling_temperature=0.0).sampling_spec("on_policy", "dynamic").teacher_temperature == 0.0
    with pytest.raises(ValueError, match="generation_cache='auto' is resolved with the models"):
        config().sampling_spec("on_policy")
    # the spec's rule, the config's field name
    with pytest.raises(ValueError, match=r"RLKDConfig.teacher_sampling_temperature=-1.0 is invalid: it must be ≥ 0"):
        config(teacher_sampling_temperature=-1.0)
