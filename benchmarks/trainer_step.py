"""Optimizer-step time and peak memory of RLKDTrainer, fast paths against the plain ones, in one process.

    python benchmarks/trainer_step.py --device cpu --shape tiny --steps 4          # plumbing, ~1 min on 2 cores
    python3 benchmarks/trainer_step.py --device cuda --shape qwen --steps 8        # a GPU session (~2 min)

Random Qwen2.5-0.5B-shaped student and 1.5B-shaped teacher (--shape qwen; no download) with a word-level tokenizer
of the same 151,936 tokens built here, random prompts of 32-64 words and 24-word completions. Each variant trains
the same fresh student for --steps optimizer steps (sampling mode --mode, sparse teacher top-K --teacher-top-k):
  plain: generation_cache="dynamic", loss_backend="logits" (eager decoding, the student's full logits);
  fast:  generation_cache="auto", loss_backend="auto" (CUDA-graph decoding on a GPU, the fused top-k loss).
Reported: median seconds per step after the first (the first carries graph capture), peak GPU memory, final loss.
Needs `datasets` (the trainer tokenises through it); on the device image carry its wheels (make gpu-wheels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
             dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2), 4096),
    "qwen": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True),
             dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, tie_word_embeddings=True), 151936),
}  # fmt: skip


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")  # fmt: skip


def dataset(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(4, vocab_size, (k,), generator=g))

    return [{"prompt": words(int(torch.randint(32, 65, (1,), generator=g))), "completion": words(24)}
            for _ in range(n)]  # fmt: skip


def build(config_kwargs: dict, vocab_size: int, device: str, dtype: torch.dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=4096, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0, **config_kwargs)  # fmt: skip
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype)


class StepTimer:
    """A TrainerCallback that records wall time per optimizer step (synchronising CUDA)."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.sync()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()
                timer.seconds.append(time.perf_counter() - timer.start)

        self.device, self.seconds, self.start, self.callback = device, [], 0.0, _Callback()

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def run_variant(name, settings, args, student_cfg, teacher, tokenizer, data, vocab_size, dtype) -> dict:
    from rlkd_onpolicy import RLKDConfig, RLKDTrainer

    student = build(student_cfg, vocab_size, args.device, dtype, seed=1)
    timer = StepTimer(args.device)
    with tempfile.TemporaryDirectory() as out:
        config = RLKDConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=1e-5,
            logging_steps=1, save_strategy="no", report_to="none", seed=0, sampling_mode=args.mode,
            max_new_tokens=args.new_tokens, teacher_top_k=args.teacher_top_k, rank_weight=2.0, rank_k=5,
            disable_tqdm=True, use_cpu=not args.device.startswith("cuda"), **settings,
        )  # fmt: skip
        trainer = RLKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[timer.callback])  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
    steady = timer.seconds[1:] or timer.seconds
    row = {
        "variant": name,
        **settings,
        "resolved_generation_cache": trainer.generation_cache,
        "resolved_loss_backend": trainer.loss_backend,
        "first_step_s": timer.seconds[0],
        "median_step_s": statistics.median(steady),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        "train_loss": result.training_loss,
    }
    del trainer, student
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--teacher-top-k", type=int, default=64)
    parser.add_argument("--mode", default="on_policy")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps={args.steps}: need at least 2 (the first step carries graph capture)")
    student_cfg, teacher_cfg, vocab_size = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tokenizer = word_tokenizer(vocab_size)
    data = dataset(args.steps * args.batch_size, vocab_size)
    teacher = build(teacher_cfg, vocab_size, args.device, dtype, seed=2).eval()
    variants = {
        "plain": {"generation_cache": "dynamic", "loss_backend": "logits"},
        "fast": {"generation_cache": "auto", "loss_backend": "auto"},
    }
    rows = []
    for name, settings in variants.items():
        rows.append(run_variant(name, settings, args, student_cfg, teacher, tokenizer, data, vocab_size, dtype))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    plain, fast = rows
    print(f"step time plain / fast: {plain['median_step_s'] / fast['median_step_s']:.2f}x", flush=True)
    if plain["peak_gpu_mib"]:
        print(f"peak memory plain / fast: {plain['peak_gpu_mib'] / fast['peak_gpu_mib']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
