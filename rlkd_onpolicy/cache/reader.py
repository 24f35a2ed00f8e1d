"""Read a teacher top-k cache: header checks at open, a checksum on every shard before its data is used."""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterable
from functools import lru_cache

import torch
from safetensors import safe_open
from safetensors.torch import load

from rlkd_onpolicy.cache.format import (
    HASH_BYTES,
    CacheHeader,
    example_hash,
    read_manifest,
    sha256_bytes,
    tokenizer_hash,
)
from rlkd_onpolicy.data.prompt_completion import TokenizedExample


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
                f"`python -m rlkd_onpolicy.cache build --teacher ... --dataset ... --out {path}`."
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
                and tensors.get("example_hash", torch.empty(0)).shape == (len(starts), HASH_BYTES)
            )
            if ok:  # each stored hash is that of the stored ids, so the hashes can stand for them
                ids = tensors["input_ids"].tolist()
                ok = all(
                    bytes(tensors["example_hash"][i].tolist())
                    == example_hash(ids[int(offsets[i]) : int(offsets[i + 1])], int(starts[i]))
                    for i in range(len(starts))
                )
            if not ok:
                raise ValueError(f"Shard {entry['file']} is inconsistent with the manifest or the header.")

    def example_hashes(self) -> list[bytes]:
        """`example_hash` of every cached example, in order, read from the shards without their top-K data."""
        hashes = []
        for entry in self.shards:
            with safe_open(os.path.join(self.path, entry["file"]), framework="pt") as shard:
                hashes.extend(bytes(row) for row in shard.get_tensor("example_hash").tolist())
        return hashes

    def check_examples(
        self,
        examples: Iterable[TokenizedExample],
        *,
        max_length: int | None,
        max_prompt_length: int | None,
        name: str = "train_dataset",
        tokenizer=None,
    ) -> None:
        """Raise a ValueError unless every example, tokenised as the trainer does, is the cache's entry of its index.

        Compares per-example hashes, so the whole dataset is checked before any work. On a difference the message
        says how many examples differ and, for the first, how: found at another index of the cache (the dataset was
        reordered or shuffled), or edited (its first differing token, decoded with `tokenizer` when given); the
        trainer's `max_length` / `max_prompt_length` (the examples' truncation) are named when they are not the
        cache's.
        """
        examples = list(examples)
        cached = self.example_hashes()
        if len(examples) != len(cached):
            raise ValueError(f"The cache at {self.path} holds {len(cached)} examples but {name} has {len(examples)}: "
                             "build it from this dataset.")
        ours = [example_hash(e.input_ids, e.completion_start) for e in examples]
        differ = [i for i, (a, b) in enumerate(zip(ours, cached, strict=True)) if a != b]
        if not differ:
            return
        first = differ[0]
        where = {h: i for i, h in reversed(list(enumerate(cached)))}  # first cache index of each hash
        moved = [i for i in differ if ours[i] in where]
        settings = [f"{key}={mine} (the cache's {theirs})"
                    for key, mine, theirs in (("max_length", max_length, self.header.max_length),
                                              ("max_prompt_length", max_prompt_length, self.header.max_prompt_length))
                    if mine != theirs]
        if ours[first] in where:
            how = (f"it is the cache's example {where[ours[first]]}, and {len(moved)} of the {len(differ)} differing "
                   "examples are elsewhere in the cache: the dataset was reordered or shuffled after the cache was "
                   "built")
        else:
            how = _describe_edit(examples[first], self[first], tokenizer)
            how += "" if settings else " (the example was edited)"
        counts = f"{len(differ)} of {len(examples)} examples of {name} tokenise differently from the cache's copies"
        if settings:
            raise ValueError(
                f"The cache at {self.path} does not match the trainer's tokenisation: {counts} (first: example "
                f"{first}; {how}), and the trainer tokenises with {', '.join(settings)}. Build the cache with the "
                "trainer's max_length and max_prompt_length, or give the trainer the cache's."
            )
        raise ValueError(
            f"The cache at {self.path} was built from another version of {name}: {counts} (first: example {first}; "
            f"{how}). Build the cache from this dataset, or train on the dataset the cache was built from."
        )

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


def _describe_edit(example: TokenizedExample, entry: dict, tokenizer) -> str:
    """How `example` differs from the cache `entry`: token counts and the first differing token of each part."""
    start = entry["completion_start"]
    cached = entry["input_ids"].tolist()

    def token(ids: list[int], i: int) -> str:
        if i >= len(ids):
            return "its end"
        return repr(tokenizer.decode([ids[i]])) if tokenizer is not None else f"id {ids[i]}"

    parts = []
    for part, mine, theirs in (("prompt", example.prompt_ids, cached[:start]),
                               ("completion", example.completion_ids, cached[start:])):
        if mine != theirs:
            pairs = enumerate(zip(mine, theirs, strict=False))
            i = next((i for i, (a, b) in pairs if a != b), min(len(mine), len(theirs)))
            parts.append(f"its {part} has {len(mine)} tokens here and {len(theirs)} in the cache and first differs "
                         f"at token {i}: {token(mine, i)} here, {token(theirs, i)} in the cache")
    return "; ".join(parts)
