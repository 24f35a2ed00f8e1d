"""Distil a teacher into a student from the command line or a YAML config (TRL's `TrlParser`, `--config`).

    python -m rlkd_onpolicy.train --config configs/train/on_policy.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu_zero3.yaml -m rlkd_onpolicy.train \\
        --config configs/train/speculative.yaml
    python -m rlkd_onpolicy.train --student_model Qwen/Qwen2.5-0.5B-Instruct --teacher_model Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/tldr --output_dir out --sampling_mode speculative
    python -m rlkd_onpolicy.train --config configs/train/served_teacher.yaml --teacher_server http://teacher:8000 \
        --teacher_top_k 64

Every `RLKDConfig` / `TrainingArguments` field is a flag and a YAML key; a flag overrides the YAML.
The dataset is TRL prompt–completion (a hub name, a saved `datasets` folder, or a json/jsonl/parquet file).
"""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelDataArguments:
    student_model: str = field(metadata={"help": "The student: a hub name or a local path."})
    dataset_name: str = field(metadata={"help": "A hub dataset, a saved datasets folder, or a json/jsonl file."})
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "The teacher: a hub name or a local path (same tokenizer). Not with --teacher_server (the "
                          "teacher on a vLLM server) or --teacher_cache (its top-k read from a cache)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (None: none)."})


def load_prompt_completion(name: str, config: str | None, split: str):
    """The split `split` of a dataset: a json/jsonl/parquet/csv file (one split, "train", as `datasets` loads a
    file), a saved `datasets` folder, or a hub dataset. A split the dataset lacks is refused, naming those it has."""
    import datasets

    path = Path(name)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{name}: unknown file type {path.suffix!r}; use .json, .jsonl, .parquet or .csv.")
        if split != "train":
            _no_split(name, split, ["train"], "a single file is one split, 'train': give the evaluation set as a "
                      "file of its own, or save a DatasetDict with both splits (save_to_disk) and pass its folder")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            if split != "train":
                _no_split(name, split, ["train"], "a saved Dataset (not a DatasetDict) is one split, 'train'")
            return loaded
        if split not in loaded:
            _no_split(name, split, sorted(loaded), "choose one of them")
        return loaded[split]
    return datasets.load_dataset(name, config, split=split)


def _no_split(name: str, split: str, splits: list[str], fix: str) -> None:
    raise ValueError(f"The dataset {name} has no split {split!r} (--dataset_train_split / --dataset_test_split); it "
                     f"has only {splits}: {fix}.")


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer
    from trl import TrlParser

    from rlkd_onpolicy.trainer import RLKDConfig, RLKDTrainer

    parser = TrlParser((ModelDataArguments, RLKDConfig))
    # TrlParser reads --config itself before argparse runs; declared here so that --help lists it.
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="A YAML file of these fields (configs/train/*.yaml); flags given too override it.")
    script_args, training_args = parser.parse_args_and_config(argv)[:2]  # [2]: the Namespace holding `config`
    train = load_prompt_completion(script_args.dataset_name, script_args.dataset_config,
                                   script_args.dataset_train_split)
    evaluation = None
    if script_args.dataset_test_split:
        evaluation = load_prompt_completion(script_args.dataset_name, script_args.dataset_config,
                                            script_args.dataset_test_split)
    tokenizer = AutoTokenizer.from_pretrained(script_args.student_model)
    trainer = RLKDTrainer(model=script_args.student_model, teacher_model=script_args.teacher_model,
                          args=training_args, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
