"""Diffusion schedule, DDPM / DDIM steps, seeded sampling with CFG and Skip-Cache,
and the `skipdit-fast sample` command end to end on a tiny model."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch

from skipdit_fast import SkipCache

from skipdit_fast.apps import cli
from skipdit_fast.sampling.diffusion import Diffusion, linear_betas, sample, space_timesteps
from skipdit_fast.models import DiT, DiTConfig
from skipdit_fast.apps.common import Progress, make_grid, write_png
from skipdit_fast.apps.sample import latents_as_images

TINY = DiTConfig(depth=4, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10, skip=True)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return DiT(TINY).eval()


# ---- schedule ---------------------------------------------------------------------------------

def test_linear_betas():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and len(b) == 1000
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)


def test_space_timesteps():
    ts = space_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    # evenly strided: each kept timestep is within 0.5 of its ideal position
    ideal = np.arange(250) * 999 / 249
    assert np.abs(np.array(ts) - ideal).max() <= 0.5 + 1e-9
    assert space_timesteps(1000, 20)[:4] == [0, 53, 105, 158]
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


def test_respaced_schedule_keeps_the_noise_levels():
    base = np.cumprod(1 - linear_betas(1000))
    for steps in (250, 50, 7):
        d = Diffusion(steps)
        assert np.allclose(d.alphas_cumprod, base[d.timesteps], rtol=1e-12, atol=0)
    full = Diffusion(1000)
    assert np.allclose(full.betas, linear_betas(1000), rtol=1e-9)


def test_p_mean_variance():
    d = Diffusion(50)
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for i in (0, 1, 25, 49):
        ab, abp, beta = d.alphas_cumprod[i], d.alphas_cumprod_prev[i], d.betas[i]
        xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
        for v, want_logvar in ((1.0, np.log(beta)), (-1.0, d.post_log_var_clipped[i])):
            out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
            mean, logvar, px0, _ = d.p_mean_variance(out, xt, i)
            torch.testing.assert_close(px0, x0)  # the exact eps recovers x0
            # the Gaussian posterior q(x_{t-1} | x_t, x_0)
            want = np.sqrt(abp) * beta / (1 - ab) * x0 + np.sqrt(1 - beta) * (1 - abp) / (1 - ab) * xt
            torch.testing.assert_close(mean, want)
            torch.testing.assert_close(logvar, torch.full_like(xt, float(want_logvar)))
    # posterior variance (clipped at index 0 to index 1's)
    pv = d.betas * (1 - d.alphas_cumprod_prev) / (1 - d.alphas_cumprod)
    assert np.allclose(np.exp(d.post_log_var_clipped[1:]), pv[1:])
    assert d.post_log_var_clipped[0] == d.post_log_var_clipped[1]


def test_ddim_step_is_deterministic_and_exact():
    d = Diffusion(10)
    x0, eps = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    i = 6
    xt = np.sqrt(d.alphas_cumprod[i]) * x0 + np.sqrt(1 - d.alphas_cumprod[i]) * eps
    out = torch.cat([eps, torch.zeros_like(eps)], dim=1)
    nxt = d.ddim_step(out, xt, i, None, eta=0.0)
    want = np.sqrt(d.alphas_cumprod_prev[i]) * x0 + np.sqrt(1 - d.alphas_cumprod_prev[i]) * eps
    torch.testing.assert_close(nxt, want)
    xt0 = np.sqrt(d.alphas_cumprod[0]) * x0 + np.sqrt(1 - d.alphas_cumprod[0]) * eps
    torch.testing.assert_close(d.ddim_step(out, xt0, 0, None), x0)  # the last step returns pred x0


# ---- sampling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sampling_shapes_and_determinism(tiny, sampler, cfg_scale):
    kw = dict(steps=6, sampler=sampler, cfg_scale=cfg_scale)
    a = sample(tiny, [1, 2, 3], seed=5, **kw)
    b = sample(tiny, [1, 2, 3], seed=5, **kw)
    c = sample(tiny, [1, 2, 3], seed=6, **kw)
    assert a.latents.shape == (3, 4, 8, 8) and a.latents.dtype == torch.float32
    assert torch.isfinite(a.latents).all()
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert a.report is None


def test_ddim_eta0_depends_only_on_the_initial_noise(tiny):
    noise = torch.randn(2, 4, 8, 8)
    a = sample(tiny, [0, 1], steps=5, sampler="ddim", noise=noise, seed=1)
    b = sample(tiny, [0, 1], steps=5, sampler="ddim", noise=noise, seed=2)
    assert torch.equal(a.latents, b.latents)
    c = sample(tiny, [0, 1], steps=5, sampler="ddim", noise=noise, seed=2, eta=1.0)
    assert not torch.equal(a.latents, c.latents)


def test_sampler_loop_matches_manual_cfg_loop(tiny):
    """The sampler spelled out: doubled latents, null labels, forward_with_cfg,
    DDPM steps with noise from one generator (DiT's sample.py)."""
    steps, scale = 5, 3.0
    got = sample(tiny, [4, 7], steps=steps, cfg_scale=scale, seed=11)
    d = Diffusion(steps)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 8, 8, generator=g)
    x = torch.cat([z, z])
    y = torch.tensor([4, 7, 10, 10])
    with torch.no_grad():
        for i in reversed(range(steps)):
            t = torch.full((4,), d.timesteps[i])
            out = tiny.forward_with_cfg(x, t, y, scale)
            mean, logvar, _, _ = d.p_mean_variance(out, x, i)
            if i > 0:
                mean = mean + torch.exp(0.5 * logvar) * torch.randn(x.shape, generator=g)
            x = mean
    assert torch.equal(got.latents, x[:2])


