"""The kernels' constants and limits as the native library exports them:
build_info()["constants"] and torch.ops.skipdit.cuda_limits (csrc/ops.cpp), which states
the CUDA kernels' limits once, next to them (csrc/cuda/<op>.cu), for Python to ask."""

from __future__ import annotations

import pytest
import torch

from skipdit_fast.ops import native

ops = torch.ops.skipdit
CONSTANTS = ("skip_fuse_cpu_fwd_chunk_bytes", "skip_fuse_cpu_bwd_chunk_bytes", "skip_fuse_cuda_smem_bytes",
             "skip_fuse_cuda_ln_bwd_smem_bytes_per_d", "skip_fuse_cuda_h_chunk_bytes", "skip_fuse_cuda_max_d",
             "skip_fuse_cuda_d_multiple", "row_indexer_max_dims")
H100 = dict(cc_major=9, cc_minor=0, smem_optin=232448)

with_cuda = pytest.mark.skipif(not native.build_info().get("cuda"), reason="native library built without CUDA")


def constants() -> dict:
    return native.build_info()["constants"]


def test_build_info_constants():
    c = constants()
    assert set(CONSTANTS) <= set(c), sorted(c)
    assert all(isinstance(c[k], int) and c[k] > 0 for k in CONSTANTS)
    assert c["skip_fuse_cpu_fwd_chunk_bytes"] < c["skip_fuse_cpu_bwd_chunk_bytes"]
    assert c["skip_fuse_cuda_smem_bytes"] > 48 * 1024  # the forward GEMM opts in
    assert c["row_indexer_max_dims"] == 16  # the limit tests/test_native_row_views.py checks


@pytest.mark.skipif(bool(native.build_info().get("cuda")), reason="library built with CUDA")
@pytest.mark.parametrize("op, features", [("skip_fuse", [64, 64]), ("attention", [72]), ("cache_delta", [])])
def test_without_cuda(op, features):
    assert ops.cuda_limits(op, features, **H100) == "native library built without CUDA"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op 'layer_norm'; the ops are skip_fuse, attention and cache_delta"):
        ops.cuda_limits("layer_norm", [8])


@with_cuda
@pytest.mark.parametrize("op, features", [("skip_fuse", [64]), ("attention", [72, 8]), ("cache_delta", [1])])
def test_wrong_number_of_features(op, features):
    with pytest.raises(ValueError, match=f"skipdit::cuda_limits: {op} takes"):
        ops.cuda_limits(op, features)


def _archs():
    return native.build_info()["cuda_archs"]


@with_cuda
@pytest.mark.parametrize("features, kw, want", [
    ([1152, 1152], dict(dtype=torch.bfloat16, **H100), ""),
    ([72, 136], dict(dtype=torch.float32, **H100), ""),
    ([8, 8], {}, ""),
    ([100, 64], {}, "D=100: the CUDA kernel needs D to be a multiple of 8 and at most 8192"),
    ([8200, 64], {}, "D=8200: the CUDA kernel needs D to be a multiple of 8 and at most 8192"),
    ([64, 100], {}, "D_out=100: the CUDA kernel needs D_out to be a multiple of 8"),
    ([64, 64], dict(dtype=torch.float64), "the CUDA kernel supports float16, bfloat16 and float32, got torch.float64"),
    ([64, 64], dict(cc_major=7, cc_minor=5, smem_optin=65536),
     "the CUDA kernel needs compute capability >= 8.0, device has 7.5"),
])
def test_skip_fuse(features, kw, want):
    assert ops.cuda_limits("skip_fuse", features, **kw) == want


@with_cuda
def test_skip_fuse_shared_memory():
    smem = constants()["skip_fuse_cuda_smem_bytes"]
    per_d = constants()["skip_fuse_cuda_ln_bwd_smem_bytes_per_d"]
    assert ops.cuda_limits("skip_fuse", [64, 64], 8, 0, smem) == ""
    assert ops.cuda_limits("skip_fuse", [64, 64], 8, 0, smem - 1) == (
        f"the CUDA kernel needs {smem} bytes of shared memory per block, the device allows {smem - 1}")
    # the LayerNorm backward of D = 8192 needs more than the forward (sm_86: 99 KiB)
    assert ops.cuda_limits("skip_fuse", [8192, 64], 8, 6, 101376) == (
        f"the CUDA kernel needs {8192 * per_d} bytes of shared memory per block, the device allows 101376")


@with_cuda
def test_architectures_of_the_build():
    archs = _archs().split(",")
    if "80-real" in archs:  # an sm_80 cubin runs on every 8.x device
        assert ops.cuda_limits("cache_delta", [], 8, 6, 101376) == ""
    if "90a-real" in archs:
        assert ops.cuda_limits("cache_delta", [], 9, 0, 232448) == ""
    # no PTX in the default build: a newer major version has no kernels
    assert ops.cuda_limits("cache_delta", [], 12, 0, 101376) == (
        f"the library has no CUDA kernels for compute capability 12.0 (built for {_archs()})")


@with_cuda
@pytest.mark.parametrize("features, kw, want", [
    ([72], dict(dtype=torch.bfloat16, **H100), ""),
    ([256], dict(dtype=torch.float16, **H100), ""),
    ([72], dict(dtype=torch.float32), "the CUDA attention kernel runs float16 and bfloat16 only, got torch.float32"),
    ([60], {}, "head dim must be a multiple of 8 up to 256, got 60"),
    ([264], {}, "head dim must be a multiple of 8 up to 256, got 264"),
    ([72], dict(cc_major=7, cc_minor=0, smem_optin=98304),
     "the CUDA attention kernel needs compute capability >= 8.0, device has 7.0"),
])
def test_attention(features, kw, want):
    assert ops.cuda_limits("attention", features, **kw) == want


@with_cuda
def test_attention_shared_memory():
    why = ops.cuda_limits("attention", [256], 8, 0, 49152)
    assert why.startswith("the CUDA attention kernel needs ") and why.endswith(
        " bytes of shared memory per block for head dim 256, the device allows 49152"), why
    need = int(why.split()[5])
    assert ops.cuda_limits("attention", [256], 8, 0, need) == ""


@with_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cache_delta(dtype):
    assert ops.cuda_limits("cache_delta", [], dtype=dtype, **H100) == ""
