"""`CachedTeacher`: the teacher's top-K read from a teacher cache (rlkd_onpolicy/cache/), no teacher model loaded."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rlkd_onpolicy.sampling.rollout import Rollout
from rlkd_onpolicy.teacher.signal import SparseTeacher

if TYPE_CHECKING:
    from rlkd_onpolicy.cache import TeacherCache


class CachedTeacher:
    """A `SparseTeacher` for each rollout from the cache entries of its examples (`example_index`).

    The cache holds completions it was built on, so the rollout must be those very completions (off_policy, or
    seq_kd's cached teacher completions); each row is checked against its entry's tokens before it is read.
    """

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def score(
        self, rollout: Rollout, example_index: torch.Tensor | None = None, *, step: int | None = None
    ) -> SparseTeacher:
        """The cache's top-K for the batch, laid out like the completion columns `(B, C, K)`."""
        if example_index is None:
            raise ValueError("A cached teacher looks its rows up by example_index: the batch has none.")
        start = rollout.prompt_length
        batch, width = rollout.sequences.shape[0], rollout.sequences.shape[1] - start
        k = self.cache.header.k
        device = rollout.sequences.device
        # Rows past a completion's end are never read (the mask drops them); fill them with valid distinct ids.
        ids = torch.arange(k, device=device).expand(batch, width, k).clone()
        logprobs = torch.full((batch, width, k), -math.log(k), device=device)
        tail = torch.full((batch, width), float("-inf"), device=device)
        where = "" if step is None else f" at training step {step}"
        for row, index in enumerate(example_index.tolist()):
            entry = self.cache[index]
            prompt = rollout.sequences[row, :start][rollout.attention_mask[row, :start].bool()].cpu()
            completion = rollout.sequences[row, start:][rollout.completion_mask[row, start:]].cpu()
            cached = entry["input_ids"]
            cs = entry["completion_start"]
            if not (torch.equal(cached[:cs], prompt) and torch.equal(cached[cs:], completion)):
                raise ValueError(
                    f"Example {index} is tokenised differently from the cache's copy ({len(prompt)}+{len(completion)} "
                    f"vs {cs}+{len(cached) - cs} tokens){where}: build the cache from this dataset with the same "
                    "max_length and max_prompt_length as the trainer."
                )
            n = len(completion)
            ids[row, :n] = entry["topk_ids"].to(device)
            logprobs[row, :n] = entry["topk_logprobs"].to(device)
            tail[row, :n] = entry["tail_logprob"].to(device)
        return SparseTeacher(ids, logprobs, tail)
