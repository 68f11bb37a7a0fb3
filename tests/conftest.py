"""Test configuration. Without a CUDA device, Triton kernels run in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# `auto`'s decisions (skipdit_fast.ops.autotune) go to a cache file: the suite writes its
# own, never the user's ~/.cache/skipdit_fast (subprocesses inherit it).
if "SKIPDIT_FAST_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SKIPDIT_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="skipdit-autotune-tests-")
# The interpreter runs tl.dot through numpy: a multithreaded BLAS on a small shared
# machine makes those tiny matmuls many times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

import skipdit_fast  # noqa: E402,F401
from skipdit_fast.ops.testing import skip_gpu_tests_without_cuda  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    with skipdit_fast.use_backend("auto"):
        yield


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models: one intra-op thread is faster than two contending ones, and steadier
    on a loaded 2-core CI machine. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def aot_results(tmp_path_factory):
    """Every Triton AOT_SPECS entry compiled for sm_80 and sm_90 (once per session,
    in a subprocess without TRITON_INTERPRET, which replaces @triton.jit):
    {(module, spec name, arch): record} with registers, spills, tensor-core use."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "skipdit_fast.kernels.aot", "--json", str(out), "--jobs", "2"],
                       env=env, capture_output=True, text=True, timeout=1500)
    if not out.exists():
        pytest.fail(f"AOT compilation did not run:\n{r.stdout}\n{r.stderr}")
    return {(x["module"], x["name"], x["arch"]): x for x in json.loads(out.read_text())}


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests_without_cuda(items)
