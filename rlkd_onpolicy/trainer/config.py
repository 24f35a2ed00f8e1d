"""`RLKDConfig`: `transformers.TrainingArguments` plus the distillation fields, each with help text and a range check.

Every field maps one to one onto a key of the training YAMLs in `configs/` (read with `TrlParser`, `--config`).
"""

import re
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from rlkd_onpolicy.losses.divergences import LOSSES, MISSING_MASS
from rlkd_onpolicy.losses.ranking import UNIONS

SAMPLING_MODES = ("off_policy", "seq_kd", "on_policy", "mixed", "speculative")
VERIFY_ON = ("raw", "warped")
GENERATION_CACHES = ("auto", "cuda_graph", "static", "dynamic")
LOSS_BACKENDS = ("auto", "logits", "fused")
NONFINITE_POLICIES = ("error", "skip")


@dataclass
class RLKDConfig(TrainingArguments):
    """Training arguments for `RLKDTrainer`. Defaults follow the papers: SKD K = 25 and draft 5 (Xu et al. 2024),
    RLKD k = 5 with weight 2 (Peng & Zhang 2024), GKD's λ = 0.5 for `mixed` (Agarwal et al. 2024).

    Unlike TRL's configs, nothing here defaults to bf16, so a config built on a CPU-only machine just works.
    """

    # -- sampling ------------------------------------------------------------------------------------------------
    sampling_mode: str = field(
        default="on_policy",
        metadata={"help": f"Where completions come from: one of {SAMPLING_MODES}. off_policy = the dataset's "
                          "completion; seq_kd = the teacher generates; on_policy = the student generates; mixed = "
                          "per sequence on-policy with probability lmbda, else the dataset; speculative = the student "
                          "proposes and the teacher replaces tokens outside its top-skd_top_k (SKD)."},
    )
    lmbda: float = field(
        default=0.5, metadata={"help": "mixed mode: probability that a sequence is on-policy [0, 1]."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Generated completion length limit (> 0)."})
    sampling_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the student's sampling (> 0). Separate from the loss's."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the student, in (0, 1]."})
    teacher_sampling_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of the teacher's samples in seq_kd and SKD replacements (≥ 0; 0 = argmax)."},
    )
    skd_top_k: int = field(
        default=25, metadata={"help": "SKD: a proposed token stays if in the teacher's top-K (≥ 1)."}
    )
    skd_draft_len: int = field(
        default=5, metadata={"help": "SKD: tokens the student drafts per teacher check (≥ 1)."}
    )
    skd_verify_on: str = field(
        default="raw",
        metadata={"help": f"SKD: whether the top-K test reads the teacher's raw or warped distribution {VERIFY_ON}; "
                          "the released SKD code tests the warped one."},
    )
    generation_cache: str = field(
        default="auto",
        metadata={"help": f"KV cache of the rollouts, one of {GENERATION_CACHES}: auto = cuda_graph where it applies "
                          "(CUDA, sdpa/eager attention, full-attention layers, no ZeRO-3 or FSDP), else dynamic; "
                          "cuda_graph = a static cache and every decode step replayed as a CUDA graph (fast on a "
                          "GPU); static; dynamic (transformers' DynamicCache, eager)."},
    )
    # -- the loss ------------------------------------------------------------------------------------------------
    loss: str = field(default="fkl", metadata={"help": f"KD divergence, one of {LOSSES} (p = teacher, q = student)."})
    beta: float = field(default=0.5, metadata={"help": "JSD(β) interpolation in [0, 1]; 0 = fkl, 1 = rkl."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew KL α in [0, 1] (DistiLLM: 0.1)."})
    temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the loss (> 0), applied to both models' logits."}
    )
    rank_weight: float = field(
        default=2.0, metadata={"help": "Weight of the RLKD ranking loss (≥ 0); 0 turns it off; 2 is the paper's."}
    )
    rank_k: int = field(default=5, metadata={"help": "Top-k of each model in the ranking loss (≥ 1)."})
    rank_union: str = field(
        default="exact", metadata={"help": f"Union of both top-k sets, one of {UNIONS} (concat = released code)."}
    )
    rank_dynamic_weighting: bool = field(
        default=False, metadata={"help": "Scale each token's KD term by its top-k overlap / k (RLKD's option)."}
    )
    rank_regularization_strength: float = field(
        default=1.0, metadata={"help": "ε of the soft rank (> 0); RLKD uses 1.0."}
    )
    teacher_top_k: int | None = field(
        default=None,
        metadata={"help": "None = the teacher's full vocabulary; an int K = a sparse teacher (its top-K on the device "
                          "right after its forward pass, as a cache stores it)."},
    )
    loss_backend: str = field(
        default="auto",
        metadata={"help": f"How the student's side of the loss is computed, one of {LOSS_BACKENDS}: logits = the full "
                          "(B, T, V) logits (any teacher, any option); fused = rlkd_onpolicy.kernels.fused_topk_loss "
                          "from the final hidden states and the output layer, never holding the logits (a sparse "
                          "teacher: teacher_top_k or teacher_cache; not with rank_dynamic_weighting or ZeRO-3); "
                          "auto = fused where it applies, else logits."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "A teacher top-k cache folder (python -m rlkd_onpolicy.cache build): the teacher is read "
                          "from it and never loaded. off_policy and seq_kd only (a seq-KD cache is built over "
                          "completions the teacher generated); K and temperature come from the cache."},
    )
    missing_mass: str = field(
        default="tail", metadata={"help": f"Sparse teacher: the mass outside the top-K, one of {MISSING_MASS}."}
    )
    # -- a teacher served by vLLM (docs/served_teacher.md) -----------------------------------------------------
    teacher_server: str | None = field(
        default=None,
        metadata={"help": "Base URL of a vLLM server with the teacher, e.g. 'http://teacher:8000': the trainer asks "
                          "it for the teacher's top-teacher_top_k prompt log-probs (a sparse teacher, like a cache) "
                          "and never loads a teacher model. Needs teacher_top_k (≤ the server's --max-logprobs) and "
                          "temperature=1; checked against the student's tokenizer at construction."},
    )
    teacher_server_model: str | None = field(
        default=None, metadata={"help": "The served model's name; None = the only model the server serves."}
    )
    teacher_server_timeout: float = field(
        default=300.0, metadata={"help": "teacher_server: seconds one HTTP request may take (> 0)."}
    )
    teacher_server_retries: int = field(
        default=4,
        metadata={"help": "teacher_server: further attempts after the first on connection errors, timeouts and HTTP "
                          "429/5xx (≥ 0), waiting teacher_server_backoff · 2^r seconds, at most "
                          "teacher_server_max_backoff; then an error naming the URL and the step."},
    )
    teacher_server_backoff: float = field(
        default=1.0, metadata={"help": "teacher_server: seconds before the first retry (≥ 0), doubling after."}
    )
    teacher_server_max_backoff: float = field(
        default=30.0, metadata={"help": "teacher_server: the longest wait between two attempts, in seconds."}
    )
    teacher_server_max_concurrency: int = field(
        default=8, metadata={"help": "teacher_server: requests in flight at once (≥ 1); vLLM batches them."}
    )
    teacher_server_rows_per_request: int = field(
        default=4, metadata={"help": "teacher_server: rollout rows per scoring request (≥ 1)."}
    )
    # -- data and models -----------------------------------------------------------------------------------------
    max_length: int | None = field(
        default=1024, metadata={"help": "Prompt + dataset completion tokens at most; longer completions are cut."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts keep their last max_prompt_length tokens (the end is what matters)."}
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "kwargs for from_pretrained when `model` is a name or path."}
    )
    teacher_model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "kwargs for from_pretrained when `teacher_model` is a name or path."}
    )
    teacher_offload_to_cpu: bool = field(
        default=False, metadata={"help": "DeepSpeed ZeRO-3 only: keep the teacher's sharded weights in CPU memory."}
    )
    metric_ks: list[int] = field(
        default_factory=lambda: [1, 5], metadata={"help": "k of the logged CR@k / MOR@k of student vs teacher."}
    )
    nonfinite_policy: str = field(
        default="error",
        metadata={"help": f"A NaN/inf loss or gradient, one of {NONFINITE_POLICIES}: error = stop before the optimizer "
                          "step with an error naming the step; skip = drop that step (parameters, optimizer and LR "
                          "schedule unchanged) and count it in the logged nonfinite_skipped_steps. DeepSpeed: error "
                          "only (its optimizer step runs inside backward)."},
    )
    nonfinite_max_consecutive_skips: int = field(
        default=10,
        metadata={"help": "nonfinite_policy='skip': stop with an error after this many consecutive skipped steps "
                          "(≥ 1); a run whose every step is skipped stops at its last step, whatever this is."},
    )
    # Our columns are prompt/completion strings, tokenised by the trainer: keep them.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the prompt/completion columns."})

    def __post_init__(self):
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        def fail(name: str, value: Any, rule: str) -> None:
            raise ValueError(f"RLKDConfig.{name}={value!r} is invalid: {rule}")

        if self.sampling_mode not in SAMPLING_MODES:
            fail("sampling_mode", self.sampling_mode, f"use one of {SAMPLING_MODES}.")
        if self.loss not in LOSSES:
            fail("loss", self.loss, f"use one of {LOSSES}.")
        if self.rank_union not in UNIONS:
            fail("rank_union", self.rank_union, f"use one of {UNIONS}.")
        if self.missing_mass not in MISSING_MASS:
            fail("missing_mass", self.missing_mass, f"use one of {MISSING_MASS}.")
        if self.loss_backend not in LOSS_BACKENDS:
            fail("loss_backend", self.loss_backend, f"use one of {LOSS_BACKENDS}.")
        if self.loss_backend == "fused" and self.teacher_top_k is None and self.teacher_cache is None:
            fail("loss_backend", self.loss_backend, "the fused loss needs a sparse teacher: set teacher_top_k (e.g. "
                 "64) or teacher_cache, or use loss_backend='logits'.")
        if self.loss_backend == "fused" and self.rank_dynamic_weighting:
            fail("loss_backend", self.loss_backend, "the fused loss has no rank_dynamic_weighting: use "
                 "loss_backend='logits' for it.")
        if self.generation_cache not in GENERATION_CACHES:
            fail("generation_cache", self.generation_cache, f"use one of {GENERATION_CACHES}.")
        if self.skd_verify_on not in VERIFY_ON:
            fail("skd_verify_on", self.skd_verify_on, f"use one of {VERIFY_ON}.")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            fail("nonfinite_policy", self.nonfinite_policy, f"use one of {NONFINITE_POLICIES}.")
        if self.nonfinite_policy == "skip" and self.deepspeed:
            fail("nonfinite_policy", self.nonfinite_policy, "DeepSpeed applies the optimizer step inside backward, "
                 "so a step cannot be skipped after the fact: use 'error' with DeepSpeed.")
        for name in ("lmbda", "beta", "skew_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, getattr(self, name), "it must be in [0, 1].")
        for name in ("temperature", "sampling_temperature", "rank_regularization_strength"):
            if not getattr(self, name) > 0:
                fail(name, getattr(self, name), "it must be > 0.")
        if not self.teacher_sampling_temperature >= 0:
            fail("teacher_sampling_temperature", self.teacher_sampling_temperature, "it must be ≥ 0 (0 = argmax).")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "it must be in (0, 1].")
        if self.rank_weight < 0:
            fail("rank_weight", self.rank_weight, "it must be ≥ 0 (0 turns the ranking loss off).")
        for name in ("max_new_tokens", "skd_top_k", "skd_draft_len", "rank_k", "nonfinite_max_consecutive_skips"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "it must be ≥ 1.")
        for name in ("max_length", "max_prompt_length", "teacher_top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(name, value, "it must be ≥ 1 or None.")
        if self.teacher_top_k is not None and self.rank_weight > 0 and self.rank_k > self.teacher_top_k:
            fail("rank_k", self.rank_k, f"with a sparse teacher it must be ≤ teacher_top_k={self.teacher_top_k}.")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            fail("max_prompt_length", self.max_prompt_length, f"it must be < max_length={self.max_length}.")
        if self.teacher_server is not None:
            self._check_teacher_server(fail)
        if self.teacher_cache is not None and self.sampling_mode not in ("off_policy", "seq_kd"):
            fail("sampling_mode", self.sampling_mode, "a teacher_cache holds the teacher on fixed sequences; modes "
                 "that generate new ones (on_policy, mixed, speculative) need an online teacher_model.")
        if not self.metric_ks or any(k < 1 for k in self.metric_ks):
            fail("metric_ks", self.metric_ks, "use a non-empty list of integers ≥ 1.")

    def teacher_server_options(self):
        """The `ServerOptions` of the teacher_server_* fields."""
        from rlkd_onpolicy.teacher.served import ServerOptions

        return ServerOptions(
            timeout=self.teacher_server_timeout,
            retries=self.teacher_server_retries,
            backoff=self.teacher_server_backoff,
            max_backoff=self.teacher_server_max_backoff,
            max_concurrency=self.teacher_server_max_concurrency,
            rows_per_request=self.teacher_server_rows_per_request,
        )

    def _check_teacher_server(self, fail) -> None:
        """What a served teacher can and cannot do, refused here rather than at the first step."""
        url = self.teacher_server
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            fail("teacher_server", url, "it must look like 'http://host:port' (the server's base URL, no /v1).")
        if self.teacher_cache is not None:
            fail("teacher_server", url, f"it and teacher_cache={self.teacher_cache!r} are two teachers: set one.")
        if self.teacher_top_k is None:
            fail("teacher_top_k", None, "a teacher_server returns the teacher's top-K log-probs, not its logits: "
                 "set teacher_top_k (e.g. 20, at most the server's --max-logprobs).")
        if self.temperature != 1.0:
            fail("temperature", self.temperature, "a teacher_server gives log-probs at temperature 1 only (at T they "
                 "need the normaliser over the whole vocabulary): use 1.0, or a local teacher / a cache built at T.")
        for name in ("teacher_model_init_kwargs", "teacher_offload_to_cpu"):
            if getattr(self, name):
                fail(name, getattr(self, name), "it configures a local teacher model; with teacher_server there is "
                     "none: leave it unset.")
        if self.sampling_mode == "speculative":
            if self.skd_verify_on != "raw":
                fail("skd_verify_on", self.skd_verify_on, "with a teacher_server the top-K test reads the rank the "
                     "server returns for the draft (its raw distribution); the warped (top-p) nucleus cannot be "
                     "decided from the top-K: use 'raw', or a local teacher.")
            if self.skd_top_k > self.teacher_top_k:
                fail("skd_top_k", self.skd_top_k, f"with a teacher_server it must be ≤ teacher_top_k="
                     f"{self.teacher_top_k} (a round's top-K is also the loss signal at the drafts).")
        try:
            self.teacher_server_options()
        except ValueError as error:  # ServerOptions names its own field first: "timeout=0 must be ..."
            raise ValueError(f"RLKDConfig.teacher_server_{error}") from None
