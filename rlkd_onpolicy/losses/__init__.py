"""Distillation losses: divergences (dense and sparse), the RLKD ranking loss, and one composing entry point
taking the objective's options as one `LossSpec`.

p is always the teacher and q the student; docs/losses.md has every formula with its paper.
"""

from rlkd_onpolicy.losses.distillation import DistillationLoss, distillation_loss
from rlkd_onpolicy.losses.divergences import (
    LOSSES,
    MISSING_MASS,
    TeacherTopK,
    bucket_divergence,
    dense_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    sparse_buckets,
    sparse_divergence,
    teacher_topk,
    total_variation,
)
from rlkd_onpolicy.losses.ranking import UNIONS, ranking_loss, soft_rank, sparse_ranking_loss, topk_overlap
from rlkd_onpolicy.losses.reduction import REDUCTIONS
from rlkd_onpolicy.losses.spec import LossSpec

__all__ = [
    "LOSSES",
    "MISSING_MASS",
    "REDUCTIONS",
    "UNIONS",
    "DistillationLoss",
    "LossSpec",
    "TeacherTopK",
    "bucket_divergence",
    "dense_divergence",
    "distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "ranking_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_rank",
    "sparse_buckets",
    "sparse_divergence",
    "sparse_ranking_loss",
    "teacher_topk",
    "topk_overlap",
    "total_variation",
]
