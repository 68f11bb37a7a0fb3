"""What the Triton kernels serve, beside them and without importing triton: each
kernel module checks its launches with these functions, and the dispatch layer
(skipdit_fast.ops.backends) asks them before it picks the `triton` backend.

Each function returns None when the kernels serve the inputs, else the reason.
"""

from __future__ import annotations

import torch

SKIP_FUSE_MIN_D, SKIP_FUSE_MAX_D = 64, 4096
# The oldest triton the kernels run on: 3.6, the GPU test machine's (tools/gpu_check.sh).
# `make compat` COMPAT_ENVS=gpu compiles every AOT spec with triton 3.6 for sm_80 and sm_90
# (0 spills), but 3.6's interpreter cannot run them (it passes runtime ints and program
# ids as 1-element arrays, which Python's range() in the kernels' loops refuses): CPU
# tensors through the interpreter (TRITON_INTERPRET=1) need 3.8, what CI tests. Triton
# 3.2, which torch 2.6 brings, fails them (tl.dot needs M, N, K >= 16). With an older
# triton the triton backend is unavailable, with the reason.
MIN_TRITON = (3, 6)
MIN_TRITON_INTERPRETER = (3, 8)
_INTERPRETER_BF16 = ("Triton's interpreter computes bf16 tl.dot wrongly (DESIGN.md 5.4; "
                     "CPU tensors run interpreted)")


def skip_fuse(device_type: str, dtype: torch.dtype, D: int, D_out: int) -> str | None:
    """The row-statistics pre-pass and the GEMM tile D in 8-element (16-byte) steps."""
    if device_type == "cpu" and dtype == torch.bfloat16:
        return _INTERPRETER_BF16
    if D % 8 != 0 or not (SKIP_FUSE_MIN_D <= D <= SKIP_FUSE_MAX_D):
        return f"triton skip_fuse needs D a multiple of 8 in [{SKIP_FUSE_MIN_D}, {SKIP_FUSE_MAX_D}], got D = {D}"
    if D_out % 8 != 0:
        return f"triton skip_fuse needs D_out a multiple of 8, got D_out = {D_out}"
    return None


def attention(device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Every head dim the op accepts (multiples of 8 up to 256) is served. On the GPU
    fp32 (IEEE) tl.dot lowers to FMA loops that spill registers at every tile size
    (ptxas: 300-20000 bytes), so fp32 is served elsewhere."""
    if device_type == "cpu" and dtype == torch.bfloat16:
        return _INTERPRETER_BF16
    if device_type == "cuda" and dtype == torch.float32:
        return "fp32 attention in Triton runs IEEE fp32 dots on FMA units and spills registers; use fp16/bf16"
    return None


def cache_delta(device_type: str, dtype: torch.dtype) -> str | None:
    """A reduction without tl.dot: every dtype the op accepts."""
    return None
