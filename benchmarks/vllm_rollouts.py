"""Student rollout tokens per second through a vLLM server (use_vllm) vs the in-process sampler, side by side in one
run, with the weight sync's time per step.

    make vllm-env && python benchmarks/vllm_rollouts.py --out vllm_rollouts.json          # CPU, SmolLM2-135M, ~5 min
    python benchmarks/vllm_rollouts.py --url http://127.0.0.1:8001 --model-dir DIR \\
        --device cuda --sync nccl --out vllm_rollouts_gpu.json     # GPU: a server you started (docs/vllm_rollouts.md)

The student is the embedded SmolLM2-135M-Instruct (fp32 on the CPU, bf16 on CUDA), saved to a temporary folder and
served by a dev-mode LocalVLLMServer started here (stopped at the end), unless --url names a running server. Each of
`--steps` steps stands for one training step: the weights move (a small random update, as an optimizer step would),
the trainer's WeightSync pushes them to the server (timed: file write + reload, or NCCL), then one batch of B
prompts (random token ids, left-padded, lengths uniform in [P/2, P]) is rolled out on-policy at temperature 1 with
`--new-tokens` new tokens, once through the server (VLLMRolloutSampler) and once in process (RolloutSampler), same
row seeds. EOS is not a stop (both sides generate every token) unless --eos. The first step is warm-up and excluded
from the medians. On a shared machine the load average is part of the result: it is printed and stored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlkd_onpolicy.models import load_embedded_smollm2  # noqa: E402
from rlkd_onpolicy.sampling import RolloutSampler  # noqa: E402
from rlkd_onpolicy.sampling.vllm_client import StudentServer  # noqa: E402
from rlkd_onpolicy.sampling.vllm_sampler import VLLMRolloutSampler  # noqa: E402
from rlkd_onpolicy.teacher.served import ServerOptions  # noqa: E402
from rlkd_onpolicy.teacher.vllm_server import LocalVLLMServer  # noqa: E402
from rlkd_onpolicy.trainer.vllm_sync import NCCLWeightSync, WeightSync  # noqa: E402
from rlkd_onpolicy.vocab import output_rows  # noqa: E402


class _OneProcess:
    """The accelerator's few members WeightSync reads, for one process without DeepSpeed."""

    is_main_process = True
    state = type("State", (), {"deepspeed_plugin": None})()

    def wait_for_everyone(self) -> None:
        pass


def prompts(bsz: int, width: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, width // 2), width + 1, (bsz,), generator=gen)
    mask = (torch.arange(width) >= width - lengths[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(3, vocab, (bsz, width), generator=gen), 0)
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps, the first one warm-up")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sync", choices=("file", "nccl"), default="file")
    parser.add_argument("--url", default=None, help="a running dev-mode server of --model-dir (else one is started)")
    parser.add_argument("--model-dir", default=None, help="with --url: the served student's folder")
    parser.add_argument("--compile", action="store_true", help="the started server uses torch.compile")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process sampler (1: vLLM's "
                        "CPU worker runs one and keeps a core for its API server; two processes spinning two threads "
                        "each on 2 cores slowed the in-process sampler ~50x in a smoke run)")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra argument for the started server, "
                        "e.g. --server-arg=--weight-transfer-config --server-arg='{\"backend\":\"nccl\"}'")
    parser.add_argument("--eos", action="store_true", help="stop rows at EOS (token counts then differ)")
    parser.add_argument("--out", default="vllm_rollouts.json")
    args = parser.parse_args()
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student, tokenizer = load_embedded_smollm2()
    if args.model_dir:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(args.model_dir)
    student = student.to(device=device, dtype=dtype).eval()
    folder = tempfile.mkdtemp(prefix="vllm-rollouts-")
    server = None
    if args.url is None:
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        server = LocalVLLMServer(folder, dtype="float32" if device.type == "cpu" else "bfloat16",
                                 enforce_eager=not args.compile, env={"VLLM_SERVER_DEV_MODE": "1"},
                                 extra_args=tuple(args.server_arg),
                                 max_model_len=args.prompt_len + args.new_tokens + 64)  # fmt: skip
        server.start()
    results = {"argv": sys.argv, "platform": platform.platform(), "torch": torch.__version__,
               "device": str(device), "sync": args.sync, "steps": []}  # fmt: skip
    try:
        if server is not None:
            results["server_startup_s"] = server.wait_ready()
            print(f"server ready after {results['server_startup_s']:.0f} s")
        url = args.url or server.url
        options = ServerOptions(timeout=600, retries=1, max_concurrency=64)  # as the trainer's (loading.py)
        client = StudentServer(url, tokenizer=tokenizer, vocab_size=len(tokenizer), output_rows=output_rows(student),
                               config=student.config, options=options)  # fmt: skip
        sync = NCCLWeightSync(client, 1, None, 51216) if args.sync == "nccl" else WeightSync(client, 1, None)
        eos = tokenizer.eos_token_id if args.eos else None
        kwargs = dict(vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                      max_new_tokens=args.new_tokens, temperature=1.0, cache_implementation="dynamic")  # fmt: skip
        for step in range(args.steps):
            with torch.no_grad():  # an optimizer step's worth of change
                for param in student.parameters():
                    param.add_(torch.randn_like(param) * 1e-4)
            sync_s = sync.before_rollout(student, _OneProcess(), step + 1, f" at benchmark step {step + 1}")
            ids, mask = prompts(args.batch, args.prompt_len, len(tokenizer), seed=step)
            ids, mask = ids.to(device), mask.to(device)
            row = {"step": step + 1, "sync_s": sync_s, "load_average": os.getloadavg()}
            for side, sampler in (("vllm", VLLMRolloutSampler("on_policy", student, server=client, **kwargs)),
                                  ("in_process", RolloutSampler("on_policy", student, **kwargs))):  # fmt: skip
                start = time.perf_counter()
                rollout = sampler.rollout(ids, mask, generator=torch.Generator().manual_seed(step))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                tokens = int(rollout.completion_mask.sum())
                row[side] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}
            results["steps"].append(row)
            print(json.dumps(row))
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        timed = results["steps"][1:] or results["steps"]
        summary = {side: statistics.median(r[side]["tokens_per_second"] for r in timed)
                   for side in ("vllm", "in_process")}  # fmt: skip
        summary["sync_s"] = statistics.median(r["sync_s"] for r in timed)
        summary["vllm_over_in_process"] = summary["vllm"] / summary["in_process"]
        results["median"] = summary
        print("median:", json.dumps(summary))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
