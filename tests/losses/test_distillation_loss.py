"""The composing entry point: parts, dynamic weighting, sparse vs dense, and gradient-accumulation equivalence."""

import pytest
import torch
from loss_reference import dense_per_token, rank_loss_per_token, top_ids

from rlkd_onpolicy.losses import LOSSES, distillation_loss, teacher_topk


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.5


@pytest.mark.parametrize("rank_weight", [0.0, 2.0])  # 0 turns ranking off; 2 is the RLKD paper's total
def test_total_is_kd_plus_weighted_rank(rank_weight):
    s, t = _logits(3, 5, 40, seed=1), _logits(3, 5, 40, seed=2)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.25
    out = distillation_loss(s, t, loss="fkl", rank_weight=rank_weight, rank_k=5, mask=mask)
    s_rows, t_rows = s.reshape(-1, 40)[mask.reshape(-1)], t.reshape(-1, 40)[mask.reshape(-1)]
    kd_ref = torch.tensor(dense_per_token(s_rows, t_rows, "fkl"), dtype=torch.float64)
    rank_ref = torch.tensor(rank_loss_per_token(s_rows, t_rows, 5), dtype=torch.float64)
    torch.testing.assert_close(out.kd, kd_ref.mean(), rtol=1e-10, atol=1e-12)
    if rank_weight:
        torch.testing.assert_close(out.rank, rank_ref.mean(), rtol=0, atol=1e-10)
    else:
        assert out.rank == 0
    torch.testing.assert_close(out.loss, out.kd + rank_weight * out.rank)
    assert int(out.num_tokens) == int(mask.sum())


def test_dynamic_weighting_scales_kd_by_topk_overlap():
    s, t = _logits(12, 30, seed=4), _logits(12, 30, seed=5)
    s[:6] = t[:6] + 0.3 * _logits(6, 30, seed=6)  # half the rows close to the teacher: overlaps differ per row
    out = distillation_loss(s, t, rank_weight=2.0, rank_k=5, rank_dynamic_weighting=True, reduction="none")
    kd = torch.tensor(dense_per_token(s, t, "fkl"), dtype=torch.float64)
    overlap = torch.tensor([len(set(top_ids(a, 5)) & set(top_ids(b, 5))) / 5 for a, b in zip(s, t, strict=True)],
                           dtype=torch.float64)
    assert len(set(overlap.tolist())) > 1
    torch.testing.assert_close(out.kd, kd * overlap, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, kd * overlap + 2.0 * out.rank)


@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_teacher_with_k_equal_v_matches_dense(loss):
    s, t = _logits(2, 6, 25, seed=7), _logits(2, 6, 25, seed=8)
    top = teacher_topk(t, 25)
    dense = distillation_loss(s, t, loss=loss, rank_weight=2.0, rank_dynamic_weighting=True)
    sparse = distillation_loss(s, teacher_topk_ids=top.ids, teacher_topk_logprobs=top.logprobs,
                               teacher_tail_logprob=top.tail_logprob, loss=loss, rank_weight=2.0,
                               rank_dynamic_weighting=True)
    for a, b in zip(dense[:3], sparse[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("loss", ["fkl", "jsd", "tvd"])
@pytest.mark.parametrize("teacher_form", ["dense", "sparse"])
def test_gradient_accumulation_equivalence(loss, teacher_form):
    """One batch of 8 == micro-batches 4+4 and 2+2+2+2, each summed and divided by the step's token count."""
    g = torch.Generator().manual_seed(9)
    s_full = torch.randn(8, 6, 32, generator=g, dtype=torch.float64)
    t_full = torch.randn(8, 6, 32, generator=g, dtype=torch.float64) * 2
    lengths = torch.tensor([6, 1, 4, 0, 5, 3, 6, 2])  # ragged, one sequence with no counted token
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)

    def step_grad(split: int) -> torch.Tensor:
        weights = s_full.clone().requires_grad_()
        parts = []
        for rows in torch.arange(8).split(split):
            kw = {"loss": loss, "rank_weight": 2.0, "rank_k": 3, "mask": mask[rows], "reduction": "sum"}
            if teacher_form == "dense":
                parts.append(distillation_loss(weights[rows], t_full[rows], **kw))
            else:
                top = teacher_topk(t_full[rows], 8)
                parts.append(distillation_loss(weights[rows], teacher_topk_ids=top.ids,
                                               teacher_topk_logprobs=top.logprobs, **kw))
        step_tokens = sum(int(p.num_tokens) for p in parts)
        assert step_tokens == int(mask.sum())
        for p in parts:  # each micro-batch back-propagates its own share, as a trainer does
            (p.loss / step_tokens).backward()
        return weights.grad

    full = step_grad(8)
    assert full.abs().sum() > 0
    torch.testing.assert_close(step_grad(4), full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(step_grad(2), full, rtol=1e-12, atol=1e-14)


def test_fully_masked_batch_gives_zero_loss_and_gradients():
    s = _logits(2, 4, 20, seed=10).float().requires_grad_()
    t = _logits(2, 4, 20, seed=11).float()
    t[1, 2] = float("nan")  # garbage in a masked row
    out = distillation_loss(s, t, rank_weight=2.0, rank_dynamic_weighting=True, mask=torch.zeros(2, 4, dtype=bool))
    assert out.loss == 0 and out.kd == 0 and out.rank == 0 and int(out.num_tokens) == 0
    out.loss.backward()
    assert torch.all(s.grad == 0)


def test_composite_bad_input():
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    with pytest.raises(ValueError, match="Give either teacher_logits or both"):
        distillation_loss(s)
    with pytest.raises(ValueError, match="rank_weight=-1"):
        distillation_loss(s, t, rank_weight=-1)
    with pytest.raises(ValueError, match=r"rank k=11 must be in \[1, V=10\]"):
        distillation_loss(s, t, rank_k=11)
    with pytest.raises(ValueError, match="student vocabulary size 10 != teacher vocabulary size 9"):
        distillation_loss(s, torch.randn(2, 9))
    with pytest.raises(ValueError, match="reduction='sum_count'"):
        distillation_loss(s, t, reduction="sum_count")
