"""The sampling modes in which the teacher takes part (seq_kd, speculative), with the teacher on a vLLM server.

`ServedRolloutSampler` has `RolloutSampler.rollout`'s signature and draws its row seeds from the same generator the
same way, so the trainer uses either without knowing which; off_policy, on_policy and mixed need no teacher to
sample and keep the local `RolloutSampler`.

- seq_kd: `served_generate`, the server samples each row (its request seed derived from the row seed).
- speculative: the student drafts locally, `served_speculative_round` verifies each round through the server. The
  student's draft j of a round uses `row_uniforms(seed, n_out + j, STREAM_STUDENT)`, as `speculative_generate` does,
  so with a greedy teacher (teacher_sampling_temperature=0) both give the same rollout. A sampled replacement is
  drawn by the server with a per-round request seed: the SKD law, but not the local sampler's random stream.

Cost (docs/served_teacher.md): each round re-sends the row's prefix + D drafts, and vLLM does not read its prefix
cache for prompt_logprobs requests, so a round pays a prefill of the whole prefix on the server; the student
re-reads its prefix once per round too (a fresh KV cache per round keeps rejected drafts out of it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from rlkd_onpolicy.sampling.hf import (
    check_prompt,
    eos_tensor,
    eval_mode,
    forward_step,
    model_device,
    new_cache,
    position_ids_from_mask,
    resolve_pad,
)
from rlkd_onpolicy.sampling.rng import SEED_BITS, STREAM_STUDENT, resolve_row_seeds, row_uniforms
from rlkd_onpolicy.sampling.rollout import SOURCE_STUDENT, SOURCE_TEACHER, Rollout, assemble_rollout, first_eos_mask
from rlkd_onpolicy.sampling.spec import SamplingSpec, SpecAttributes
from rlkd_onpolicy.sampling.warping import sample_from_logits
from rlkd_onpolicy.teacher.served import ServedTeacher, served_generate, served_speculative_round

SERVED_SAMPLING_MODES = ("seq_kd", "speculative")
_ROUND_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct request seeds per (row seed, position)


def round_seeds(row_seeds: torch.Tensor, positions: torch.Tensor) -> list[int]:
    """The server's request seed for a row's replacement drawn at output position `positions`: a function of the
    row seed and the position only, so a resumed run asks for the same samples."""
    keep = (1 << SEED_BITS) - 1
    return [(s ^ (p * _ROUND_SEED_MIX)) & keep for s, p in zip(row_seeds.tolist(), positions.tolist(), strict=True)]


class ServedRolloutSampler(SpecAttributes):
    """seq_kd or speculative rollouts with the teacher on a server; `rollout` as `RolloutSampler.rollout`.

    `mode_or_spec` and the keyword `options` as for `RolloutSampler` (the spec's mode seq_kd or speculative; its
    skd_verify_on must be "raw", the rank the server returns; cache_implementation and graph_sampling are not
    used: the student drafts with a fresh cache per round). `student` drafts (the trainer makes one sampler per
    rollout, with the unwrapped model); `vocab_size` cuts the student's logits to the shared vocabulary.
    """

    def __init__(
        self,
        mode_or_spec: str | SamplingSpec,
        student: torch.nn.Module,
        teacher: ServedTeacher,
        *,
        vocab_size: int,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        **options,
    ):
        spec = SamplingSpec.from_options(mode_or_spec, **options)
        if spec.mode not in SERVED_SAMPLING_MODES:
            raise ValueError(f"ServedRolloutSampler samples {SERVED_SAMPLING_MODES}, not {spec.mode!r}.")
        if spec.mode == "speculative" and spec.skd_verify_on != "raw":
            raise ValueError(f"SamplingSpec.skd_verify_on={spec.skd_verify_on!r} is invalid with a served teacher: "
                             "its top-K test reads the rank the server returns (the raw distribution); use 'raw'.")
        self.spec, self.student, self.teacher = spec, student, teacher
        self.vocab_size = vocab_size
        # as RolloutSampler: a tokenizer without a pad token pads with EOS
        self.eos_token_id, self.pad_token_id = eos_token_id, resolve_pad(pad_token_id, eos_token_id)

    def rollout(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        row_seeds: torch.Tensor | None = None,
    ) -> Rollout:
        """One batch; dataset completions are ignored (both modes generate). Row seeds come from `generator` as in
        `RolloutSampler.rollout`."""
        check_prompt(prompt_ids, prompt_mask)
        row_seeds = resolve_row_seeds(row_seeds, prompt_ids.shape[0], generator, prompt_ids.device)
        if self.mode == "seq_kd":
            return served_generate(
                self.teacher, prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens,
                temperature=self.teacher_temperature, top_p=self.teacher_top_p, eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id, row_seeds=row_seeds,
            )  # fmt: skip
        with eval_mode(self.student):
            return self._speculative(prompt_ids, prompt_mask, row_seeds)

    @torch.no_grad()
    def _speculative(self, prompt_ids, prompt_mask, row_seeds) -> Rollout:
        bsz, d, limit = prompt_ids.shape[0], self.skd_draft_len, self.max_new_tokens
        eos = set() if (e := eos_tensor(self.eos_token_id, "cpu")) is None else set(e.tolist())
        prompts = [prompt_ids[r][prompt_mask[r].bool()].tolist() for r in range(bsz)]
        out: list[list[int]] = [[] for _ in range(bsz)]
        src: list[list[int]] = [[] for _ in range(bsz)]
        live = list(range(bsz))
        start, rounds, requests = time.perf_counter(), 0, 0.0
        while live:
            seeds, n_out = row_seeds[live], torch.tensor([len(out[r]) for r in live])
            drafts = self._draft([prompts[r] + out[r] for r in live], seeds, n_out)
            result = self._round([prompts[r] + out[r] for r in live], drafts, seeds, n_out)
            rounds, requests = rounds + 1, requests + result.stats["requests"]
            for i, row in enumerate(live):
                a = int(result.n_accept[i])
                emitted = drafts[i, :a].tolist() + ([int(result.replacement[i])] if a < d else [])
                sources = [SOURCE_STUDENT] * a + [SOURCE_TEACHER] * (a < d)
                for token, source in zip(emitted, sources, strict=True):
                    out[row].append(token)
                    src[row].append(source)
                    if token in eos or len(out[row]) >= limit:
                        break
            live = [r for r in live if len(out[r]) < limit and not (out[r] and out[r][-1] in eos)]
        tokens = torch.full((bsz, limit), self.pad_token_id, dtype=torch.int64)
        source = torch.full((bsz, limit), SOURCE_TEACHER, dtype=torch.int8)
        for row in range(bsz):
            tokens[row, : len(out[row])] = torch.tensor(out[row], dtype=torch.int64)
            source[row, : len(src[row])] = torch.tensor(src[row], dtype=torch.int8)
        lengths = torch.tensor([len(o) for o in out])
        mask = (torch.arange(limit) < lengths[:, None]) & first_eos_mask(tokens, e)
        seconds = time.perf_counter() - start
        generated, accepted = int(mask.sum()), int(((source == SOURCE_STUDENT) & mask).sum())
        stats = {
            "generated_tokens": float(generated), "seconds": seconds, "tokens_per_second": generated / seconds,
            "acceptance_rate": accepted / max(generated, 1), "tokens_replaced": float(generated - accepted),
            "rounds": float(rounds), "teacher_requests": requests,
        }  # fmt: skip
        device = prompt_ids.device
        return assemble_rollout(
            prompt_ids, prompt_mask, torch.where(mask, tokens, self.pad_token_id).to(device), mask.to(device),
            source.to(device), pad_token_id=self.pad_token_id, stats=stats, mode="speculative", row_seeds=row_seeds,
        )  # fmt: skip

    def _round(self, prefixes: list[list[int]], drafts: torch.Tensor, row_seeds: torch.Tensor, n_out: torch.Tensor):
        """The teacher's verdict on one round of drafts (a `SpeculativeRound`): the server verifies them."""
        return served_speculative_round(
            self.teacher, prefixes, drafts, top_k=self.skd_top_k, teacher_temperature=self.teacher_temperature,
            teacher_top_p=self.teacher_top_p, seeds=round_seeds(row_seeds, n_out),
        )  # fmt: skip

    def _draft(self, prefixes: list[list[int]], row_seeds: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
        """(B, D) student drafts after each prefix: the prefix in one pass (left-padded, fresh KV cache), then D − 1
        single-token steps; draft j is sampled with the row's uniform at output position n_out + j."""
        device, d = model_device(self.student), self.skd_draft_len
        width = max(map(len, prefixes))
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prefixes], device=device)
        mask = torch.zeros(len(prefixes), width + d - 1, dtype=torch.long, device=device)
        for row, prefix in enumerate(prefixes):
            mask[row, width - len(prefix) :] = 1
        seeds, n_out, position = row_seeds.to(device), n_out.to(device), mask[:, :width].sum(-1)
        cache = new_cache(self.student, "dynamic", width + d - 1)
        logits = forward_step(self.student, ids, mask, position_ids_from_mask(mask[:, :width]), cache, width,
                              last_only=True)  # fmt: skip
        drafts = torch.empty(len(prefixes), d, dtype=torch.int64, device=device)
        for j in range(d):
            u = row_uniforms(seeds, n_out + j, STREAM_STUDENT)
            drafts[:, j] = sample_from_logits(logits[:, -1, : self.vocab_size], u, self.temperature, self.top_p)
            if j + 1 < d:
                logits = forward_step(self.student, drafts[:, j : j + 1], mask, (position + j)[:, None], cache,
                                      width + j + 1)  # fmt: skip
        return drafts.cpu()
