"""LossSpec: one default per option, each range checked once, the error naming the field; the entry points take it."""

import pytest
import torch

from rlkd_onpolicy import RLKDConfig
from rlkd_onpolicy.kernels import fused_topk_loss
from rlkd_onpolicy.losses import LossSpec, distillation_loss


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("loss", "kl", r"use one of \('fkl'"),
        ("beta", 1.5, r"it must be in \[0, 1\]"),
        ("skew_alpha", float("nan"), "it must be a finite number"),
        ("temperature", 0.0, r"it must be > 0"),
        ("missing_mass", "zero", "use one of"),
        ("rank_weight", -1.0, "it must be ≥ 0"),
        ("rank_k", 0, "it must be an int ≥ 1"),
        ("rank_k", 2.5, "it must be an int ≥ 1"),  # a float k is refused, not truncated
        ("rank_union", "sum", "use one of"),
        ("regularization_strength", float("inf"), "it must be a finite number"),
        ("backend", "cuda", r"use one of \('auto', 'torch', 'triton'\)"),
    ],
)
def test_bad_field_is_named_with_its_value(field, value, rule):
    with pytest.raises(ValueError, match=rf"LossSpec\.{field}={value!r} is invalid: {rule}"):
        LossSpec(**{field: value})


def test_spec_is_frozen_and_keeps_the_papers_defaults():
    spec = LossSpec()
    assert (spec.loss, spec.rank_weight, spec.rank_k, spec.regularization_strength) == ("fkl", 2.0, 5, 1.0)
    with pytest.raises(AttributeError):
        spec.rank_weight = 0.0


def test_entry_points_take_the_spec_whole_or_as_keywords():
    s, t = torch.randn(3, 4, 20), torch.randn(3, 4, 20)
    spec = LossSpec(loss="jsd", beta=0.3, rank_weight=1.5, rank_k=3)
    by_spec = distillation_loss(s, t, spec=spec)
    by_keywords = distillation_loss(s, t, loss="jsd", beta=0.3, rank_weight=1.5, rank_k=3)
    assert torch.equal(by_spec.loss, by_keywords.loss)
    with pytest.raises(ValueError, match="not both"):
        distillation_loss(s, t, spec=spec, rank_weight=0.0)
    hidden, weight = torch.randn(6, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    top = torch.randn(6, 20, dtype=torch.float64).log_softmax(-1).topk(5)
    fused = fused_topk_loss(hidden, weight, top.indices, top.values, spec=spec, backend=None)
    assert torch.equal(fused, fused_topk_loss(hidden, weight, top.indices, top.values, spec=spec))
    with pytest.raises(ValueError, match="rank_dynamic_weighting=True is not supported by fused_topk_loss"):
        fused_topk_loss(hidden, weight, top.indices, top.values, spec=LossSpec(rank_dynamic_weighting=True))


def test_config_builds_the_spec_and_names_its_own_fields(tmp_path):
    args = RLKDConfig(output_dir=str(tmp_path), report_to="none", loss="jsd", loss_temperature=2.0,
                      rank_regularization_strength=0.5, rank_weight=1.0)  # fmt: skip
    assert args.loss_spec() == LossSpec(loss="jsd", beta=0.5, temperature=2.0, regularization_strength=0.5,
                                        rank_weight=1.0)  # fmt: skip
    # the spec's rule, the config's field name
    with pytest.raises(ValueError, match="RLKDConfig.rank_regularization_strength=0.0 is invalid: it must be > 0"):
        RLKDConfig(output_dir=str(tmp_path), report_to="none", rank_regularization_strength=0.0)
