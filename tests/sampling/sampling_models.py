"""Tiny randomly initialised causal LMs and ragged prompt batches for the sampling tests (no downloads)."""

import tiny_models
import torch
from transformers import LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int, vocab: int = VOCAB, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    # larger logits than the default init (sharpen 8), so distributions are peaked enough for top-K / top-p / EOS to
    # matter
    return tiny_models.tiny_llama(vocab, hidden=hidden, layers=layers, seed=seed, sharpen=8.0,
                                  max_position_embeddings=256, **tiny_models.HF_SPECIAL_IDS).eval()  # fmt: skip


def ragged_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB, pad: int = 0):
    """Left-padded (B, max(lengths)) prompt ids and mask; token ids avoid 0..2 (pad / EOS candidates)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def row_alone(ids: torch.Tensor, mask: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of a left-padded batch without its padding, as a batch of one."""
    keep = mask[i].bool()
    return ids[i : i + 1, keep], mask[i : i + 1, keep]
