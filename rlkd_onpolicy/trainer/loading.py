"""The student and the teacher as the trainer holds them: loaded from names or taken as objects, the student with
its PEFT adapters and dropout setting, the teacher placed for inference (accelerate, or a DeepSpeed engine), and
the `Teacher` (rlkd_onpolicy/teacher/) that scores the rollouts: a local model, a cache or a server."""

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlkd_onpolicy.data.prompt_completion import validate_prompt_completion_dataset
from rlkd_onpolicy.teacher import CachedTeacher, LocalTeacher, Teacher
from rlkd_onpolicy.trainer.config import RLKDConfig, check_against_vocabulary
from rlkd_onpolicy.trainer.cross_tokenizer import teacher_tokenizer_for, tokenize_cross_dataset
from rlkd_onpolicy.trainer.data import (
    check_completion_tokens,
    check_map_style,
    resolve_tokenizer,
    tokenize_dataset,
    tokenized_examples,
)
from rlkd_onpolicy.trainer.deepspeed import prepare_teacher
from rlkd_onpolicy.trainer.guards import (
    check_cache_vocabulary,
    check_own_forward,
    check_positions,
    check_same_tokenizer,
    check_separate_teacher,
    check_teachers,
    open_cache,
)
from rlkd_onpolicy.trainer.reliability import check_output_dir_writable
from rlkd_onpolicy.vocab import vocabulary_size


@dataclass
class Loaded:
    """What `load_and_check` gives the trainer: the student (with its adapters), the teacher model (None with a
    cache or a server), the shared tokenizer and vocabulary size, the opened cache or the checked server, and the
    tokenised datasets."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tokenizer: object
    vocab_size: int
    cache: object | None
    served: object | None
    train_dataset: object
    eval_dataset: object | None
    teacher_tokenizer: object | None = None  # a teacher with another tokenizer (cross_tokenizer.py), else None
    teacher_vocab_size: int | None = None
    student_server: object | None = None  # use_vllm: the checked StudentServer


def load_and_check(model, teacher_model, args: RLKDConfig, processing_class, train_dataset, eval_dataset,
                   peft_config) -> Loaded:  # fmt: skip
    """Everything before `Trainer.__init__`: the cheap checks first (teachers, output folder, tokenizer, cache,
    datasets), then the models are loaded and checked, then the datasets tokenised (and held against the cache)."""
    teacher_model = teacher_from_args(teacher_model, args)
    check_teachers(teacher_model, args)
    check_separate_teacher(model, teacher_model)  # before anything sets requires_grad on either
    check_output_dir_writable(args.output_dir)
    tokenizer = resolve_tokenizer(model, processing_class)
    teacher_tokenizer = teacher_tokenizer_for(args, tokenizer)  # None: the teacher shares the student's tokenizer
    cache = None
    if args.teacher_cache is not None:
        cache = open_cache(args, tokenizer, teacher_model, train_dataset, eval_dataset)
        teacher_model = None  # the cache stands for the teacher: it is never loaded
    if isinstance(teacher_model, str) and teacher_tokenizer is None:
        check_same_tokenizer(tokenizer, teacher_model)
    check_map_style(train_dataset, "train_dataset")
    validate_prompt_completion_dataset(train_dataset, "train_dataset")
    for name, dataset in eval_datasets(eval_dataset).items():
        check_map_style(dataset, name)
        validate_prompt_completion_dataset(dataset, name)
    model = load_model(model, args.model_init_kwargs, "model")
    teacher = None if teacher_model is None else load_model(teacher_model, args.teacher_model_init_kwargs,
                                                             "teacher_model")  # fmt: skip
    check_own_forward(model, "model")
    if teacher is not None:
        check_own_forward(teacher, "teacher_model")
    teacher_vocab_size = None
    if teacher_tokenizer is None:
        vocab_size = vocabulary_size(model, teacher, tokenizer)  # the tokenizer's ids, for everything
    else:  # each model against its own tokenizer
        vocab_size = vocabulary_size(model, None, tokenizer)
        teacher_vocab_size = vocabulary_size(teacher, None, teacher_tokenizer)
    check_against_vocabulary(args, vocab_size, None if cache is None else cache.header.k)
    served = None if args.teacher_server is None else served_teacher(args, tokenizer, vocab_size)
    if teacher_tokenizer is not None and args.use_vllm:
        raise ValueError(f"use_vllm=True with a teacher of another tokenizer (teacher_tokenizer_name_or_path="
                         f"{args.teacher_tokenizer_name_or_path!r}) is not supported: the cross-tokenizer path samples "
                         "the student in process. Set use_vllm=False (docs/cross_tokenizer.md).")
    student_server = None if not args.use_vllm else vllm_student_server(args, tokenizer, vocab_size, model)
    if cache is not None:
        check_cache_vocabulary(cache, vocab_size)
    model = trainable_student(model, peft_config, args.disable_dropout)
    if teacher_tokenizer is not None:
        train_dataset = tokenize_cross_dataset(train_dataset, tokenizer, teacher_tokenizer, args, "train_dataset")
        if isinstance(eval_dataset, dict):  # Trainer's dict of named eval sets
            eval_dataset = {key: tokenize_cross_dataset(dataset, tokenizer, teacher_tokenizer, args,
                                                        f"eval_dataset[{key!r}]")
                            for key, dataset in eval_dataset.items()}  # fmt: skip
        elif eval_dataset is not None:
            eval_dataset = tokenize_cross_dataset(eval_dataset, tokenizer, teacher_tokenizer, args, "eval_dataset")
        return Loaded(model, teacher, tokenizer, vocab_size, cache, served, train_dataset, eval_dataset,
                      teacher_tokenizer, teacher_vocab_size)  # fmt: skip
    train_dataset = tokenize_dataset(train_dataset, tokenizer, args, "train_dataset")
    if cache is not None:  # every example against the cache's hashes, before any work
        cache.check_examples(tokenized_examples(train_dataset), tokenizer=tokenizer, max_length=args.max_length,
                             max_prompt_length=args.max_prompt_length)  # fmt: skip
    if isinstance(eval_dataset, dict):  # Trainer's dict of named eval sets: metrics eval_<name>_*
        eval_dataset = {key: tokenize_dataset(dataset, tokenizer, args, f"eval_dataset[{key!r}]")
                        for key, dataset in eval_dataset.items()}  # fmt: skip
    elif eval_dataset is not None:
        eval_dataset = tokenize_dataset(eval_dataset, tokenizer, args, "eval_dataset")
    mode = "off_policy" if cache is not None else args.sampling_mode  # with a cache: the cached sequences
    check_completion_tokens(train_dataset, args, mode)
    evaluated = list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]
    models = {"model": model, "teacher_model": teacher} if teacher is not None else {"model": model}
    check_positions(models, args, mode, [train_dataset] + [d for d in evaluated if d is not None])
    return Loaded(model, teacher, tokenizer, vocab_size, cache, served, train_dataset, eval_dataset,
                  student_server=student_server)


def eval_datasets(eval_dataset) -> dict:
    """{name in messages: dataset}: the eval dataset, or each of a dict of them (Trainer's named eval sets)."""
    if eval_dataset is None:
        return {}
    if isinstance(eval_dataset, dict):
        return {f"eval_dataset[{key!r}]": dataset for key, dataset in eval_dataset.items()}
    return {"eval_dataset": eval_dataset}


def teacher_from_args(teacher_model, args: RLKDConfig):
    """TRL's `teacher_model_name_or_path` names the teacher when `teacher_model` is not given; two different
    names are refused rather than one of them ignored."""
    name = args.teacher_model_name_or_path
    if name is None or teacher_model is None:
        return teacher_model if teacher_model is not None else name
    if isinstance(teacher_model, str) and teacher_model != name:
        raise ValueError(
            f"teacher_model={teacher_model!r} and args.teacher_model_name_or_path={name!r} name different teachers; "
            "give one of them."
        )
    return teacher_model


def load_model(model: str | PreTrainedModel, init_kwargs: dict | None, what: str) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))
    if init_kwargs:
        raise ValueError(f"{what}_init_kwargs are only used when {what} is a name or path; got a model object.")
    return model


