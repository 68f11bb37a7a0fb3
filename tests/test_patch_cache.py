"""skipdit_fast.enable_skip_cache / disable_skip_cache: our DiT, diffusers
HunyuanDiT2DModel (its native long skips driven by the SkipCache engine) and a whole
tiny HunyuanDiTPipeline with classifier-free guidance, built locally."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch

import skipdit_fast
from skipdit_fast import SkipCache, disable_skip_cache, enable_skip_cache, patch
from skipdit_fast.cache import SkipCacheRunError
from skipdit_fast.sampling.diffusion import sample
from skipdit_fast.models import DiT, DiTConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TIMES = (900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0)


def test_our_dit_enable_equals_passing_the_cache():
    cfg = DiTConfig(depth=6, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10, skip=True)
    torch.manual_seed(0)
    a = DiT(cfg).eval()
    b = copy.deepcopy(a)
    for cfg_scale in (1.0, 4.0):
        explicit = SkipCache(interval=2, branch=2)
        want = sample(a, [1, 3], steps=7, cfg_scale=cfg_scale, cache=explicit, seed=0)
        cache = enable_skip_cache(b, interval=2, branch=2)
        got = sample(b, [1, 3], steps=7, cfg_scale=cfg_scale, seed=0)  # the sampler passes no cache
        assert torch.equal(got.latents, want.latents)
        assert cache.report().kinds == explicit.report().kinds and cache.report().cached_steps == 3
        again = sample(b, [1, 3], steps=7, cfg_scale=cfg_scale, seed=0)  # a new run: reset by the timestep
        assert torch.equal(again.latents, want.latents) and cache.report().steps == 7
        assert disable_skip_cache(b) is cache and disable_skip_cache(b) is None
    plain = sample(b, [1, 3], steps=7, seed=0)
    assert torch.equal(plain.latents, sample(a, [1, 3], steps=7, seed=0).latents)


def test_our_dit_without_skips_or_too_deep_a_branch():
    cfg = DiTConfig(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)
    with pytest.raises(ValueError, match="long skips"):
        enable_skip_cache(DiT(cfg))
    with pytest.raises(ValueError, match="at most 2"):
        enable_skip_cache(DiT(DiTConfig(**{**cfg.__dict__, "skip": True})), branch=3)
    with pytest.raises(ValueError, match="not a model whose block loop"):
        enable_skip_cache(torch.nn.Linear(2, 2))


import diffusers_models as M  # noqa: E402  (imports diffusers inside its functions)

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed (requirements-test.txt pins it)")


def hy(model, t, inputs):
    x, _, kw = inputs
    return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), **kw)[0]


@needs_diffusers
def test_hunyuan_cached_steps_run_2k_blocks_and_match_the_oracle():
    """Full steps are bitwise the native forward; a cached step runs blocks 0..K-1 and
    depth-K..depth-1 (2K) and equals the native forward with block depth-K's input
    replaced by the one of the last full step (a pre-hook on an unmodified copy)."""
    model = M.hunyuan(num_layers=10)  # 4 long skips: blocks 0..3 push, 6..9 pop
    ref = copy.deepcopy(model)
    inputs = M.hunyuan_inputs()
    K = 2
    ran: list[int] = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    kept = {}

    def oracle_hook(m, args):
        if kept.get("replace"):
            return (kept["h"],)
        kept["h"] = args[0]

    ref.blocks[10 - K].register_forward_pre_hook(oracle_hook)
    cache = enable_skip_cache(model, interval=2, branch=K)
    with torch.no_grad():
        for step, t in enumerate(TIMES):
            ran.clear()
            got = hy(model, t, inputs)
            cached = step % 2 == 1
            assert ran == ([0, 1, 8, 9] if cached else list(range(10))), (step, ran)
            kept["replace"] = cached
            want = hy(ref, t, inputs)
            assert torch.equal(got, want), step
    r = cache.report()
    assert (r.steps, r.full_steps, r.cached_steps, r.blocks_run, r.blocks_total) == (7, 4, 3, 52, 70)
    assert r.flops_total > r.flops_run > 0


@needs_diffusers
def test_hunyuan_cache_with_controlnet_samples():
    model = M.hunyuan(num_layers=10)
    inputs = M.hunyuan_inputs()
    x, t, kw = inputs
    g = torch.Generator().manual_seed(3)
    ctrl = [0.1 * torch.randn(2, 16, 32, generator=g) for _ in range(4)]
    with torch.no_grad():
        want = model(x, t, controlnet_block_samples=list(ctrl), **kw)[0]  # the model pops its list
        enable_skip_cache(model, interval=1, branch=4)  # every step full
        got = model(x, t, controlnet_block_samples=ctrl, **kw)[0]
        assert torch.equal(got, want) and len(ctrl) == 4
        with pytest.raises(ValueError, match="number of controls"):
            model(x, t - 100, controlnet_block_samples=ctrl[:3], **kw)


@needs_diffusers
def test_hunyuan_run_boundaries_and_disable():
    model = M.hunyuan(num_layers=10)
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        native = [hy(model, t, inputs) for t in TIMES[:2]]
        cache = enable_skip_cache(model, interval=2, branch=2)
        first = [hy(model, t, inputs) for t in TIMES[:3]]
        assert cache.report().kinds == ["full", "cached", "full"]
        second = [hy(model, t, inputs) for t in TIMES[:2]]  # t went up: a new run
        assert cache.report().kinds == ["full", "cached"]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert disable_skip_cache(model) is cache
        assert torch.equal(hy(model, TIMES[0], inputs), native[0])
        assert torch.equal(hy(model, TIMES[1], inputs), native[1])
        cache = enable_skip_cache(model, interval=2, branch=2, auto_reset=False)
        [hy(model, t, inputs) for t in TIMES[:3]]
        # the caller resets: a new run without reset() would reuse this run's features (refused)
        with pytest.raises(SkipCacheRunError, match="without cache.reset"):
            hy(model, TIMES[0], inputs)
        cache.reset()
        assert [hy(model, t, inputs) for t in TIMES[:2]] and cache.report().kinds == ["full", "cached"]


@needs_diffusers
def test_hunyuan_adaptive_mode():
    model = M.hunyuan(num_layers=10)
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        cache = enable_skip_cache(model, interval=3, branch=2, threshold=1e9)  # always similar enough
        [hy(model, t, inputs) for t in TIMES]
        assert cache.report().kinds == ["full", "cached", "cached"] * 2 + ["full"]
        cache = enable_skip_cache(model, interval=3, branch=2, threshold=0.0)  # never
        [hy(model, t, inputs) for t in TIMES]
        r = cache.report()
        assert r.kinds == ["full"] * 7 and r.checks == 6 and all(d > 0 for d in r.deltas)


@needs_diffusers
def test_hunyuan_enable_refusals():
    from diffusers.models.transformers.hunyuan_transformer_2d import HunyuanDiT2DModel

    with pytest.raises(ValueError, match="at most 2"):
        enable_skip_cache(M.hunyuan(num_layers=6), branch=3)
    with pytest.raises(ValueError, match="pushes 1 skips but 2 blocks merge"):
        enable_skip_cache(M.hunyuan(num_layers=5), branch=1)

    class Scaled(HunyuanDiT2DModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="differs from the HunyuanDiT2DModel.forward"):
        enable_skip_cache(Scaled(num_layers=6, **M.HY), branch=2)
    with pytest.raises(ValueError, match="not a diffusers model"):
        enable_skip_cache(M.dit())


@needs_diffusers
def test_hunyuan_patched_and_cached():
    model = M.hunyuan(num_layers=10)
    ref = copy.deepcopy(model)
    inputs = M.hunyuan_inputs()
    report = patch(model)
    assert report.counts() == {"attention": 20, "skip merge": 4}
    enable_skip_cache(model, interval=3, branch=3)
    enable_skip_cache(ref, interval=3, branch=3)
    with torch.no_grad():
        for t in TIMES:
            got, want = hy(model, t, inputs), hy(ref, t, inputs)
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@needs_diffusers
def test_pipeline_with_cfg():
    """A whole HunyuanDiTPipeline (tiny, random, offline) with classifier-free guidance:
    one transformer forward per step holds both halves; the cached run stays close to
    the uncached one; runs restart at set_timesteps; disable gives the uncached output back."""
    pytest.importorskip("transformers", reason="the pipeline's text encoders need transformers (requirements-test.txt)")
    pipe = M.hunyuan_pipeline(num_layers=10)
    batches = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    ref = M.run_pipeline(pipe, steps=20)
    assert set(batches) == {2}  # cond and uncond in one forward
    cache = enable_skip_cache(pipe, interval=2, branch=2)
    got = M.run_pipeline(pipe, steps=20)
    r = cache.report()
    assert (r.full_steps, r.cached_steps, r.blocks_run, r.blocks_total) == (10, 10, 140, 200)
    quality = M.psnr(got, ref)
    print(f"\nHunyuanDiTPipeline tiny, 20 DDPM steps, CFG 5, Skip-Cache N=2 K=2: PSNR {quality:.1f} dB vs uncached")
    assert 25 < quality < float("inf")
    assert (M.run_pipeline(pipe, steps=20) == got).all()  # a second run: same cache schedule, same image
    patch(pipe)
    fast = M.run_pipeline(pipe, steps=20)
    assert abs(fast - got).max() <= 1e-4 and cache.report().cached_steps == 10
    skipdit_fast.unpatch(pipe)
    assert disable_skip_cache(pipe) is cache
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert (M.run_pipeline(pipe, steps=20) == ref).all()


def cache_bf16_check(device):
    """Patch + Skip-Cache in bf16: cached steps run 2K blocks; every step stays within
    bf16 rounding (5%) of the unpatched fp32 model under the same Skip-Cache."""
    base = M.hunyuan(num_layers=10)
    ref = copy.deepcopy(base).to(device)
    model = base.bfloat16().to(device)
    inputs = M.hunyuan_inputs(dtype=torch.bfloat16, device=device)
    inputs32 = M.hunyuan_inputs(device=device)
    ran = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    patch(model)
    cache = enable_skip_cache(model, interval=2, branch=2)
    enable_skip_cache(ref, interval=2, branch=2)
    with torch.no_grad():
        for step, t in enumerate(TIMES):
            ran.clear()
            out = hy(model, t, inputs).float()
            want = hy(ref, t, inputs32)
            assert len(ran) == (4 if step % 2 else 10) and torch.isfinite(out).all()
            assert ((out - want).abs().max() / want.abs().max()).item() < 0.05, step
    assert cache.report().cached_steps == 3


@needs_diffusers
def test_hunyuan_cache_bf16_cpu():
    cache_bf16_check("cpu")


@needs_diffusers
@pytest.mark.gpu
def test_hunyuan_cache_bf16_gpu():
    cache_bf16_check("cuda")
