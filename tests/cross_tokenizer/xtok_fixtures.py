"""Real tokenizers made on the machine for the cross-tokenizer tests (no download): a word-level one (words split by
a Whitespace pre-tokenizer, punctuation apart), a character-level one, a BPE and a unigram trained on embedded Bible
verses, and SmolLM2's byte-level BPE from the embedded GGUF; tiny Llamas sized to them."""

from functools import cache

from tiny_models import tiny_llama
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TEXT = ("the cat sees a dog . the dog runs to the red house , and a bird sleeps in the tree . "
        "le chat voit un chien . café naïve — 日本 🙂 ok !")  # fmt: skip
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def word_tokenizer(text: str = TEXT) -> PreTrainedTokenizerFast:
    """Words of `text` (Whitespace pre-tokenizer: `\\w+|[^\\w\\s]+`), unknown words as <unk>."""
    words = sorted({w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(backend)


def char_tokenizer(text: str = TEXT, decoder: bool = True) -> PreTrainedTokenizerFast:
    """One token per character of `text` (spaces included); `decoder=False` leaves the default decoder, which
    joins tokens with spaces."""
    chars = sorted(set(text))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if decoder:
        backend.decoder = decoders.Fuse()
    return _wrap(backend)


@cache
def bible_text(limit: int = 400) -> str:
    from rlkd_onpolicy.data.parallel import load_bible_pairs

    pairs = load_bible_pairs("en", "fr", "dev", max_chars=None)[:limit]
    return "\n".join(p["src"] + "\n" + p["tgt"] for p in pairs)


def _trained(model, trainer, pre_tokenizer, decoder) -> PreTrainedTokenizerFast:
    backend = Tokenizer(model)
    backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoder
    backend.train_from_iterator(bible_text().splitlines(), trainer=trainer)
    return _wrap(backend)


@cache
def bible_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 600 entries trained on Bible verses (English and French)."""
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    return _trained(models.BPE(), trainer, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


@cache
def bible_unigram() -> PreTrainedTokenizerFast:
    """A SentencePiece-style unigram of 500 entries (Metaspace) trained on the same verses."""
    trainer = trainers.UnigramTrainer(vocab_size=500, special_tokens=SPECIALS, unk_token="<unk>")
    return _trained(models.Unigram(), trainer, pre_tokenizers.Metaspace(), decoders.Metaspace())


@cache
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from rlkd_onpolicy.models import embedded_smollm2_path

    folder, name = embedded_smollm2_path()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def llama_for(tokenizer, seed: int = 0, **config):
    """A tiny random Llama with one output row per token of `tokenizer`, its special ids set from it."""
    return tiny_llama(len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)  # fmt: skip
