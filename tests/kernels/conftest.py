"""Kernel tests run on CPU through the Triton interpreter when no GPU is present.

``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is *decorated* (i.e. when its module is imported), so it is
set here, before any test module imports ``kernels.*``. On a CUDA machine the variable is left alone and the same
tests run the compiled kernels on the GPU.

Shared by the kernel test modules: the ``requires_triton`` marker (skips a test, or a ``pytest.param`` case, where
Triton kernels cannot run) and the ``triton_runnable`` fixture (the same condition as a bool).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REQUIRES_TRITON_REASON = "Triton needs a GPU or TRITON_INTERPRET=1 set before kernels import"


def _triton_runnable() -> bool:
    if torch.cuda.is_available():
        return True
    from kernels.quant.quant_triton import INTERPRETED

    return INTERPRETED


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"requires_triton: skip unless Triton kernels can run ({REQUIRES_TRITON_REASON})")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_triton") is not None and not _triton_runnable():
        pytest.skip(REQUIRES_TRITON_REASON)


@pytest.fixture
def triton_runnable() -> bool:
    """Whether Triton kernels can run here: on a CUDA GPU, or on the CPU in the interpreter."""
    return _triton_runnable()
