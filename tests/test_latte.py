"""Latte / Latte-skip: golden outputs of the official class-to-video code (uncached,
CFG, Latte_skip_cache runs), an independent transcription of the official forward and
cache loop at depths other than 28, attention on strided qkv views, names, loading,
Skip-Cache for video (thresholds, CFG, adaptive, report), sampling videos, FORA and
the split on Latte, patch() and enable_skip_cache() on our Latte."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from skipdit_fast import SkipCache, enable_skip_cache, disable_skip_cache, patch, unpatch
from skipdit_fast.cache import CACHED, FULL
from skipdit_fast.cache.baselines import CachedModel, ForaCache
from skipdit_fast.models import (CheckpointError, Latte, LatteConfig, from_config, from_name, latte_names,
                                 load_checkpoint, model_names, save_safetensors)
from skipdit_fast.models import layers
from skipdit_fast.sampling.diffusion import sample

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

DATA = Path(__file__).parent / "data" / "official_latte_small.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA, weights_only=True)


def golden_config(g, extras: int, skip: bool) -> LatteConfig:
    c = g["config"]
    return LatteConfig(depth=c["depth"], hidden_size=c["hidden_size"], num_heads=c["num_heads"],
                       patch_size=c["patch_size"], input_size=c["input_size"], in_channels=c["in_channels"],
                       num_frames=c["num_frames"], extras=extras, num_classes=c["num_classes"],
                       learn_sigma=c["learn_sigma"], mlp_ratio=c["mlp_ratio"], skip=skip)


def golden_model(g, extras: int, skip: bool) -> Latte:
    m = Latte(golden_config(g, extras, skip)).eval()
    m.load_state_dict_strict(g[f"e{extras}_{'skip' if skip else 'latte'}_state_dict"])
    return m


# ---- an independent transcription of the official forward (class-to-video/models/latte.py) ----------

def _official_t_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _lin(sd, k, x):
    return F.linear(x, sd[f"{k}.weight"], sd[f"{k}.bias"])


def _block(sd, i, x, c, heads):
    p = f"blocks.{i}"
    mod = _lin(sd, f"{p}.adaLN_modulation.1", F.silu(c))
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    ln = lambda v: F.layer_norm(v, (v.shape[-1],), eps=1e-6)  # noqa: E731
    B, N, C = x.shape
    h = ln(x) * (1 + sc1.unsqueeze(1)) + sh1.unsqueeze(1)
    qkv = _lin(sd, f"{p}.attn.qkv", h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    a = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
    h = _lin(sd, f"{p}.attn.proj", (a @ v).transpose(1, 2).reshape(B, N, C))
    x = x + g1.unsqueeze(1) * h
    h = ln(x) * (1 + sc2.unsqueeze(1)) + sh2.unsqueeze(1)
    h = _lin(sd, f"{p}.mlp.fc2", F.gelu(_lin(sd, f"{p}.mlp.fc1", h), approximate="tanh"))
    return x + g2.unsqueeze(1) * h


class OfficialLatte:
    """The official Latte / Latte_skip / Latte_skip_cache forward, transcribed with
    (b f) t d <-> (b t) f d rearranges, repeated conditioning, and the merge index
    generalized from (i - 14) // 2 to (i - depth // 2) // 2 (the same for depth 28)."""

    def __init__(self, sd, cfg: LatteConfig, N=None, K=None):
        self.sd, self.cfg, self.N, self.K = sd, cfg, N, K
        self.cache_cont, self.cache_val = 0, None

    def __call__(self, x, t, y=None):
        sd, cfg = self.sd, self.cfg
        cur = t[0].item()
        b, f, ch, hh, ww = x.shape
        x = F.conv2d(x.reshape(b * f, ch, hh, ww), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"],
                     stride=cfg.patch_size).flatten(2).transpose(1, 2) + sd["pos_embed"]
        T = x.shape[1]
        te = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", _official_t_embedding(t))))
        if cfg.extras == 2:
            te = te + sd["y_embedder.embedding_table.weight"][y]
        c_sp, c_tm = te.repeat_interleave(f, 0), te.repeat_interleave(T, 0)
        depth, skips = cfg.depth, []
        full = self.N is None or (self.cache_cont % self.N == 0 or self.cache_val is None or cur >= 900)
        for i in range(0, depth, 2):
            if not full and not (i < self.K * 2 or i >= depth - self.K * 2):
                continue
            if full and self.N is not None and i == depth - self.K * 2:
                self.cache_val = x
            if cfg.skip and i >= depth // 2:
                j = (i - depth // 2) // 2
                if not full and i == depth - self.K * 2:
                    x = self.cache_val
                cat = torch.cat([x, skips.pop()], dim=-1)
                cat = F.layer_norm(cat.float(), (cat.shape[-1],), sd[f"skip_norms.{j}.weight"].float(),
                                   sd[f"skip_norms.{j}.bias"].float(), 1e-6)
                x = _lin(sd, f"skip_linears.{j}.linear", cat)
            x = _block(sd, i, x, c_sp, cfg.num_heads)
            x = x.reshape(b, f, T, -1).transpose(1, 2).reshape(b * T, f, -1)
            if i == 0:
                x = x + sd["temp_embed"]
            x = _block(sd, i + 1, x, c_tm, cfg.num_heads)
            x = x.reshape(b, T, f, -1).transpose(1, 2).reshape(b * f, T, -1)
            if cfg.skip and i < depth // 2:
                skips.append(x)
        if self.N is not None:
            self.cache_cont += 1
            if cur < 50:
                self.cache_cont, self.cache_val = 0, None
        mod = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c_sp))
        sh, sc = mod.chunk(2, dim=1)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + sc.unsqueeze(1)) + sh.unsqueeze(1)
        x = _lin(sd, "final_layer.linear", x)
        p, C = cfg.patch_size, cfg.out_channels
        g = int(T ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(b * f, g, g, p, p, C)).reshape(b * f, C, g * p, g * p)
        return x.reshape(b, f, *x.shape[1:])


