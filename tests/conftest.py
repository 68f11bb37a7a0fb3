"""Test configuration. Without a CUDA device, Triton kernels run in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import skipdit_fast  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    with skipdit_fast.use_backend("auto"):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
