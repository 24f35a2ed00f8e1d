"""Rollout throughput of every sampling mode against plain `model.generate`, on the same models and batches.

    python benchmarks/sampling.py --device cpu --shape tiny --batches 20 --threads 1 --out results.json  # CPU, ~2 min
    python benchmarks/sampling.py --device cuda --shape qwen --batches 20 --out results.json  # the issue's shape

--shape qwen builds random Qwen2.5-0.5B-shaped student / 1.5B-shaped teacher configs locally (no download), batch 64,
64-token prompts, 128 new tokens. Every batch has its own padded prompt width (uniform in [P/2, P]) and ragged rows
inside it, so a sampler that recompiles or re-captures per shape pays for it here. Times are wall-clock over all
batches, first-call compilation and graph capture included; EOS is disabled so every row generates max_new_tokens.
Random models have flat next-token distributions, so SKD's acceptance rate here is near 0 (worst case: one token
per round: the worst case); the row speculative_accept_all (top_k = V, every proposal accepted) is the best case.
The acceptance column says what each SKD number was measured at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlkd_onpolicy.sampling import RolloutSampler  # noqa: E402

SHAPES = {
    # name: (student config kwargs, teacher config kwargs, batch, prompt, new tokens)
    "tiny": (
        dict(
            vocab_size=8192,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        dict(
            vocab_size=8192,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        8,
        16,
        32,
    ),
    "qwen": (  # Qwen2.5-0.5B and Qwen2.5-1.5B shapes
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        64,
        64,
        128,
    ),
}


def build(config_kwargs: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(max_position_embeddings=4096, **config_kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None  # no early stop: every row generates max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_batches(n: int, bsz: int, prompt_len: int, vocab: int, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        width = int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=gen))
        lengths = torch.randint(max(1, width // 2), width + 1, (bsz,), generator=gen)
        lengths[0] = width
        ids = torch.randint(1, vocab, (bsz, width), generator=gen)
        mask = (torch.arange(width) >= width - lengths[:, None]).long()
        batches.append((torch.where(mask.bool(), ids, 0).to(device), mask.to(device)))
    return batches


def write(path, meta, results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, batches, new_tokens, device, budget_s=None, **kwargs):
    torch.manual_seed(0)
    tokens, first, start, done, first_tokens = 0, None, time.perf_counter(), 0, 0
    for ids, mask in batches:
        if budget_s is not None and done and time.perf_counter() - start > budget_s:
            break  # over its time budget: the row reports the batches it finished (see "batches_run")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **kwargs,
            )
        sync(device)
        first = first if first is not None else time.perf_counter() - t0
        tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        first_tokens = first_tokens if done else tokens
        done += 1
    return timing(tokens, time.perf_counter() - start, first, first_tokens, done)


def run_sampler(sampler: RolloutSampler, batches, device, budget_s=None):
    tokens, first, start, stats, done, first_tokens = 0, None, time.perf_counter(), {}, 0, 0
    gen = torch.Generator(device="cpu").manual_seed(0)
    for ids, mask in batches:
        if budget_s is not None and done and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        rollout = sampler.rollout(ids, mask, generator=gen)
        sync(device)
        first = first if first is not None else time.perf_counter() - t0
        tokens += int(rollout.completion_mask.sum())
        first_tokens = first_tokens if done else tokens
        for k in ("acceptance_rate", "teacher_forward_passes", "rounds"):
            if k in rollout.stats:
                stats[k] = stats.get(k, 0.0) + rollout.stats[k]
        done += 1
    stats = {k: v / done for k, v in stats.items()}
    return timing(tokens, time.perf_counter() - start, first, first_tokens, done) | stats


def timing(tokens, seconds, first_seconds, first_tokens, batches_run) -> dict:
    """Totals, plus the steady rate after the first batch (which carries compilation or graph capture)."""
    steady_s = seconds - first_seconds
    return {
        "tokens": tokens,
        "seconds": seconds,
        "first_batch_seconds": first_seconds,
        "batches_run": batches_run,
        "steady_tokens_per_second": (tokens - first_tokens) / steady_s if batches_run > 1 and steady_s > 0 else None,
    }


def warm_up(student, teacher, batch, device) -> None:
    ids, mask = batch
    with torch.no_grad():
        for model in (student, teacher):
            model(input_ids=ids, attention_mask=mask)
    sync(device)


def profile_step(student, batch, new_tokens, vocab, device, repeats=40) -> dict:
    """Median milliseconds (CUDA events) of the parts of one decode step, CUDA only: the captured forward replayed,
    the same forward run eagerly, the row uniforms, the sampler (warp + two-level inverse CDF) and, for comparison,
    a flat float64 inverse CDF over the whole vocabulary (the sampler before it went two-level)."""
    if not device.startswith("cuda"):
        return {}
    import statistics

    from rlkd_onpolicy.sampling import decode, draw_row_seeds, row_uniforms, sample_from_logits
    from rlkd_onpolicy.sampling.graphs import _POOLS

    ids, mask = batch
    seeds = draw_row_seeds(ids.shape[0], torch.Generator().manual_seed(0), ids.device)
    decode(student, ids, mask, seeds, stream=1, max_new_tokens=new_tokens, pad_token_id=0, vocab_size=vocab,
           cache_implementation="cuda_graph")  # fmt: skip
    bucket = next(reversed(_POOLS[student].buckets.values()))  # the bucket just used, its graph captured
    width = ids.shape[1]

    def rewind():  # each forward advances the write column by one: start every timing from the prompt's end
        for layer in bucket.cache.layers:
            layer.cumulative_length.fill_(width)
        bucket.column.fill_(width)

    def timed(fn, advances=False):
        if advances:
            rewind()
        fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for a, b in zip(starts, ends, strict=True):
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        if advances:
            rewind()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))

    logits = bucket.logits[:, -1, :vocab].clone()
    u = row_uniforms(seeds, 0, 1)

    def flat():
        probs = torch.softmax(logits.float(), -1)
        cdf = probs.cumsum(-1, dtype=torch.float64)
        return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)

    with torch.no_grad():
        return {
            "graph_replay": timed(bucket.graph.replay, advances=True),
            "eager_forward": timed(lambda: bucket._forward(student), advances=True),
            "row_uniforms": timed(lambda: row_uniforms(seeds, 5, 1)),
            "sample_from_logits": timed(lambda: sample_from_logits(logits, u, 1.0, 1.0)),
            "flat_float64_inverse_cdf": timed(flat),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--skd-top-k", type=int, default=25)
    parser.add_argument("--skip", nargs="*", default=[], help="row names to skip, e.g. generate_static")
    parser.add_argument("--rows", nargs="*", default=None, help="run only these rows, in this order")
    parser.add_argument("--profile-step", action="store_true", help="CUDA-event times of one decode step's parts")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--row-budget-s",
        type=float,
        default=None,
        help="stop a row after the batch that crosses this many seconds (its batches_run says how many ran)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    student_cfg, teacher_cfg, bsz, prompt_len, new_tokens = SHAPES[args.shape]
    bsz, prompt_len = args.batch_size or bsz, args.prompt_len or prompt_len
    new_tokens = args.new_tokens or new_tokens
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    student, teacher = build(student_cfg, args.device, dtype), build(teacher_cfg, args.device, dtype)
    batches = make_batches(args.batches, bsz, prompt_len, student_cfg["vocab_size"], args.device, seed=1)
    on_cuda = args.device.startswith("cuda")

    def sampler(mode, **kw):
        kw.setdefault("skd_top_k", args.skd_top_k)
        return RolloutSampler(
            mode, student, teacher, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **kw
        )

    budget = args.row_budget_s
    meta = {
        "shape": args.shape,
        "device": args.device,
        "dtype": str(dtype),
        "batch_size": bsz,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batches": args.batches,
        "skd_top_k": args.skd_top_k,
        "row_budget_s": budget,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if on_cuda else None,
    }

    def gen_row(**kw):
        return lambda: run_generate(student, batches, new_tokens, args.device, budget_s=budget, **kw)

    def row(mode, **kw):
        return lambda: run_sampler(sampler(mode, **kw), batches, args.device, budget_s=budget)

    # most important rows first: with a time limit on the whole run, the targets' rows are measured before the rest
    runs = {"generate_default": gen_row()}
    if on_cuda:
        runs["on_policy_cuda_graph"] = row("on_policy", cache_implementation="cuda_graph")
        # the whole step (sampling and bookkeeping too) in the graph: one replay per token
        runs["on_policy_cuda_graph_sampling"] = row("on_policy", cache_implementation="cuda_graph", graph_sampling=True)
    runs |= {
        "on_policy": row("on_policy"),
        "generate_static": gen_row(cache_implementation="static"),
        "speculative": row("speculative"),
        # top_k = V accepts every proposal: SKD's best case, the cost of its machinery alone
        "speculative_accept_all": row("speculative", skd_top_k=student_cfg["vocab_size"]),
    }
    if on_cuda:
        runs["speculative_cuda_graph"] = row("speculative", cache_implementation="cuda_graph")
        runs["speculative_accept_all_cuda_graph"] = row(
            "speculative", cache_implementation="cuda_graph", skd_top_k=student_cfg["vocab_size"]
        )
        runs["seq_kd_cuda_graph"] = row("seq_kd", cache_implementation="cuda_graph")
        runs["speculative_static"] = row("speculative", cache_implementation="static")
    runs["seq_kd"] = row("seq_kd")
    if args.rows:
        unknown = sorted(set(args.rows) - set(runs))
        if unknown:
            parser.error(f"--rows {unknown} unknown; rows here: {sorted(runs)}")
        runs = {name: runs[name] for name in args.rows}
    warm_up(student, teacher, batches[0], args.device)  # CUDA context, cuBLAS handles: not charged to the first row
    results = {}
    for name, fn in runs.items():
        if name in args.skip:
            continue
        try:
            results[name] = fn()
        except Exception as exc:  # a baseline that does not run on this setup is reported, not fatal
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        r = results[name]
        if "tokens" in r:
            r["tokens_per_second"] = r["tokens"] / r["seconds"]
        print(
            f"{name:28s} "
            + (
                f"{r['tokens_per_second']:10.1f} tok/s  {r['seconds']:7.2f} s  first batch "
                f"{r['first_batch_seconds']:6.2f} s  batches {r['batches_run']}"
                if "tokens" in r
                else r["error"]
            ),
            flush=True,
        )
        write(args.out, meta, results)  # after every row: a run cut short by a time limit keeps what it measured

    if args.profile_step:  # after the rows, so that no row finds a graph captured for it already
        profile = profile_step(student, batches[0], new_tokens, student_cfg["vocab_size"], args.device)
        meta["step_profile_ms"] = profile
        print("step profile (ms):", json.dumps(profile), flush=True)
        write(args.out, meta, results)

    def tps(name):
        return results.get(name, {}).get("tokens_per_second")

    print(f"\n{'mode':28s} {'tok/s':>10s} {'vs generate':>12s} {'vs static':>10s} {'SKD accept':>10s} {'steady':>10s}")
    for name, r in results.items():
        if "tokens_per_second" not in r:
            continue
        ratios = [
            f"{r['tokens_per_second'] / tps(b):.2f}x" if tps(b) else "n/a"
            for b in ("generate_default", "generate_static")
        ]
        accept = f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else ""
        steady = f"{r['steady_tokens_per_second']:.1f}" if r.get("steady_tokens_per_second") else ""
        rate = r["tokens_per_second"]
        print(f"{name:28s} {rate:10.1f} {ratios[0]:>12s} {ratios[1]:>10s} {accept:>10s} {steady:>10s}")
    for skd in ("speculative", "speculative_accept_all"):
        for base in ("on_policy", "on_policy_cuda_graph"):
            if tps(skd) and tps(base):
                print(f"cost per token, {skd} / {base}: {tps(base) / tps(skd):.2f}")
    write(args.out, meta, results)


if __name__ == "__main__":
    main()
