"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with its real
launch configurations (AOT_SPECS in each kernels/ module), with 0 spill bytes.

The compilation runs once per session (the aot_results fixture in conftest.py) and
each (kernel, arch) is a test."""

import pytest

pytest.importorskip("triton")

def _spec_ids():
    from skipdit_fast.kernels.aot import all_specs

    return [(m, s.name) for m, s in all_specs()]


SPECS = _spec_ids()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("module,name", SPECS, ids=[f"{m}:{n}" for m, n in SPECS])
def test_aot_compiles_without_spills(aot_results, module, name, arch):
    r = aot_results.get((module, name, arch))
    assert r is not None, f"no AOT result for {module}:{name} on {arch}"
    assert "error" not in r, r.get("error")
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{name} on {arch}: {r['spill_stores']} B spill stores with {r['registers']} registers")


def test_every_kernel_module_has_specs():
    from skipdit_fast.kernels.aot import all_specs

    modules = {m for m, _ in all_specs()}
    assert "cache_delta" in modules
