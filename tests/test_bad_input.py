"""Bad input gets a clear Python exception (ValueError / TypeError naming the
argument), never a crash, from every backend that runs here."""

import math

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast import _triton_ops

BACKENDS = ["cpu", "reference"] + (["triton"] if _triton_ops.interpreting() else [])


def _good():
    return dict(x=torch.randn(4, 8), skip=torch.randn(4, 8), norm_weight=torch.ones(16),
                norm_bias=torch.zeros(16), weight=torch.randn(8, 16), bias=torch.zeros(8), eps=1e-6)


SKIP_FUSE_BAD = {
    "dtype mix": (dict(skip=torch.randn(4, 8, dtype=torch.float64)), TypeError, "skip dtype"),
    "weight dtype": (dict(weight=torch.randn(8, 16).half()), TypeError, "weight dtype"),
    "int input": (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "must be float16"),
    "norm dtype": (dict(norm_weight=torch.ones(16, dtype=torch.float64)), TypeError, "norm parameters"),
    "shape mismatch": (dict(skip=torch.randn(4, 9)), ValueError, "skip must have the shape"),
    "norm shape": (dict(norm_bias=torch.zeros(15)), ValueError, "norm_bias must have shape"),
    "weight shape": (dict(weight=torch.randn(8, 15)), ValueError, "weight must have shape"),
    "bias shape": (dict(bias=torch.zeros(7)), ValueError, "bias must have shape"),
    "last-dim stride": (dict(x=torch.randn(8, 4).t()), ValueError, "contiguous last dimension"),
    "empty": (dict(x=torch.randn(0, 8), skip=torch.randn(0, 8)), ValueError, "empty"),
    "nan eps": (dict(eps=math.nan), ValueError, "eps must be finite"),
    "inf eps": (dict(eps=math.inf), ValueError, "eps must be finite"),
    "device mix": (dict(skip=torch.randn(4, 8, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(SKIP_FUSE_BAD))
def test_skip_fuse_bad_input(backend, case):
    if backend == "triton" and not _triton_ops.implemented("skip_fuse"):
        pytest.skip("no Triton skip_fuse kernel")
    change, exc, msg = SKIP_FUSE_BAD[case]
    kw = {**_good(), **change}
    with sf.use_backend(backend), pytest.raises(exc, match=msg):
        sf.ops.skip_fuse(**kw)


def _qkv(**change):
    t = dict(q=torch.randn(2, 5, 3, 16), k=torch.randn(2, 7, 3, 16), v=torch.randn(2, 7, 3, 16))
    t.update(change)
    return t


ATTN_BAD = {
    "3-D": (dict(q=torch.randn(5, 3, 16)), ValueError, "must be 4-D"),
    "dtype mix": (dict(k=torch.randn(2, 7, 3, 16).double()), TypeError, "k dtype"),
    "heads": (dict(k=torch.randn(2, 7, 4, 16), v=torch.randn(2, 7, 4, 16)), ValueError, "must agree"),
    "kv shape": (dict(v=torch.randn(2, 6, 3, 16)), ValueError, "k and v must have one shape"),
    "head dim": (dict(q=torch.randn(2, 5, 3, 12), k=torch.randn(2, 7, 3, 12), v=torch.randn(2, 7, 3, 12)),
                 ValueError, "multiple of 8"),
    "stride": (dict(q=torch.randn(2, 5, 16, 3).transpose(-1, -2)), ValueError, "contiguous last"),
    "empty": (dict(q=torch.randn(2, 0, 3, 16)), ValueError, "empty"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ATTN_BAD))
def test_attention_bad_input(backend, case):
    if backend == "triton" and not _triton_ops.implemented("attention"):
        pytest.skip("no Triton attention kernel")
    change, exc, msg = ATTN_BAD[case]
    with sf.use_backend(backend), pytest.raises(exc, match=msg):
        sf.ops.attention(**_qkv(**change))


def test_attention_bad_scale():
    with sf.use_backend("cpu"), pytest.raises(ValueError, match="scale must be finite"):
        sf.ops.attention(**_qkv(), scale=math.inf)


CD_BAD = {
    "shape": (torch.randn(3, 4), torch.randn(3, 5), ValueError, "one shape"),
    "dtype": (torch.randn(3, 4), torch.randn(3, 4).half(), TypeError, "b dtype"),
    "empty": (torch.randn(0, 4), torch.randn(0, 4), ValueError, "empty"),
    "int": (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), TypeError, "must be"),
    "stride": (torch.randn(4, 3).t(), torch.randn(4, 3).t(), ValueError, "contiguous last"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CD_BAD))
def test_cache_delta_bad_input(backend, case):
    a, b, exc, msg = CD_BAD[case]
    with sf.use_backend(backend), pytest.raises(exc, match=msg):
        sf.ops.cache_delta(a, b)


def test_direct_op_call_bad_input_is_python_error():
    """The C++ ops check their arguments themselves (no Python layer in between)."""
    kw = _good()
    with pytest.raises(ValueError, match="skip must have the shape"):
        torch.ops.skipdit.skip_fuse(kw["x"], torch.randn(3, 8), kw["norm_weight"], kw["norm_bias"],
                                    kw["weight"], kw["bias"], 1e-6)
    with pytest.raises(ValueError, match="lse must have shape"):
        q = torch.randn(1, 4, 2, 8)
        torch.ops.skipdit.attention_backward(q, q, q, q, q, torch.randn(3), 0.3)
