"""Backend choice: context manager, setter, environment variable, auto, and
explicit requests that fail with reasons instead of falling back."""

import os
import subprocess
import sys

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast.ops import backends, defs


def _q(op="skip_fuse", device="cpu", dtype=torch.float32, grad=False):
    return backends.Query(op, torch.device(device), dtype, grad, ())


def test_auto_picks_cpu_kernel_on_cpu():
    for op in backends.OPS:
        assert backends.select(_q(op)).backend == "cpu"


def test_use_backend_context_and_restore():
    assert sf.get_backend() == "auto"
    with sf.use_backend("reference"):
        assert sf.get_backend("attention") == "reference"
        assert backends.select(_q("attention")).backend == "reference"
        with sf.use_backend(attention="cpu"):
            assert backends.select(_q("attention")).backend == "cpu"
            assert backends.select(_q("skip_fuse")).backend == "reference"
        assert backends.select(_q("attention")).backend == "reference"
    assert sf.get_backend() == "auto"


def test_set_backend():
    try:
        sf.set_backend("reference")
        assert backends.select(_q()).backend == "reference"
        sf.set_backend(skip_fuse="cpu")
        assert backends.select(_q()).backend == "cpu"
        assert backends.select(_q("cache_delta")).backend == "reference"
    finally:
        sf.set_backend("auto")


def test_unknown_names_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        sf.set_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown op"):
        sf.set_backend(matmul="cpu")


def test_explicit_request_fails_with_reason_not_fallback():
    x = torch.randn(3, 8)
    with sf.use_backend("cuda"), pytest.raises(sf.BackendError, match="backend 'cuda' cannot run cache_delta"):
        sf.ops.cache_delta(x, x)


def test_explain_lists_every_backend():
    why = backends.explain(_q("attention", dtype=torch.float64))
    assert set(why) == set(backends.BACKENDS)
    assert why["cpu"] == [] and why["reference"] == []
    assert why["cuda"], "cuda cannot run CPU tensors: a reason is expected"
    assert any("device cpu" in r or "CUDA" in r for r in why["cuda"])


def test_auto_error_lists_candidates(monkeypatch):
    monkeypatch.setitem(defs.OPS["cache_delta"].static_order, "cpu", ("cuda",))
    backends._CACHE.clear()
    try:
        with pytest.raises(sf.BackendError, match=r"no backend can run cache_delta[\s\S]*cuda:"):
            sf.ops.cache_delta(torch.randn(2, 8), torch.randn(2, 8))
    finally:
        backends._CACHE.clear()


def test_limits_are_consulted(monkeypatch):
    impl = backends.registry()["skip_fuse"]["cpu"]
    monkeypatch.setattr(impl, "check", lambda q: "D too small" if q.features[0] < 16 else None)
    backends._CACHE.clear()
    try:
        with sf.use_backend("cpu"), pytest.raises(sf.BackendError, match="D too small"):
            sf.ops.skip_fuse(torch.randn(2, 8), torch.randn(2, 8), torch.ones(16), torch.zeros(16),
                             torch.randn(8, 16))
        # auto skips it and takes the next candidate
        out = sf.ops.skip_fuse(torch.randn(2, 8), torch.randn(2, 8), torch.ones(16), torch.zeros(16),
                               torch.randn(8, 16))
        assert out.shape == (2, 8)
    finally:
        backends._CACHE.clear()


def test_env_var_is_read_at_import():
    code = ("import skipdit_fast as sf; print(sf.get_backend(), sf.get_backend('attention'), "
            "sf.get_backend('skip_fuse'))")
    env = {**os.environ, "SKIPDIT_FAST_BACKEND": "reference,attention=cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "cpu", "reference"]
    for value, msg in (("nonsense", "unknown backend"), ("cpu,reference", "two backends for all ops"),
                       ("attention=cpu,attention=reference", "attention is given twice")):
        env["SKIPDIT_FAST_BACKEND"] = value
        bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert bad.returncode != 0 and msg in bad.stderr, (value, bad.stderr[-300:])


def test_needs_grad_goes_into_selection():
    x = torch.randn(2, 8, requires_grad=True)
    q = backends.Query("skip_fuse", x.device, x.dtype, True, (8, 8))
    assert backends.select(q).backend == "cpu"
    with torch.no_grad():
        assert not sf.ops._needs_grad(x)
