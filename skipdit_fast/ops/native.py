"""Loads the native library skipdit_fast/_C.so and says why when it cannot.

The library registers the torch.ops.skipdit.* schemas and the C++ CPU (and CUDA)
kernels. It is a plain libtorch shared library, loaded with torch.ops.load_library.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # skipdit_fast/
LIBRARY_PATH = os.path.join(_PACKAGE, "_C.so")
PTXAS_REPORT_PATH = os.path.join(_PACKAGE, "_C.ptxas.txt")

# The row-chunk buffers of the C++ CPU skip_fuse kernel (csrc/cpu/skip_fuse.cpp:
# kFwdChunkBytes, kBwdChunkBytes): its temporaries stay within them at every M. Stated
# here once, for the tests and the benchmark, until build_info() exports them under
# "constants".
CPU_SKIP_FUSE_CHUNK_BYTES = 16 << 20
CPU_SKIP_FUSE_BWD_CHUNK_BYTES = 24 << 20

_load_error: str | None = None
_loaded = False


def _load() -> None:
    global _load_error, _loaded
    if _loaded or _load_error is not None:
        return
    if hasattr(torch.ops, "skipdit") and hasattr(torch.ops.skipdit, "build_info"):
        _loaded = True  # loaded by someone else (e.g. torch.ops.load_library by hand)
        return
    if not os.path.exists(LIBRARY_PATH):
        _load_error = (
            f"{LIBRARY_PATH} does not exist: the native library was not built. Install with "
            "`pip install --no-build-isolation .` (or `make build` in a checkout)."
        )
        return
    try:
        torch.ops.load_library(LIBRARY_PATH)
    except (OSError, RuntimeError) as e:  # undefined symbols, wrong torch, ...
        _load_error = f"loading {LIBRARY_PATH} failed: {e}"
        info = _read_build_info_from_file()
        if info and info.get("torch") and info["torch"] != torch.__version__:
            _load_error += (
                f" (it was built against torch {info['torch']}, this is torch "
                f"{torch.__version__}: rebuild it)"
            )
        return
    _loaded = True
    info = build_info()
    if info.get("torch") and info["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        _load_error = (
            f"{LIBRARY_PATH} was built against torch {info['torch']} but this is torch "
            f"{torch.__version__}: rebuild it (`pip install --no-build-isolation .`)."
        )
        _loaded = False


def _read_build_info_from_file() -> dict | None:
    try:
        with open(LIBRARY_PATH, "rb") as f:
            data = f.read()
    except OSError:
        return None
    i = data.find(b'{"torch": "')
    if i < 0:
        return None
    j = data.find(b"}", i)
    try:
        return json.loads(data[i : j + 1].decode())
    except (ValueError, UnicodeDecodeError):
        return None


def available() -> bool:
    _load()
    return _loaded


def load_error() -> str | None:
    _load()
    return _load_error


@lru_cache(maxsize=None)
def build_info() -> dict:
    """What the library was built against and for: torch, CUDA, archs, compiler."""
    if not _loaded:
        return {}
    return json.loads(torch.ops.skipdit.build_info())


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the library registered a kernel for skipdit::<op> under dispatch_key."""
    if not available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"skipdit::{op}", dispatch_key)


def ptxas_report() -> list[dict]:
    """Per-kernel resource usage from ptxas (registers, spills), as built."""
    if not os.path.exists(PTXAS_REPORT_PATH):
        return []
    with open(PTXAS_REPORT_PATH) as f:
        return parse_ptxas(f.read())


def parse_ptxas(text: str) -> list[dict]:
    """Parses `ptxas -v` output into one record per (kernel, arch)."""
    import re

    out: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None,
                   "spill_stores": None, "spill_loads": None, "stack": None}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


# ---------------------------------------------------------------------------------------
# what the CUDA kernels of the library serve (csrc/cuda; checked before `cuda` is picked)

# csrc/cuda/skip_fuse.cu: rows move in 16-byte chunks (x / skip and weight rows), the
# epilogue stores column pairs, the backward keeps 2*D fp32 column sums per CTA in shared
# memory, and the forward GEMM needs sm_80+ (cp.async, bf16 mma.sync) and 108 KiB of
# shared memory per block (3 stages of 2 x 128 x 144-byte tiles).
_SKIP_FUSE_CUDA_SMEM = 3 * 2 * 128 * 144


def cuda_limits(op: str, device: torch.device, dtype: torch.dtype, features: tuple) -> str | None:
    """None when the library's CUDA kernel of `op` serves these inputs, else why not."""
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 0):
            return f"the CUDA kernels need compute capability >= 8.0, device has {cc[0]}.{cc[1]}"
    if op == "skip_fuse":
        D, D_out = features[:2]
        if D % 8 != 0 or D > 8192:
            return f"D={D}: the CUDA kernel needs D to be a multiple of 8 and at most 8192"
        if D_out % 8 != 0:
            return f"D_out={D_out}: the CUDA kernel needs D_out to be a multiple of 8"
        if device.type == "cuda":
            optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
            if optin is not None and optin < _SKIP_FUSE_CUDA_SMEM:
                return (f"the CUDA kernel needs {_SKIP_FUSE_CUDA_SMEM} bytes of shared memory per block, "
                        f"the device allows {optin}")
    elif op == "attention":
        # mma.sync / cp.async kernels for fp16 and bf16; every head dim the op accepts
        # (multiples of 8 up to 256) is served.
        if dtype not in (torch.float16, torch.bfloat16):
            return f"the CUDA attention kernel runs float16 and bfloat16 only, got {dtype}"
    return None
