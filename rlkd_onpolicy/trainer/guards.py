"""The trainer's checks: each runs once, when the trainer is built or at the first step that can tell, and refuses
what would otherwise train the wrong objective without an error (house habit: validate early and loudly)."""

import torch
from transformers import AutoTokenizer

from rlkd_onpolicy.trainer.config import RLKDConfig
from rlkd_onpolicy.vocab import cut_logits


def check_teachers(teacher_model, args: RLKDConfig) -> None:
    """Exactly one teacher: a model (object or name), a cache or a server (a cache may name its model)."""
    if teacher_model is None and args.teacher_cache is None and args.teacher_server is None:
        raise ValueError("teacher_model is required (a causal LM or a name/path, or "
                         "args.teacher_model_name_or_path) unless args.teacher_cache or args.teacher_server is "
                         "set.")  # fmt: skip
    if teacher_model is not None and not isinstance(teacher_model, str) and args.teacher_cache is not None:
        raise ValueError(f"teacher_model is a model object and args.teacher_cache={args.teacher_cache!r}: the cache "
                         "stands for the teacher, so the model would be ignored. Pass teacher_model=None (or the "
                         "teacher's name, which is checked against the cache), or leave teacher_cache unset to "
                         "distil from the model.")  # fmt: skip
    if teacher_model is not None and args.teacher_server is not None:
        raise ValueError(f"teacher_model and args.teacher_server={args.teacher_server!r} are two teachers: pass "
                         "teacher_model=None to distil from the server, or leave teacher_server unset.")  # fmt: skip


def check_separate_teacher(model, teacher_model) -> None:
    """The teacher must be another model than the student: the trainer freezes the teacher (requires_grad=False),
    which would freeze the student too. Checked before anything touches either model."""
    if teacher_model is None or isinstance(teacher_model, str) or isinstance(model, str):
        return
    if teacher_model is model:
        raise ValueError(f"teacher_model and model are the same object ({type(model).__name__}): the teacher is "
                         "frozen for inference, so the student would not train. Pass a separate teacher model (e.g. "
                         "loaded with from_pretrained).")  # fmt: skip
    def storage(p):  # 0 for meta tensors and partitioned ZeRO-3 shells, which share nothing
        return p.untyped_storage().data_ptr() if p.numel() > 0 and p.device.type != "meta" else 0

    student_storage = {storage(p) for p in model.parameters()} - {0}
    shared = [name for name, p in teacher_model.named_parameters() if storage(p) in student_storage]
    if shared:
        raise ValueError(f"teacher_model shares {len(shared)} parameter tensor(s) with model (e.g. {shared[0]!r}): "
                         "freezing the teacher would freeze them in the student, and training the student would "
                         "change the teacher. Pass a teacher with its own weights (copy.deepcopy it, or load it with "
                         "from_pretrained).")  # fmt: skip


def absolute_positions(model: torch.nn.Module) -> tuple[str, int] | None:
    """(config field, positions) of a model with learned absolute position embeddings (GPT-2's `wpe`, OPT's
    `embed_positions`): an embedding table other than the tokens' with about that many rows, which a longer
    sequence indexes out of range. None for models without one (RoPE, ALiBi), which take any length."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    for field in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, field, None)
        if isinstance(limit, int) and limit > 0:
            break
    else:
        return None
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in model.modules():
        rows = module.num_embeddings if isinstance(module, torch.nn.Embedding) and module is not tokens else -1
        if limit <= rows <= limit + 2:
            return field, limit  # OPT's table has 2 offset rows
    return None


def check_positions(models: dict[str, torch.nn.Module], args: RLKDConfig, mode: str, datasets: list) -> None:
    """Refuse, before training, a sequence longer than a model's absolute position embeddings: it would stop the
    run with an IndexError mid-way. The longest sequence of each kind is measured on the tokenised datasets: dataset
    sequences (prompt + completion, modes that train on them) and prompt + max_new_tokens (modes that generate;
    speculative drafts skd_draft_len - 1 positions further)."""
    limited = {what: found for what, model in models.items() if (found := absolute_positions(model)) is not None}
    if not limited or not datasets:
        return
    prompts = max(len(ids) for dataset in datasets for ids in dataset["prompt_ids"])
    needs = []  # (length, what makes it, the fields to lower)
    if mode in ("off_policy", "mixed"):
        longest = max(len(p) + len(c) for dataset in datasets
                      for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"], strict=True))  # fmt: skip
        needs.append((longest, f"dataset sequences (prompt + completion) of up to {longest} tokens "
                      f"(max_length={args.max_length})", "Lower max_length"))  # fmt: skip
    if mode != "off_policy":
        extra = args.skd_draft_len - 1 if mode == "speculative" else 0
        drafts = f" + skd_draft_len={args.skd_draft_len} - 1 (speculative drafts)" if extra else ""
        length = prompts + args.max_new_tokens + extra
        needs.append((length, f"prompts of up to {prompts} tokens (max_prompt_length={args.max_prompt_length}) + "
                      f"max_new_tokens={args.max_new_tokens}{drafts} make {length}-token sequences",
                      "Lower max_prompt_length or max_new_tokens"))  # fmt: skip
    for what, (field, limit) in limited.items():
        for length, cause, fix in needs:
            if length > limit:
                raise ValueError(
                    f"The {what} ({type(models[what]).__name__}) has absolute position embeddings for {limit} "
                    f"positions ({field}={limit}), but {cause}: the run would stop with an IndexError. {fix} so "
                    f"that they fit in {limit}, or use a model with more positions."
                )


def check_same_tokenizer(tokenizer, teacher_name_or_path: str) -> None:
    """A teacher given by name brings its own tokenizer: it must be the student's, or the distillation is void."""
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name_or_path)
    except (OSError, ValueError):
        return  # no tokenizer files next to the teacher: the vocabulary-size check still runs
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The teacher {teacher_name_or_path!r} has another tokenizer ({len(teacher_tokenizer)} tokens) than the "
            f"student's processing_class ({len(tokenizer)} tokens); token-level distillation needs one tokenizer. "
            f"To distil across tokenizers, set teacher_tokenizer_name_or_path={teacher_name_or_path!r} "
            "(docs/cross_tokenizer.md)."
        )


