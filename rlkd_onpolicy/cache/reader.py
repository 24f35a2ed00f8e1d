"""Read a teacher top-k cache: header checks at open, a checksum on every shard before its data is used."""

from __future__ import annotations

import bisect
import math
import os
from functools import lru_cache

import torch
from safetensors.torch import load

from rlkd_onpolicy.cache.format import CacheHeader, read_manifest, sha256_bytes, tokenizer_hash


class TeacherCache:
    """Dataset-like view of a cache folder: `cache[i]` is the teacher's top-K for dataset example i.

    `cache[i]` is a dict of CPU tensors:
        input_ids (L,) int64, completion_start int, topk_ids (C, K) int64, topk_logprobs (C, K) float32,
        tail_logprob (C,) float32, where C = L - completion_start and row j predicts input_ids[completion_start + j].

    Use `TeacherCache.open`, which checks the header against what the trainer uses.
    """

    def __init__(self, path: str, header: CacheHeader, shards: list[dict], max_shards_in_memory: int = 2):
        self.path, self.header, self.shards = path, header, shards
        self._starts = [0]
        for entry in shards:
            self._starts.append(self._starts[-1] + entry["num_examples"])
        self._load_shard = lru_cache(maxsize=max_shards_in_memory)(self._read_shard)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        tokenizer=None,
        expect_teacher: str | None = None,
        expect_k: int | None = None,
        expect_temperature: float | None = None,
        allow_partial: bool = False,
    ) -> TeacherCache:
        """Open a cache, failing with a ValueError when it does not match the run.

        Args:
            tokenizer: the tokenizer the trainer uses; its hash must equal the one the cache was built with.
            expect_teacher / expect_k / expect_temperature: checked against the header when given.
            allow_partial: open a cache whose build has not finished (only its complete shards are visible).
        """
        manifest = read_manifest(path)
        if manifest is None:
            raise ValueError(
                f"{path} is not a teacher cache (no manifest.json); build one with "
                "`python -m rlkd_onpolicy.cache build --teacher ... --dataset ... --out {path}`."
            )
        header = CacheHeader.from_dict(manifest["header"])
        if not manifest.get("complete") and not allow_partial:
            raise ValueError(
                f"The cache at {path} is incomplete (its build stopped); rerun the same build command to resume it, "
                "or pass allow_partial=True."
            )
        if tokenizer is not None and tokenizer_hash(tokenizer) != header.tokenizer_hash:
            raise ValueError(
                f"The cache at {path} was built with another tokenizer (hash {header.tokenizer_hash[:12]}…, this one "
                f"{tokenizer_hash(tokenizer)[:12]}…); its token ids would not match. Use the teacher's tokenizer or "
                "rebuild the cache."
            )
        if expect_teacher is not None and expect_teacher != header.teacher:
            raise ValueError(f"The cache at {path} holds teacher {header.teacher!r}, not {expect_teacher!r}.")
        if expect_k is not None and expect_k != header.k:
            raise ValueError(f"The cache at {path} stores k={header.k}, not the k={expect_k} asked for.")
        if expect_temperature is not None and not math.isclose(expect_temperature, header.temperature):
            raise ValueError(
                f"The cache at {path} holds teacher log-probs at temperature={header.temperature}, not "
                f"{expect_temperature}; rebuild it with --temperature {expect_temperature}."
            )
        # Sizes are cheap to check at open and catch truncated shards; checksums run when a shard is first read.
        for entry in manifest["shards"]:
            file = os.path.join(path, entry["file"])
            if not os.path.exists(file):
                raise ValueError(f"Shard {file} listed in the manifest is missing; rerun the build to rewrite it.")
            size = os.path.getsize(file)
            if size != entry["bytes"]:
                raise ValueError(
                    f"Shard {file} has {size} bytes, the manifest says {entry['bytes']}: it is truncated or "
                    "overwritten. Delete it and rerun the build."
                )
        return cls(path, header, manifest["shards"])

    def __len__(self) -> int:
        return self._starts[-1]

    def _read_shard(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.shards[index]
        file = os.path.join(self.path, entry["file"])
        with open(file, "rb") as handle:
            data = handle.read()
        if sha256_bytes(data) != entry["sha256"]:
            raise ValueError(
                f"Shard {file} fails its SHA-256 check (corrupted on disk). Delete it, remove its entry and the "
                "later ones from manifest.json, and rerun the build; or rebuild the cache."
            )
        return load(data)

    def verify(self) -> None:
        """Check every shard's checksum and internal consistency; raise ValueError on the first bad one."""
        for index, entry in enumerate(self.shards):
            tensors = self._read_shard(index)
            offsets, starts = tensors["sequence_offsets"], tensors["completion_start"]
            completions = int((offsets[1:] - offsets[:-1] - starts).sum())
            ok = (
                len(starts) == entry["num_examples"]
                and int(offsets[-1]) == tensors["input_ids"].numel()
                and tensors["topk_ids"].shape == (completions, self.header.k)
                and tensors["topk_logprobs"].shape == (completions, self.header.k)
                and tensors["tail_logprob"].shape == (completions,)
                and (tensors["topk_ids"] >= 0).all()
                and (tensors["topk_ids"] < self.header.vocab_size).all()
            )
            if not ok:
                raise ValueError(f"Shard {entry['file']} is inconsistent with the manifest or the header.")

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a cache of {len(self)} examples.")
        shard = bisect.bisect_right(self._starts, index) - 1
        tensors = self._load_shard(shard)
        local = index - self._starts[shard]
        offsets, starts = tensors["sequence_offsets"], tensors["completion_start"]
        begin, end = int(offsets[local]), int(offsets[local + 1])
        # Completion rows of the examples before this one, within the shard.
        row = int((offsets[1 : local + 1] - offsets[:local] - starts[:local]).sum())
        start = int(starts[local])
        rows = slice(row, row + (end - begin - start))
        return {
            "input_ids": tensors["input_ids"][begin:end].long(),
            "completion_start": start,
            "topk_ids": tensors["topk_ids"][rows].long(),
            "topk_logprobs": tensors["topk_logprobs"][rows].float(),
            "tail_logprob": tensors["tail_logprob"][rows].float(),
        }
