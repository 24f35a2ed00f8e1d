"""Rollouts with the student generating on its vLLM server (`StudentServer`), as drop-in samplers of each mode.

- on_policy, mixed: `VLLMRolloutSampler` is `RolloutSampler` with the student's decoding sent to the server: the same
  coins (mixed), the same row seeds from the same generator, the same rollout layout. Row i's request carries the seed
  `row_seeds[i]`; at temperature 0 the rollout is the in-process sampler's (argmax), which the tests check step by step.
  At temperature > 0 vLLM draws from its own per-request generator seeded with the row seed: the same law, another
  random stream (a resumed run asks for the same seeds, so it gets the same samples from the same server build).
- seq_kd: the teacher generates (locally, or on its own teacher_server); the student's server has nothing to do.
- speculative: the student's D-token draft blocks come from its server; the teacher verifies them locally
  (`VLLMSpeculativeSampler`, a full forward of prefix + drafts per round, `verify_drafts`' test and replacement) or
  on its own server (`VLLMServedSpeculativeSampler`, `served_speculative_round`). The round loop is
  `ServedRolloutSampler`'s. Draft seeds are a function of (row seed, output position), so a resumed run drafts the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlkd_onpolicy.sampling import RolloutSampler
from rlkd_onpolicy.sampling.hf import model_device, position_ids_from_mask
from rlkd_onpolicy.sampling.rng import SEED_BITS
from rlkd_onpolicy.sampling.rollout import SOURCE_STUDENT, first_eos_mask
from rlkd_onpolicy.sampling.spec import SamplingSpec
from rlkd_onpolicy.sampling.speculative import verify_drafts
from rlkd_onpolicy.sampling.vllm_client import StudentServer
from rlkd_onpolicy.teacher.served import SpeculativeRound
from rlkd_onpolicy.teacher.served_sampling import ServedRolloutSampler, round_seeds

_DRAFT_SEED_MIX = 0xD1B54A32D192ED03  # odd 64-bit constant: draft seeds differ from the teacher's replacement seeds


def draft_seeds(row_seeds: torch.Tensor, positions: torch.Tensor) -> list[int]:
    """The server's request seed for a row's draft block starting at output position `positions`."""
    keep = (1 << SEED_BITS) - 1
    return [(s ^ _DRAFT_SEED_MIX) & keep for s in round_seeds(row_seeds, positions)]


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


class VLLMRolloutSampler(RolloutSampler):
    """`RolloutSampler` (on_policy, mixed, seq_kd, off_policy) whose student samples come from `server`.

    `server` a checked `StudentServer` holding the student's current weights (the trainer syncs them); `where`
    (e.g. " at training step 3") ends the server's error messages. The other arguments are RolloutSampler's.
    """

    def __init__(self, mode_or_spec: str | SamplingSpec, student: torch.nn.Module, teacher=None, *,
                 server: StudentServer, where: str = "", **kwargs):  # fmt: skip
        super().__init__(mode_or_spec, student, teacher, **kwargs)
        if self.mode == "speculative":
            raise ValueError("VLLMRolloutSampler does not draft for SKD: use VLLMSpeculativeSampler.")
        self.server, self.where = server, where

    def _generate(self, prompt_ids, prompt_mask, row_seeds):
        if self.mode == "seq_kd":  # the teacher samples; the student's server is not involved
            return super()._generate(prompt_ids, prompt_mask, row_seeds)
        bsz, n = prompt_ids.shape[0], self.max_new_tokens
        mask = prompt_mask.bool().cpu()
        prompts = [prompt_ids[row].cpu()[mask[row]].tolist() for row in range(bsz)]
        eos = _eos_list(self.eos_token_id)
        outputs = self.server.generate(prompts, max_tokens=n, temperature=self.temperature, top_p=self.top_p,
                                       seeds=row_seeds.tolist(), stop_token_ids=eos, where=self.where)  # fmt: skip
        tokens = torch.full((bsz, n), self.pad_token_id, dtype=torch.long)
        for row, out in enumerate(outputs):
            tokens[row, : len(out)] = torch.tensor(out, dtype=torch.long)
        lengths = torch.tensor([len(out) for out in outputs])
        completion_mask = (torch.arange(n) < lengths[:, None]) & first_eos_mask(
            tokens, torch.tensor(eos, dtype=torch.long) if eos else None
        )
        tokens = torch.where(completion_mask, tokens, self.pad_token_id)
        device = prompt_ids.device
        source = torch.full((bsz, n), SOURCE_STUDENT, dtype=torch.int8, device=device)
        return tokens.to(device), completion_mask.to(device), source, 0


class VLLMServedSpeculativeSampler(ServedRolloutSampler):
    """SKD with the student's drafts from its server and the teacher on its own server (`teacher` a ServedTeacher)."""

    def __init__(self, mode_or_spec, student, teacher, *, server: StudentServer, where: str = "", **kwargs):
        super().__init__(mode_or_spec, student, teacher, **kwargs)
        self.server, self.where = server, where

    def _draft(self, prefixes: list[list[int]], row_seeds: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
        """(B, D) drafts: D tokens per prefix from the server (EOS is not a stop here: the round decides)."""
        d = self.skd_draft_len
        outputs = self.server.generate(prefixes, max_tokens=d, temperature=self.temperature, top_p=self.top_p,
                                       seeds=draft_seeds(row_seeds, n_out), where=self.where)  # fmt: skip
        if any(len(out) != d for out in outputs):
            raise RuntimeError(f"The student's vLLM server at {self.server.url} drafted {[len(o) for o in outputs]} "
                               f"tokens, not skd_draft_len={d}{self.where}.")  # fmt: skip
        return torch.tensor(outputs, dtype=torch.long)


class VLLMSpeculativeSampler(VLLMServedSpeculativeSampler):
    """SKD with the student's drafts from its server and a local teacher module that verifies each round (one
    forward pass over prefix + drafts, then `verify_drafts`: the same top-K test and replacement law as the in-process
    sampler; skd_verify_on "raw" or "warped")."""

    def __init__(self, mode_or_spec, student, teacher: torch.nn.Module, *, server: StudentServer, where: str = "",
                 **kwargs):  # fmt: skip
        spec = SamplingSpec.from_options(mode_or_spec, **{k: v for k, v in kwargs.items() if k not in _SAMPLER_KW})
        verify_on = spec.skd_verify_on
        # ServedRolloutSampler refuses "warped" (a server returns raw ranks); a local teacher has its logits.
        from dataclasses import replace

        super().__init__(replace(spec, skd_verify_on="raw"), student, teacher, server=server, where=where,
                         **{k: v for k, v in kwargs.items() if k in _SAMPLER_KW})  # fmt: skip
        self.skd_verify_on = verify_on

    @torch.no_grad()
    def _round(self, prefixes: list[list[int]], drafts: torch.Tensor, row_seeds: torch.Tensor, n_out: torch.Tensor):
        teacher, d = self.teacher, drafts.shape[1]
        device = model_device(teacher)
        rows = [p + drafts[i].tolist() for i, p in enumerate(prefixes)]
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        was_training = teacher.training
        teacher.eval()
        try:
            logits = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        finally:
            teacher.train(was_training)
        # the logits at column c predict token c + 1: the D drafts are the last D columns
        draft_logits = logits[:, width - d - 1 : width - 1, : self.vocab_size].float()
        n_accept, replacement = verify_drafts(
            drafts.to(device), draft_logits, row_seeds.to(device), n_out.to(device), top_k=self.skd_top_k,
            teacher_temperature=self.teacher_temperature, teacher_top_p=self.teacher_top_p,
            verify_on=self.skd_verify_on,
        )  # fmt: skip
        empty = torch.empty(len(rows), d, 0)
        return SpeculativeRound(n_accept.cpu(), replacement.cpu(), empty, empty, {"requests": 0.0})


_SAMPLER_KW = ("vocab_size", "eos_token_id", "pad_token_id")
