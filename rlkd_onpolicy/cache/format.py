"""On-disk format of the teacher top-k cache: header, manifest, shard naming, checksums and atomic writes.

A cache is a folder::

    manifest.json            header (teacher, revision, tokenizer hash, V, K, temperature, dtype, version)
                             + the list of complete shards, each with its example count and SHA-256
    shard-00000.safetensors  examples [0, shard_size) of the dataset, in order
    shard-00001.safetensors  ...

A shard holds, for its n examples with sequence lengths L_i and completion lengths C_i:

    input_ids            (ΣL_i,)   int32    prompt + completion ids, concatenated
    sequence_offsets     (n+1,)    int64    example i is input_ids[off[i]:off[i+1]]
    completion_start     (n,)      int64    index of the first completion token in its example
    topk_ids             (ΣC_i, K) int32    teacher's top-K ids at the positions predicting the completion tokens
    topk_logprobs        (ΣC_i, K) dtype    their log-probs over the full vocabulary at `temperature`
    tail_logprob         (ΣC_i,)   float32  log of the teacher mass outside the top-K
    example_hash         (n, 16)   uint8    `example_hash(input_ids, completion_start)` of each example (version 2)

Shards and the manifest are written to a temporary file, fsynced and renamed, so a crash leaves only complete
shards; a shard is listed in the manifest only after its rename, so a shard that is not listed is ignored
(and rewritten) by a resumed build.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch

FORMAT_VERSION = 2  # 2: per-example hashes of the token ids, so a trainer checks its dataset against them
HASH_BYTES = 16
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Unit roundoff (half the spacing at 1.0) of each storage dtype: a stored log-prob x̂ of x obeys
# |x̂ - x| <= UNIT_ROUNDOFF[dtype] * |x| + SUBNORMAL_ERROR[dtype] (round to nearest; docs/cache.md).
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
SUBNORMAL_ERROR = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of what decides the token ids: the tokenizer's model, normaliser, pre-tokeniser, added and special
    tokens and chat template. Runtime settings (truncation, padding) are left out, so a tokenizer that has been
    called with `truncation=True` still hashes the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # a slow tokenizer: its vocabulary is what we can see
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheHeader:
    teacher: str  # hub name or local path of the teacher
    teacher_revision: str | None  # hub revision / commit, when known
    tokenizer_hash: str  # tokenizer_hash() of the tokenizer that produced input_ids
    vocab_size: int  # V of the teacher's logits
    k: int  # number of top ids stored per position
    temperature: float  # the teacher log-probs are log_softmax(teacher_logits / temperature)
    dtype: str  # storage dtype of topk_logprobs: float16 | bfloat16 | float32
    shard_size: int  # examples per shard (the last shard may hold fewer)
    max_length: int | None
    max_prompt_length: int | None
    dataset: str
    split: str | None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.k < 1 or self.k > self.vocab_size:
            raise ValueError(f"k={self.k} must be in [1, vocab_size={self.vocab_size}].")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0.")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(STORAGE_DTYPES)}.")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size} must be >= 1.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CacheHeader:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            why = (" (version 1 stores no per-example hashes, which the trainer needs to check that its dataset is "
                   "the one the cache was built from)" if version == 1 else "")
            raise ValueError(
                f"Cache format_version={version} is not the version this library reads ({FORMAT_VERSION}){why}; "
                "rebuild the cache with `python -m rlkd_onpolicy.cache build` into a new folder."
            )
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def differences(self, other: CacheHeader) -> list[str]:
        """Fields whose values differ, as 'field: cached <self>, requested <other>' strings."""
        return [
            f"{f.name}: cached {getattr(self, f.name)!r}, requested {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def example_hash(input_ids: Sequence[int], completion_start: int) -> bytes:
    """The first 16 bytes of SHA-256 over an example's completion start and token ids (int64, little endian).

    Stored per example, so that a trainer can check cheaply, before any work, that each example of its dataset
    tokenises to the sequence the cache holds (an edited, shuffled or differently truncated dataset does not).
    """
    data = struct.pack(f"<{len(input_ids) + 1}q", completion_start, *input_ids)
    return hashlib.sha256(data).digest()[:HASH_BYTES]


def example_hashes_tensor(hashes: Sequence[bytes]) -> torch.Tensor:
    """`(n, 16) uint8` from n hashes, the shard layout."""
    return torch.frombuffer(bytearray(b"".join(hashes)), dtype=torch.uint8).reshape(len(hashes), HASH_BYTES)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees either the old file or the complete new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    # The rename lives in the directory entry: fsync the directory too so it survives a power loss.
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"The cache manifest {path} is not valid JSON ({error}); rebuild the cache.") from error


def write_manifest(folder: str, header: CacheHeader, shards: list[dict], complete: bool) -> None:
    manifest = {"header": header.to_dict(), "shards": shards, "complete": complete}
    atomic_write(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())
