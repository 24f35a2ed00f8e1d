"""`RolloutSampler`: one object that turns a batch of prompts (and dataset completions) into a `Rollout` for any
sampling mode of the trainer.

Modes
  off_policy   the dataset's completion (supervised KD); no model runs.
  seq_kd       the teacher samples the completion (sequence-level KD).
  on_policy    the student samples the completion (GKD with lambda = 1).
  mixed        GKD's lambda drawn per sequence: a row is on-policy with probability `lmbda`, else the dataset's.
  speculative  SKD: student proposals verified against the teacher's top-K (see speculative.py).
"""

import time
from collections.abc import Sequence

import torch

from rlkd_onpolicy.vocab import sampling_vocabulary

from .generate import decode
from .graphs import check_graphable
from .hf import check_prompt, eval_mode, model_device, resolve_pad
from .rng import STREAM_STUDENT, STREAM_TEACHER, resolve_row_seeds
from .rollout import SOURCE_DATA, SOURCE_STUDENT, SOURCE_TEACHER, Rollout, assemble_rollout
from .spec import SAMPLING_MODES, SamplingSpec, SpecAttributes
from .speculative import speculative_generate

__all__ = ["SAMPLING_MODES", "RolloutSampler"]
_NEEDS_TEACHER = ("seq_kd", "speculative")
_NEEDS_DATA = ("off_policy", "mixed")


