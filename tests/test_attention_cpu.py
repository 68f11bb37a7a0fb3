"""The CPU attention (csrc/cpu/attention.cpp) against fp64 truth with the error budget of
PyTorch's own 16-bit composition (helpers.attention_pt), DESIGN.md section 4."""

import pytest
import torch

import skipdit_fast as sf
from helpers import assert_budget, attention_pt
from skipdit_fast.ops import reference
from skipdit_fast.ops.testing import poison_outputs

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Dh", [72, 88, 64])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (77, 77), (16, 40), (256, 256)])
def test_attention_forward(dtype, Dh, Nq, Nk):
    B, H = 2, 3
    qkv = torch.randn(B, Nq, 3, H, Dh, dtype=torch.float64)
    q = qkv[:, :, 0].to(dtype)
    k = torch.randn(B, Nk, H, Dh, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Nk, H, Dh, dtype=torch.float64).to(dtype)
    truth = reference.attention(q.double(), k.double(), v.double())
    ref_lowp = attention_pt(q, k, v)
    with sf.use_backend("cpu"), poison_outputs():
        out = sf.ops.attention(q, k, v)
    assert out.is_contiguous() and out.shape == q.shape
    assert_budget(out, ref_lowp, truth, atol=ATOL[dtype], what=f"attention {dtype} {Dh} {Nq}x{Nk}")


def test_attention_fused_qkv_views_and_scale():
    B, N, H, Dh = 2, 50, 4, 72
    qkv = torch.randn(B, N, 3 * H * Dh)
    q, k, v = qkv.view(B, N, 3, H, Dh).unbind(2)
    assert not q.is_contiguous()
    with sf.use_backend("cpu"):
        out = sf.ops.attention(q, k, v, scale=0.05)
    truth = reference.attention(q.double(), k.double(), v.double(), scale=0.05)
    assert_budget(out, attention_pt(q, k, v, scale=0.05), truth, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backward(dtype):
    B, Nq, Nk, H, Dh = 2, 33, 20, 2, 72
    base = [torch.randn(B, n, H, Dh, dtype=torch.float64) for n in (Nq, Nk, Nk)]
    g = torch.randn(B, Nq, H, Dh, dtype=torch.float64).to(dtype).double()

    def grads(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        fn(*ts).backward(g.to(ts[0].dtype))
        return [t.grad for t in ts]

    low = [t.to(dtype) for t in base]
    truth = grads(reference.attention, [t.double() for t in low])
    ref_lowp = grads(attention_pt, low)
    with sf.use_backend("cpu"):
        out = grads(sf.ops.attention, low)
    for name, o, r, t in zip("qkv", out, ref_lowp, truth):
        assert_budget(o, r, t, atol=ATOL[dtype], what=f"grad {name} {dtype}")
