"""Measurements behind the translation example's defaults (docs/example_translation.md, "How the default was chosen").

    # the teacher: zero-shot and after SFT, per direction, BLEU/chrF on John at several points of one SFT run
    .venv/bin/python examples/translation_study.py teacher --pairs en-fr fr-en es-en --steps 150 --eval-at 50 100 150
    # students: depth x SFT warm start, each distilled and beside the SFT baseline (same steps, batch, lr)
    .venv/bin/python examples/translation_study.py student --pair fr-en --layers 10 12 15 --warm-steps 0 60
    # students of the same size by depth or width pruning: at pruning, after the warm start (docs/pruning.md)
    .venv/bin/python examples/translation_study.py pruning --students depth-15 mlp-512 heads-6+mlp-680
    # why the ranking loss does (not) move the student: soft-rank diagnostics on a teacher/student pair
    .venv/bin/python examples/translation_study.py rank-diagnosis --teacher artifacts/teacher-<hash> \
        --student artifacts/student-<hash> --strengths 0.1 1 10
    # the ranking loss's options one at a time (ε, rank_k, rank_weight, union, dynamic weighting), 3 seeds each
    .venv/bin/python examples/translation_study.py ablation --config configs/translation/rlkd_ablation.yaml
    # GKD's and SKD's orderings: sampling modes x losses x rank weights from one supervised student, 3 seeds
    .venv/bin/python examples/translation_study.py orderings --config configs/translation/orderings.yaml

Each measurement is appended to `--out` (JSON lines) as soon as it is made, so a long study keeps what it measured.
The settings not given here are the example's defaults (`ExampleConfig`), so a row reproduces with the example's flags.
"""

import argparse
import importlib.util
import json
import os
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


# Students of about the depth cut's 81.4M parameters, made four ways (the MLP takes what the other cuts leave).
STUDENTS = {
    "depth-15": ["--student-pruning", "depth", "--student-layers", "15"],
    "mlp-512": ["--student-pruning", "width", "--student-intermediate-size", "512"],
    "heads-6+mlp-680": ["--student-pruning", "width", "--student-num-attention-heads", "6",
                        "--student-intermediate-size", "680"],
    "hidden-504+mlp-736": ["--student-pruning", "width", "--student-hidden-size", "504",
                           "--student-intermediate-size", "736"],
    "heads-6+hidden-504+mlp-904": ["--student-pruning", "width", "--student-num-attention-heads", "6",
                                   "--student-hidden-size", "504", "--student-intermediate-size", "904"],
}  # fmt: skip


