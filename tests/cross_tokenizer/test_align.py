"""Alignment of two tokenizations into spans, as properties over real tokenizers and real text: SmolLM2's byte-level BPE
(embedded GGUF), a byte-level BPE and a unigram (Metaspace) trained here on Bible verses, a word-level and a
character-level tokenizer."""

import itertools

import pytest
from xtok_fixtures import (
    TEXT,
    bible_bpe,
    bible_text,
    bible_unigram,
    char_tokenizer,
    smollm2_tokenizer,
    word_tokenizer,
)

from rlkd_onpolicy.cross_tokenizer import align_spans, decode_with_offsets, encode_with_offsets, normalize_offsets

TOKENIZERS = {
    "smollm2": smollm2_tokenizer,
    "bible_bpe": bible_bpe,
    "bible_unigram": bible_unigram,
    "word": word_tokenizer,
    "char": char_tokenizer,
}
# Multi-byte characters (accents, a dash, CJK, an emoji split into byte tokens), spaces in runs, newlines, an empty
# text, text the word and char tokenizers do not know (<unk>), and SmolLM2's chat markup (its special tokens in text).
EXTRA_TEXTS = [
    TEXT,
    "",
    " ",
    "  two  spaces\tand\nlines  ",
    "café naïve — 日本語 🙂🙂 x",
    "unknown words: zebra quixotic!",
    "<|im_start|>user\nBonjour 🙂<|im_end|>\n<|im_start|>assistant\n",
]


def texts() -> list[str]:
    return bible_text().splitlines()[:40:2] + EXTRA_TEXTS


def check_spans(spans, student, teacher, length: int) -> None:
    """Every character in exactly one span, spans contiguous and ordered, each with a non-empty run of tokens on
    both sides, every token in exactly one span and inside its span's characters, and no span splittable."""
    if not student or not teacher:
        assert spans == []
        return
    assert spans[0].chars[0] == 0 and spans[-1].chars[1] == length
    for before, after in itertools.pairwise(spans):
        assert before.chars[1] == after.chars[0]
        assert before.student[1] == after.student[0] and before.teacher[1] == after.teacher[0]
    assert spans[0].student[0] == 0 and spans[-1].student[1] == len(student)
    assert spans[0].teacher[0] == 0 and spans[-1].teacher[1] == len(teacher)
    for span in spans:
        assert span.student[1] > span.student[0] and span.teacher[1] > span.teacher[0]
        assert span.chars[1] >= span.chars[0]
        for offsets, (first, last) in ((student, span.student), (teacher, span.teacher)):
            for start, end in offsets[first:last]:
                assert span.chars[0] <= start <= end <= span.chars[1]
        # minimal: no cut inside the span leaves tokens of both sides on both of its parts
        inside = [o for o in student[slice(*span.student)] + teacher[slice(*span.teacher)]]
        for cut in range(span.chars[0] + 1, span.chars[1]):
            if any(s < cut < e for s, e in inside):
                continue
            parts = [[(s, e) for s, e in offsets[slice(*run)] if (e <= cut if e > s else s < cut)]
                     for offsets, run in ((student, span.student), (teacher, span.teacher))]  # fmt: skip
            counts = (len(parts[0]), len(parts[1]))
            sizes = (span.student[1] - span.student[0], span.teacher[1] - span.teacher[0])
            splittable = all(0 < c < n for c, n in zip(counts, sizes, strict=True))
            assert not splittable, (span, cut)


# each pair of different tokenizers, both ways round, and each with itself
PAIRS = [(a, b) for a in TOKENIZERS for b in TOKENIZERS]


@pytest.mark.parametrize(("student_name", "teacher_name"), PAIRS)
def test_spans_partition_the_text(student_name, teacher_name):
    student_tok, teacher_tok = TOKENIZERS[student_name](), TOKENIZERS[teacher_name]()
    for text in texts():
        student, teacher = encode_with_offsets(student_tok, text), encode_with_offsets(teacher_tok, text)
        spans = align_spans(student.offsets, teacher.offsets, len(text))
        check_spans(spans, student.offsets, teacher.offsets, len(text))
        if student_name == teacher_name and student.ids:
            # one tokenizer: the same tokens on both sides of every span, one span per token that covers text (byte
            # tokens inside one character, zero-width after normalize_offsets, join the token before them)
            assert all(s.student == s.teacher for s in spans)
            assert len(spans) == max(sum(e > s for s, e in student.offsets), 1)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_special_tokens_and_bos_eos_asymmetry(name):
    """BOS/EOS added by the tokenizer carry (0, 0) offsets: normalised to zero-width tokens at the text's ends, they
    join the first and last spans; the other side has none."""
    tokenizer, other = TOKENIZERS[name](), word_tokenizer()
    text = "the cat sees a dog ."
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    raw = [(0, 0)] + tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] + [(0, 0)]
    offsets = normalize_offsets(raw, len(text))
    assert offsets[0] == (0, 0) and offsets[-1] == (len(text), len(text))
    teacher = encode_with_offsets(other, text)
    spans = align_spans(offsets, teacher.offsets, len(text))
    check_spans(spans, offsets, teacher.offsets, len(text))
    assert spans[0].student[0] == 0 and spans[-1].student[1] == len(ids)


@pytest.mark.parametrize("name", ["smollm2", "bible_bpe", "bible_unigram", "char"])
def test_decoded_pieces_rebuild_the_decoded_text(name):
    """A model's sampled ids: each token's piece is what it adds to the decoded prefix; the pieces are the decoded
    text, a token inside a multi-byte character is zero-width, and special tokens add nothing."""
    tokenizer = TOKENIZERS[name]()
    for text in EXTRA_TEXTS + bible_text().splitlines()[:6]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        decoded, tokens = decode_with_offsets(tokenizer, ids)
        assert decoded == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert tokens.offsets == normalize_offsets(tokens.offsets, len(decoded))  # ordered, non-overlapping
        assert tokens.offsets[-1] == (len(decoded), len(decoded))  # EOS
        pieces = "".join(decoded[s:e] for s, e in tokens.offsets)
        assert pieces == decoded
        if name in ("smollm2", "bible_bpe") and "🙂" in text:
            assert any(s == e for s, e in tokens.offsets[:-1])  # the emoji's first byte tokens wait for the rest


def test_decoder_that_joins_tokens_with_spaces():
    """A tokenizer without a decoder joins tokens with spaces: the pieces still partition the decoded text."""
    tokenizer = char_tokenizer(decoder=False)
    ids = tokenizer("a cat", add_special_tokens=False)["input_ids"]
    decoded, tokens = decode_with_offsets(tokenizer, ids)
    assert decoded == tokenizer.decode(ids)
    assert "".join(decoded[s:e] for s, e in tokens.offsets) == decoded


def test_the_docstring_example():
    chars = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    spans = align_spans(chars, [(0, 1), (2, 5)], 5)
    assert [(s.student, s.teacher, s.chars) for s in spans] == [((0, 2), (0, 1), (0, 2)), ((2, 5), (1, 2), (2, 5))]
