"""The Triton path at the issue's shapes on a GPU (skipped without CUDA; run by benchmarks/gpu_check.sh)."""

import pytest
import torch

from rlkd_onpolicy._imports import is_triton_available
from rlkd_onpolicy.kernels import fused_topk_loss
from rlkd_onpolicy.losses import teacher_topk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and is_triton_available()), reason="needs CUDA and triton"),
]
V, H, K = 151936, 896, 64


def make(n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, H, device="cuda", generator=g) / H**0.25
    weight = torch.randn(V, H, device="cuda", generator=g) / H**0.25
    top = teacher_topk(torch.randn(n, V, device="cuda", generator=g) * 2, K)
    return hidden.to(dtype), weight.to(dtype), top


def run(hidden, weight, top, backend, **kwargs):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fused_topk_loss(hidden, weight, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob,
                           backend=backend, **({"rank_weight": 0.0} | kwargs))
    (loss * 0.7).backward()
    return [loss.detach().double(), hidden.grad.double(), weight.grad.double()]


def relative(a, b):
    return float((a - b).norm() / b.norm())


# fp32 against the reference in float64 (target 1e-5), bf16 against the reference in bf16 (target 2e-2)
@pytest.mark.parametrize("loss", ["fkl", "jsd", "rkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_parity_at_vocabulary_152k(dtype, loss):
    hidden, weight, top = make(2048, dtype)
    got = run(hidden, weight, top, "triton", loss=loss)
    if dtype == torch.float32:
        expected = run(hidden.double(), weight.double(), top, "torch", loss=loss)
        errors = [relative(a, b) for a, b in zip(got, expected, strict=True)]
        if loss == "rkl":
            # Reverse KL's gradient at V = 152k is ill-conditioned in float32: on the H200 the float32 reference
            # itself is 6e-5 from float64 (the kernel 3e-5; benchmarks/kernel_accuracy.py). The 1e-5 target is
            # out of float32's reach here, so the kernel must be at least as accurate as the reference in float32.
            reference = run(hidden, weight, top, "torch", loss=loss)
            reference_errors = [relative(a, b) for a, b in zip(reference, expected, strict=True)]
            assert all(e <= max(1e-5, r) for e, r in zip(errors, reference_errors, strict=True)), (
                errors,
                reference_errors,
            )
            return
        assert max(errors) <= 1e-5, errors
    else:
        expected = run(hidden, weight, top, "torch", loss=loss)
        errors = [relative(a, b) for a, b in zip(got, expected, strict=True)]
        assert max(errors) <= 2e-2, errors


def test_triton_peak_memory_under_one_gib():
    hidden, weight, top = make(8192, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_topk_loss(hidden, weight, top.ids, top.logprobs, teacher_tail_logprob=top.tail_logprob,
                    rank_weight=0.0, backend="triton").backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 2**30