def random_state(cfg: LatteConfig, seed=0) -> dict:
    """Random values for every key of our model (which are the official keys),
    the fixed embeddings kept."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in Latte(cfg).state_dict().items():
        if k in ("pos_embed", "temp_embed"):
            sd[k] = v.clone()
        elif k.startswith("skip_norms"):
            sd[k] = (1.0 if k.endswith("weight") else 0.0) + 0.2 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / max(1, v.shape[-1]) ** 0.5
    return sd


def video_inputs(cfg: LatteConfig, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *cfg.latent_shape, generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g) if cfg.class_conditional else None
    return x, y


# ---- golden outputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extras", [1, 2])
@pytest.mark.parametrize("skip", [False, True])
def test_matches_golden_outputs_of_official_code(golden, extras, skip):
    model = golden_model(golden, extras, skip)
    with torch.no_grad():
        out = model(golden[f"e{extras}_x"], golden[f"e{extras}_t"], golden[f"e{extras}_y"])
    want = golden[f"e{extras}_{'skip' if skip else 'latte'}_out"]
    assert out.shape == want.shape == (2, 4, 8, 8, 8)
    assert rel_err(out, want) <= 1e-5


def test_golden_cfg(golden):
    model = golden_model(golden, 2, True)
    with torch.no_grad():
        out = model.forward_with_cfg(golden["e2_cfg_x"], golden["e2_t"], golden["e2_cfg_y"], 4.0)
    assert rel_err(out, golden["e2_skip_cfg4_out"]) <= 1e-5
    # guidance on channels [:4] along dim 2: both halves equal there, the variance channels are the forward's
    assert torch.equal(out[0, :, :4], out[1, :, :4])
    with torch.no_grad():
        plain = model(torch.cat([golden["e2_cfg_x"][:1]] * 2), golden["e2_t"], golden["e2_cfg_y"])
    assert torch.equal(out[:, :, 4:], plain[:, :, 4:])


@pytest.mark.parametrize("extras", [1, 2])
@pytest.mark.parametrize("N,K", [(2, 1), (2, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("static", [False, True])
def test_golden_official_cache_runs(golden, extras, N, K, static):
    model = golden_model(golden, extras, True)
    cache = SkipCache.for_model(model, interval=N, branch=K, static=static)
    with torch.no_grad():
        for i in range(12):
            t = golden[f"e{extras}_cache_timesteps"][i].repeat(2)
            out = model(golden[f"e{extras}_cache_inputs"][i], t, golden[f"e{extras}_y"], cache=cache)
            assert rel_err(out, golden[f"e{extras}_cache_N{N}_K{K}_out"][i]) <= 1e-5, f"call {i}"
    ts = golden[f"e{extras}_cache_timesteps"].tolist()
    # full: counter % N == 0 (the counter restarts after t < 50), nothing cached, or t >= 900
    want, counter = [], 0
    for t in ts:
        want.append(FULL if counter % N == 0 or not want or t >= 900 else CACHED)
        counter = 0 if t < 50 else counter + 1
    assert cache.report().kinds == want
    r = cache.report()
    assert r.unit == "block pairs" and r.blocks_total == 12 * 14
    assert r.blocks_run == 14 * r.full_steps + 2 * K * r.cached_steps


def test_transcription_reproduces_the_golden_outputs(golden):
    """The transcription below is checked against the official code's outputs first."""
    for extras in (1, 2):
        for skip in (False, True):
            cfg = golden_config(golden, extras, skip)
            sd = golden[f"e{extras}_{'skip' if skip else 'latte'}_state_dict"]
            with torch.no_grad():
                out = OfficialLatte(sd, cfg)(golden[f"e{extras}_x"], golden[f"e{extras}_t"], golden[f"e{extras}_y"])
            assert rel_err(out, golden[f"e{extras}_{'skip' if skip else 'latte'}_out"]) <= 1e-5
    cfg = golden_config(golden, 2, True)
    off = OfficialLatte(golden["e2_skip_state_dict"], cfg, N=3, K=2)
    with torch.no_grad():
        for i in range(12):
            out = off(golden["e2_cache_inputs"][i], golden["e2_cache_timesteps"][i].repeat(2), golden["e2_y"])
            assert rel_err(out, golden["e2_cache_N3_K2_out"][i]) <= 1e-5


