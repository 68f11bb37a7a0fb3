"""Ahead-of-time compilation of the Triton kernels, no GPU needed.

Each kernel module lists AOT_SPECS: the real launch configurations (signature,
constexprs, num_warps, num_stages). compile_spec() compiles one for a target arch
(sm_80, sm_90) to PTX and cubin with triton.compile, then runs the ptxas bundled with
Triton on the PTX with -v to read registers and spill bytes.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field


@dataclass
class AotSpec:
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""
    # the archs this configuration is launched on (a per-arch config names one)
    archs: tuple = (80, 90)
    # argument -> known divisibility, what the JIT specializes at run time; None: 16 for
    # every pointer (torch allocations and the launchers' views are 16-byte aligned).
    # Without it every load compiles to scalar loads and the report is not the real code.
    divisibility: dict | None = None
    # compiled by the test suite in CI; the rest only in the full sweep
    # (python -m skipdit_fast.kernels.aot --full, or SKIPDIT_FULL_AOT=1)
    ci: bool = True

    def attrs(self) -> dict:
        div = self.divisibility
        if div is None:
            div = {a: 16 for a, t in self.signature.items() if isinstance(t, str) and t.startswith("*")}
        return {(self.fn.arg_names.index(a),): [["tt.divisibility", d]] for a, d in div.items()}


def ptxas_path() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def compile_spec(spec: AotSpec, arch: int) -> dict:
    """Compiles spec for sm_<arch>; returns {name, arch, ptx, cubin, registers,
    spill_stores, spill_loads, stack, asm_has(instr) helper data}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from skipdit_fast.ops.native import parse_ptxas

    sig = dict(spec.signature)
    for k in spec.constexprs:
        sig[k] = "constexpr"
    # every parameter of the kernel must be typed
    missing = [a for a in spec.fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"{spec.name}: signature lacks {missing}")
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs), attrs=spec.attrs())
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu_name}", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {spec.name} on {gpu_name}:\n{r.stderr}")
    recs = parse_ptxas(r.stdout + r.stderr)
    if not recs:
        raise RuntimeError(f"no ptxas report for {spec.name}: {r.stdout}{r.stderr}")
    rec = dict(recs[0])
    rec.update(name=spec.name or spec.fn.__name__, arch=gpu_name, ptx=ptx,
               cubin=compiled.asm.get("cubin"), shared=compiled.metadata.shared)
    return rec


def tensor_core_kind(ptx: str) -> str | None:
    """'wgmma' or 'mma' when the PTX issues tensor-core instructions, else None."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return None


def full_sweep_requested() -> bool:
    return os.environ.get("SKIPDIT_FULL_AOT") == "1"


def all_specs(full: bool | None = None) -> list[tuple[str, AotSpec]]:
    """(module name, spec) for every kernel module in this package: the CI subset, or
    every spec with full=True (default: SKIPDIT_FULL_AOT=1)."""
    if full is None:
        full = full_sweep_requested()
    import importlib
    import pkgutil

    import skipdit_fast.kernels as pkg

    out = []
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name in ("aot", "limits") or m.name.startswith("_"):  # not kernel modules
            continue
        mod = importlib.import_module(f"skipdit_fast.kernels.{m.name}")
        specs = getattr(mod, "AOT_SPECS", None)
        if specs is None:
            raise RuntimeError(f"kernels/{m.name}.py has no AOT_SPECS")
        out += [(m.name, s) for s in specs() if full or s.ci]
    return out


def _compile_one(job):
    module, idx, arch, full = job
    spec = [s for name, s in all_specs(full) if name == module][idx]
    try:
        r = compile_spec(spec, arch)
    except Exception as e:  # report, don't hide: the caller fails on "error"
        return {"module": module, "name": spec.name, "arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"}
    return {"module": module, "name": r["name"], "arch": r["arch"], "registers": r["registers"],
            "spill_stores": r["spill_stores"], "spill_loads": r["spill_loads"], "stack": r["stack"],
            "shared": r["shared"], "tensor_cores": tensor_core_kind(r["ptx"]),
            "cp_async_16": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10", r["ptx"])),
            "vector_loads": "ld.global.v4" in r["ptx"] or "cp.async.cg.shared.global" in r["ptx"],
            "constexprs": {k: v for k, v in spec.constexprs.items() if isinstance(v, (bool, int, float, str))},
            "num_warps": spec.num_warps, "num_stages": spec.num_stages}


def compile_all(archs=(80, 90), jobs: int = 2, full: bool | None = None) -> list[dict]:
    """Compiles every AOT spec for each of its archs among `archs` (in `jobs` processes)."""
    import multiprocessing as mp

    full = full_sweep_requested() if full is None else full
    specs = all_specs(full)
    counters: dict[str, int] = {}
    work = []
    for module, spec in specs:
        i = counters.get(module, 0)
        counters[module] = i + 1
        for arch in spec.archs:
            if arch in archs:
                work.append((module, i, arch, full))
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_one, work)


def main(argv=None) -> int:
    """python -m skipdit_fast.kernels.aot [--arch 80 --arch 90] [--jobs N] [--json PATH] [--full]"""
    import argparse
    import json

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("AOT compilation needs TRITON_INTERPRET unset (the interpreter replaces @triton.jit)")
    p = argparse.ArgumentParser(prog="python -m skipdit_fast.kernels.aot")
    p.add_argument("--arch", type=int, action="append")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--full", action="store_true", help="every spec, not only the CI subset")
    a = p.parse_args(argv)
    recs = compile_all(tuple(a.arch or (80, 90)), a.jobs, full=a.full or None)
    bad = 0
    for r in recs:
        if "error" in r:
            bad += 1
            print(f"{r['module']:12s} {r['name']:40s} {r['arch']:7s} ERROR {r['error']}")
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        bad += spill > 0
        print(f"{r['module']:12s} {r['name']:40s} {r['arch']:7s} regs {r['registers']:3d} "
              f"spill {spill:4d} B  smem {r['shared']:6d} B  tc {r['tensor_cores'] or '-'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
