"""Build of skipdit_fast: setuptools drives CMake (CMakeLists.txt is the one build).

    pip install --no-build-isolation .        # or -e . for development

Environment:
    SKIPDIT_FAST_CUDA=auto|0|1   build the CUDA kernels (auto: when nvcc is found and
                                 torch is a CUDA build; 1: fail if they cannot be built)
    TORCH_CUDA_ARCH_LIST         e.g. "8.0;9.0a" (default: sm_80 and sm_90a)
    MAX_JOBS                     parallel compile jobs (default: from cores and memory)
    CUDA_HOME / CUDACXX          where the CUDA toolkit / nvcc is

The CMake build folder is build/cmake-<cpu|cuda>-<key>, keyed by this interpreter and
the torch it builds against, so that two environments never share a CMake cache (a
shared one would link, and put in the library's RPATH, the other environment's torch).
The automatic CUDA build refuses an nvcc whose major version differs from the CUDA
major version torch was built with (both libcudart would load; kernels compiled for one
runtime then run under the other).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_mode() -> str:
    v = os.environ.get("SKIPDIT_FAST_CUDA", "auto").strip().lower()
    table = {"auto": "AUTO", "": "AUTO", "1": "ON", "on": "ON", "true": "ON",
             "0": "OFF", "off": "OFF", "false": "OFF"}
    if v not in table:
        raise SystemExit(f"SKIPDIT_FAST_CUDA must be auto, 0 or 1, got {v!r}")
    return table[v]


def find_nvcc() -> str | None:
    """The real nvcc: an nvcc on PATH may be a wrapper script, so the toolkit root is
    read from `nvcc --dryrun` (its TOP= line), not guessed from the path."""
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for nvcc in candidates:
        if not os.path.exists(nvcc):
            continue
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"^#\$ TOP=(.*)$", out.stderr + out.stdout, re.M)
        if m:
            real = os.path.normpath(os.path.join(m.group(1).strip(), "bin", "nvcc"))
            if os.path.exists(real):
                return real
        return os.path.realpath(nvcc)
    return None


def nvcc_version(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def cuda_mismatch(nvcc_ver: str | None, torch_cuda: str | None) -> str | None:
    """Why nvcc cannot build kernels for this torch (different CUDA major versions), else None."""
    if not nvcc_ver or not torch_cuda:
        return None
    if nvcc_ver.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {nvcc_ver} but torch was built with CUDA {torch_cuda}: the major versions "
                "differ (point CUDA_HOME / CUDACXX at a CUDA "
                f"{torch_cuda.split('.')[0]} toolkit, or install the torch build for CUDA {nvcc_ver.split('.')[0]})")
    return None


def build_key(torch_module) -> str:
    """This interpreter + the torch it builds against, as a folder name: one CMake
    build folder (and cache) per environment."""
    torch_dir = os.path.dirname(os.path.realpath(torch_module.__file__))
    ident = "\n".join([os.path.realpath(sys.executable), sys.prefix, torch_dir, torch_module.__version__])
    tv = re.sub(r"[^0-9A-Za-z.]+", "_", torch_module.__version__)
    return f"py{sys.version_info[0]}{sys.version_info[1]}-torch{tv}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def default_jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    # A CUDA translation unit can take ~3 GB in cicc/ptxas.
    return max(1, min(cores, int(mem_gb // 3)))


def _tool(name: str) -> str:
    """A build tool from this Python's environment (the cmake / ninja wheels), else PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    REPORT = "_C.ptxas.txt"  # ptxas resource report, shipped next to the library

    def _report_pairs(self):
        """(built report, in-place report) per extension."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            yield (os.path.join(os.path.dirname(regular_file), self.REPORT),
                   os.path.join(os.path.dirname(inplace_file), self.REPORT))

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            for built, inplace in self._report_pairs():
                if os.path.exists(built):
                    mapping[built] = inplace
        return mapping

    def get_outputs(self):
        outs = super().get_outputs()
        if not self.inplace:
            outs += [b for b, _ in self._report_pairs() if os.path.exists(b) and b not in outs]
        return outs

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for built, inplace in self._report_pairs():
            if os.path.exists(built):
                self.copy_file(built, inplace, level=self.verbose)
            elif os.path.exists(inplace):
                os.unlink(inplace)

    def get_ext_filename(self, ext_name):
        # A plain shared library loaded with torch.ops.load_library, not a Python
        # extension module: no ABI tag in its name.
        return os.path.join(*ext_name.split(".")) + ".so"

    def build_extension(self, ext):
        import torch  # the torch we build against (no build isolation)

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = _cuda_mode()
        nvcc = find_nvcc() if mode != "OFF" else None
        if mode == "ON" and (nvcc is None or torch.version.cuda is None):
            raise SystemExit(f"SKIPDIT_FAST_CUDA=1 but nvcc={nvcc}, torch CUDA={torch.version.cuda}")
        mismatch = cuda_mismatch(nvcc_version(nvcc), torch.version.cuda) if nvcc else None
        if mismatch and mode == "ON":
            raise SystemExit(f"SKIPDIT_FAST_CUDA=1: {mismatch}")
        use_cuda = nvcc is not None and torch.version.cuda is not None and mismatch is None
        tag = "cuda" if use_cuda else "cpu"
        build_dir = ROOT / "build" / f"cmake-{tag}-{build_key(torch)}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DTORCH_ROOT={os.path.dirname(torch.__file__)}",
            f"-DSKIPDIT_FAST_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
        ]
        ninja = _tool("ninja")
        args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if not use_cuda and mode == "AUTO":
            why = "no nvcc found" if nvcc is None else mismatch or "torch is a CPU build"
            print(f"skipdit_fast: building the CPU library only ({why})", flush=True)
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", str(default_jobs())], check=True)
        lib = build_dir / "lib" / "_C.so"
        shutil.copyfile(lib, out_path)
        report = build_dir / "lib" / "_C.ptxas.txt"
        dest_report = out_dir / "_C.ptxas.txt"
        if report.exists():
            shutil.copyfile(report, dest_report)
        elif dest_report.exists():
            dest_report.unlink()


setup(
    ext_modules=[CMakeExtension("skipdit_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
