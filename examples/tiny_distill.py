"""Distil a tiny random teacher into a tinier student with the RLKD objective, on the CPU, in about a minute.

    python examples/tiny_distill.py
    python examples/tiny_distill.py --steps 100 --loss jsd --rank-weight 0

Expected output: one line every 10 steps, the KD loss and the ranking loss going down and MOR@5 (the overlap of
the student's top-5 with the teacher's) going up, e.g.
    step   1  loss 5.9243  kd 2.3000  rank 1.8122  mor@5 0.01
    ...
    step  60  loss 2.6912  kd 1.2965  rank 0.6973  mor@5 0.57
No data and no download: the teacher is a randomly initialised (sharpened) Llama, the corpus 32 random sequences.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlkd_onpolicy.losses import LOSSES, distillation_loss
from rlkd_onpolicy.metrics import topk_agreement


def tiny_llama(vocab: int, width: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--loss", choices=LOSSES, default="fkl")
    parser.add_argument("--rank-weight", type=float, default=2.0)
    parser.add_argument("--rank-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-sharpness", type=float, default=10.0, help="scales the random teacher's logits")
    args = parser.parse_args()

    vocab = 512
    teacher = tiny_llama(vocab, 128, 4, args.seed).eval()
    with torch.no_grad():  # a random model is nearly uniform; sharpen it so there are peaks to learn
        teacher.lm_head.weight.mul_(args.teacher_sharpness)
    student = tiny_llama(vocab, 64, 2, args.seed + 1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    dataset = torch.randint(0, vocab, (32, 24), generator=generator)  # a small fixed "corpus", seen repeatedly
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = dataset[(step % 4) * 8 : (step % 4 + 1) * 8]
        with torch.no_grad():
            teacher_logits = teacher(ids).logits
        student_logits = student(ids).logits
        out = distillation_loss(student_logits, teacher_logits, loss=args.loss, rank_weight=args.rank_weight,
                                rank_k=args.rank_k)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 1:
            mor = topk_agreement(student_logits.detach(), teacher_logits, ks=(5,))["mor@5"]
            print(f"step {step:3d}  loss {out.loss.item():.4f}  kd {out.kd.item():.4f}  rank {out.rank.item():.4f}"
                  f"  mor@5 {mor:.2f}")
    print(f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
