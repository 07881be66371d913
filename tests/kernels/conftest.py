"""Kernel tests run the Triton kernels on CPU under TRITON_INTERPRET=1 (on a CUDA machine: compiled).

Triton picks the interpreter when a kernel is decorated, so the flag must be set before
``vllm_frontier.kernels`` is imported; a copy imported earlier without it (by other test folders) is dropped
from ``sys.modules`` so these tests import a fresh one.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [n for n in sys.modules if n.startswith("vllm_frontier.kernels")]:
        del sys.modules[_name]