@pytest.mark.parametrize("depth,extras", [(8, 2), (12, 1), (16, 2)])
def test_other_depths_against_the_transcription(depth, extras):
    """The official code hard-codes the merge index for depth 28; ours works for any
    depth divisible by 4 (uncached and cached)."""
    cfg = LatteConfig(depth=depth, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_frames=3,
                      extras=extras, num_classes=7, skip=True)
    sd = random_state(cfg, seed=depth)
    model = Latte(cfg).eval()
    model.load_state_dict_strict(sd)
    x, y = video_inputs(cfg, B=3, seed=1)
    t = torch.full((3,), 400)
    with torch.no_grad():
        assert rel_err(model(x, t, y), OfficialLatte(sd, cfg)(x, t, y)) <= 1e-5
        vanilla = replace(cfg, skip=False)
        vsd = {k: v for k, v in sd.items() if not k.startswith("skip_")}
        assert rel_err(_loaded(vanilla, vsd)(x, t, y), OfficialLatte(vsd, vanilla)(x, t, y)) <= 1e-5
        K = depth // 8 or 1
        off = OfficialLatte(sd, cfg, N=2, K=K)
        cache = SkipCache.for_model(model, interval=2, branch=K)
        for i, tv in enumerate([999, 920, 880, 700, 500, 300, 100, 49, 20]):
            tt = torch.full((3,), tv)
            xi = x + 0.1 * i
            assert rel_err(model(xi, tt, y, cache=cache), off(xi, tt, y)) <= 1e-5, f"call {i}"
    assert cache.report().cached_steps >= 2


