"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when there is no GPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when `rlkd_onpolicy.kernels.triton_topk` is first
imported (lazily, by the Triton backend), so setting it here affects nothing that is compiled for a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
