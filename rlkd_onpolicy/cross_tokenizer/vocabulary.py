"""`VocabularyMap`: the entries two tokenizers share, matched by their vocabulary string, built once.

As TRL's GOLD (`ULDLoss._initialize_vocabulary_mapping`): a teacher entry and a student entry are the same token when
their strings in `get_vocab()` are equal ("the" and "the"; "Ġthe" and "Ġthe"). Two byte-level BPEs share most
entries; a word-level and a character-level tokenizer share their one-character words, punctuation and the special
tokens they both spell alike. Only ids below each side's vocabulary size (the tokenizer's length) count.
"""

import torch


class VocabularyMap:
    """`student_ids (S,)` and `teacher_ids (S,)`: the shared entries, pair i being one string, ordered by teacher id.

    Build it from two tokenizers, or with `from_vocabularies` from their `get_vocab()` dicts:
        >>> shared = VocabularyMap.from_vocabularies({"a": 0, "b": 1, "c": 2}, {"c": 0, "a": 1, "the": 2})
        >>> shared.student_ids.tolist(), shared.teacher_ids.tolist(), shared.identical
        ([2, 0], [0, 1], False)
    """

    def __init__(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int, teacher_vocab_size: int):
        self._build(student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab(), student_vocab_size,
                    teacher_vocab_size)  # fmt: skip

    @classmethod
    def from_vocabularies(cls, student: dict[str, int], teacher: dict[str, int], student_vocab_size: int | None = None,
                          teacher_vocab_size: int | None = None) -> "VocabularyMap":  # fmt: skip
        """From string → id dicts; the sizes default to one more than each dict's largest id."""
        shared = cls.__new__(cls)
        shared._build(student, teacher, student_vocab_size or max(student.values()) + 1,
                      teacher_vocab_size or max(teacher.values()) + 1)  # fmt: skip
        return shared

    def _build(self, student: dict[str, int], teacher: dict[str, int], student_vocab_size: int,
               teacher_vocab_size: int) -> None:  # fmt: skip
        pairs = sorted((t, student[token]) for token, t in teacher.items() if token in student
                       and t < teacher_vocab_size and student[token] < student_vocab_size)  # fmt: skip
        self.teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        self.student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        self.student_vocab_size, self.teacher_vocab_size = student_vocab_size, teacher_vocab_size
        # every entry of both vocabularies shared, at the same id: the loss is the same-vocabulary one
        self.identical = (len(pairs) == student_vocab_size == teacher_vocab_size
                          and bool((self.teacher_ids == self.student_ids).all()))  # fmt: skip

    @property
    def size(self) -> int:
        return int(self.teacher_ids.numel())

    def to(self, device) -> "VocabularyMap":
        self.teacher_ids, self.student_ids = self.teacher_ids.to(device), self.student_ids.to(device)
        return self

    def unshared(self, side: str) -> torch.Tensor:
        """The ids of `side` ("student" or "teacher") that the other vocabulary lacks, ascending."""
        size, shared = ((self.student_vocab_size, self.student_ids) if side == "student"
                        else (self.teacher_vocab_size, self.teacher_ids))  # fmt: skip
        keep = torch.ones(size, dtype=torch.bool, device=shared.device)
        keep[shared] = False
        return keep.nonzero().squeeze(-1)
