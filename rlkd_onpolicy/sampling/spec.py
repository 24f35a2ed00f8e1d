"""`SamplingSpec`: every option of a rollout, one name and one default each, validated once; the sampling modes.

`RLKDConfig.sampling_spec(mode)` builds it from the config's fields; `RolloutSampler`, `speculative_generate` (and
its reference) and the served teacher's `ServedRolloutSampler` take it whole, or build it from their keyword
arguments. docs/sampling.md has the field table.
"""

from dataclasses import dataclass, fields, replace

from rlkd_onpolicy._fields import InvalidField, check_choice, check_count, check_number

SAMPLING_MODES = ("off_policy", "seq_kd", "on_policy", "mixed", "speculative")
VERIFY_ON = ("raw", "warped")
# dynamic: transformers' DynamicCache; static: a preallocated StaticCache (fixed shapes);
# cuda_graph: a StaticCache and the decode steps replayed as CUDA graphs (graphs.py; CUDA only)
CACHE_IMPLEMENTATIONS = ("dynamic", "static", "cuda_graph")
# The keyword signatures that predate the spec name three fields without the skd_ prefix (speculative_generate's
# top_k and draft_len, and verify_on); they are read as the fields.
KEYWORD_ALIASES = {"top_k": "skd_top_k", "draft_len": "skd_draft_len", "verify_on": "skd_verify_on"}


@dataclass(frozen=True)
class SamplingSpec:
    """Where completions come from and how they are sampled. Defaults follow the papers: SKD's K = 25 and draft
    length 5 (Xu et al. 2024), GKD's λ = 0.5 (Agarwal et al. 2024)."""

    mode: str  # one of SAMPLING_MODES
    lmbda: float = 0.5  # mixed: the probability that a sequence is on-policy, in [0, 1]
    max_new_tokens: int = 128  # completion budget per sequence (≥ 1; off_policy, which never generates, takes 0)
    temperature: float = 1.0  # the student's sampling temperature (on_policy, mixed, SKD proposals); 0 = argmax
    top_p: float = 1.0  # the student's nucleus, in (0, 1]
    teacher_temperature: float = 1.0  # the teacher's (seq_kd, SKD replacements); 0 = argmax
    teacher_top_p: float = 1.0  # the teacher's nucleus, in (0, 1]
    skd_top_k: int = 25  # SKD: a proposal stays if it is in the teacher's top-K
    skd_draft_len: int = 5  # SKD: tokens the student drafts per teacher check
    skd_verify_on: str = "raw"  # SKD: the top-K test reads the teacher's raw or warped distribution (VERIFY_ON)
    cache_implementation: str = "dynamic"  # the rollouts' KV cache, one of CACHE_IMPLEMENTATIONS
    graph_sampling: bool = False  # with cuda_graph: sampling and bookkeeping in the step's graph too (decode modes)

    def __post_init__(self):
        owner = "SamplingSpec"
        check_choice(owner, "mode", self.mode, SAMPLING_MODES, "unknown sampling mode; ")
        check_number(owner, "lmbda", self.lmbda, 0.0, 1.0, note=" (the on-policy probability per sequence)")
        if self.mode != "off_policy" or self.max_new_tokens != 0:  # off_policy never generates: 0 is fine there
            check_count(owner, "max_new_tokens", self.max_new_tokens)
        check_number(owner, "temperature", self.temperature, 0.0, note=" (0 = argmax)")
        check_number(owner, "top_p", self.top_p, 0.0, 1.0, above=True)
        check_number(owner, "teacher_temperature", self.teacher_temperature, 0.0, note=" (0 = argmax)")
        check_number(owner, "teacher_top_p", self.teacher_top_p, 0.0, 1.0, above=True)
        check_count(owner, "skd_top_k", self.skd_top_k)
        check_count(owner, "skd_draft_len", self.skd_draft_len)
        check_choice(owner, "skd_verify_on", self.skd_verify_on, VERIFY_ON)
        check_choice(owner, "cache_implementation", self.cache_implementation, CACHE_IMPLEMENTATIONS)
        check_choice(owner, "graph_sampling", self.graph_sampling, (False, True))
        if self.graph_sampling and self.cache_implementation != "cuda_graph":
            raise InvalidField(
                owner,
                "graph_sampling",
                True,
                f"graph_sampling=True needs cache_implementation='cuda_graph', got {self.cache_implementation!r}.",
            )

    @classmethod
    def from_options(cls, mode_or_spec: "str | SamplingSpec", **options) -> "SamplingSpec":
        """`mode_or_spec` itself when it is a SamplingSpec, else a SamplingSpec of that mode and the keyword
        `options` (the fields, or their KEYWORD_ALIASES; None = the field's default), for the keyword signatures.
        A spec with options is refused: one of the two would be ignored."""
        given = {KEYWORD_ALIASES.get(name, name): value for name, value in options.items() if value is not None}
        if not isinstance(mode_or_spec, SamplingSpec):
            return cls(mode_or_spec, **given)
        if given:
            raise ValueError(f"Give a SamplingSpec or keyword options, not both (got a spec and {sorted(given)}).")
        return mode_or_spec

    def check_vocabulary(self, vocab_size: int) -> None:
        """SKD's top-K must fit the vocabulary both models sample from (known once the models are)."""
        if self.mode == "speculative" and self.skd_top_k > vocab_size:
            raise ValueError(
                f"SamplingSpec.skd_top_k={self.skd_top_k} is invalid: it must be at most the vocabulary "
                f"size {vocab_size} (the teacher's top-K is taken over it)."
            )


_FIELDS = frozenset(f.name for f in fields(SamplingSpec))


class SpecAttributes:
    """For the samplers: their `spec`'s fields read as their own attributes (`sampler.temperature` is
    `sampler.spec.temperature`), and setting one replaces the spec by a validated copy (`sampler.lmbda = 0.3`)."""

    spec: SamplingSpec

    def __getattr__(self, name: str):  # called only for names the object does not hold itself
        if name in _FIELDS:
            return getattr(self.spec, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _FIELDS:
            name, value = "spec", replace(self.spec, **{name: value})
        super().__setattr__(name, value)
