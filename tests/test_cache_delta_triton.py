"""The Triton cache_delta kernel, run in Triton's interpreter on CPU tensors (and on
a GPU when there is one)."""

import pytest
import torch

import skipdit_fast as sf
from helpers import FAMILIES, rows, strided_like
from skipdit_fast.ops import reference, triton_ops
from skipdit_fast.ops.testing import poison_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.skipif(DEVICE == "cpu" and not triton_ops.interpreting(),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              pytest.mark.skipif(triton_ops.triton_missing_reason() is not None,
                                 reason=f"{triton_ops.triton_missing_reason()}")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 72), (3, 37, 88), (2, 64, 1152)])
def test_cache_delta_triton(family, dtype, shape):
    a = rows(shape, family, dtype, DEVICE)
    b = (a.double() + 0.05 * torch.randn(shape, dtype=torch.float64, device=DEVICE)).to(dtype)
    truth = reference.cache_delta(a.double().cpu(), b.double().cpu()).item()
    with sf.use_backend("triton"), poison_outputs():
        out = sf.ops.cache_delta(a, b)
    assert out.device.type == DEVICE and out.dtype == torch.float32 and out.shape == ()
    # fp32 accumulation of exact inputs
    assert abs(out.item() - truth) <= 2e-5 * abs(truth)


def test_cache_delta_triton_strided_rows():
    a = strided_like(torch.randn(4, 30, 72, device=DEVICE))
    b = strided_like(torch.randn(4, 30, 72, device=DEVICE), pad=16)
    with sf.use_backend("triton"):
        out = sf.ops.cache_delta(a, b)
    assert abs(out.item() - reference.cache_delta(a.double(), b.double()).item()) < 1e-5


def test_cache_delta_triton_refuses_uncollapsible_layout():
    t = torch.randn(4, 6, 5, 8, device=DEVICE).transpose(0, 1)  # leading dims do not collapse
    with sf.use_backend("triton"), pytest.raises((ValueError, sf.BackendError), match="collapse"):
        sf.ops.cache_delta(t, t)
