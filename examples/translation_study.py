"""Measurements behind the translation example's defaults (docs/example_translation.md, "How the default was chosen").

    # the teacher: zero-shot and after SFT, per direction, BLEU/chrF on John at several points of one SFT run
    .venv/bin/python examples/translation_study.py teacher --pairs en-fr fr-en es-en --steps 150 --eval-at 50 100 150

Each measurement is appended to `--out` (JSON lines) as soon as it is made, so a long study keeps what it measured.
The settings not given here are the example's defaults (`ExampleConfig`), so a row reproduces with the example's flags.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _example():
    spec = importlib.util.spec_from_file_location("distill_translation", REPO / "examples" / "distill_translation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _append(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as file:
        file.write(json.dumps(row) + "\n")
    print("[row]", json.dumps({k: v for k, v in row.items() if k != "samples"}))


def teacher_study(args) -> None:
    """For each direction: the zero-shot teacher, then one SFT run evaluated at `--eval-at` steps."""
    ex = _example()
    for pair in args.pairs:
        _teacher_direction(args, ex, *pair.split("-"))


def _teacher_direction(args, ex, src: str, tgt: str) -> None:
    from transformers import TrainerCallback

    from rlkd_onpolicy.models import load_model_and_tokenizer

    cfg = ex.ExampleConfig(src=src, tgt=tgt, test_limit=args.test_limit, teacher_lr=args.lr,
                           max_chars=args.max_chars, instruction_role=args.instruction_role,
                           sft_batch_size=args.batch_size, eval_max_new_tokens=args.max_new_tokens)  # fmt: skip
    data = ex.load_data(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.teacher)
    base = {"study": "teacher", "src": src, "tgt": tgt, "lr": args.lr, "batch": args.batch_size,
            "max_chars": args.max_chars, "instruction_role": args.instruction_role,
            "test_verses": len(data["test"]), "total_steps": args.steps}  # fmt: skip

    eval_seconds = [0.0]  # evaluations inside the SFT run, not counted as SFT time

    def measure(step: int, seconds: float) -> None:
        result = ex.evaluate(model, tokenizer, data["test"], cfg)
        eval_seconds[0] += result["eval_seconds"]
        _append(args.out, base | {"step": step, "sft_seconds": seconds, "bleu": result["bleu"],
                                  "chrf": result["chrf"], "eval_seconds": result["eval_seconds"],
                                  "samples": result["samples"][:3]})  # fmt: skip

    if args.zero_shot:
        measure(0, 0.0)
    eval_seconds[0] = 0.0
    start = time.perf_counter()

    class EvalAt(TrainerCallback):
        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step in args.eval_at and state.global_step != args.steps:
                measure(state.global_step, time.perf_counter() - start - eval_seconds[0])

    info = ex.sft(model, tokenizer, data["train"], cfg, args.out.parent / "sft", steps=args.steps, lr=args.lr,
                  callbacks=[EvalAt()])  # fmt: skip
    measure(args.steps, info["seconds"] - eval_seconds[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    teacher = sub.add_parser("teacher", help="Teacher per direction: zero-shot and after SFT.")
    teacher.add_argument("--pairs", nargs="+", default=["en-fr", "fr-en", "es-en"])
    teacher.add_argument("--steps", type=int, default=150)
    teacher.add_argument("--eval-at", type=int, nargs="*", default=[])
    teacher.add_argument("--lr", type=float, default=3e-4)
    teacher.add_argument("--batch-size", type=int, default=8)
    teacher.add_argument("--max-chars", type=int, default=200)
    teacher.add_argument("--instruction-role", default="system")
    teacher.add_argument("--test-limit", type=int, default=100)
    teacher.add_argument("--max-new-tokens", type=int, default=96)
    teacher.add_argument("--no-zero-shot", dest="zero_shot", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("runs/study/study.jsonl"))
    args = parser.parse_args(argv)
    {"teacher": teacher_study}[args.study](args)


if __name__ == "__main__":
    main()
