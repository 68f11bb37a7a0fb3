"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with its real
launch configurations (AOT_SPECS in each kernels/ module), with 0 spill bytes.

The compilation runs once per session (the aot_results fixture in conftest.py) and
each (kernel, arch) is a test."""

import pytest

pytest.importorskip("triton")

def _cases():
    from skipdit_fast.kernels.aot import all_specs

    return [(m, s.name, "sm_90a" if a >= 90 else f"sm_{a}") for m, s in all_specs() for a in s.archs]


CASES = _cases()


@pytest.mark.parametrize("module,name,arch", CASES, ids=[f"{m}:{n}:{a}" for m, n, a in CASES])
def test_aot_compiles_without_spills(aot_results, module, name, arch):
    r = aot_results.get((module, name, arch))
    assert r is not None, f"no AOT result for {module}:{name} on {arch}"
    assert "error" not in r, r.get("error")
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{name} on {arch}: {r['spill_stores']} B spill stores with {r['registers']} registers")


def test_every_kernel_module_has_ci_specs():
    import pkgutil

    import skipdit_fast.kernels as pkg
    from skipdit_fast.kernels.aot import all_specs

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)
               if m.name not in ("aot", "limits") and not m.name.startswith("_")}  # _x: parts of module x
    assert modules and modules == {m for m, _ in all_specs(full=False)}
