"""Translation evaluation: greedy generation, corpus BLEU/chrF (sacrebleu), and teacher-forced agreement with a teacher.

Every metric reads the same token sequences: the prompt rendered as in training (`rlkd_onpolicy.data.tokenize_example`,
chat template when the tokenizer has one) and, for the teacher-forced metrics, the reference completion (+ EOS).
Documented in docs/data_and_eval.md.

Example:
    >>> from rlkd_onpolicy.eval import bleu_chrf
    >>> scores = bleu_chrf(["In the beginning was the Word."], ["In the beginning was the Word."])
    >>> {name: round(value, 1) for name, value in scores.items()}
    {'bleu': 100.0, 'chrf': 100.0}
    >>> hypotheses = generate_translations(model, tokenizer, pairs, "fr", "en", max_new_tokens=64)  # doctest: +SKIP
"""

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rlkd_onpolicy.data import collate_prompt_completion, tokenize_example
from rlkd_onpolicy.data.parallel import to_prompt_completion
from rlkd_onpolicy.metrics import topk_agreement
from rlkd_onpolicy.vocab import BeyondVocabularyMask, cut_logits, vocabulary_size


def _examples(tokenizer, pairs: Sequence[dict], src: str, tgt: str, conversational: bool | None,
              instruction_role: str = "user", **lengths):  # fmt: skip
    if not pairs:
        raise ValueError("No pairs to evaluate: the split is empty (check the length limits and `limit`).")
    if conversational is None:
        conversational = getattr(tokenizer, "chat_template", None) is not None
    examples = to_prompt_completion(pairs, src, tgt, conversational=conversational, instruction_role=instruction_role)
    return [tokenize_example(tokenizer, e, **lengths) for e in examples]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return pad


def _batches(items: list, batch_size: int, key):
    """Yield (indices, items) in batches of similar length (less padding), longest first (memory peaks early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    order = sorted(range(len(items)), key=lambda i: -key(items[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield chosen, [items[i] for i in chosen]


@torch.no_grad()
def generate_translations(
    model,
    tokenizer,
    pairs: Sequence[dict],
    src: str,
    tgt: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    max_prompt_length: int | None = 256,
    conversational: bool | None = None,
    instruction_role: str = "user",
    progress: bool = False,
) -> list[str]:
    """Greedy translations of `pairs[i]["src"]`, in the order of `pairs`.

    Prompts are left-padded (B, P) so that every row continues at the same column; generation stops at EOS.
    """
    tokenized = _examples(
        tokenizer, pairs, src, tgt, conversational, instruction_role, max_prompt_length=max_prompt_length
    )
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(tokenized)
    was_training = model.training
    model.eval()
    batches = list(_batches(tokenized, batch_size, key=lambda e: len(e.prompt_ids)))
    for indices, batch in _progress(batches, progress, "generate"):
        collated = collate_prompt_completion(batch, pad)
        prompt_ids, prompt_mask = collated["prompt_ids"].to(device), collated["prompt_mask"].to(device)
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            # the output layer's padding rows beyond the tokenizer are never emitted (rlkd_onpolicy/vocab.py)
            logits_processor=[BeyondVocabularyMask(len(tokenizer))],
        )
        texts = tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(indices, texts, strict=True):
            outputs[i] = text.strip()
    model.train(was_training)
    return outputs


def translate(model, tokenizer, texts: str | Sequence[str], src: str, tgt: str, *, instruction_role: str = "user",
              max_new_tokens: int = 128, batch_size: int = 16) -> str | list[str]:  # fmt: skip
    """Greedy translation of one text (returns a string) or several (a list), prompted as in training."""
    single = isinstance(texts, str)
    pairs = [{"src": text, "tgt": ""} for text in ([texts] if single else texts)]
    out = generate_translations(model, tokenizer, pairs, src, tgt, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, instruction_role=instruction_role)  # fmt: skip
    return out[0] if single else out


def load_translator(folder: str | Path, **generation):
    """A translation function from a folder written by the translation example (`save_pretrained` of a distilled
    student plus `translation.json`: languages and prompt format).

    Example:
        >>> translate = load_translator("runs/translation/students/on_policy-fkl-rank-0")  # doctest: +SKIP
        >>> translate("Au commencement était la Parole.")  # doctest: +SKIP
        'In the beginning was the Word.'
    """
    from rlkd_onpolicy.models import load_model_and_tokenizer

    folder = Path(folder)
    settings_file = folder / "translation.json"
    if not settings_file.is_file():
        raise FileNotFoundError(
            f"{settings_file} is missing: load_translator reads folders written by examples/distill_translation.py "
            "(a saved model plus translation.json with 'src', 'tgt' and 'instruction_role'). For another model, "
            "call translate(model, tokenizer, text, src, tgt) directly."
        )
    settings = json.loads(settings_file.read_text())
    model, tokenizer = load_model_and_tokenizer(str(folder.resolve()))

    def translator(texts: str | Sequence[str]) -> str | list[str]:
        return translate(model, tokenizer, texts, settings["src"], settings["tgt"],
                         instruction_role=settings.get("instruction_role", "user"), **generation)  # fmt: skip

    return translator


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level BLEU (13a tokenisation) and chrF (character 6-grams, beta 2) with sacrebleu, on a 0–100 scale."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must align.")
    if not references:
        raise ValueError("BLEU/chrF need at least one hypothesis–reference pair.")
    return {
        "bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
        "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score,
    }


def _completion_logits(model, collated: dict, device) -> torch.Tensor:
    """Teacher-forced logits (B, C, V) that predict the completion tokens (B, C)."""
    input_ids = torch.cat([collated["prompt_ids"], collated["completion_ids"]], dim=1).to(device)
    mask = torch.cat([collated["prompt_mask"], collated["completion_mask"]], dim=1).to(device)
    # Left padding shifts the prompt; positions must count real tokens only, as in generation.
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    width_p, width_c = collated["prompt_ids"].shape[1], collated["completion_ids"].shape[1]
    # logits at column t predict token t + 1: the completion (columns P .. P+C-1) is predicted from P-1 .. P+C-2.
    return logits[:, width_p - 1 : width_p + width_c - 1].float()


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over valid tokens of KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)), and the token count.

    student_logits, teacher_logits: (B, T, V); mask: (B, T), 1 for tokens to count.
    """
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)
    mask = mask.bool()
    return per_token[mask].sum().item(), int(mask.sum().item())


