"""Rows of views with many strided leading dims (csrc/common.h RowIndexer): the native
ops serve views with up to 16 leading dims that do not merge into one stride, with the
reference's results, and refuse more with an error naming the op and the argument --
never by writing past the indexer (which crashed the process from 24 dims on)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast import reference

from helpers import assert_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def many_dim_view(ndim: int, D: int = 8, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A [2]*ndim + [D] view whose ndim leading dims do not merge into one stride:
    stride 8*(ndim + 1 - d) for dim d (overlapping rows over a small storage)."""
    g = torch.Generator().manual_seed(seed)
    strides = [D * (ndim + 1 - d) for d in range(ndim)] + [1]
    size = 1 + sum(s for s in strides[:-1]) + (D - 1)
    base = torch.randn(size, generator=g, dtype=torch.float64).to(dtype)
    return base.as_strided((2,) * ndim + (D,), strides)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


# The views of issue 16: 24 leading dims of stride 8 (a segfault before the fix) and 17
# (a silent stack overwrite). Run in a subprocess so that a crash fails the test.
CRASH_CASES = {
    "cache_delta": "skipdit_fast.ops.cache_delta(x, x)",
    "skip_fuse": "skipdit_fast.ops.skip_fuse(x, x, torch.ones(16), torch.zeros(16), torch.randn(8, 16))",
    # grad_out expanded from one row: no 2^24-row allocation before the call
    "skip_fuse_backward": ("torch.ops.skipdit.skip_fuse_backward(torch.randn(8).expand(x.shape[:-1] + (8,)), "
                           "x, x, torch.ones(16), torch.zeros(16), torch.randn(8, 16), None, 1e-6)"),
}


@pytest.mark.parametrize("ndim", [17, 24])
@pytest.mark.parametrize("op", sorted(CRASH_CASES))
def test_too_many_dims_is_an_error_not_a_crash(op, ndim):
    r = _run(f"""
        import torch, skipdit_fast
        x = torch.randn(8 * {ndim} + 8).as_strided((2,) * {ndim} + (8,), (8,) * {ndim} + (1,))
        with skipdit_fast.use_backend("cpu"):
            try:
                {CRASH_CASES[op]}
            except ValueError as e:
                print("ValueError:", e)
            else:
                print("no error")
    """)
    assert r.returncode == 0, f"exit code {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    arg = "a" if op == "cache_delta" else "x"
    assert "ValueError:" in r.stdout and f": {arg} has more than 16 leading dimensions" in r.stdout, r.stdout
    assert f"skipdit::{op}" in r.stdout, r.stdout


@pytest.mark.parametrize("ndim", [9, 12, 16])
def test_cache_delta_many_dims_matches_reference(ndim):
    a = many_dim_view(ndim, seed=1)
    b = many_dim_view(ndim, seed=2)
    with sf.use_backend("cpu"):
        out = sf.ops.cache_delta(a, b)
    truth = reference.cache_delta(a.double(), b.double())
    assert abs(out.item() - truth.item()) <= 1e-6 * abs(truth.item())


@pytest.mark.parametrize("ndim", [9, 16])
def test_skip_fuse_many_dims_matches_reference(ndim):
    D, D_out = 8, 16
    x = many_dim_view(ndim, D, seed=3).requires_grad_()
    skip = many_dim_view(ndim, D, seed=4).requires_grad_()
    nw = (1 + 0.1 * torch.randn(2 * D)).requires_grad_()
    nb = (0.1 * torch.randn(2 * D)).requires_grad_()
    w = (torch.randn(D_out, 2 * D) / 4).requires_grad_()
    b = torch.randn(D_out).requires_grad_()
    args = [x, skip, nw, nb, w, b]
    gy = torch.randn(x.shape[:-1] + (D_out,))
    with sf.use_backend("cpu"):
        y = sf.ops.skip_fuse(*args)
        grads = torch.autograd.grad(y, args, gy)
    ref_y = reference.skip_fuse(*args)
    ref_grads = torch.autograd.grad(ref_y, args, gy)
    args64 = [a.detach().double().requires_grad_() for a in args]
    truth_y = reference.skip_fuse(*args64)
    truth_grads = torch.autograd.grad(truth_y, args64, gy.double())
    # DESIGN.md's rule: error vs the fp64 truth within 2x the fp32 reference's own
    # (the weight / bias gradients sum 2**ndim rows: an absolute bound on them would
    # measure the fp32 round-off of the sum, not the kernel; it failed at 16 dims)
    assert_budget(y, ref_y, truth_y, atol=1e-6, what="y")
    for name, g, r, t in zip(["x", "skip", "norm_weight", "norm_bias", "weight", "bias"], grads, ref_grads,
                             truth_grads):
        # x and skip rows overlap in memory: their gradients are per view element
        assert_budget(g, r, t, atol=1e-5 * max(1.0, t.abs().max().item()), what=name)


def test_error_names_the_argument():
    """a is contiguous (one row stride), b has 17 strided leading dims: b is refused."""
    b = many_dim_view(17)
    a = b.contiguous()
    with sf.use_backend("cpu"), pytest.raises(ValueError, match=r"skipdit::cache_delta: b has more than 16"):
        sf.ops.cache_delta(a, b)