def test_sampling_with_cache_one_state_per_run(tiny):
    cache = SkipCache(interval=2, branch=1)
    a = sample(tiny, [1, 2], steps=8, cfg_scale=2.0, cache=cache, seed=3)
    kinds = list(a.report.kinds)
    b = sample(tiny, [1, 2], steps=8, cfg_scale=2.0, cache=cache, seed=3)  # reset by the sampler
    assert torch.equal(a.latents, b.latents) and b.report.kinds == kinds
    assert kinds == ["full", "cached"] * 4
    c = sample(tiny, [1, 2], steps=8, cfg_scale=2.0, cache=dict(interval=2, branch=1), seed=3)
    assert torch.equal(a.latents, c.latents) and c.report is not a.report
    # a different batch in the next run is fine: the cache is per run
    d = sample(tiny, [1, 2, 3], steps=8, cache=cache, seed=3)
    assert d.latents.shape[0] == 3 and d.report.steps == 8
    plain = sample(tiny, [1, 2], steps=8, cfg_scale=2.0, seed=3)
    assert not torch.equal(plain.latents, a.latents)  # the cache did change the computation
    # the sampler tells the cache each step's timestep on the host
    assert a.report.blocks_run == 4 * 4 + 4 * 2


def test_label_checks(tiny):
    with pytest.raises(ValueError, match="labels"):
        sample(tiny, [11], steps=2)
    with pytest.raises(ValueError, match="sampler"):
        sample(tiny, [1], steps=2, sampler="euler")


# ---- the CLI ------------------------------------------------------------------------------------

def read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
            size = (h, w)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    h, w = size
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return torch.from_numpy(raw[:, 1:].reshape(h, w, 3).copy())


def test_write_png_round_trip(tmp_path):
    img = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    write_png(tmp_path / "a.png", img)
    assert torch.equal(read_png(tmp_path / "a.png"), img)
    grid = make_grid(torch.rand(3, 3, 4, 4))
    assert grid.shape == (2 * 6 + 2, 2 * 6 + 2, 3)


def test_progress_bar_without_terminal():
    out = io.StringIO()
    p = Progress("sampling", stream=out)
    for k in range(1, 21):
        p(k, 20)
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and lines[-1].startswith("sampling [" + "#" * 30 + "] 20/20")


def test_cli_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", "DiT-S/8-skip", "--classes", "1", "2", "3", "--steps", "4", "--cfg", "1.5",
            "--cache-interval", "2", "--cache-branch", "2", "--seed", "7", "--out", str(out)]
    assert cli.main(args) == 0
    cap = capsys.readouterr()
    assert "random weights" in cap.err and "latents" in cap.err and "sampling [" in cap.err
    summary = cap.out.strip().splitlines()
    assert len(summary) == 1
    assert "3 images, DiT-S/8-skip (random weights), ddpm 4 steps" in summary[0]
    assert "4 steps: 2 full, 2 cached" in summary[0] and str(out) in summary[0]
    png = read_png(out)
    assert png.shape == (2 * (256 + 2) + 2, 2 * (256 + 2) + 2, 3)
    # the same run through the Python API gives the same pixels
    torch.manual_seed(7)
    model = DiT.from_name("DiT-S/8-skip").eval()
    res = sample(model, [1, 2, 3], steps=4, cfg_scale=1.5, cache=SkipCache(interval=2, branch=2), seed=7)
    assert torch.equal(png, make_grid(latents_as_images(res.latents)))


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, bad)
    assert cli.main(["sample", "--model", "DiT-S/8", "--ckpt", str(bad), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "missing keys" in err and "x_embedder.proj.weight" in err and "blocks.0.attn.qkv.weight" in err
    assert cli.main(["sample", "--model", "DiT-S/8", "--cache-interval", "2", "--steps", "2",
                     "--out", str(tmp_path / "x.png")]) == 1
    assert "'-skip' model" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "DiT-Q/8", "--out", str(tmp_path / "x.png")]) == 1
    capsys.readouterr()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert cli.main(["sample", "--model", "DiT-S/8", "--vae", "some/vae", "--out", str(tmp_path / "x.png")]) == 1
        assert "--vae needs the diffusers package" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
