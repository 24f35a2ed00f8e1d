"""Build a teacher top-k cache: one teacher pass over a dataset, written in atomic shards, resumable."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from rlkd_onpolicy.cache.format import (
    STORAGE_DTYPES,
    CacheHeader,
    atomic_write,
    example_hash,
    example_hashes_tensor,
    read_manifest,
    sha256_bytes,
    shard_name,
    tokenizer_hash,
    write_manifest,
)
from rlkd_onpolicy.data import check_prompt_not_empty, tokenize_example, validate_prompt_completion_dataset
from rlkd_onpolicy.losses.divergences import teacher_topk
from rlkd_onpolicy.vocab import cut_logits


def teacher_vocab_size(teacher) -> int:
    """V of the teacher's logits (the output embedding's rows, which may exceed len(tokenizer) by padding)."""
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(teacher.config.vocab_size)


def _encode_shard(
    examples: list, teacher, pad_id: int, k: int, temperature: float, batch_size: int, dtype: str, n_tokens: int
):
    """Run the teacher over tokenised examples and pack them into the shard tensors of format.py."""
    device = next(teacher.parameters()).device
    input_ids, offsets, starts, topk_ids, topk_logprobs, tails = [], [0], [], [], [], []
    hashes = [example_hash(e.input_ids, e.completion_start) for e in examples]
    storage = STORAGE_DTYPES[dtype]
    for begin in range(0, len(examples), batch_size):
        batch = examples[begin : begin + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
            attention[row, : len(example.input_ids)] = 1
        # Right padding: the real positions see only real tokens under the causal mask, so their logits are exact.
        with torch.inference_mode():
            # The distribution is over the tokenizer's tokens: padding rows of the output layer are cut, as the
            # trainer cuts an online teacher's logits (Qwen2.5: 151,936 rows for 151,665 tokens).
            logits = cut_logits(teacher(input_ids=ids.to(device), attention_mask=attention.to(device)).logits, n_tokens)
        for row, example in enumerate(batch):
            start, length = example.completion_start, len(example.completion_ids)
            input_ids.append(torch.tensor(example.input_ids, dtype=torch.int32))
            offsets.append(offsets[-1] + len(example.input_ids))
            starts.append(start)
            # The logits at position t predict token t + 1: completion token j is predicted at start + j - 1.
            top_ids, top_logprobs, tail = teacher_topk(logits[row, start - 1 : start - 1 + length], k, temperature)
            topk_ids.append(top_ids.to(torch.int32).cpu())
            # Clamp so an fp16 store never turns a very negative (but finite) log-prob into -inf.
            topk_logprobs.append(top_logprobs.clamp(min=torch.finfo(storage).min).to(storage).cpu())
            tails.append(tail.cpu())
    return {
        "input_ids": torch.cat(input_ids),
        "sequence_offsets": torch.tensor(offsets, dtype=torch.int64),
        "completion_start": torch.tensor(starts, dtype=torch.int64),
        "topk_ids": torch.cat(topk_ids).reshape(-1, k).contiguous(),
        "topk_logprobs": torch.cat(topk_logprobs).reshape(-1, k).contiguous(),
        "tail_logprob": torch.cat(tails).float().contiguous(),
        "example_hash": example_hashes_tensor(hashes),
    }


def build_cache(
    teacher,
    tokenizer,
    dataset,
    out: str,
    *,
    k: int = 64,
    temperature: float = 1.0,
    dtype: str = "float16",
    batch_size: int = 8,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    shard_size: int = 1024,
    teacher_name: str | None = None,
    teacher_revision: str | None = None,
    dataset_name: str = "",
    split: str | None = None,
    progress: bool = True,
    on_shard_written: Callable[[int], None] | None = None,
) -> str:
    """Run `teacher` once over `dataset` (prompt–completion examples) and write its top-K cache to `out`.

    Example i of the dataset becomes cache entry i. When `out` already holds a partial cache with the same header,
    the build resumes after its last complete shard; a different header is refused. `on_shard_written(index)` is
    called after each shard and the manifest are on disk (progress hooks; tests inject a crash there).

    Returns `out`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; the cache needs at least one prompt–completion example.")
    # everything that can be refused is refused before `out` is created, so a refused build leaves nothing behind
    validate_prompt_completion_dataset(dataset, "the dataset")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length} (as RLKDConfig "
                         "requires): no trainer could use a cache built so. Lower --max-prompt-length.")
    vocab = teacher_vocab_size(teacher)
    if len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the teacher's logits have only V={vocab}; "
            "use the teacher's own tokenizer."
        )
    header = CacheHeader(
        teacher=teacher_name or getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__,
        teacher_revision=teacher_revision,
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=len(tokenizer),
        k=k,
        temperature=float(temperature),
        dtype=dtype,
        shard_size=shard_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        dataset=dataset_name,
        split=split,
    )
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        return _build(teacher, tokenizer, dataset, out, header, k=k, temperature=temperature, dtype=dtype,
                      batch_size=batch_size, shard_size=shard_size, progress=progress,
                      on_shard_written=on_shard_written)  # fmt: skip
    except BaseException:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # a build refused or stopped before its first shard leaves no empty folder behind
        raise


def _build(teacher, tokenizer, dataset, out: str, header: CacheHeader, *, k, temperature, dtype, batch_size,
           shard_size, progress, on_shard_written) -> str:  # fmt: skip
    max_length, max_prompt_length = header.max_length, header.max_prompt_length
    shards: list[dict] = []
    manifest = read_manifest(out)
    if manifest is not None:
        existing = CacheHeader.from_dict(manifest["header"])
        if existing != header:
            raise ValueError(
                f"{out} already holds a cache with another header ({'; '.join(existing.differences(header))}). "
                "Choose another --out, or delete the folder to rebuild."
            )
        shards = manifest["shards"]
    # Temporary files are leftovers of a crash mid-write; shards past the manifest are rewritten below.
    for leftover in glob.glob(os.path.join(out, "*.tmp-*")):
        os.remove(leftover)
    done = sum(entry["num_examples"] for entry in shards)
    if done > len(dataset):
        raise ValueError(f"{out} already holds {done} examples but the dataset has only {len(dataset)}.")
    if manifest is not None and manifest.get("complete") and done == len(dataset):
        return out

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher.eval()
    bar = tqdm(total=len(dataset), initial=done, unit="ex", desc="teacher top-k", disable=not progress)
    for index in range(len(shards), (len(dataset) + shard_size - 1) // shard_size):
        first, last = index * shard_size, min((index + 1) * shard_size, len(dataset))
        examples = []
        for position in range(first, last):
            row = dataset[position]
            example = tokenize_example(tokenizer, row, max_length=max_length, max_prompt_length=max_prompt_length)
            check_prompt_not_empty(example, position, "the dataset", row.get("prompt", row.get("messages")))
            examples.append(example)
        tensors = _encode_shard(examples, teacher, pad_id, k, temperature, batch_size, dtype, len(tokenizer))
        data = save(tensors, metadata={"shard": str(index), "first_example": str(first)})
        atomic_write(os.path.join(out, shard_name(index)), data)
        shards.append({"file": shard_name(index), "num_examples": last - first, "bytes": len(data),
                       "sha256": sha256_bytes(data)})
        write_manifest(out, header, shards, complete=last == len(dataset))
        bar.update(last - first)
        if on_shard_written is not None:
            on_shard_written(index)
    bar.close()
    return out
