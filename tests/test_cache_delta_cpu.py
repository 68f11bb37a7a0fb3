"""The CPU cache_delta (csrc/cpu/cache_delta.cpp) against fp64 truth, DESIGN.md section 4."""

import pytest
import torch

import skipdit_fast as sf
from helpers import FAMILIES, rows, strided_like
from skipdit_fast.ops import reference
from skipdit_fast.ops.testing import poison_outputs

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 72), (3, 37, 88), (2, 256, 1152)])
def test_cache_delta(family, dtype, shape):
    a = rows(shape, family, dtype)
    b = (a.double() + 0.05 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    truth = reference.cache_delta(a.double(), b.double())
    with sf.use_backend("cpu"), poison_outputs():
        out = sf.ops.cache_delta(a, b)
    assert out.shape == () and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # accumulated in double from the exact inputs: only the final rounding differs
    assert abs(out.item() - truth.item()) <= 1e-6 * abs(truth.item()) + 1e-12


def test_cache_delta_strided():
    a = strided_like(torch.randn(4, 30, 72))
    b = strided_like(torch.randn(4, 30, 72), pad=5)
    with sf.use_backend("cpu"):
        out = sf.ops.cache_delta(a, b)
    assert abs(out.item() - reference.cache_delta(a.double(), b.double()).item()) < 1e-6
