"""A tiny teacher, tokenizer and prompt–completion data built offline (no hub access)."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


def make_examples(n: int) -> list[dict]:
    return [
        {"prompt": SENTENCES[i % len(SENTENCES)], "completion": SENTENCES[(3 * i + 1) % len(SENTENCES)]}
        for i in range(n)
    ]
