"""The native build: CUDA cubins for the default archs, ptxas report with 0 spills,
build metadata, and a standalone CMake build that torch.ops.load_library loads."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from skipdit_fast.ops import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc_present():
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.exists(os.path.join(h, "bin", "nvcc"))
                                                  for h in homes)


needs_cuda_build = pytest.mark.skipif(
    not native.build_info().get("cuda"),
    reason="library built without CUDA (no nvcc or CPU torch)")


def test_library_loaded_and_matches_torch():
    assert native.available(), native.load_error()
    info = native.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["openmp"] is True


def test_cuda_compiled_when_toolkit_present():
    """CI machines have nvcc: there the CUDA code must be compiled and linked."""
    if torch.version.cuda is None or not _nvcc_present():
        pytest.skip("no CUDA toolkit or CPU build of torch")
    if os.environ.get("SKIPDIT_FAST_CUDA", "auto").lower() in ("0", "off", "false"):
        pytest.skip("SKIPDIT_FAST_CUDA=0")
    assert native.build_info().get("cuda"), "nvcc is present but the library was built without CUDA"


def _cuobjdump():
    import triton.backends.nvidia as nv

    p = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


@needs_cuda_build
def test_cubins_for_each_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    out = subprocess.run([tool, "--list-elf", native.LIBRARY_PATH], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    archs = set(re.findall(r"\.(sm_\w+)\.cubin", out.stdout))
    want = {f"sm_{a.split('-')[0]}" for a in native.build_info()["cuda_archs"].split(",") if a.endswith("real")}
    assert want and want <= archs, f"cubins for {sorted(archs)}, expected {sorted(want)}"


@needs_cuda_build
def test_ptxas_report_no_spills():
    recs = native.ptxas_report()
    assert recs, "no ptxas report shipped next to the library"
    archs = {r["arch"] for r in recs}
    want = {f"sm_{a.split('-')[0]}" for a in native.build_info()["cuda_archs"].split(",") if a.endswith("real")}
    assert want <= archs
    for r in recs:
        assert r["registers"] is not None, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"spills in {r['kernel']} ({r['arch']})"
    # every kernel is compiled for every arch
    by_kernel = {}
    for r in recs:
        by_kernel.setdefault(r["kernel"], set()).add(r["arch"])
    for k, a in by_kernel.items():
        assert want <= a, f"{k} compiled only for {sorted(a)}"


def test_parse_ptxas():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers"""
    (r,) = native.parse_ptxas(text)
    assert r == {"kernel": "_Z3fooPf", "arch": "sm_90a", "registers": 255, "spill_stores": 4,
                 "spill_loads": 4, "stack": 8}


@pytest.mark.slow
def test_standalone_cmake_build(tmp_path):
    """`cmake -S . -B build -G Ninja` with torch's cmake prefix path builds a library
    that torch.ops.load_library loads (CPU part, to keep CI time)."""
    bindir = os.path.dirname(sys.executable)
    cmake = os.path.join(bindir, "cmake") if os.path.exists(os.path.join(bindir, "cmake")) else shutil.which("cmake")
    ninja = os.path.join(bindir, "ninja") if os.path.exists(os.path.join(bindir, "ninja")) else shutil.which("ninja")
    if not cmake or not ninja:
        pytest.skip("cmake/ninja not installed")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", ROOT, "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DSKIPDIT_FAST_CUDA=OFF"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build), "-j", "2"], check=True, capture_output=True)
    lib = build / "_C.so"
    assert lib.exists()
    code = (f"import torch; torch.ops.load_library({str(lib)!r}); "
            "x = torch.randn(3, 8); print(torch.ops.skipdit.cache_delta(x, x + 1).item() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
