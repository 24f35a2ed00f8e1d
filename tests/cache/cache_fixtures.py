"""A tiny teacher, tokenizer and prompt–completion data built offline (no hub access)."""

from tiny_models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "birds sing in the morning light",
    "the river flows to the sea",
    "she reads a book by the window",
    "we walk home after the rain",
]


def make_tokenizer(sentences=SENTENCES) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    backend.train_from_iterator(sentences, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    # Prompts start with BOS, as with a real LM tokenizer, so every completion token has a predicting position.
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def make_teacher(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    model = tiny_llama(vocab_size, hidden=32, layers=1, seed=seed, heads=2, kv_heads=2, max_position_embeddings=64)
    return model.eval()


def make_examples(n: int) -> list[dict]:
    return [
        {"prompt": SENTENCES[i % len(SENTENCES)], "completion": SENTENCES[(3 * i + 1) % len(SENTENCES)]}
        for i in range(n)
    ]
