"""CLI: `python -m rlkd_onpolicy.cache build|verify ...` (see docs/cache.md)."""

from __future__ import annotations

import argparse
import os
import sys

from rlkd_onpolicy.cache.format import STORAGE_DTYPES


def load_prompt_completion_dataset(name: str, split: str):
    """A json/jsonl/parquet file, a folder written by `Dataset.save_to_disk`, or a hub dataset name."""
    import datasets

    if os.path.isfile(name):
        extension = name.rsplit(".", 1)[-1].lower()
        builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(extension)
        if builder is None:
            raise ValueError(f"--dataset {name}: unsupported file type '.{extension}'; use .json, .jsonl or .parquet.")
        if split != "train":
            raise ValueError(f"--split {split!r}: a single file is one split, 'train' (the one `datasets` gives it).")
        try:
            return datasets.load_dataset(builder, data_files=name, split="train")
        except StopIteration:  # what `datasets` raises on a file without a single example (it names nothing)
            raise ValueError(f"--dataset {name} holds no example; the cache needs prompt–completion examples.") \
                from None
    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--split {split!r} is not in {name} (splits: {list(loaded)}).")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(name, split=split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkd_onpolicy.cache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="run a teacher over a dataset and write its top-K cache (resumes)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--teacher", required=True, help="local path or hub name of the teacher model")
    build.add_argument("--revision", default=None, help="hub revision of the teacher (recorded in the header)")
    build.add_argument("--tokenizer", default=None, help="tokenizer path or name (default: the teacher's)")
    build.add_argument("--dataset", required=True, help="json/jsonl/parquet file, saved datasets folder or hub name")
    build.add_argument("--split", default="train", help="dataset split (saved DatasetDict or hub dataset)")
    build.add_argument("--out", required=True, help="cache folder (created; a partial build there is resumed)")
    build.add_argument("--k", type=int, default=64, help="top-K ids stored per completion token")
    build.add_argument("--temperature", type=float, default=1.0, help="teacher log-probs at logits / temperature")
    build.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward pass")
    build.add_argument("--max-length", type=int, default=None, help="max prompt + completion tokens")
    build.add_argument("--max-prompt-length", type=int, default=None, help="max prompt tokens (keeps the end)")
    build.add_argument("--shard-size", type=int, default=1024, help="examples per shard file")
    build.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16", help="log-prob storage dtype")
    build.add_argument("--teacher-dtype", choices=sorted(STORAGE_DTYPES), default=None,
                       help="dtype to load the teacher in (default: float32 on CPU, bfloat16 on CUDA)")
    build.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    verify = commands.add_parser("verify", help="check every shard's checksum and shapes")
    verify.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "verify":
        from rlkd_onpolicy.cache.reader import TeacherCache

        cache = TeacherCache.open(args.path, allow_partial=True)
        cache.verify()
        print(f"{args.path}: {len(cache)} examples in {len(cache.shards)} shards, all checksums match.")
        return 0

    for name in ("k", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not args.temperature > 0:
        parser.error(f"--temperature={args.temperature} must be > 0")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd_onpolicy.cache.writer import build_cache

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dtype = STORAGE_DTYPES[args.teacher_dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    dataset = load_prompt_completion_dataset(args.dataset, args.split)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher, revision=args.revision)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, revision=args.revision, dtype=teacher_dtype)
    build_cache(
        teacher.to(device),
        tokenizer,
        dataset,
        args.out,
        k=args.k,
        temperature=args.temperature,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        shard_size=args.shard_size,
        teacher_name=args.teacher,
        teacher_revision=args.revision or getattr(teacher.config, "_commit_hash", None),
        dataset_name=args.dataset,
        split=args.split,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