class RolloutSampler(SpecAttributes):
    """Produces a `Rollout` for one of SAMPLING_MODES from a batch; the trainer's single entry point to sampling.

    Args:
        mode_or_spec: a `SamplingSpec` (mode, λ, both models' warps, SKD's K, draft length and test, the KV cache;
            docs/sampling.md), or a mode name with the spec's fields as keyword `options` (verify_on for
            skd_verify_on), the others at SamplingSpec's defaults. The fields read as the sampler's attributes.
        student, teacher: causal LMs; the teacher may be None except in seq_kd and speculative.
        eos_token_id: int or list of ints; None disables EOS stopping. pad_token_id: None -> EOS -> 0.
        vocab_size: the tokenizer's length (rlkd_onpolicy/vocab.py): no id ≥ vocab_size is ever sampled, in any
            mode, even where the output layers have more rows (padding, any number of rows). None = the output
            layers' rows, which must then be the same.
    """

    def __init__(
        self,
        mode_or_spec: str | SamplingSpec,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None = None,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        **options,
    ):
        spec = SamplingSpec.from_options(mode_or_spec, **options)
        mode = spec.mode
        if spec.cache_implementation == "cuda_graph":
            if model_device(student).type != "cuda":
                raise ValueError(
                    f"cache_implementation='cuda_graph' needs the models on a CUDA device, the student is on "
                    f"{model_device(student).type}; use 'dynamic' or 'static' there"
                )
            check_graphable(student)
            if mode in _NEEDS_TEACHER:
                check_graphable(teacher)
        if mode in _NEEDS_TEACHER and teacher is None:
            raise ValueError(f"mode {mode!r} needs a teacher model, got teacher=None")
        self.vocab_size = sampling_vocabulary(student, teacher, vocab_size)
        spec.check_vocabulary(self.vocab_size)
        self.spec, self.student, self.teacher = spec, student, teacher
        self.eos_token_id = eos_token_id
        self.pad_token_id = resolve_pad(pad_token_id, eos_token_id)

    def rollout(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        row_seeds: torch.Tensor | None = None,
    ) -> Rollout:
        """Sample one batch. prompt_ids / prompt_mask (B, P) LEFT-padded; completion_ids / completion_mask (B, C)
        RIGHT-padded dataset completions (needed by off_policy and mixed, ignored otherwise).

        Randomness: mixed mode first draws B uniforms for its per-sequence coin, then (unless row_seeds is given)
        B row seeds, both from `generator` (torch's global generator when None). Row i's tokens depend only on its
        prompt and row_seeds[i], never on the other rows.
        """
        check_prompt(prompt_ids, prompt_mask)
        bsz = prompt_ids.shape[0]
        device = prompt_ids.device
        if self.mode in _NEEDS_DATA:
            _check_completions(prompt_ids, completion_ids, completion_mask, self.mode)
        on_policy_rows = None
        if self.mode == "mixed":
            # one coin per sequence (TRL draws one per batch): the on-policy share of every batch is close to lmbda
            gen_device = generator.device if generator is not None else torch.device("cpu")
            coins = torch.rand(bsz, generator=generator, device=gen_device).to(device)
            on_policy_rows = coins < self.lmbda
        row_seeds = resolve_row_seeds(row_seeds, bsz, generator, device)

        if self.mode == "speculative":
            return speculative_generate(
                self.student, self.teacher, prompt_ids, prompt_mask, self.spec, eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id, row_seeds=row_seeds,
                vocab_size=self.vocab_size,
            )

        start = time.perf_counter()
        stats: dict[str, float] = {}
        if self.mode == "off_policy":
            tokens, mask = completion_ids, completion_mask.bool()
            source = torch.full_like(tokens, SOURCE_DATA, dtype=torch.int8)
        elif self.mode in ("on_policy", "seq_kd"):
            tokens, mask, source, passes = self._generate(prompt_ids, prompt_mask, row_seeds)
            stats["forward_passes"] = float(passes)
        else:  # mixed
            tokens, mask, source = self._mixed(
                prompt_ids, prompt_mask, completion_ids, completion_mask.bool(), row_seeds, on_policy_rows, stats
            )
            stats["on_policy_fraction"] = float(on_policy_rows.float().mean())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        generated = float(mask[source != SOURCE_DATA].sum()) if self.mode != "off_policy" else 0.0
        stats.update(generated_tokens=generated, seconds=seconds, tokens_per_second=generated / max(seconds, 1e-9))
        return assemble_rollout(
            prompt_ids,
            prompt_mask,
            tokens,
            mask,
            source,
            pad_token_id=self.pad_token_id,
            stats=stats,
            mode=self.mode,
            row_seeds=row_seeds,
        )

    def _generate(self, prompt_ids, prompt_mask, row_seeds):
        """Student (on_policy) or teacher (seq_kd) sampling; returns tokens (B, N), mask, source, forward passes."""
        if self.mode == "seq_kd":
            model, stream, src = self.teacher, STREAM_TEACHER, SOURCE_TEACHER
            temperature, top_p = self.teacher_temperature, self.teacher_top_p
        else:
            model, stream, src = self.student, STREAM_STUDENT, SOURCE_STUDENT
            temperature, top_p = self.temperature, self.top_p
        with eval_mode(model):
            out = decode(
                model,
                prompt_ids,
                prompt_mask.long(),
                row_seeds,
                stream=stream,
                max_new_tokens=self.max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                vocab_size=self.vocab_size,
                cache_implementation=self.cache_implementation,
                graph_sampling=self.graph_sampling,
            )
        source = torch.full_like(out.tokens, src, dtype=torch.int8)
        return out.tokens, out.completion_mask, source, out.forward_passes

    def _mixed(self, prompt_ids, prompt_mask, completion_ids, completion_mask, row_seeds, on_policy_rows, stats):
        """Dataset completions, with the on-policy rows replaced by student samples (only those rows are decoded)."""
        bsz = prompt_ids.shape[0]
        width = max(completion_ids.shape[1], self.max_new_tokens if bool(on_policy_rows.any()) else 0)
        tokens = torch.full((bsz, width), self.pad_token_id, dtype=torch.long, device=prompt_ids.device)
        mask = torch.zeros(bsz, width, dtype=torch.bool, device=prompt_ids.device)
        source = torch.full((bsz, width), SOURCE_DATA, dtype=torch.int8, device=prompt_ids.device)
        tokens[:, : completion_ids.shape[1]] = completion_ids
        mask[:, : completion_ids.shape[1]] = completion_mask
        rows = on_policy_rows.nonzero().squeeze(1)
        if rows.numel():
            # per-row seeds make the sub-batch give exactly what these rows would get in the full batch
            sub_ids, sub_mask = _strip_left_padding(prompt_ids[rows], prompt_mask[rows])
            gen_tokens, gen_mask, _, passes = self._generate(sub_ids, sub_mask, row_seeds[rows])
            n = gen_tokens.shape[1]
            tokens[rows] = self.pad_token_id
            tokens[rows, :n] = gen_tokens
            mask[rows] = False
            mask[rows, :n] = gen_mask
            source[rows] = SOURCE_STUDENT
            stats["forward_passes"] = float(passes)
        return tokens, mask, source


def _strip_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a left-padded sub-batch (fewer columns to attend over)."""
    drop = int((mask.sum(0) == 0).sum())
    return ids[:, drop:], mask[:, drop:]


def _check_completions(prompt_ids, completion_ids, completion_mask, mode: str) -> None:
    if completion_ids is None or completion_mask is None:
        raise ValueError(f"mode {mode!r} needs the dataset's completion_ids and completion_mask (B, C)")
    bsz = prompt_ids.shape[0]
    if completion_ids.ndim != 2 or completion_ids.shape != completion_mask.shape or completion_ids.shape[0] != bsz:
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and completion_mask {tuple(completion_mask.shape)} must "
            f"both be (B, C) with B = {bsz} (the prompt batch size)"
        )
    mask = completion_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("completion_mask must contain only 0 and 1")
    if completion_ids.shape[1] > 1 and not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        raise ValueError("dataset completions must be RIGHT-padded (each completion_mask row is 1...1 0...0)")