def _loaded(cfg, sd):
    m = Latte(cfg).eval()
    m.load_state_dict_strict(sd)
    return m


# ---- structure ----------------------------------------------------------------------------------------

def test_attention_gets_strided_views_of_the_fused_qkv(monkeypatch):
    """Spatial attention sees [B*F, T, H, Dh], temporal [B*T, F, H, Dh]: views of the
    qkv projection's output (one storage, qkv strides), never copies."""
    cfg = LatteConfig(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_frames=5,
                      extras=2, num_classes=3, skip=True)
    model = Latte(cfg).eval()
    x, y = video_inputs(cfg, B=2)
    seen, outputs = [], {}
    real = layers.ops.attention

    def spy(q, k, v, scale=None):
        seen.append((q, k, v))
        return real(q, k, v, scale)

    for i, blk in enumerate(model.blocks):
        blk.attn.qkv.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(len(outputs), o))
    monkeypatch.setattr(layers.ops, "attention", spy)
    with torch.no_grad():
        model(x, torch.full((2,), 300), y)
    B, F_, T, D, H = 2, 5, 16, 64, 4
    assert len(seen) == len(outputs) == 4
    for n, (q, k, v) in enumerate(seen):
        qkv = outputs[n]
        spatial = n % 2 == 0
        assert q.shape == ((B * F_, T, H, D // H) if spatial else (B * T, F_, H, D // H))
        for j, tt in enumerate((q, k, v)):
            assert not tt.is_contiguous()
            assert tt.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
            assert tt.data_ptr() == qkv.data_ptr() + j * D * qkv.element_size()
            L = T if spatial else F_
            assert tt.stride() == (L * 3 * D, 3 * D, D // H, 1)


def test_names_sizes_and_errors():
    names = latte_names()
    assert len(names) == 24 and "Latte-XL/2-skip" in names and set(names) <= set(model_names())
    cfg = LatteConfig.from_name("Latte-XL/2-skip")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size, cfg.num_frames) == \
        (28, 1152, 16, 2, 32, 16) and cfg.skip and cfg.extras == 1
    assert LatteConfig.from_name("Latte-skip") == cfg
    assert LatteConfig.from_name("Latte-S/4", image_size=512, num_frames=8).input_size == 64
    assert isinstance(from_name("Latte-B/8"), Latte) and from_name("Latte-B/8").depth == 6  # pairs
    assert isinstance(from_config(replace(cfg, depth=4, hidden_size=32, num_heads=2)), Latte)
    with pytest.raises(ValueError, match="unknown model"):
        LatteConfig.from_name("Latte-XXL/2")
    with pytest.raises(ValueError, match="divisible by 4"):
        Latte(replace(cfg, depth=6, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match="extras"):
        Latte(replace(cfg, depth=4, hidden_size=32, num_heads=2, extras=78))
    small = Latte(LatteConfig(depth=4, hidden_size=32, num_heads=2, input_size=8, num_frames=3, extras=2,
                              num_classes=4)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    t = torch.tensor([10])
    with pytest.raises(ValueError, match="frames"):
        small(torch.randn(1, 4, 4, 8, 8), t, torch.tensor([1]))
    with pytest.raises(ValueError, match="class-conditional"):
        small(x, t)
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        small(x[0], t, torch.tensor([1]))
    uncond = Latte(replace(small.config, extras=1)).eval()
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([1]))
    with pytest.raises(ValueError, match="long skips"):
        small(x, t, torch.tensor([1]), cache=SkipCache(2, 1))


def test_fixed_embeddings_are_the_official_sincos(golden):
    model = Latte(golden_config(golden, 1, True))
    for k in ("pos_embed", "temp_embed"):
        assert torch.allclose(model.state_dict()[k], golden["e1_skip_state_dict"][k], atol=1e-6), k


def test_strict_loading_and_checkpoint_files(golden, tmp_path):
    cfg = golden_config(golden, 2, True)
    sd = golden["e2_skip_state_dict"]
    model = Latte(cfg).eval()
    with pytest.raises(CheckpointError, match="vanilla Latte"):
        model.load_state_dict_strict(golden["e2_latte_state_dict"])
    with pytest.raises(CheckpointError, match="a Latte-skip"):
        Latte(replace(cfg, skip=False)).load_state_dict_strict(sd)
    with pytest.raises(CheckpointError, match="unconditional model"):
        model.load_state_dict_strict(golden["e1_skip_state_dict"])
    with pytest.raises(CheckpointError, match="extras=2, num_classes=5"):
        Latte(replace(cfg, extras=1)).load_state_dict_strict(sd)
    with pytest.raises(CheckpointError, match="num_frames=4"):
        Latte(replace(cfg, num_frames=16)).load_state_dict_strict(sd)
    x, t, y = golden["e2_x"], golden["e2_t"], golden["e2_y"]
    want = golden["e2_skip_out"]
    # official training checkpoints hold the weights under 'ema' (torch.load weights_only)
    torch.save({"ema": sd, "model": sd}, tmp_path / "UCF101-skip.pt")
    torch.save(sd, tmp_path / "plain.pt")
    save_safetensors(sd, tmp_path / "w.safetensors")
    for name in ("UCF101-skip.pt", "plain.pt", "w.safetensors"):
        with torch.no_grad():
            out = Latte(cfg).load_checkpoint(tmp_path / name).eval()(x, t, y)
        assert rel_err(out, want) <= 1e-5, name
    torch.save({"state_dict": sd}, tmp_path / "other.pt")  # nothing else is taken silently
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(tmp_path / "other.pt")


# ---- Skip-Cache for video ------------------------------------------------------------------------------

def test_for_model_defaults_and_strict_stop(golden):
    model = golden_model(golden, 1, True)
    c = SkipCache.for_model(model, interval=3)
    assert (c.interval, c.branch, c.start, c.stop, c.strict_stop) == (3, 1, 900, 50, True)
    assert "strict_stop=True" in repr(c)
    assert SkipCache.for_model(model, branch=2, stop=20, strict_stop=False).stop == 20
    x = golden["e1_cache_inputs"][0]

    def kinds(cache, ts):
        with torch.no_grad():
            for tv in ts:
                model(x, torch.full((2,), tv), cache=cache)
        return cache.report().kinds

    # t = 50 is not < 50: the Latte cache survives it; DiT's t <= stop rule drops it
    ts = [800, 700, 50, 40, 30]
    assert kinds(SkipCache.for_model(model, interval=9), ts) == [FULL, CACHED, CACHED, CACHED, FULL]
    assert kinds(SkipCache(interval=9, branch=1, start=900, stop=50), ts) == [FULL, CACHED, CACHED, FULL, FULL]
    # 14 pairs allow K up to 7
    with torch.no_grad():
        model(x, torch.full((2,), 500), cache=SkipCache(interval=2, branch=7))
    with pytest.raises(ValueError, match="too large"):
        model(x, torch.full((2,), 500), cache=SkipCache(interval=2, branch=8))


def tiny_video(skip=True, extras=2, depth=8, seed=0):
    cfg = LatteConfig(depth=depth, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                      num_frames=3, extras=extras, num_classes=5, skip=skip)
    torch.manual_seed(seed)
    return Latte(cfg).eval()


def test_cfg_batches_keep_each_half(golden):
    """With CFG both halves go through one forward: each keeps its own cached features
    and one step advances the counter once; the result equals running each half alone."""
    model = golden_model(golden, 2, True)
    x = golden["e2_cache_inputs"][:6, :1]
    y_c, y_u = golden["e2_y"][:1], torch.tensor([5])
    both = SkipCache.for_model(model, interval=2)
    cond, uncond = SkipCache.for_model(model, interval=2), SkipCache.for_model(model, interval=2)
    with torch.no_grad():
        for i, tv in enumerate([999, 800, 700, 600, 500, 400]):
            t2 = torch.full((2,), tv)
            out = model.forward_with_cfg(torch.cat([x[i], x[i]]), t2, torch.cat([y_c, y_u]), 3.0, cache=both)
            oc = model(x[i], t2[:1], y_c, cache=cond)
            ou = model(x[i], t2[:1], y_u, cache=uncond)
            guided = ou[:, :, :4] + 3.0 * (oc[:, :, :4] - ou[:, :, :4])
            assert rel_err(out[0, :, :4], guided[0]) <= 1e-5 and rel_err(out[1, :, 4:], ou[0, :, 4:]) <= 1e-5
    assert both.report().kinds == cond.report().kinds == [FULL, CACHED, FULL, CACHED, FULL, CACHED]


def test_adaptive_mode_and_shape_checks():
    model = tiny_video()
    x, y = video_inputs(model.config)
    with torch.no_grad():
        never = SkipCache.for_model(model, interval=4, threshold=0.0)
        for tv in (800, 700, 600):
            model(x, torch.full((2,), tv), y, cache=never)
        assert never.report().kinds == [FULL, FULL, FULL] and never.report().checks == 2
        always = SkipCache.for_model(model, interval=4, threshold=1e9)
        for tv in (800, 700, 600, 500, 400):
            model(x, torch.full((2,), tv), y, cache=always)
        assert always.report().kinds == [FULL, CACHED, CACHED, CACHED, FULL]
        with pytest.raises(ValueError, match="batch-size or resolution change"):
            model(x[:1], torch.full((1,), 300), y[:1], cache=always)


def test_block_flops_and_report():
    model = tiny_video(depth=8)
    x, y = video_inputs(model.config)
    h, _ = model.embed(x, torch.full((2,), 1), y)
    fl = model.block_flops(h)
    assert len(fl) == 4 and fl[2] > fl[1] and fl[0] == fl[1]  # pairs 2, 3 also merge
    cache = SkipCache.for_model(model, interval=2)
    with torch.no_grad():
        for tv in (800, 700):
            model(x, torch.full((2,), tv), y, cache=cache)
    r = cache.report()
    assert r.flops_total == pytest.approx(2 * sum(fl)) and r.flops_run == pytest.approx(sum(fl) + fl[0] + fl[3])
    assert "block pairs 6/8 run" in str(r)


# ---- sampling -------------------------------------------------------------------------------------------

def test_sample_videos_conditional_and_unconditional():
    model = tiny_video()
    res = sample(model, [1, 4], steps=5, seed=3)
    assert res.latents.shape == (2, 3, 4, 8, 8) and torch.isfinite(res.latents).all()
    assert torch.equal(sample(model, [1, 4], steps=5, seed=3).latents, res.latents)
    cfg = sample(model, [1, 4], steps=5, seed=3, cfg_scale=2.0)
    assert cfg.latents.shape == res.latents.shape and not torch.equal(cfg.latents, res.latents)
    cached = sample(model, [1, 4], steps=20, seed=3, cache=dict(interval=2))
    assert cached.report.unit == "block pairs" and cached.report.cached_steps > 0
    assert cached.report.kinds[:2] == [FULL, FULL]  # t >= 900: the Latte defaults came with the dict
    uncond = tiny_video(extras=1)
    u = sample(uncond, num_samples=3, steps=4, seed=0)
    assert u.latents.shape == (3, 3, 4, 8, 8)
    with pytest.raises(ValueError, match="num_samples"):
        sample(uncond, steps=2)
    with pytest.raises(ValueError, match="unconditional"):
        sample(uncond, [1], steps=2)
    with pytest.raises(ValueError, match="class-conditional"):
        sample(uncond, num_samples=1, steps=2, cfg_scale=3.0)
    with pytest.raises(ValueError, match="labels"):
        sample(model, steps=2)
    with pytest.raises(ValueError, match="noise"):
        sample(model, [1], steps=2, noise=torch.randn(1, 4, 8, 8))


def test_sampling_loop_matches_a_manual_video_loop():
    from skipdit_fast.sampling.diffusion import Diffusion

    model = tiny_video()
    y = torch.tensor([2, 0])
    res = sample(model, y, steps=4, seed=5, sampler="ddim")
    d = Diffusion(4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 8, 8, generator=gen)
    with torch.no_grad():
        for i in reversed(range(4)):
            out = model(x, torch.full((2,), d.timesteps[i]), y)
            x = d.ddim_step(out, x, i, gen)
    torch.testing.assert_close(res.latents, x, rtol=1e-6, atol=1e-6)


# ---- baselines: FORA and the split without skips on Latte ---------------------------------------------------

def test_fora_on_latte():
    model = tiny_video(skip=True)
    x, y = video_inputs(model.config)
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    wrapped, cache = CachedModel(model), ForaCache(3)
    with torch.no_grad():
        for step in range(4):
            calls.clear()
            t = torch.full((2,), 800 - 100 * step)
            out = wrapped(x + 0.1 * step, t, y, cache=cache)
            if step in (0, 3):
                assert calls == list(range(8)) and torch.equal(out, model(x + 0.1 * step, t, y))
            else:
                assert calls == []
    assert cache.report().kinds == [FULL, CACHED, CACHED, FULL] and cache.report().unit == "block pairs"
    # interval 1: every step full, the uncached sampler's result
    ref = sample(model, y, steps=4, seed=1).latents
    torch.testing.assert_close(sample(wrapped, y, steps=4, seed=1, cache=ForaCache(1)).latents, ref,
                               rtol=1e-5, atol=1e-5)


def test_split_without_skips_on_vanilla_latte():
    model = tiny_video(skip=False)
    x, y = video_inputs(model.config)
    wrapped = CachedModel(model)
    assert wrapped.cache_defaults == Latte.cache_defaults
    cache = SkipCache.for_model(wrapped, interval=2)
    t = torch.full((2,), 500)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, t, y, cache=cache), model(x, t, y))
        cached = wrapped(x, t, y, cache=cache)
        cache2 = SkipCache.for_model(wrapped, interval=2)
        wrapped(x, t, y, cache=cache2)
        assert torch.equal(cached, wrapped(torch.randn_like(x), t, y, cache=cache2))  # no skips: input unused


# ---- integrations ------------------------------------------------------------------------------------------

def test_patch_on_our_latte_changes_nothing():
    model = tiny_video(skip=True)
    x, y = video_inputs(model.config)
    t = torch.full((2,), 300)
    with torch.no_grad():
        want = model(x, t, y)
        report = patch(model)
        got = model(x, t, y)
    assert not report.changed, str(report)
    left = {la.module for la in report.left_alone}
    assert {f"blocks.{i}.attn" for i in range(8)} <= left and {"skip_linears.0", "skip_linears.1"} <= left
    assert "Latte.merge" in str(report)
    assert rel_err(got, want) <= 1e-6  # within the error budget (bitwise here: nothing was swapped)
    assert unpatch(model) == 0


def test_enable_skip_cache_on_latte():
    model = tiny_video(skip=True)
    x, y = video_inputs(model.config)
    cache = enable_skip_cache(model, interval=2)
    assert (cache.branch, cache.start, cache.stop, cache.strict_stop) == (1, 900, 50, True)
    with torch.no_grad():
        for tv in (999, 800, 700, 600):
            model(x, torch.full((2,), tv), y)
    assert cache.report().kinds == [FULL, CACHED, FULL, CACHED]
    assert disable_skip_cache(model) is cache
    with pytest.raises(ValueError, match="too large"):
        enable_skip_cache(model, branch=3)
    with pytest.raises(ValueError, match="long skips"):
        enable_skip_cache(tiny_video(skip=False))


def test_low_precision_forward(golden):
    model = golden_model(golden, 2, True)
    x, t, y = golden["e2_x"], golden["e2_t"], golden["e2_y"]
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double(), t, y)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
            out = copy.deepcopy(model).to(dtype)(x.to(dtype), t, y)
            assert out.dtype == dtype and rel_err(out.float(), ref) <= tol, dtype
