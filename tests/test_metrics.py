"""CR@k, MOR@k and Spearman@k against plain Python computations."""

import pytest
import torch
from scipy.stats import spearmanr

from rlkd_onpolicy.metrics import topk_agreement


def _plain(student, teacher, ks):
    out = {}
    rows = list(zip(student.tolist(), teacher.tolist(), strict=True))

    def top(v, k):
        return sorted(range(len(v)), key=lambda i: -v[i])[:k]

    for k in ks:
        out[f"cr@{k}"] = sum(top(s, k) == top(t, k) for s, t in rows) / len(rows)
        out[f"mor@{k}"] = sum(len(set(top(s, k)) & set(top(t, k))) / k for s, t in rows) / len(rows)
    k = max(ks)
    rhos = []
    for s, t in rows:
        ids = top(t, k) + [i for i in top(s, k) if i not in top(t, k)]
        rhos.append(1.0 if len(ids) == 1 else spearmanr([s[i] for i in ids], [t[i] for i in ids]).statistic)
    out[f"spearman@{k}"] = sum(rhos) / len(rhos)
    return out


@pytest.mark.parametrize("ks", [(1, 2, 3, 5, 10), (1,), (4, 2)])  # defaults, single k (union of 1), unsorted ks
def test_topk_agreement_matches_plain_computation(ks):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(40, 60, generator=g, dtype=torch.float64)
    student = teacher + torch.randn(40, 60, generator=g, dtype=torch.float64) * 0.6  # partial agreement
    mask = torch.rand(40, generator=g) > 0.2
    got = topk_agreement(student, teacher, ks=ks, mask=mask)
    ref = _plain(student[mask], teacher[mask], ks)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert 0 < got[f"mor@{max(ks)}"] < 1


def test_identical_models_agree_fully():
    t = torch.randn(3, 7, 50)
    got = topk_agreement(t, t.clone())
    assert all(v == pytest.approx(1.0) for v in got.values())


def test_bad_input():
    with pytest.raises(ValueError, match=r"ks=\(0,\)"):
        topk_agreement(torch.randn(2, 5), torch.randn(2, 5), ks=(0,))
    with pytest.raises(ValueError, match="same shape"):
        topk_agreement(torch.randn(2, 5), torch.randn(2, 6))


def test_sparse_teacher_k_is_named_as_k_not_the_vocabulary():
    # issue 15: ks above a sparse teacher's K=4 used to say "must be in [1, V=4]", calling K the vocabulary
    from rlkd_onpolicy.metrics import topk_overlap_metrics

    student = torch.randn(3, 54)
    teacher_ids = torch.randn(3, 54).topk(4).indices
    with pytest.raises(ValueError, match=r"in \[1, the teacher's K=4\]"):
        topk_overlap_metrics(student, teacher_ids, ks=(1, 8))
