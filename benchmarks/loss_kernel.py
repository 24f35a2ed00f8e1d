"""Time and memory of distillation losses with a large vocabulary, forward + backward incl. the output projection.

    python benchmarks/loss_kernel.py                                   # CUDA: the issue's shapes (N=8192, V=151936)
    python benchmarks/loss_kernel.py --device cpu --out results.json   # a small CPU shape

Every method runs in this process on the same inputs: student hidden (N, H) and lm_head weight (V, H) with
gradients, teacher logits (N, V) for the dense losses and their top-K for the sparse ones. Reported: the median
time (CUDA events on GPU, perf_counter on CPU) and the peak extra memory (CUDA: the allocator's peak above what
was allocated before the call; CPU: the process's peak resident memory above its resident memory before the call,
an approximation), each with its ratio to the three-matmul floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlkd_onpolicy._imports import is_liger_available, is_triton_available  # noqa: E402
from rlkd_onpolicy.kernels import fused_topk_loss  # noqa: E402
from rlkd_onpolicy.losses import dense_divergence, sparse_divergence, teacher_topk  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float | None]:
    """Median milliseconds over `repeats` calls and peak extra MiB of one call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), peak
    peak = None
    if _reset_cpu_peak():
        before = _rss_bytes("VmRSS:")
        fn()
        after = _rss_bytes("VmHWM:")
        peak = None if before is None or after is None else max(after - before, 0) / 2**20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=None, help="tokens (default 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--v", type=int, default=None, help="vocabulary (default 151936 on CUDA, 16384 on CPU)")
    parser.add_argument("--h", type=int, default=None, help="student hidden size (default 896 on CUDA, 128 on CPU)")
    parser.add_argument("--k", type=int, default=64, help="teacher top-K")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, float32 CPU")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default 1024 CUDA, 256 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 10 CUDA, 3 CPU)")
    parser.add_argument("--skip-dense-jsd", action="store_true", help="skip the 60 GiB full-vocabulary JSD")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda and "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:
        # glibc keeps freed large blocks resident once its mmap threshold has grown, which hides later peaks from
        # the resident-memory measure; a fixed threshold returns every large tensor to the OS when it is freed.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    n = args.n or (8192 if cuda else 1024)
    vocab = args.v or (151936 if cuda else 16384)
    hidden_size = args.h or (896 if cuda else 128)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    repeats = args.repeats or (10 if cuda else 3)
    args.chunk_size = args.chunk_size or (1024 if cuda else 256)
    if not 1 <= args.k <= vocab:
        parser.error(f"--k={args.k} must be in [1, --v={vocab}]")
    torch.manual_seed(0)

    hidden = (torch.randn(n, hidden_size, device=device) / hidden_size**0.25).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.25).to(dtype).requires_grad_()
    teacher_logits = (torch.randn(n, vocab, device=device) * 2).to(dtype)
    top = teacher_topk(teacher_logits, args.k)
    grad_logits = torch.randn(n, vocab, device=device, dtype=dtype) / n  # the floor's incoming gradient

    def clear():
        hidden.grad = weight.grad = None

    def floor():
        clear()
        with torch.no_grad():
            torch.mm(hidden, weight.t())  # logits
            torch.mm(grad_logits, weight)  # grad_hidden
            torch.mm(grad_logits.t(), hidden)  # grad_weight

    def dense(loss, **kwargs):
        def run():
            clear()
            dense_divergence(hidden @ weight.t(), teacher_logits, loss, **kwargs).backward()

        return run

    def chunked_topk():
        # Chunk by chunk, backward right away: one chunk of logits at a time, no recompute.
        clear()
        for start in range(0, n, args.chunk_size):
            rows = slice(start, start + args.chunk_size)
            logits = F.linear(hidden[rows], weight)
            loss = sparse_divergence(logits, top.ids[rows], top.logprobs[rows],
                                     teacher_tail_logprob=top.tail_logprob[rows], reduction="sum") / n
            loss.backward()

    def ours(backend):
        def run():
            clear()
            fused_topk_loss(hidden, weight, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob,
                            rank_weight=0.0, chunk_size=args.chunk_size, backend=backend).backward()

        return run

    methods = [("matmul floor (3 matmuls)", floor), ("torch full-vocab forward KL", dense("fkl"))]
    if not args.skip_dense_jsd:
        methods.append(("torch full-vocab JSD(0.5)", dense("jsd", beta=0.5)))
    if is_liger_available() and cuda:
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.5)
        teacher_hidden = torch.randn_like(hidden).detach()
        teacher_weight = torch.randn_like(weight).detach()

        def liger_jsd():
            clear()
            liger(hidden, weight, teacher_hidden, teacher_weight, None).backward()  # shift_labels=None: no mask

        methods.append(("Liger LigerFusedLinearJSD(0.5)", liger_jsd))
    methods.append((f"torch chunked top-{args.k} forward KL", chunked_topk))
    methods.append((f"ours fused_topk_loss backend=torch (top-{args.k} fkl)", ours("torch")))
    if cuda and is_triton_available():
        methods.append((f"ours fused_topk_loss backend=triton (top-{args.k} fkl)", ours("triton")))

    results = []
    for name, fn in methods:
        try:
            ms, mib = measure(fn, device, repeats)
            results.append({"method": name, "median_ms": ms, "peak_extra_mib": mib})
        except torch.OutOfMemoryError:
            results.append({"method": name, "median_ms": None, "peak_extra_mib": None, "error": "out of memory"})
            clear()
            torch.cuda.empty_cache()
        except Exception as exc:  # e.g. a baseline's kernel that does not build here: reported, not fatal
            results.append({"method": name, "median_ms": None, "peak_extra_mib": None,
                            "error": f"{type(exc).__name__}: {exc}"[:300]})  # fmt: skip
            clear()
        print(f"[measured] {json.dumps(results[-1])}", flush=True)  # a run cut short still shows what it measured
    floor_ms, floor_mib = results[0]["median_ms"], results[0]["peak_extra_mib"]
    for row in results:
        row["time_vs_floor"] = row["median_ms"] / floor_ms if row["median_ms"] else None
        row["memory_vs_floor"] = row["peak_extra_mib"] / floor_mib if row["peak_extra_mib"] and floor_mib else None

    config = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
              "n": n, "v": vocab, "h": hidden_size, "k": args.k, "dtype": str(dtype).removeprefix("torch."),
              "chunk_size": args.chunk_size, "repeats": repeats, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    print(json.dumps(config))
    print(f"| {'method':<48} | {'median ms':>10} | {'× floor':>8} | {'peak extra MiB':>14} | {'× floor':>8} |")
    print(f"|{'-' * 50}|{'-' * 12}:|{'-' * 9}:|{'-' * 15}:|{'-' * 9}:|")
    for row in results:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "n/a"

        print(f"| {row['method']:<48} | {fmt(row['median_ms'], '10.1f')} | {fmt(row['time_vs_floor'], '8.2f')} | "
              f"{fmt(row['peak_extra_mib'], '14.1f')} | {fmt(row['memory_vs_floor'], '8.2f')} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"config": config, "results": results}, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
