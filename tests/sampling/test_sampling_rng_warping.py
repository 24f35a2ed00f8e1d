"""The counter-based uniforms and the warped inverse-CDF sampler that every sampling path goes through."""

import pytest
import torch
from scipy import stats

from rlkd_onpolicy.sampling import draw_row_seeds, row_uniforms, sample_from_logits, warp_probs
from rlkd_onpolicy.sampling.rng import STREAM_STUDENT, STREAM_TEACHER

N_DRAWS = 120_000


def test_row_uniforms_are_uniform_and_deterministic():
    seeds = draw_row_seeds(N_DRAWS, torch.Generator().manual_seed(0))
    u = row_uniforms(seeds, 3, STREAM_STUDENT)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    counts = torch.histc(u.float(), bins=50, min=0.0, max=1.0)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert torch.equal(u, row_uniforms(seeds.clone(), 3, STREAM_STUDENT))
    # a row's number depends on its own seed only, never on the batch around it
    assert torch.equal(row_uniforms(seeds[7:8], 3, STREAM_STUDENT), u[7:8])


def test_row_uniforms_streams_and_counters_are_independent():
    seeds = draw_row_seeds(N_DRAWS, torch.Generator().manual_seed(1))
    a = row_uniforms(seeds, 0, STREAM_STUDENT)
    pairs = {
        "other stream": row_uniforms(seeds, 0, STREAM_TEACHER),
        "next counter": row_uniforms(seeds, 1, STREAM_STUDENT),
        "neighbouring seed": row_uniforms(seeds + 1, 0, STREAM_STUDENT),
    }
    for name, b in pairs.items():
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < 5 / N_DRAWS**0.5, name
        # joint uniformity on a 10 x 10 grid catches dependence that correlation misses
        cells = (a * 10).long() * 10 + (b * 10).long()
        assert stats.chisquare(torch.bincount(cells, minlength=100).numpy()).pvalue > 1e-3, name


def test_warp_probs_top_p_matches_a_sorted_reference():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0]])
    probs = warp_probs(logits, temperature=0.7, top_p=0.8)
    full = torch.softmax(logits / 0.7, -1)[0]
    order = full.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for i in order:  # the smallest prefix of most likely tokens whose mass reaches top_p
        kept.append(i)
        mass += full[i].item()
        if mass >= 0.8:
            break
    expected = torch.zeros(6)
    expected[kept] = full[kept] / full[kept].sum()
    torch.testing.assert_close(probs[0], expected)
    # temperature 0 is a point mass at the argmax
    assert torch.equal(warp_probs(logits, 0.0), torch.nn.functional.one_hot(torch.tensor([4]), 6).float())


@pytest.mark.parametrize(
    "temperature, top_p",
    [
        (1.0, 1.0),  # plain softmax
        (0.6, 0.7),  # temperature and nucleus: tokens outside the nucleus must never appear
    ],
)
def test_sample_from_logits_follows_the_warped_distribution(temperature, top_p):
    logits = torch.tensor([1.5, 0.2, -0.3, 2.0, -2.0, 0.9, 0.0, -1.0])
    seeds = draw_row_seeds(N_DRAWS, torch.Generator().manual_seed(2))
    tokens = sample_from_logits(logits.expand(N_DRAWS, -1), row_uniforms(seeds, 0, STREAM_STUDENT), temperature, top_p)
    expected = warp_probs(logits, temperature, top_p)
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    expected = expected[support].double() / expected[support].double().sum()  # float32 sums are not exactly 1
    assert stats.chisquare(counts[support].numpy(), (expected * N_DRAWS).numpy()).pvalue > 1e-3
