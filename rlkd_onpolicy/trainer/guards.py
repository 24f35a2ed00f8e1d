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
    if teacher_model is not None and args.teacher_server is not None:
        raise ValueError(f"teacher_model and args.teacher_server={args.teacher_server!r} are two teachers: pass "
                         "teacher_model=None to distil from the server, or leave teacher_server unset.")  # fmt: skip


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
