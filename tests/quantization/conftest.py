"""Run the FP4 Triton kernels through Triton's interpreter when no GPU is present (set before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
