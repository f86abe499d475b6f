"""Kernel tests run on CPU through the Triton interpreter when no GPU is present.

``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is *decorated* (i.e. when its module is imported), so it is
set here, before any test module imports ``kernels.*``. On a CUDA machine the variable is left alone and the same
tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
