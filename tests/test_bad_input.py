"""Bad input gets a clear Python exception (ValueError / TypeError naming the
argument), never a crash, from every backend that runs here."""

import math

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast.ops import triton_ops

BACKENDS = ["auto", "cpu", "reference", "torch"] + (["triton"] if triton_ops.interpreting()
                                                    and triton_ops.triton_missing_reason() is None else [])


def _good(D=8):
    return dict(x=torch.randn(4, D), skip=torch.randn(4, D), norm_weight=torch.ones(2 * D),
                norm_bias=torch.zeros(2 * D), weight=torch.randn(D, 2 * D), bias=torch.zeros(D), eps=1e-6)


# case -> (change to the good arguments for width D, exception, message)
SKIP_FUSE_BAD = {
    "dtype mix": (lambda D: dict(skip=torch.randn(4, D, dtype=torch.float64)), TypeError, "skip dtype"),
    "weight dtype": (lambda D: dict(weight=torch.randn(D, 2 * D).half()), TypeError, "weight dtype"),
    "int input": (lambda D: dict(x=torch.ones(4, D, dtype=torch.int32)), TypeError, "must be float16"),
    "norm dtype": (lambda D: dict(norm_weight=torch.ones(2 * D, dtype=torch.float64)), TypeError,
                   "norm parameters"),
    "shape mismatch": (lambda D: dict(skip=torch.randn(4, D + 1)), ValueError, "skip must have the shape"),
    "norm shape": (lambda D: dict(norm_bias=torch.zeros(2 * D - 1)), ValueError, "norm_bias must have shape"),
    "weight shape": (lambda D: dict(weight=torch.randn(D, 2 * D - 1)), ValueError, "weight must have shape"),
    "bias shape": (lambda D: dict(bias=torch.zeros(D - 1)), ValueError, "bias must have shape"),
    "last-dim stride": (lambda D: dict(x=torch.randn(D, 4).t()), ValueError, "contiguous last dimension"),
    "empty": (lambda D: dict(x=torch.randn(0, D), skip=torch.randn(0, D)), ValueError, "empty"),
    "nan eps": (lambda D: dict(eps=math.nan), ValueError, "eps must be finite"),
    "inf eps": (lambda D: dict(eps=math.inf), ValueError, "eps must be finite"),
    "device mix": (lambda D: dict(skip=torch.randn(4, D, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(SKIP_FUSE_BAD))
def test_skip_fuse_bad_input(backend, case):
    D = 64 if backend == "triton" else 8  # a width every tested backend serves
    change, exc, msg = SKIP_FUSE_BAD[case]
    kw = {**_good(D), **change(D)}
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
