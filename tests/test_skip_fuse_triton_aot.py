"""Ahead-of-time compilation of the Triton skip_fuse kernels (no GPU needed).

Every entry of kernels/skip_fuse.py AOT_SPECS (each autotune config of the forward
and grad_weight GEMMs for every dtype it serves, the row-wise kernels at small,
DiT-XL and maximum widths) is compiled for sm_80 and sm_90 with the ptxas bundled with
Triton: 0 bytes spilled, tensor-core MMAs where expected (wgmma for the sm_90 16-bit
GEMMs with >= 64-row tiles), pipelined 16-byte cp.async loads in the forward GEMM.
The compilation itself is shared with tests/test_triton_aot.py (conftest.aot_results).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(aot_results):
    """{(spec name, 80 | 90): record} for the skip_fuse kernels, from the session's
    AOT compilation of every kernel module (conftest.aot_results)."""
    out = {}
    for (module, name, arch), r in aot_results.items():
        if module == "skip_fuse":
            assert "error" not in r, (name, arch, r.get("error"))
            out[(name, 80 if arch == "sm_80" else 90)] = {
                **r, "wgmma": r["tensor_cores"] == "wgmma", "mma_sync": r["tensor_cores"] == "mma"}
    return out


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
