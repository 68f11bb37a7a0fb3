"""Ahead-of-time compilation of the Triton kernels, no GPU needed.

Each kernel module lists AOT_SPECS: the real launch configurations (signature,
constexprs, num_warps, num_stages). compile_spec() compiles one for a target arch
(sm_80, sm_90) to PTX and cubin with triton.compile, then runs the ptxas bundled with
Triton on the PTX with -v to read registers and spill bytes.
"""

from __future__ import annotations

import os
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


def ptxas_path() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def compile_spec(spec: AotSpec, arch: int) -> dict:
    """Compiles spec for sm_<arch>; returns {name, arch, ptx, cubin, registers,
    spill_stores, spill_loads, stack, asm_has(instr) helper data}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from skipdit_fast._lib import parse_ptxas

    sig = dict(spec.signature)
    for k in spec.constexprs:
        sig[k] = "constexpr"
    # every parameter of the kernel must be typed
    missing = [a for a in spec.fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"{spec.name}: signature lacks {missing}")
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs))
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
