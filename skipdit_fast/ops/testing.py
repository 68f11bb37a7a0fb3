"""Testing aids of the op layer, used by the test suite and the GPU check."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .checks import _POISON


@contextlib.contextmanager
def poison_outputs(on: bool = True) -> Iterator[None]:
    """Fill every kernel output with NaN before the kernel writes it (C++, CUDA and
    Triton kernels), so that unwritten elements show up as NaN."""
    prev_py = _POISON[0]
    _POISON[0] = on
    prev_c = torch.ops.skipdit._set_poison_outputs(on)
    try:
        yield
    finally:
        _POISON[0] = prev_py
        torch.ops.skipdit._set_poison_outputs(prev_c)


def skip_gpu_tests_without_cuda(items) -> None:
    """pytest collection hook body (tests/ and bench/): without a CUDA device, tests
    marked `gpu` are skipped with the reason."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
