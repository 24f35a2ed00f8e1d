"""Tiny offline tokenizer, models and prompt–completion data shared by the tests (no hub, no download), and a
corrupted copy of a teacher cache."""

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, sharpen: float = 1.0, heads: int = 4,
               kv_heads: int = 2, **config) -> LlamaForCausalLM:  # fmt: skip
    """A random Llama, the tests' usual model; `sharpen` scales its output layer so its next-token distribution
    has clear peaks. `config` overrides further LlamaConfig fields (the special ids default to the tiny tokenizer's:
    pad 0, BOS 2, EOS 3). The pad id matters to the weights: its embedding row is initialised to zero."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128, bos_token_id=2,
        eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**(fields | config)))
    if sharpen != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model


def tiny_gpt2(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, position_scale: float = 1.0,
              **config) -> GPT2LMHeadModel:  # fmt: skip
    """A random GPT-2: learned absolute position embeddings, so its outputs depend on where a row's positions start
    (Llama's RoPE does not). `position_scale` scales those embeddings, initialised as small as the token ones, so a
    shift moves the logits clearly. `config` overrides further GPT2Config fields (special ids: the tiny tokenizer's)."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, n_positions=64, n_embd=hidden, n_layer=layers, n_head=2, bos_token_id=2,
                  eos_token_id=3, pad_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(GPT2Config(**(fields | config)))
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(position_scale)
    return model.eval()


def left_padded_rollouts(pads: int = 3):
    """(batch, alone): a two-row rollout whose second row's prompt is left-padded by `pads` (and whose first row's
    completion is right-padded), and that second row as a rollout of its own, with no padding."""
    from rlkd_onpolicy.sampling.rollout import SOURCE_DATA, assemble_rollout

    def rollout(prompt_ids, prompt_mask, completion_ids, completion_mask):
        completion_mask = torch.tensor(completion_mask, dtype=torch.bool)
        return assemble_rollout(torch.tensor(prompt_ids), torch.tensor(prompt_mask), torch.tensor(completion_ids),
                                completion_mask, torch.full_like(completion_mask, SOURCE_DATA, dtype=torch.int8),
                                pad_token_id=0, stats={}, mode="off_policy")  # fmt: skip

    long_prompt, prompt, completion = list(range(6, 8 + pads)), [10, 11], [15, 16, 17, 3]
    batch = rollout([long_prompt, [0] * pads + prompt], [[1] * len(long_prompt), [0] * pads + [1] * len(prompt)],
                    [[12, 13, 3, 0], completion], [[1, 1, 1, 0], [1, 1, 1, 1]])  # fmt: skip
    return batch, rollout([prompt], [[1] * len(prompt)], [completion], [[1] * len(completion)])


# LlamaConfig's own special ids, for the models that do not use the tiny tokenizer.
HF_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)

CACHE_K = 8  # the top-K of the shared teacher cache, `cache_dir` in tests/conftest.py


def tiny_teacher(vocab_size: int = 64) -> LlamaForCausalLM:
    """The trainer tests' teacher: wider than the student (hidden 48) and peaked (sharpen 4)."""
    return tiny_llama(vocab_size, hidden=48, layers=2, seed=1, sharpen=4.0)


def student_and_teacher(student_vocab: int = 64, teacher_vocab: int = 64) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(student, teacher): a one-layer student (hidden 32) and `tiny_teacher`. The teacher is built first, as the
    tests that this replaced did, so torch's global random state afterwards is the same."""
    teacher = tiny_teacher(teacher_vocab)
    return tiny_llama(student_vocab, hidden=32, layers=1, seed=2), teacher


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


def corrupted_cache_copy(cache_dir: Path, folder: Path) -> Path:
    """A copy of the cache at `cache_dir` in `folder` with one payload byte of its second shard flipped."""
    shutil.copytree(cache_dir, folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    return folder