@torch.no_grad()
def teacher_forced_agreement(
    student,
    teacher,
    tokenizer,
    pairs: Sequence[dict],
    src: str,
    tgt: str,
    *,
    batch_size: int = 8,
    ks: Sequence[int] = (1, 2, 3, 5, 10),
    max_length: int | None = 384,
    max_prompt_length: int | None = 256,
    conversational: bool | None = None,
    instruction_role: str = "user",
    progress: bool = False,
) -> dict[str, float]:
    """Student vs teacher on the reference translations (teacher-forced, same tokens for both).

    Returns {"kl": mean over reference completion tokens (EOS included) of KL(teacher ‖ student), "tokens": count}
    and the CR@k / MOR@k / Spearman@k of `rlkd_onpolicy.metrics.topk_agreement` as token means. The two models must
    share the tokenizer (their output layers may differ by padding rows, cut to it), as in distillation.
    """
    vocab = vocabulary_size(student, teacher, tokenizer)  # padding rows may differ; both are cut to the tokenizer
    tokenized = _examples(
        tokenizer, pairs, src, tgt, conversational, instruction_role, max_length=max_length,
        max_prompt_length=max_prompt_length,
    )  # fmt: skip
    device = next(student.parameters()).device
    states = student.training, teacher.training
    student.eval()
    teacher.eval()
    kl_total, tokens = 0.0, 0
    agreement_totals: dict[str, float] = {}
    batches = list(_batches(tokenized, batch_size, key=lambda e: len(e.input_ids)))
    for _, batch in _progress(batches, progress, "teacher-forced"):
        collated = collate_prompt_completion(batch, _pad_id(tokenizer))
        mask = collated["completion_mask"].to(device).bool()
        student_logits = cut_logits(_completion_logits(student, collated, device), vocab)
        teacher_logits = cut_logits(_completion_logits(teacher, collated, device), vocab)
        batch_kl, count = kl_sum(student_logits, teacher_logits, mask)
        kl_total, tokens = kl_total + batch_kl, tokens + count
        if count:
            # token means per batch, re-weighted by the batch's token count into one mean over the split
            for key, value in topk_agreement(student_logits, teacher_logits, ks=tuple(ks), mask=mask).items():
                agreement_totals[key] = agreement_totals.get(key, 0.0) + float(value) * count
    student.train(states[0])
    teacher.train(states[1])
    result = {"kl": kl_total / tokens if tokens else math.nan, "tokens": tokens}
    result.update({key: total / tokens for key, total in agreement_totals.items()})
    return result


def evaluate_translation(
    model,
    tokenizer,
    pairs: Sequence[dict],
    src: str,
    tgt: str,
    *,
    teacher=None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    ks: Sequence[int] = (1, 2, 3, 5, 10),
    conversational: bool | None = None,
    instruction_role: str = "user",
    progress: bool = False,
) -> dict:
    """BLEU and chrF of greedy translations against `pairs[i]["tgt"]`, plus, with a `teacher`, the teacher-forced
    KL(teacher ‖ model) and top-k agreement on the references, and `kl_own`: the same KL on the model's own greedy
    translations (the on-policy view: the references are off-policy data, which favours off-policy training). Also
    returns the hypotheses and the seconds taken."""
    start = time.perf_counter()
    hypotheses = generate_translations(
        model, tokenizer, pairs, src, tgt, batch_size=batch_size, max_new_tokens=max_new_tokens,
        conversational=conversational, instruction_role=instruction_role, progress=progress,
    )  # fmt: skip
    result: dict = bleu_chrf(hypotheses, [p["tgt"] for p in pairs])
    if teacher is not None:
        result.update(
            teacher_forced_agreement(
                model, teacher, tokenizer, pairs, src, tgt, batch_size=max(batch_size // 2, 1), ks=ks,
                conversational=conversational, instruction_role=instruction_role, progress=progress,
            )  # fmt: skip
        )
        own = [{**pair, "tgt": hypothesis} for pair, hypothesis in zip(pairs, hypotheses, strict=True)]
        result["kl_own"] = teacher_forced_agreement(
            model, teacher, tokenizer, own, src, tgt, batch_size=max(batch_size // 2, 1), ks=(1,),
            conversational=conversational, instruction_role=instruction_role, progress=progress,
        )["kl"]  # fmt: skip
    result["hypotheses"] = hypotheses
    result["eval_seconds"] = time.perf_counter() - start
    return result


def _progress(items, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False)
