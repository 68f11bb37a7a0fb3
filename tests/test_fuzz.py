"""The fuzz suite (issue 16.7): every probe of tests/fuzz_cases.py (bad dtypes,
shapes, dims, strides, devices, values, non-tensors, 0-d and empty tensors, for every
public op function and torch.ops.skipdit op on each CPU backend) must raise a clear
error or compute what the reference computes. The probes run in worker subprocesses,
all of them in one go at the first test (a crash fails its probe, not the session);
each test reads its probe's result. Known bugs (fuzz_cases.KNOWN_BUG_PATTERNS) are
xfail with the bug named. tools/fuzz_report.py prints the counts."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# triton too, where its kernels run in the interpreter (conftest: no CUDA device); the
# workers inherit the setting, so that they build the same table
os.environ.setdefault("SKIPDIT_FAST_FUZZ_TRITON", "1")
import fuzz_cases as fc  # noqa: E402

PROBES = fc.all_probes()


@pytest.fixture(scope="module")
def results():
    return fc.run_isolated([p.id for p in PROBES])


def _param(p):
    marks = [pytest.mark.xfail(reason=p.xfail, strict=False)] if p.xfail else []
    return pytest.param(p, id=p.id, marks=marks)


@pytest.mark.parametrize("probe", [_param(p) for p in PROBES])
def test_probe(probe, results):
    r = results[probe.id]
    assert r["outcome"] in ("error", "correct"), f"{probe.id} (expect {probe.expect}): {r['detail']}"
    if probe.expect == "error":
        assert r["outcome"] == "error"
    if probe.expect == "compute":
        assert r["outcome"] == "correct"


def test_the_table_covers_every_op_and_backend():
    import torch

    import skipdit_fast.ops as ops
    from skipdit_fast.ops import defs

    targets = {p.target for p in PROBES}
    for op in defs.OPS:
        assert f"ops.{op}" in targets and f"ops.{op}.backward" in targets
        for kop in (op,) + defs.OPS[op].kernel_ops():
            assert f"skipdit::{kop}" in targets, kop
            assert hasattr(torch.ops.skipdit, kop)
    for t in fc.targets():
        if t.name.startswith("ops."):
            assert set(fc.BACKENDS) <= set(t.backends)
    assert callable(ops.skip_fuse)
    cases = {p.case.split(": ", 1)[-1] for p in PROBES}
    for kind in ("dtype int32", "last dim + 1", "one more dim", "0-d", "empty", "on the meta device", "a list",
                 "None", "last-dim stride 2", "padded leading stride", "a NaN", "an inf", "every tensor on meta",
                 "many dims (6-D as_strided)", "2**31 + 8 elements"):
        assert kind in cases, kind


def test_a_crash_fails_its_probe_only(monkeypatch):
    monkeypatch.setenv("SKIPDIT_FAST_FUZZ_SELFTEST", "1")
    good = "skipdit::cache_delta[native-cpu]: good arguments"
    r = fc.run_isolated(["selftest: segfault", good])
    assert r["selftest: segfault"]["outcome"] == "fail" and "crash" in r["selftest: segfault"]["detail"]
    assert r[good]["outcome"] == "correct"
