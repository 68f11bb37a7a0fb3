"""Ahead-of-time compilation of the Triton skip_fuse kernels (no GPU needed).

Every entry of kernels/skip_fuse.py AOT_SPECS (each autotune config of the forward
and grad_weight GEMMs for every dtype it serves, the row-wise kernels at small,
DiT-XL and maximum widths) is compiled for sm_80 and sm_90 with the ptxas bundled with
Triton: 0 bytes spilled, tensor-core MMAs where expected (wgmma for the sm_90 16-bit
GEMMs with >= 64-row tiles), pipelined 16-byte cp.async loads in the forward GEMM.
The compilations run in a small process pool (about a minute on 2 cores).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

ARCHS = (80, 90)


def _compile(job):
    """(spec index, arch) -> the facts the tests need (runs in a worker process)."""
    from skipdit_fast.kernels.aot import compile_spec
    from skipdit_fast.kernels.skip_fuse import AOT_SPECS

    index, arch = job
    spec = AOT_SPECS()[index]
    rec = compile_spec(spec, arch)
    ptx = rec["ptx"]
    return {
        "name": spec.name, "arch": arch, "registers": rec["registers"],
        "spill_stores": rec["spill_stores"], "spill_loads": rec["spill_loads"], "shared": rec["shared"],
        "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync.aligned" in ptx,
        "cp_async_16": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10", ptx)),
    }


@pytest.fixture(scope="module")
def compiled():
    from skipdit_fast.kernels.skip_fuse import AOT_SPECS

    jobs = [(i, a) for i in range(len(AOT_SPECS())) for a in ARCHS]
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    # conftest sets TRITON_INTERPRET=1 without a GPU; the workers must start without it
    # (triton and @triton.jit read it at import), as AOT compilation needs real kernels
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            recs = list(pool.map(_compile, jobs))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return {(r["name"], r["arch"]): r for r in recs}


def test_specs_cover_every_config():
    from skipdit_fast.kernels import skip_fuse as K

    names = [s.name for s in K.AOT_SPECS()]
    assert len(names) == len(set(names))
    for tag, table in (("fwd", K.FWD_CONFIGS), ("dw", K.DW_CONFIGS)):
        for family, configs in table.items():
            dtypes = ("fp16", "bf16") if family == "16bit" else ("fp32",)
            for dt in dtypes:
                got = [n for n in names if n.startswith(f"skip_fuse_{tag}_{dt}_{family}_") and n.endswith("_rows")]
                assert len(got) == len(configs), (tag, family, dt, got)
    for kernel in ("stats", "ln_bwd"):
        for dt in ("fp16", "bf16", "fp32"):
            assert sum(n.startswith(f"skip_fuse_{kernel}_{dt}_") for n in names) == 3


def test_no_spills(compiled):
    bad = [f"{n} sm_{a}: {r['spill_stores']} B stored / {r['spill_loads']} B loaded, {r['registers']} regs"
           for (n, a), r in compiled.items() if r["spill_stores"] or r["spill_loads"]]
    assert not bad, "spills:\n" + "\n".join(bad)


def test_tensor_cores(compiled):
    from skipdit_fast.kernels import skip_fuse as K

    for (name, arch), r in compiled.items():
        if not (name.startswith("skip_fuse_fwd_") or name.startswith("skip_fuse_dw_")) or "_ieee_" in name:
            continue
        # 16-bit and tf32 GEMMs run on tensor cores: wgmma on sm_90 when the tile has
        # >= 64 rows per warp group, mma.sync otherwise
        assert r["wgmma"] or r["mma_sync"], (name, arch)
        if arch == 80:
            assert r["mma_sync"] and not r["wgmma"], name
    big = K.FWD_CONFIGS["16bit"][0].kwargs
    name = f"skip_fuse_fwd_bf16_16bit_{big['BLOCK_M']}x{big['BLOCK_N']}x{big['BLOCK_K']}"
    hits = [r for (n, a), r in compiled.items() if n.startswith(name) and a == 90]
    assert hits and all(r["wgmma"] for r in hits), "sm_90 bf16 forward does not use wgmma"


def test_forward_loads_are_pipelined(compiled):
    """The forward GEMM's x/skip and W tiles arrive by 16-byte cp.async (the software
    pipeline), not by plain register loads."""
    for (name, arch), r in compiled.items():
        if name.startswith("skip_fuse_fwd_") and "_16bit_" in name:
            assert r["cp_async_16"] > 0, (name, arch)