def open_cache(args: RLKDConfig, tokenizer, teacher_model, train_dataset, eval_dataset):
    """Open and fully verify the teacher cache before anything is loaded or trained."""
    from rlkd_onpolicy.cache import TeacherCache

    if eval_dataset is not None:
        raise ValueError("Evaluation needs an online teacher: with teacher_cache, pass no eval_dataset.")
    cache = TeacherCache.open(
        args.teacher_cache,
        tokenizer=tokenizer,
        expect_teacher=teacher_model if isinstance(teacher_model, str) else None,
        expect_k=args.teacher_top_k,
        expect_temperature=args.loss_temperature,
    )
    cache.verify()  # every shard's checksum now, not halfway through training
    if train_dataset is not None and len(cache) != len(train_dataset):
        raise ValueError(
            f"The cache at {args.teacher_cache} holds {len(cache)} examples but train_dataset has "
            f"{len(train_dataset)}: build it from this dataset."
        )
    return cache


def check_cache_vocabulary(cache, vocab_size: int) -> None:
    """The cache's teacher must cover the tokenizer's ids (fewer rows: another tokenizer family)."""
    if cache.header.vocab_size < vocab_size:
        raise ValueError(
            f"The cache's teacher has {cache.header.vocab_size} vocabulary rows, fewer than the "
            f"{vocab_size} tokens the student and tokenizer use: it comes from another tokenizer family."
        )


def check_own_forward(model: torch.nn.Module, what: str = "model") -> None:
    """Refuse a model whose `forward` was replaced on the instance by a wrapper that runs *another* model object.

    trl's `SFTTrainer` does this and leaves it: it sets `model.forward` to a fused-LM-head wrapper that closes over
    the model's original bound `forward`. A `copy.deepcopy` of such a model keeps calling the original's forward, so
    the copy's weights neither produce its outputs nor receive gradients: training logs grad_norm 0 and changes
    nothing, without an error. Wrappers that call back into the same model (accelerate's autocast wrapper, the patch
    on the model trl trained) pass.
    """
    patched = model.__dict__.get("forward")
    if patched is None:
        return
    pending, seen = [getattr(patched, "__func__", patched)], set()
    while pending:
        func = pending.pop()
        if id(func) in seen:
            continue
        seen.add(id(func))
        for cell in getattr(func, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            owner = getattr(value, "__self__", None)
            if isinstance(owner, torch.nn.Module) and owner is not model:
                raise ValueError(
                    f"{what}.forward was replaced on the instance by a wrapper that runs the forward of another "
                    f"{type(owner).__name__} object: {what} is most likely a copy.deepcopy "
                    "of a model trained by trl's SFTTrainer (it patches forward with a fused LM head and leaves it). "
                    f"Its own weights would get no gradients. Fix: `del {what}.forward` before copying (restores the "
                    "class's forward), or load the model with from_pretrained."
                )
            inner = getattr(value, "__func__", value)
            if callable(inner) and getattr(inner, "__closure__", None):
                pending.append(inner)
        wrapped = getattr(func, "__wrapped__", None)
        if wrapped is not None:
            pending.append(wrapped)


def check_fused_head(outputs, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int, backend: str) -> None:
    """The model's logits must be its output layer applied to its last hidden state (no softcapping or scaling in
    between), else the fused loss would train another objective. `outputs` of a forward with hidden states."""
    with torch.no_grad():
        mine = torch.nn.functional.linear(outputs.hidden_states[-1][:, -1:], weight, bias).float()
        theirs = cut_logits(outputs.logits[:, -1:], vocab_size).detach().float()
        same = torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max().clamp_min(1)))
    if not same:
        raise ValueError(
            f"loss_backend={backend!r}: this student's logits are not its output layer applied to "
            "its last hidden state (softcapping or logit scaling?), so the fused loss cannot stand in for them; "
            "set loss_backend='logits'."
        )