def trainable_student(model: PreTrainedModel, peft_config, disable_dropout: bool) -> torch.nn.Module:
    """The student with `peft` adapters when `peft_config` is given, and TRL's `disable_dropout` (every dropout
    module gets p = 0)."""
    if peft_config is not None:
        from rlkd_onpolicy._imports import require

        require("peft")
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def placed_teacher(teacher: torch.nn.Module, accelerator, deepspeed: bool, offload_to_cpu: bool) -> torch.nn.Module:
    """The teacher for inference only (eval mode, no gradients): an accelerate-prepared model, or under DeepSpeed an
    inference engine (sharded under ZeRO-3, optionally offloaded to the CPU; trainer/deepspeed.py)."""
    if deepspeed:
        teacher = prepare_teacher(teacher, accelerator, offload_to_cpu=offload_to_cpu)
    else:
        if offload_to_cpu:
            raise ValueError("teacher_offload_to_cpu=True needs DeepSpeed ZeRO-3 (see configs/accelerate/).")
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def served_teacher(args: RLKDConfig, tokenizer, vocab_size: int):
    """The `ServedTeacher` at `args.teacher_server`; building it checks the server (it answers, serves this
    tokenizer, returns top-K) now, before training."""
    from rlkd_onpolicy.teacher.served import ServedTeacher

    return ServedTeacher(
        args.teacher_server, tokenizer=tokenizer, top_k=args.teacher_top_k, vocab_size=vocab_size,
        model=args.teacher_server_model, temperature=args.loss_temperature, options=args.teacher_server_options(),
    )  # fmt: skip


def vllm_student_server(args: RLKDConfig, tokenizer, vocab_size: int, student):
    """The `StudentServer` at `args.vllm_server_url()`, waited for (up to vllm_server_timeout) and checked now: one
    model, the student's tokenizer, vocabulary and architecture (each mismatch names the field)."""
    from rlkd_onpolicy.sampling.vllm_client import StudentServer
    from rlkd_onpolicy.teacher.served import ServerOptions
    from rlkd_onpolicy.vocab import output_rows

    server = StudentServer(args.vllm_server_url(), tokenizer=tokenizer, vocab_size=vocab_size,
                           output_rows=output_rows(student), config=getattr(student, "config", None),
                           # one request per row (its own seed), up to 64 in flight as TRL's client: vLLM batches them
                           options=ServerOptions(timeout=args.vllm_server_timeout, retries=2, backoff=1.0,
                                                 max_concurrency=64),
                           check=False)  # fmt: skip
    server.wait_until_up(args.vllm_server_timeout)
    server.check()
    return server


def scoring_teacher(args: RLKDConfig, teacher, cache, served, vocab_size: int) -> Teacher:
    """The teacher that scores each rollout: the cache, the server, or the local model (its top-K with
    `teacher_top_k`, as a cache stores it and a server returns it)."""
    if cache is not None:
        return CachedTeacher(cache)
    if served is not None:
        return served
    return LocalTeacher(teacher, vocab_size, top_k=args.teacher_top_k, temperature=args.loss_temperature)
