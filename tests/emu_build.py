"""Builds the CPU emulator harnesses of the CUDA kernels (tests/emu/<name>.cpp) into
shared libraries for ctypes, once per version of their sources.

A harness compiles the kernel headers of csrc/cuda unchanged against the emulator's
PTX semantics (tests/emu/ptx_emu.h) and CTA model (tests/emu/cta.h) with g++; no CUDA
toolkit is needed. The library lands in build/emu/<name>-<hash>.so, the hash covering
the harness, every header under csrc/ and tests/emu/, the compiler and its flags, so an
edit to any of them rebuilds it and an unchanged tree reuses it.

SKIPDIT_EMU_LIB_<NAME> (e.g. SKIPDIT_EMU_LIB_ATTENTION_KERNELS) runs the tests on
another build of a harness, e.g. one compiled against a deliberately broken copy of a
kernel, to see the tests fail.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "emu"
FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off",
         "-fno-strict-aliasing", "-Wl,--no-undefined"]


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the kernel emulator")
    return cxx


def _inputs(name: str) -> list[Path]:
    headers = sorted(p for d in (ROOT / "csrc", EMU_DIR) for p in d.rglob("*")
                     if p.suffix in (".h", ".cuh"))
    return [EMU_DIR / f"{name}.cpp", *headers]


def build(name: str) -> Path:
    """build/emu/<name>-<hash>.so for tests/emu/<name>.cpp (compiled when missing)."""
    cxx = _compiler()
    h = hashlib.sha256()
    for p in _inputs(name):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    h.update(" ".join([cxx, *FLAGS]).encode())
    out_dir = ROOT / "build" / "emu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{name}-{h.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, *FLAGS, "-I", str(ROOT / "csrc"), "-I", str(EMU_DIR),
                        str(EMU_DIR / f"{name}.cpp"), "-o", str(tmp)], check=True)
        tmp.replace(lib)
    return lib


def load(name: str) -> ctypes.CDLL:
    """The harness library (SKIPDIT_EMU_LIB_<NAME> overrides the path)."""
    override = os.environ.get(f"SKIPDIT_EMU_LIB_{name.upper()}")
    return ctypes.CDLL(str(Path(override) if override else build(name)))


def run_checks(fn, *args) -> tuple[int, str]:
    """Calls a harness check `int fn(..., char* log, int log_len)`; returns (failures, log)."""
    log = ctypes.create_string_buffer(1 << 16)
    fails = fn(*args, log, len(log))
    return fails, log.value.decode()
