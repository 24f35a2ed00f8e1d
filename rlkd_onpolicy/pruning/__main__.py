"""CLI: prune a teacher into a student by activation importance and save it (docs/pruning.md).

    python -m rlkd_onpolicy.pruning --teacher embedded:smollm2 --calibration data.jsonl --params 81e6 --out student/
    python -m rlkd_onpolicy.pruning --teacher DIR --calibration texts.txt --intermediate-size 512 --out student/

The calibration file is .jsonl / .json (examples with "text", "prompt" + "completion" or "messages") or .txt (one
text a line). The student, its tokenizer and `pruning.json` (widths, parameter counts, calibration) go to --out.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rlkd_onpolicy.pruning.width import WIDTHS


def read_calibration(path: str, limit: int) -> list:
    """The first `limit` examples of a .jsonl / .json / .txt file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--calibration {path} is not a file; give a .jsonl, .json or .txt of texts.")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        examples = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".jsonl":
        examples = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        examples = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(examples, list):
            raise ValueError(f"--calibration {path}: a .json file must hold a list of examples.")
    else:
        raise ValueError(f"--calibration {path}: unsupported type '{suffix}'; use .jsonl, .json or .txt.")
    for row, example in enumerate(examples[:limit]):
        if not isinstance(example, str) and not (
            isinstance(example, dict)
            and ({"text"} <= set(example) or {"prompt", "completion"} <= set(example) or "messages" in example)
        ):
            raise ValueError(
                f"--calibration {path}: example {row} has neither 'text', 'prompt' + 'completion' nor "
                f"'messages' (got {example!r:.100})."
            )
    if not examples:
        raise ValueError(f"--calibration {path} holds no example.")
    return examples[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlkd_onpolicy.pruning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--teacher", required=True, help="local folder, hub name or 'embedded:smollm2'")
    parser.add_argument("--calibration", required=True, help=".jsonl/.json/.txt of texts the student will see")
    parser.add_argument("--out", required=True, help="folder for the pruned model (must not exist or be empty)")
    parser.add_argument("--samples", type=int, default=256, help="calibration examples used (default: 256)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per calibration example (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    parser.add_argument("--params", type=float, default=None, help="parameter target, e.g. 81e6 (picks the widths)")
    parser.add_argument(
        "--axes",
        default="intermediate_size",
        help=f"comma-separated widths a --params target shrinks, of {', '.join(WIDTHS)} (default: intermediate_size)",
    )
    for name in WIDTHS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"the student's {name}")
    args = parser.parse_args(argv)

    widths = {name: getattr(args, name) for name in WIDTHS if getattr(args, name) is not None}
    if args.params is not None and widths:
        parser.error(f"give --params or widths ({', '.join(sorted(widths))}), not both")
    if args.params is None and not widths:
        parser.error("give --params or at least one width (e.g. --intermediate-size 512)")
    for name in ("samples", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out} exists and is not an empty folder; choose a new one")
    axes = tuple(a.strip() for a in args.axes.split(",") if a.strip())
    examples = read_calibration(args.calibration, args.samples)

    from rlkd_onpolicy.models import load_model_and_tokenizer
    from rlkd_onpolicy.pruning.importance import calibration_batches
    from rlkd_onpolicy.pruning.width import check_supported, count_parameters, prune, widths_for_params

    teacher, tokenizer = load_model_and_tokenizer(args.teacher)
    check_supported(teacher)
    if args.params is not None:
        widths = widths_for_params(teacher, args.params, axes)
    batches = calibration_batches(tokenizer, examples, max_length=args.max_length, batch_size=args.batch_size)
    student = prune(teacher, batches, **widths)
    before = count_parameters(type(teacher), teacher.config)
    after = sum(p.numel() for p in student.parameters())
    report = {
        "teacher": args.teacher,
        "widths": {name: getattr(student.config, name) for name in WIDTHS},
        "teacher_widths": {name: getattr(teacher.config, name) for name in WIDTHS},
        "teacher_parameters": before,
        "student_parameters": after,
        "calibration": args.calibration,
        "calibration_examples": len(examples),
        "calibration_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
    }
    # Written to a temporary folder beside --out and renamed, so a failure leaves no half-written model.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in WIDTHS:
        print(f"{name}: {report['teacher_widths'][name]} -> {report['widths'][name]}")
    print(f"parameters: {before:,} -> {after:,} ({before / after:.2f}x smaller); saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