def pruning_study(args) -> None:
    """For each way of making the student: its metrics at pruning (no training), after the warm start, and, with
    --distill-steps > 0, after each requested method (the SFT baseline included). One row per stage and method."""
    ex = _example()
    for name in args.students:
        base = [*STUDENTS[name], "--test-limit", str(args.test_limit), "--seed", *map(str, args.seeds),
                "--save-students", "false", "--artifacts-dir", str(args.artifacts_dir), *args.extra]  # fmt: skip
        stages = [("at pruning", ["--student-sft-steps", "0", "--skip-distill"]),
                  ("warm start", ["--student-sft-steps", str(args.warm_steps), "--skip-distill"])]  # fmt: skip
        if args.distill_steps:
            stages.append(("distilled", ["--student-sft-steps", str(args.warm_steps), "--distill-steps",
                                         str(args.distill_steps), "--sampling-mode", *args.modes]))  # fmt: skip
        for stage, flags in stages:
            flags = [*base, *flags, "--output-dir", str(args.out.parent / f"{name}-{stage.replace(' ', '-')}")]
            print("[study]", " ".join(flags), flush=True)
            start = time.perf_counter()
            results = ex.main(flags)
            for method, row in results["rows"].items():
                if method.startswith("teacher") or (stage == "distilled" and method == "student before"):
                    continue
                _append(args.out, {
                    "study": "pruning", "student": name, "stage": stage, "method": method,
                    "parameters": results["student_parameters"], "warm_steps": args.warm_steps,
                    "warm_seconds": (results["student_sft"] or {}).get("seconds", 0.0),
                    "train_seconds": row.get("train_seconds"), "wall_seconds": time.perf_counter() - start,
                    **{k: row.get(k) for k in ("bleu", "chrf", "kl", "kl_own", "mor@5", "cr@1")}, "flags": flags,
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


KD_ONLY, RLKD = "KD only (rank 0)", "KD + rank (RLKD's defaults)"


def _finished(folder: Path) -> dict | None:
    """The example's results.json in `folder` if its run finished (not a partial one), else None."""
    file = folder / "results.json"
    if not file.is_file():
        return None
    results = json.loads(file.read_text())
    return None if results.get("partial") else results


def _checked_config(ex, folder: Path, settings: dict, where: str):
    """Write `settings` (output_dir = `folder`) to folder/config.yaml; returns (its path, the ExampleConfig it makes),
    after building every method's RLKDConfig, so that a bad value fails, naming `where`, before anything runs."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(settings | {"output_dir": str(folder)}, sort_keys=False, allow_unicode=True))
    try:
        cfg = ex.parse_args(["--config", str(path)])
        for _, mode, weight in ex.method_names(cfg):
            if mode != ex.SFT_BASELINE:
                ex.rlkd_config(cfg, sampling_mode=mode, rank_weight=weight, seed=cfg.seeds[0], output_dir=folder)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from error
    return path, cfg


def ablation_plan(ex, config: Path, output: Path | None = None):
    """Read and check an ablation plan (YAML: base, variants, optional settings and output_dir) before anything runs:
    the base must run one sampling mode with rank weights 0 and 2; each variant's settings (the base's, rank weight
    2 unless it sets rank_weights, then the plan's `settings`, then its own changes) are written to
    <output>/<variant>/config.yaml and must make a valid ExampleConfig and RLKDConfig with the base's seeds.
    Returns (base preset path, base ExampleConfig, {variant: (config path, changes)}, output folder)."""
    import yaml

    plan = yaml.safe_load(Path(config).read_text()) or {}
    unknown = sorted(set(plan) - {"base", "settings", "variants", "output_dir"})
    if unknown or not plan.get("variants") or "base" not in plan:
        raise ValueError(f"{config}: needs 'base' and 'variants' (optional 'settings', 'output_dir'); "
                         f"unknown keys {unknown}.")  # fmt: skip
    base_file = REPO / plan["base"]
    base = ex.parse_args(["--config", str(base_file)])
    if sorted(base.rank_weights) != [0.0, 2.0] or len(base.sampling_modes) != 1:
        raise ValueError(f"{base_file}: the base must run one sampling mode with rank_weights [0.0, 2.0], not "
                         f"{base.sampling_modes} x {base.rank_weights}.")  # fmt: skip
    output = Path(output or plan.get("output_dir", "runs/rlkd_ablation"))
    base_settings = yaml.safe_load(base_file.read_text())
    configs = {}
    for name, changes in plan["variants"].items():
        settings = base_settings | {"rank_weights": [2.0]} | plan.get("settings", {}) | dict(changes)
        path, cfg = _checked_config(ex, output / ex._slug(name), settings, f"{config}: variant {name!r} ({changes})")
        if cfg.seeds != base.seeds:
            raise ValueError(f"{config}: variant {name!r}: seeds {cfg.seeds} differ from the base's {base.seeds}; "
                             "the comparison pairs runs by seed.")  # fmt: skip
        configs[name] = (path, changes)
    return base_file, base, configs, output


def ablation(args) -> None:
    """The ranking loss's options, one at a time, on a base preset (RLKD's Table 1 in miniature): the base runs KD
    with rank weight 0 and with RLKD's defaults (its own output_dir, reused when finished); each variant changes
    some of the example's settings and runs the base's seeds, so every variant is paired by seed with both base
    rows. Writes <output_dir>/ablation.md and ablation.json after every variant; a finished variant is reused."""
    ex = _example()
    base_file, base, configs, output = ablation_plan(ex, args.config)
    mode = base.sampling_modes[0]
    kd_name, rank_name = (f"{mode} {base.loss} rank={w:g}" for w in (0.0, 2.0))
    results = _finished(Path(base.output_dir))
    if results is None:
        print("[ablation] base:", base_file, flush=True)
        results = ex.main(["--config", str(base_file)])
    runs = {KD_ONLY: results["runs"][kd_name], RLKD: results["runs"][rank_name]}
    described = {KD_ONLY: "rank_weight 0", RLKD: "rank_weight 2, rank_k 5, ε 1, exact union, no dynamic weighting"}
    for name, (path, changes) in configs.items():
        results = _finished(path.parent)
        if results is None:
            print(f"[ablation] {name}: {path}", flush=True)
            results = ex.main(["--config", str(path)])
        (method,) = [m for m in results["runs"] if not m.startswith(("teacher", "student"))]
        runs[name] = results["runs"][method]
        described[name] = ", ".join(f"{k} {v}" for k, v in changes.items())
        _write_ablation(ex, output, runs, described, args.config)


def _write_ablation(ex, output: Path, runs: dict, described: dict, config: Path) -> None:
    rows = {f"{name} ({described[name]})": ex.summarise(r) for name, r in runs.items()}
    pairs = [(RLKD, KD_ONLY)] + [(n, b) for n in runs if n not in (KD_ONLY, RLKD) for b in (KD_ONLY, RLKD)]
    seconds = sum(r.get("train_seconds", 0.0) for rs in runs.values() for r in rs)
    text = (f"Ablation of the ranking loss (`examples/translation_study.py ablation --config {config}`); "
            f"{sum(map(len, runs.values()))} runs, {seconds / 60:.0f} min of training.\n\n"
            + ex.markdown_table(rows)
            + "\n\nPaired differences (runs paired by seed; mean [95 % t interval]):\n\n"
            + ex.paired_table(runs, pairs) + "\n" + _diagnostics_table(ex, runs, described))  # fmt: skip
    (output / "ablation.md").write_text(text)
    (output / "ablation.json").write_text(json.dumps({"runs": runs, "described": described}, indent=1, default=str))
    print(text, flush=True)


def _diagnostics_table(ex, runs: dict, described: dict) -> str:
    """Mean over seeds and logging steps of the trainer's ranking-loss diagnostics, per row that logged them."""
    lines = []
    for name, rs in runs.items():
        logged = [r.get("diagnostics") or {} for r in rs]
        means = {k: [d[k] for d in logged if k in d] for k in ex.DIAGNOSTICS}
        if any(means.values()):
            cells = [f"{sum(v) / len(v):.3f}" if v else "" for v in means.values()]
            lines.append(f"| {name} ({described[name]}) | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = "| row | " + " | ".join(ex.DIAGNOSTICS) + " |\n" + "|---" * (len(ex.DIAGNOSTICS) + 1) + "|\n"
    title = "\nRanking-loss diagnostics (trainer, mean over logging steps and seeds):\n\n"
    return title + header + "\n".join(lines) + "\n"


# GKD's and SKD's "supervised KD" is off-policy forward KL: every other method is compared with it.
SUPERVISED_KD = ("fkl", "off_policy")  # (loss, mode)


def orderings_plan(ex, config: Path, output: Path | None = None):
    """Read and check an orderings plan (YAML: `settings` shared by every loss, `losses` {loss: its own changes},
    optional `output_dir`) before anything runs. Each loss's settings (the example's defaults, then `settings`, then
    its changes, `loss` set) are written to <output>/<loss>/config.yaml and must make a valid ExampleConfig and an
    RLKDConfig per method; all losses run the same seeds (runs are paired by seed across losses too), and at most
    one runs the SFT baseline (one row of that name). Returns ({loss: config path}, output folder)."""
    import yaml

    plan = yaml.safe_load(Path(config).read_text()) or {}
    unknown = sorted(set(plan) - {"settings", "losses", "output_dir"})
    if unknown or not plan.get("losses"):
        raise ValueError(f"{config}: needs 'losses' (optional 'settings', 'output_dir'); unknown keys {unknown}.")
    output = Path(output or plan.get("output_dir", "runs/orderings"))
    configs, seeds, with_sft = {}, None, []
    for loss, changes in plan["losses"].items():
        settings = dict(plan.get("settings") or {}) | dict(changes or {}) | {"loss": loss}
        path, cfg = _checked_config(ex, output / ex._slug(loss), settings, f"{config}: loss {loss!r} ({changes})")
        if seeds is not None and cfg.seeds != seeds:
            raise ValueError(f"{config}: loss {loss!r} runs seeds {cfg.seeds}, another loss {seeds}; the comparison "
                             "pairs runs by seed, so every loss needs the same seeds.")  # fmt: skip
        seeds = cfg.seeds
        if ex.SFT_BASELINE in cfg.sampling_modes:
            with_sft.append(loss)
        configs[loss] = path
    if len(with_sft) > 1:
        raise ValueError(f"{config}: losses {with_sft} all run the SFT baseline (no teacher, the same runs): keep "
                         f"'{ex.SFT_BASELINE}' in one loss's sampling_modes.")  # fmt: skip
    return configs, output


def orderings(args) -> None:
    """The sampling modes (supervised KD, on-policy, mixed, speculative) x losses x rank weights from the same
    supervised student, seeds paired: GKD's and SKD's orderings (issue 13). Runs each loss of the plan named by
    --loss (all by default, in the plan's order; runs already made are reused, so a stopped study resumes and two
    shells can run two losses side by side), then writes <output_dir>/orderings.md and orderings.json from every
    loss's results, partial ones included (--report-only: only that)."""
    ex = _example()
    configs, output = orderings_plan(ex, args.config)
    unknown = sorted(set(args.loss or []) - set(configs))
    if unknown:
        raise ValueError(f"--loss {unknown}: the plan {args.config} has losses {list(configs)}.")
    if not args.report_only:
        for loss, path in configs.items():
            if args.loss and loss not in args.loss:
                continue
            if _finished(path.parent) is None:
                print(f"[orderings] {loss}: {path}", flush=True)
                ex.main(["--config", str(path)])
    text = _write_orderings(ex, output, configs, args.config)
    print(text, flush=True)


def orderings_pairs(methods: list[tuple[str, str, str, float]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The paired comparisons of an orderings study, by question. `methods`: (row name, loss, mode, rank weight)."""
    names = {(loss, mode, weight): name for name, loss, mode, weight in methods}
    sections: dict[str, list[tuple[str, str]]] = {
        "against supervised KD (off-policy forward KL, same rank weight), GKD's and SKD's baseline": [],
        "against on-policy KD (same loss and rank weight), SKD's and mixed data's claim": [],
        "of the ranking loss (rank weight > 0 against 0, same mode and loss)": [],
        "of the divergence (against forward KL, same mode and rank weight; off-policy is in the first table)": [],
        "against the SFT baseline, what the teacher adds": [],
    }
    supervised, on_policy, rank, loss_pairs, sft = sections.values()
    baseline = next((name for name, _, mode, _ in methods if mode == "sft"), None)
    for name, loss, mode, weight in methods:
        if mode == "sft":
            continue
        kd = names.get((*SUPERVISED_KD, weight))
        if kd is not None and kd != name:
            supervised.append((name, kd))
        if mode in ("mixed", "speculative") and (loss, "on_policy", weight) in names:
            on_policy.append((name, names[(loss, "on_policy", weight)]))
        if weight > 0 and (loss, mode, 0.0) in names:
            rank.append((name, names[(loss, mode, 0.0)]))
        if loss != "fkl" and ("fkl", mode) != SUPERVISED_KD and ("fkl", mode, weight) in names:
            loss_pairs.append((name, names[("fkl", mode, weight)]))
        if baseline is not None:
            sft.append((name, baseline))
    return [(title, pairs) for title, pairs in sections.items() if pairs]


def _write_orderings(ex, output: Path, configs: dict[str, Path], config: Path) -> str:
    """orderings.md: every finished method's row (mean ± 95 % half-width), rollout diagnostics, and the paired
    differences by question; orderings.json: the runs; curves_<loss>.png: the dev curves of each loss's methods.
    Each written through a temporary file, since two shells may write them at once."""
    rows: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    methods, partial = [], []
    for loss, path in configs.items():
        file = path.parent / "results.json"
        if not file.is_file():
            partial.append(f"{loss} (not started)")
            continue
        results = json.loads(file.read_text())
        if results.get("partial"):
            partial.append(f"{loss} (partial)")
        for name, row in results["rows"].items():
            if name.startswith(("teacher", "student")):
                rows.setdefault(name, row)
        cfg = ex.ExampleConfig(**{k: v for k, v in results["config"].items()})
        for name, mode, weight in ex.method_names(cfg):
            if name in results["runs"]:
                runs[name] = results["runs"][name]
                rows[name] = ex.summarise(runs[name]) if len(runs[name]) > 1 else dict(runs[name][0])
                methods.append((name, loss, mode, weight))
    seconds = sum(r.get("train_seconds", 0.0) for rs in runs.values() for r in rs)
    shown = Path(config).resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
    text = (f"Orderings of the sampling modes (`examples/translation_study.py orderings --config {shown}`); "
            f"{sum(map(len, runs.values()))} runs, {seconds / 60:.0f} min of training"
            + (f"; still running or stopped: {', '.join(partial)}" if partial else "") + ".\n\n"
            + ex.markdown_table(rows) + "\n" + _rollout_table(ex, runs))  # fmt: skip
    for title, pairs in orderings_pairs(methods):
        text += f"\nPaired differences {title}; runs paired by seed, mean [95 % t interval]:\n\n"
        text += ex.paired_table(runs, pairs) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    baseline = [name for name, _, mode, _ in methods if mode == ex.SFT_BASELINE]
    for loss in configs:  # dev MOR@5 and KL against steps, one figure per loss (with the SFT baseline), seed bands
        names = [name for name, of, mode, _ in methods if of == loss and mode != ex.SFT_BASELINE]
        if names:
            temporary = output / f".{os.getpid()}.curves_{loss}.png"
            ex.plot_curves({name: [r.get("dev") or [] for r in runs[name]] for name in baseline + names}, temporary)
            temporary.replace(output / f"curves_{loss}.png")
            text += f"\nDev curves, {loss}: curves_{loss}.png\n"
    report = json.dumps({"rows": rows, "runs": runs}, indent=1, default=str)
    for name, content in (("orderings.md", text), ("orderings.json", report)):
        temporary = output / f".{name}.{os.getpid()}"
        temporary.write_text(content)
        temporary.replace(output / name)
    return text


def _rollout_table(ex, runs: dict) -> str:
    """Mean over seeds and logging steps of what the rollouts logged: SKD's acceptance rate, mixed's on-policy
    share (empty for modes without them)."""
    lines = []
    for name, rs in runs.items():
        logged = [r.get("diagnostics") or {} for r in rs]
        means = {k: [d[k] for d in logged if k in d] for k in ex.ROLLOUT_DIAGNOSTICS}
        if any(means.values()):
            lines.append(f"| {name} | " + " | ".join(f"{sum(v) / len(v):.3f}" if v else "" for v in means.values())
                         + " |")  # fmt: skip
    if not lines:
        return ""
    header = "| method | " + " | ".join(ex.ROLLOUT_DIAGNOSTICS) + " |\n" + "|---" * (len(ex.ROLLOUT_DIAGNOSTICS) + 1)
    return "\nRollouts (mean over logging steps and seeds):\n\n" + header + "|\n" + "\n".join(lines) + "\n"


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
    pruned = sub.add_parser("pruning", help="Students made by depth or width pruning: at pruning, warm, distilled.")
    pruned.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    pruned.add_argument("--warm-steps", type=int, default=30)
    pruned.add_argument("--distill-steps", type=int, default=0, help="0: stop after the warm start.")
    pruned.add_argument("--modes", nargs="+", default=["off_policy", "sft"])
    pruned.add_argument("--test-limit", type=int, default=50)
    pruned.add_argument("--seeds", type=int, nargs="+", default=[0])
    pruned.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More flags for the example.")
    diagnosis = sub.add_parser("rank-diagnosis", help="Soft-rank diagnostics of the ranking loss on dev verses.")
    diagnosis.add_argument("--teacher", type=Path, required=True)
    diagnosis.add_argument("--student", type=Path, required=True)
    diagnosis.add_argument("--pair", default="fr-en")
    diagnosis.add_argument("--verses", type=int, default=32)
    diagnosis.add_argument("--strengths", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    diagnosis.add_argument("--rank-k", type=int, default=5)
    diagnosis.add_argument("--rank-weight", type=float, default=2.0)
    ablate = sub.add_parser("ablation", help="The ranking loss's options, one at a time, on a base preset.")
    ablate.add_argument("--config", type=Path, default=REPO / "configs" / "translation" / "rlkd_ablation.yaml")
    order = sub.add_parser("orderings", help="Sampling modes x losses x rank weights from one supervised student.")
    order.add_argument("--config", type=Path, default=REPO / "configs" / "translation" / "orderings.yaml")
    order.add_argument("--loss", nargs="+", help="Run only these losses of the plan (e.g. one per shell).")
    order.add_argument("--report-only", action="store_true", help="Only write orderings.md from what has run.")
    parser.add_argument("--out", type=Path, default=Path("runs/study/study.jsonl"))
    parser.add_argument("--artifacts-dir", type=Path, default=Path("artifacts"))
    args = parser.parse_args(argv)
    {"teacher": teacher_study, "student": student_study, "pruning": pruning_study, "rank-diagnosis": rank_diagnosis,
     "ablation": ablation, "orderings": orderings}[args.study](args)  # fmt: skip


if __name__ == "__main__":
    main()
