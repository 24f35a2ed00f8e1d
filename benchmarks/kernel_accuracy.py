"""Accuracy of the fused top-k loss in float32 at the issue's vocabulary, against float64 and the float32 reference.

    python benchmarks/kernel_accuracy.py --device cuda --out accuracy.json    # ~20 s on one H100/H200

For each loss: relative errors (Frobenius norm of the difference / norm of the float64 value) of the loss, the
gradient of the hidden states and the gradient of the output projection, for the Triton backend against float64,
the PyTorch reference in float32 against float64 (what float32 itself allows), and Triton against that reference.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlkd_onpolicy.kernels import fused_topk_loss  # noqa: E402
from rlkd_onpolicy.losses import teacher_topk  # noqa: E402


def run(hidden, weight, top, backend, loss):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    value = fused_topk_loss(hidden, weight, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob,
                            backend=backend, loss=loss, rank_weight=0.0)  # fmt: skip
    (value * 0.7).backward()
    return [value.detach().double(), hidden.grad.double(), weight.grad.double()]


def relative(got, expected):
    return [float((a - b).norm() / b.norm()) for a, b in zip(got, expected, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--h", type=int, default=896)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--backend", default="triton", help="the fast path to check (triton on a GPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    g = torch.Generator(device=args.device).manual_seed(0)
    hidden = torch.randn(args.n, args.h, device=args.device, generator=g) / args.h**0.25
    weight = torch.randn(args.v, args.h, device=args.device, generator=g) / args.h**0.25
    top = teacher_topk(torch.randn(args.n, args.v, device=args.device, generator=g) * 2, args.k)
    rows = []
    for loss in ("fkl", "jsd", "rkl"):
        exact = run(hidden.double(), weight.double(), top, "torch", loss)
        reference = run(hidden, weight, top, "torch", loss)
        fast = run(hidden, weight, top, args.backend, loss)
        row = {
            "loss": loss,
            "fast_vs_float64": relative(fast, exact),
            "reference_fp32_vs_float64": relative(reference, exact),
            "fast_vs_reference_fp32": relative(fast, reference),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": args.n, "v": args.v, "h": args.h, "k": args.k, "backend": args.backend, "rows": rows}, f)


if __name__ == "__main__":
    main()
