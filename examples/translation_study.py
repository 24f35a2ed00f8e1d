"""Measurements behind the translation example's defaults (docs/example_translation.md, "How the default was chosen").

    # the teacher: zero-shot and after SFT, per direction, BLEU/chrF on John at several points of one SFT run
    .venv/bin/python examples/translation_study.py teacher --pairs en-fr fr-en es-en --steps 150 --eval-at 50 100 150
    # students: depth x SFT warm start, each distilled and beside the SFT baseline (same steps, batch, lr)
    .venv/bin/python examples/translation_study.py student --pair fr-en --layers 10 12 15 --warm-steps 0 60
    # why the ranking loss does (not) move the student: soft-rank diagnostics on a teacher/student pair
    .venv/bin/python examples/translation_study.py rank-diagnosis --teacher artifacts/teacher-<hash> \
        --student artifacts/student-<hash> --strengths 0.1 1 10

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
                           teacher_sft_steps=args.steps, artifacts_dir=str(args.artifacts_dir),
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
    info["seconds"] -= eval_seconds[0]
    measure(args.steps, info["seconds"])
    # Saved where the example looks for this teacher (same settings, same key): later runs start from it.
    folder = Path(cfg.artifacts_dir) / f"teacher-{cfg.teacher_key()}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "sft.json").write_text(json.dumps(info | {"settings": ex.dataclasses.asdict(cfg)}, indent=1))
    print(f"[teacher] saved to {folder}")


def student_study(args) -> None:
    """For each (student layers, warm-start SFT steps): the example with those flags, every requested method (the
    SFT baseline included), one row per method with the gain over the student before distillation."""
    ex = _example()
    for layers in args.layers:
        for warm in args.warm_steps:
            name = f"{args.pair}-L{layers}-W{warm}"
            flags = ["--src", args.pair.split("-")[0], "--tgt", args.pair.split("-")[1],
                     "--student-layers", str(layers), "--student-sft-steps", str(warm),
                     "--teacher-sft-steps", str(args.teacher_steps), "--teacher-lr", str(args.teacher_lr),
                     "--distill-steps", str(args.distill_steps), "--test-limit", str(args.test_limit),
                     "--sampling-mode", *args.modes, "--rank-weight", "0", "--seed", *map(str, args.seeds),
                     "--save-students", "false", "--artifacts-dir", str(args.artifacts_dir),
                     "--output-dir", str(args.out.parent / name), *args.extra]  # fmt: skip
            print("[study]", " ".join(flags), flush=True)
            results = ex.main(flags)
            before = results["rows"]["student before"]
            warm_seconds = (results["student_sft"] or {}).get("seconds", 0.0)
            for method, row in results["rows"].items():
                if method.startswith("teacher"):
                    continue
                seconds = row.get("train_seconds") or 0.0
                _append(args.out, {
                    "study": "student", "pair": args.pair, "layers": layers, "warm_steps": warm, "method": method,
                    "parameters": results["student_parameters"], "teacher_parameters": results["teacher_parameters"],
                    "warm_seconds": warm_seconds, "train_seconds": seconds if method != "student before" else 0.0,
                    **{k: row.get(k) for k in ("bleu", "chrf", "kl", "kl_own", "mor@5", "cr@1")},
                    "bleu_gain": None if method == "student before" else row["bleu"] - before["bleu"],
                    "flags": flags,
                })  # fmt: skip


def rank_diagnosis(args) -> None:
    """Teacher-forced on dev verses, per regularization strength ε: the fraction of tokens whose student soft ranks
    are hard (no gradient from the ranking loss), of undefined rows, and the per-token gradient norm that each term
    (forward KL, rank_weight × ranking loss) puts on the student's logits. Soft ranks are shift invariant (log-probs
    rank as logits do) and soft_rank(z / T, ε) = soft_rank(z, ε T), so ε also covers a temperature on the logits."""
    import torch

    from rlkd_onpolicy.data import collate_prompt_completion
    from rlkd_onpolicy.eval.translation import _completion_logits, _examples, _pad_id
    from rlkd_onpolicy.losses import distillation_loss
    from rlkd_onpolicy.models import load_model_and_tokenizer

    ex = _example()
    src, tgt = args.pair.split("-")
    cfg = ex.ExampleConfig(src=src, tgt=tgt, dev_limit=args.verses)
    dev = ex.load_data(cfg)["dev"]
    teacher, tokenizer = load_model_and_tokenizer(str(args.teacher))
    student, _ = load_model_and_tokenizer(str(args.student))
    examples = _examples(tokenizer, dev, src, tgt, None, cfg.instruction_role, max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length)  # fmt: skip
    batch = collate_prompt_completion(examples, _pad_id(tokenizer))
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        teacher_logits = _completion_logits(teacher.eval(), batch, "cpu")
        student_logits = _completion_logits(student.eval(), batch, "cpu")
    for strength in args.strengths:
        logits = student_logits.clone().requires_grad_()
        stats: dict = {}
        out = distillation_loss(logits, teacher_logits, loss="fkl", rank_weight=args.rank_weight,
                                rank_k=args.rank_k, regularization_strength=strength, mask=mask,
                                reduction="sum", rank_stats=stats)  # fmt: skip
        tokens = int(mask.sum())
        (kd_grad,) = torch.autograd.grad(out.kd, logits, retain_graph=True)
        (rank_grad,) = torch.autograd.grad(args.rank_weight * out.rank, logits)
        _append(args.out, {
            "study": "rank-diagnosis", "teacher": str(args.teacher), "student": str(args.student),
            "strength": strength, "rank_k": args.rank_k, "rank_weight": args.rank_weight,
            "tokens": tokens, "kd": out.kd.item() / tokens, "rank": out.rank.item() / tokens,
            "hard_fraction": stats["hard_rows"] / max(stats["rows"], 1),
            "undefined_fraction": stats["undefined_rows"] / max(stats["rows"], 1),
            # per-token mean of each term's gradient norm on that token's logits
            "kd_grad_norm": float(kd_grad[mask].norm(dim=-1).mean()),
            "rank_grad_norm": float(rank_grad[mask].norm(dim=-1).mean()),
        })  # fmt: skip


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
    student = sub.add_parser("student", help="Students: depth x warm start, distillation vs the SFT baseline.")
    student.add_argument("--pair", default="fr-en")
    student.add_argument("--layers", type=int, nargs="+", default=[10, 12, 15])
    student.add_argument("--warm-steps", type=int, nargs="+", default=[0, 60])
    student.add_argument("--teacher-steps", type=int, default=120)
    student.add_argument("--teacher-lr", type=float, default=3e-4)
    student.add_argument("--distill-steps", type=int, default=40)
    student.add_argument("--test-limit", type=int, default=100)
    student.add_argument("--modes", nargs="+", default=["sft", "off_policy", "on_policy"])
    student.add_argument("--seeds", type=int, nargs="+", default=[0])
    student.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More flags for the example.")
    diagnosis = sub.add_parser("rank-diagnosis", help="Soft-rank diagnostics of the ranking loss on dev verses.")
    diagnosis.add_argument("--teacher", type=Path, required=True)
    diagnosis.add_argument("--student", type=Path, required=True)
    diagnosis.add_argument("--pair", default="fr-en")
    diagnosis.add_argument("--verses", type=int, default=32)
    diagnosis.add_argument("--strengths", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    diagnosis.add_argument("--rank-k", type=int, default=5)
    diagnosis.add_argument("--rank-weight", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("runs/study/study.jsonl"))
    parser.add_argument("--artifacts-dir", type=Path, default=Path("artifacts"))
    args = parser.parse_args(argv)
    {"teacher": teacher_study, "student": student_study, "rank-diagnosis": rank_diagnosis}[args.study](args)


if __name__ == "__main__":
    main()
