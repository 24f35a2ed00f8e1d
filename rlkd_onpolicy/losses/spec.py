"""`LossSpec`: every option of the distillation objective, one name and one default each, validated once.

`RLKDConfig.loss_spec()` builds it from the config's fields; `distillation_loss` (full logits) and
`rlkd_onpolicy.kernels.fused_topk_loss` (hidden states, sparse teacher) take it whole, or build it from their
keyword arguments. docs/losses.md has the field table.
"""

from dataclasses import dataclass

from rlkd_onpolicy._fields import check_choice, check_count, check_number
from rlkd_onpolicy.losses.divergences import LOSSES, MISSING_MASS
from rlkd_onpolicy.losses.ranking import UNIONS

# fused_topk_loss's kernel: "auto" = Triton on CUDA when installed, else the PyTorch reference
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class LossSpec:
    """The objective `L = rank_weight · L_rank + w · D(p ‖ q)` per token (p = teacher, q = student).

    Defaults follow the papers: RLKD's k = 5 with weight 2 and ε = 1 (Peng & Zhang 2024), GKD's β = 0.5, DistiLLM's
    α = 0.1.
    """

    loss: str = "fkl"  # the divergence D, one of LOSSES
    beta: float = 0.5  # generalised JSD's β (loss="jsd"), in [0, 1]: 0 = forward KL, 1 = reverse KL
    skew_alpha: float = 0.1  # skew KL's α (loss="skl" / "srkl"), in [0, 1]
    temperature: float = 1.0  # the loss temperature (> 0), dividing both models' logits
    missing_mass: str = "tail"  # a sparse teacher's mass outside its top-K, one of MISSING_MASS
    rank_weight: float = 2.0  # weight of the RLKD ranking loss (≥ 0); 0 turns it off
    rank_k: int = 5  # top-k of each model in the ranking loss (≥ 1)
    rank_union: str = "exact"  # how both top-k sets are joined, one of UNIONS (concat = the released code)
    regularization_strength: float = 1.0  # ε of the soft rank (> 0)
    rank_dynamic_weighting: bool = False  # w = |top-k(p) ∩ top-k(q)| / k per token instead of 1 (RLKD's option)
    backend: str = "auto"  # fused_topk_loss's kernel, one of BACKENDS (distillation_loss works on logits)

    def __post_init__(self):
        owner = "LossSpec"
        check_choice(owner, "loss", self.loss, LOSSES)
        check_number(owner, "beta", self.beta, 0.0, 1.0)
        check_number(owner, "skew_alpha", self.skew_alpha, 0.0, 1.0)
        check_number(owner, "temperature", self.temperature, 0.0, above=True)
        check_choice(owner, "missing_mass", self.missing_mass, MISSING_MASS)
        check_number(owner, "rank_weight", self.rank_weight, 0.0, note=" (0 turns the ranking loss off; RLKD uses 2)")
        check_count(owner, "rank_k", self.rank_k)
        check_choice(owner, "rank_union", self.rank_union, UNIONS)
        check_number(owner, "regularization_strength", self.regularization_strength, 0.0, above=True)
        check_choice(owner, "rank_dynamic_weighting", self.rank_dynamic_weighting, (False, True))
        check_choice(owner, "backend", self.backend, BACKENDS)

    @classmethod
    def from_options(cls, spec: "LossSpec | None" = None, **options) -> "LossSpec":
        """`spec` itself, or a LossSpec of the keyword `options` (LossSpec's field names; None = the field's
        default), for the entry points' keyword signatures. Giving both is refused: one would be ignored."""
        given = {name: value for name, value in options.items() if value is not None}
        if spec is None:
            return cls(**given)
        if given:
            raise ValueError(f"Give a LossSpec or its fields as keywords, not both (got spec and {sorted(given)}).")
        return spec
