"""The teacher's view of a student rollout (and the student's of a teacher's): the same completion text tokenised by
the other tokenizer, both sides' tokens aligned into spans.

Where the text comes from, per row:
- a dataset completion (the rollout's SOURCE_DATA rows): the reference text, tokenised on both sides (exact offsets);
- a student sample (on_policy, mixed): the student's tokens decoded (align.decode_with_offsets), the teacher tokenises
  that text;
- a teacher sample (seq_kd): the teacher's tokens decoded, the student tokenises that text.
A completion that ends with the sampling side's EOS gets the other side's EOS too (zero-width at the text's end, so
it joins the last span). Prompts are not aligned: each side has its own (its chat template, its BOS).
"""

from dataclasses import dataclass, field

import torch

from rlkd_onpolicy.sampling.rollout import SOURCE_DATA, SOURCE_NONE, SOURCE_TEACHER, Rollout, assemble_rollout

from .align import Span, Tokens, align_spans, decode_with_offsets, encode_with_offsets
from .losses import SpanIndex


@dataclass
class CrossRollout(Rollout):
    """A student `Rollout` with the teacher's tokenization of the same completions: `teacher_rollout` (the teacher's
    own prompts and completion tokens, its ids) and `spans`, per row the aligned spans as indices into that row's
    student and teacher completion tokens."""

    teacher_rollout: Rollout | None = None
    spans: list[list[Span]] = field(default_factory=list)

    def span_index(self) -> SpanIndex:
        """The spans of all rows as indices into the rows' counted tokens flattened in row order (`x[mask]`)."""
        student_counts = self.completion_mask[:, self.prompt_length :].sum(1).tolist()
        teacher = self.teacher_rollout
        teacher_counts = teacher.completion_mask[:, teacher.prompt_length :].sum(1).tolist()
        columns: list[list[int]] = [[], [], [], []]
        s_offset = t_offset = 0
        for row, spans in enumerate(self.spans):
            for span in spans:
                values = (s_offset + span.student[0], s_offset + span.student[1], t_offset + span.teacher[0],
                          t_offset + span.teacher[1])
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
            s_offset += student_counts[row]
            t_offset += teacher_counts[row]
        device = self.sequences.device
        return SpanIndex(*(torch.tensor(c, dtype=torch.long, device=device) for c in columns))


def _eos_set(tokenizer) -> set[int]:
    return set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}


def _counted(rollout: Rollout, row: int) -> list[int]:
    start = rollout.prompt_length
    return rollout.sequences[row, start:][rollout.completion_mask[row, start:]].tolist()


def _with_eos(tokens: Tokens, eos_id: int | None, length: int, add: bool) -> Tokens:
    if not add or eos_id is None:
        return tokens
    return Tokens(tokens.ids + [int(eos_id)], tokens.offsets + [(length, length)])


def reference_tokens(tokenizer, text: str, ids: list[int]) -> tuple[str, Tokens] | None:
    """The offsets of a dataset completion's (possibly truncated) `ids` in its reference `text`, or None when `text`
    does not tokenise to them. The text is cut where the last kept token ends."""
    encoded = encode_with_offsets(tokenizer, text)
    eos = _eos_set(tokenizer)
    body = ids[:-1] if ids and ids[-1] in eos else ids
    if encoded.ids[: len(body)] != body:
        return None
    offsets = encoded.offsets[: len(body)]
    if len(body) < len(encoded.ids):
        text = text[: offsets[-1][1] if offsets else 0]
    tokens = Tokens(list(body), offsets)
    return text, _with_eos(tokens, tokenizer.eos_token_id, len(text), len(body) < len(ids))


def _pad_rows(rows: list[list[int]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols], mask[i, cols] = torch.tensor(r, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def pad_token(tokenizer) -> int:
    """The pad id of a tokenizer, its EOS without one (the masks drop padding), else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def side_rollout(prompts: list[list[int]], completions: list[list[int]], pad_id: int, source: int, mode: str,
                 device) -> Rollout:  # fmt: skip
    """A rollout of token lists: prompts left-padded, completions right-padded, every completion token counted."""
    prompt_ids, prompt_mask = _pad_rows(prompts, pad_id, "left", device)
    completion_ids, completion_mask = _pad_rows(completions, pad_id, "right", device)
    source = torch.full_like(completion_ids, source, dtype=torch.int8)
    return assemble_rollout(prompt_ids, prompt_mask, completion_ids, completion_mask.bool(), source,
                            pad_token_id=pad_id, stats={}, mode=mode)  # fmt: skip


def teacher_view(rollout: Rollout, teacher_prompts: list[list[int]], references: list[str | None], student_tokenizer,
                 teacher_tokenizer) -> CrossRollout:  # fmt: skip
    """The student's `rollout` with the teacher's tokenization of each row's completion (see the module):
    `teacher_prompts` the teacher's prompt ids per row, `references` each row's completion text where it is known
    (the dataset's, or the teacher's decoded sample in seq_kd; read on SOURCE_DATA and SOURCE_TEACHER rows only, so
    a mixed batch's student rows are decoded; None where there is none)."""
    start = rollout.prompt_length
    teacher_rows, spans = [], []
    student_eos = _eos_set(student_tokenizer)
    for row in range(rollout.sequences.shape[0]):
        ids = _counted(rollout, row)
        source = int(rollout.token_source[row, start]) if ids else SOURCE_NONE
        view = None
        if source in (SOURCE_DATA, SOURCE_TEACHER) and references[row] is not None:
            view = reference_tokens(student_tokenizer, references[row], ids)
        if view is None:
            view = decode_with_offsets(student_tokenizer, ids)
        text, student = view
        teacher = encode_with_offsets(teacher_tokenizer, text)
        teacher = _with_eos(teacher, teacher_tokenizer.eos_token_id, len(text), bool(ids) and ids[-1] in student_eos)
        teacher_rows.append(teacher.ids)
        spans.append(align_spans(student.offsets, teacher.offsets, len(text)))
    teacher_rollout = side_rollout(teacher_prompts, teacher_rows, pad_token(teacher_tokenizer), SOURCE_DATA,
                                   rollout.mode, rollout.sequences.device)  # fmt: skip
    return CrossRollout(**vars(rollout), teacher_rollout=teacher_rollout, spans=spans)


def student_completions_from_teacher(teacher_rollout: Rollout, student_tokenizer,
                                     teacher_tokenizer) -> tuple[list[list[int]], list[str]]:  # fmt: skip
    """seq_kd: each teacher completion's text and the student's tokens of it (plus the student's EOS where the
    teacher's completion ends with its own)."""
    rows, texts, teacher_eos = [], [], _eos_set(teacher_tokenizer)
    for row in range(teacher_rollout.sequences.shape[0]):
        ids = _counted(teacher_rollout, row)
        text, _ = decode_with_offsets(teacher_tokenizer, ids)
        student = encode_with_offsets(student_tokenizer, text)
        ended = bool(ids) and ids[-1] in teacher_eos
        rows.append(_with_eos(student, student_tokenizer.eos_token_id, len(text), ended).ids)
        texts.append(text)
    return rows, texts
