"""pytest-benchmark microbenchmarks (not part of the default `pytest` run, whose
testpaths is tests/): `pytest bench` or `make bench`. They time real kernels only:
no Triton interpreter here (a Triton backend on CPU tensors is skipped)."""

import pytest
import torch

import skipdit_fast  # noqa: F401
from skipdit_fast.ops.testing import skip_gpu_tests_without_cuda


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    with skipdit_fast.use_backend("auto"):
        yield


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests_without_cuda(items)
