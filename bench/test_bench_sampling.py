"""End-to-end sampling benchmark (pytest-benchmark): Skip-DiT with and without
Skip-Cache, with our kernels (backend auto) and with the eager reference ops, through
skipdit_fast.sampling.diffusion.sample.

On a GPU: DiT-XL/2-skip, 256 px, batch 8 + CFG, bf16 (the DESIGN.md section 6 target
row); on the CPU: DiT-S/4-skip at 128 px (16 tokens per image), batch 2 + CFG, fp32."""

from __future__ import annotations

import pytest
import torch

from skipdit_fast.ops import backends
from skipdit_fast.benchmark import sampling_configs, sampling_model
from skipdit_fast.models import DiT
from skipdit_fast.sampling.diffusion import sample

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
MODEL, IMAGE_SIZE = sampling_model(DEVICE)
STEPS = 50 if DEVICE.type == "cuda" else 6
BATCH = 8 if DEVICE.type == "cuda" else 2


@pytest.fixture(scope="module")
def api():
    model = DiT.from_name(MODEL, image_size=IMAGE_SIZE).to(device=DEVICE, dtype=DTYPE).eval()
    return model, sample


@pytest.mark.parametrize("kernels,backend,cache", [
    pytest.param(k, b, c, id=f"{k}-{'nocache' if c is None else 'N%d-K%d' % (c['interval'], c['branch'])}")
    for k, b, c in sampling_configs()])
def test_sampling(benchmark, api, kernels, backend, cache):
    model, sample = api
    labels = list(range(BATCH))
    benchmark.extra_info.update(model=MODEL, image_size=IMAGE_SIZE, steps=STEPS, batch=f"{BATCH} x 2 (CFG)", dtype=str(DTYPE),
                                kernels=kernels, cache=cache)
    with backends.use_backend(backend):
        sample(model, labels, steps=STEPS, cfg_scale=4.0, cache=cache, seed=0)  # warm-up
        res = benchmark.pedantic(lambda: sample(model, labels, steps=STEPS, cfg_scale=4.0, cache=cache, seed=0),
                                 rounds=3, iterations=1)
    if cache is not None and getattr(res, "report", None) is not None:
        rep = res.report
        benchmark.extra_info.update(full_steps=rep.full_steps, cached_steps=rep.cached_steps,
                                    blocks_run=rep.blocks_run, blocks_total=rep.blocks_total)
        assert rep.cached_steps > 0
