"""Two tokenizations of one text, aligned by character offsets into spans.

A *span* is the smallest run of tokens on each side that covers the same piece of text: the text is cut only where
neither tokenization has a token across the cut, and a piece that one side covers with no token (whitespace a
word-level tokenizer drops, a special token's zero-width place) joins its neighbour. The spans partition the text:
every character is in exactly one span, each span holds a contiguous, ordered, non-empty run of tokens on both sides,
and every token is in exactly one span.

Offsets are *character* offsets into a Python string (code points), not bytes: a multi-byte character is one
position, and two byte-level tokens that share one character (a 4-byte emoji split in two) get the same offsets
from the tokenizer; `normalize_offsets` makes the second zero-width, so both land in the same span.

Tokens come from text (`encode_with_offsets`, the dataset's references) or text comes from tokens
(`decode_with_offsets`, a model's samples: each token's piece is what it adds to the decoded prefix).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tokens:
    """One side's tokens over a text: `ids` and `offsets`, (start, end) character offsets, ordered and
    non-overlapping after `normalize_offsets` (a zero-width token has start == end)."""

    ids: list[int]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Span:
    """Tokens `student[0]:student[1]` and `teacher[0]:teacher[1]` (indices into each side's tokens) cover the text's
    characters `chars[0]:chars[1]`."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    chars: tuple[int, int]


def normalize_offsets(offsets, length: int) -> list[tuple[int, int]]:
    """Ordered, non-overlapping offsets within [0, length]: a token that starts before the previous one ends starts
    where it ends instead; one that lies wholly before it (BOS/EOS added with (0, 0), the second byte-level token of a
    multi-byte character) becomes zero-width there. Tokenizers report all three."""
    cursor, out = 0, []
    for start, end in offsets:
        start, end = min(max(int(start), 0), length), min(max(int(end), 0), length)
        if end <= cursor:
            out.append((cursor, cursor))
            continue
        start = max(start, cursor)
        out.append((start, end))
        cursor = end
    return out


def encode_with_offsets(tokenizer, text: str) -> Tokens:
    """`text` tokenised without special tokens, with normalised character offsets (a fast tokenizer's)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Tokens(list(encoded["input_ids"]), normalize_offsets(encoded["offset_mapping"], len(text)))


def decode_with_offsets(tokenizer, ids, special_ids=None) -> tuple[str, Tokens]:
    """The text of `ids` and each token's piece of it: the piece is what the token adds to the decoded prefix.

    Special tokens (EOS, pad, BOS...) add no text: zero-width. A token that ends inside a multi-byte character (the
    prefix decodes to a trailing U+FFFD) is zero-width until a later token completes the character. A decoder that
    rewrites earlier text when a token is added (no prefix relation) gives the new token the decoded text beyond the
    current length. Cost: one decode per token of a growing prefix (quadratic, fine for completions).
    """
    special = set(tokenizer.all_special_ids if special_ids is None else special_ids)
    ids = [int(i) for i in ids]
    text, offsets, kept = "", [], []
    for token in ids:
        if token in special:
            offsets.append((len(text), len(text)))
            continue
        kept.append(token)
        decoded = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded.endswith("\ufffd") or len(decoded) <= len(text):
            offsets.append((len(text), len(text)))
            continue
        start = len(text)
        text += decoded[start:]
        offsets.append((start, len(text)))
    return text, Tokens(ids, offsets)


def align_spans(student: list[tuple[int, int]], teacher: list[tuple[int, int]], length: int) -> list[Span]:
    """The spans of two tokenizations of one text of `length` characters (normalised offsets, see the module).

    Returns [] when either side has no token. Example: "a cat" as characters vs words:
        >>> chars = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
        >>> [(s.student, s.teacher) for s in align_spans(chars, [(0, 1), (2, 5)], 5)]
        [((0, 2), (0, 1)), ((2, 5), (1, 2))]
    """
    if not student or not teacher:
        return []
    # Cut at every position no token crosses; the finest segments are the runs between cuts.
    crossed = bytearray(length + 1)
    for start, end in (*student, *teacher):
        crossed[start + 1 : end] = b"\x01" * max(end - start - 1, 0)
    cuts = [0] + [b for b in range(1, length) if not crossed[b]] + [length] if length else [0, 0]
    segment_of = [0] * max(length, 1)  # the segment holding each character
    for k in range(len(cuts) - 1):
        segment_of[cuts[k] : cuts[k + 1]] = [k] * (cuts[k + 1] - cuts[k])

    def segment(offset: tuple[int, int]) -> int:
        start, end = offset
        # a zero-width token belongs with the character before it (EOS with the text's end), else the first one
        return segment_of[start] if end > start else segment_of[max(start - 1, 0)] if length else 0

    segments = [[cuts[k], cuts[k + 1], [], []] for k in range(len(cuts) - 1)]
    for side, offsets in ((2, student), (3, teacher)):
        for index, offset in enumerate(offsets):
            segments[segment(offset)][side].append(index)
    # A segment with no token on a side joins the one before it (the first joins the next).
    spans: list[list] = []
    for seg in segments:
        if spans and not (spans[-1][2] and spans[-1][3] and seg[2] and seg[3]):
            last = spans[-1]
            last[1], last[2], last[3] = seg[1], last[2] + seg[2], last[3] + seg[3]
        else:
            spans.append(seg)
    return [Span((s[0], s[-1] + 1), (t[0], t[-1] + 1), (a, b)) for a, b, s, t in spans]
