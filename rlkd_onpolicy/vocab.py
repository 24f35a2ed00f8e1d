"""The one vocabulary policy of sampling, the loss, the teacher cache and evaluation: the tokenizer's ids.

A model's output layer may have more rows than its tokenizer has tokens (Qwen2.5-0.5B: 151,936 rows for 151,665
tokens; Qwen2.5-7B: 152,064). No text maps to the extra rows, the loss never covers them, and a cache never stores
them; so every consumer works on ids `0 … len(tokenizer) - 1`:
- the samplers (`sampling_vocabulary`) accept two output layers of any sizes that both cover the tokenizer's
  length, whatever the number of padding rows, and refuse one that does not;
- sampling (student and teacher, every decode path: batched, CUDA-graph, speculative, greedy, the references) cuts
  the logits to `vocabulary_size` before sampling, so an id ≥ len(tokenizer) is never emitted;
- the trainer's loss and metrics, and the cache writer, cut the logits with `cut_logits`;
- `transformers`' `generate` (evaluation) gets `BeyondVocabularyMask`, which sets those logits to -inf.
"""

import torch


def output_rows(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (what its logits' last dimension is), else config.vocab_size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None) if head is not None else None
    if weight is not None:
        # under DeepSpeed ZeRO-3 a partitioned weight has shape (0,); its full shape is in ds_shape
        rows = int(getattr(weight, "ds_shape", weight.shape)[0])
        if rows > 0:
            return rows
    return int(model.config.get_text_config().vocab_size)


def vocabulary_size(student: torch.nn.Module, teacher: torch.nn.Module | None, tokenizer) -> int:
    """The ids everything works on: the tokenizer's length, once both output layers are checked to cover it.

    Teacher and student may differ only by padding rows beyond the tokenizer; anything else means two tokenizers
    and is a ValueError naming both sizes.
    """
    n_tokens = len(tokenizer)
    student_rows = output_rows(student)
    if teacher is None:
        if student_rows < n_tokens:
            raise ValueError(
                f"the tokenizer has {n_tokens} tokens but the model's output layer only {student_rows} rows: this "
                "tokenizer does not belong to this model."
            )
        return n_tokens
    teacher_rows = output_rows(teacher)
    if student_rows != teacher_rows and min(student_rows, teacher_rows) < n_tokens:
        raise ValueError(
            f"student vocabulary size {student_rows} != teacher vocabulary size {teacher_rows}, and the difference "
            f"is not padding beyond the tokenizer's {n_tokens} tokens: the two models do not share a tokenizer. "
            "Distil between models of one tokenizer family, or set RLKDConfig.teacher_tokenizer_name_or_path to the "
            "teacher's tokenizer (docs/cross_tokenizer.md)."
        )
    if min(student_rows, teacher_rows) < n_tokens:
        raise ValueError(
            f"the tokenizer has {n_tokens} tokens but the models' output layers only {min(student_rows, teacher_rows)}"
            " rows: this tokenizer does not belong to these models."
        )
    return n_tokens


def sampling_vocabulary(student: torch.nn.Module, teacher: torch.nn.Module | None, vocab_size: int | None) -> int:
    """The ids a sampler draws from: `vocab_size` (the tokenizer's length), once each model's output layer is
    checked to cover it; the rows beyond it are padding, cut whatever their number. Without `vocab_size` (a sampler
    used without a tokenizer) the two output layers must have the same rows, since padding cannot be told from
    another tokenizer then."""
    rows = {"student": output_rows(student)}
    if teacher is not None:
        rows["teacher"] = output_rows(teacher)
    shown = ", ".join(f"the {who}'s {n} rows" for who, n in rows.items())
    if vocab_size is None:
        if len(set(rows.values())) > 1:
            raise ValueError(
                f"the output layers differ ({shown}): pass vocab_size=len(tokenizer), so that the rows beyond the "
                "tokenizer (padding) are cut; models of two tokenizers cannot be distilled token by token."
            )
        return rows["student"]
    short = min(rows, key=rows.get)
    if not 1 <= vocab_size <= rows[short]:
        raise ValueError(
            f"vocab_size={vocab_size} (the tokenizer's length) must be in [1, {rows[short]}]: the {short}'s output "
            f"layer has only {rows[short]} rows ({shown}), so it does not belong to this tokenizer. Distil between "
            "models of one tokenizer family."
        )
    return vocab_size


def cut_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """logits (..., rows) -> (..., vocab_size): the padding rows beyond the tokenizer dropped."""
    return logits[..., :vocab_size]


class BeyondVocabularyMask:
    """A `transformers` logits processor for `generate`: the logits of ids ≥ vocab_size become -inf, so greedy
    or sampled decoding never emits a padding row."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        return scores.index_fill(-1, torch.arange(self.vocab_size, scores.shape[-1], device=scores.device),
                                 float("-inf"))
