"""Tiny offline tokenizer, models and prompt–completion data shared by the tests (no hub, no download)."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a cat dog bird sees eats runs sleeps red blue green big small house tree river light dark one two three "
    "translate to french english le la chat chien oiseau voit mange court dort rouge bleu vert grand petit maison "
    "arbre fleuve lumiere sombre un deux trois"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}{% if m['role'] == 'assistant' %}"
    "{{ '<eos> ' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template; `extra_words` makes a *different* tokenizer for mismatch tests."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(WORDS) + list(extra_words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, sharpen: float = 1.0):
    """A random Llama; `sharpen` scales its output layer so its next-token distribution has clear peaks."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2, eos_token_id=3,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    if sharpen != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model


def tiny_pairs(n: int = 16, seed: int = 0, conversational: bool = False) -> list[dict]:
    """Random word-for-word 'translations' in TRL's prompt–completion format."""
    g = torch.Generator().manual_seed(seed)
    en, fr = WORDS[:20], WORDS[26:46]
    rows = []
    for _ in range(n):
        idx = torch.randint(0, 20, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        src, tgt = " ".join(en[i] for i in idx), " ".join(fr[i] for i in idx)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": f"translate {src}"}],
                         "completion": [{"role": "assistant", "content": tgt}]})
        else:
            rows.append({"prompt": f"translate to french {src}", "completion": tgt})
    return rows
