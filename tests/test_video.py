"""Video around the model: the moving-digits data, GIF / MP4 writing and video grids,
`skipdit-fast sample` for Latte (random weights, checkpoints with and without a label
table, a VAE decoding per frame in chunks), the trainer on a Latte, the frame
classifier, the shipped tiny Latte / Latte-skip and `skipdit-fast demo --video`."""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from skipdit_fast.apps import cli, demo
from skipdit_fast.apps.common import _gif_palette, gif_bytes, video_grid, write_video
from skipdit_fast.apps.sample import decode_with_vae, latents_as_images
from skipdit_fast.apps.train import TrainConfig, Trainer, default_train_config
from skipdit_fast.data.moving_digits import clip_split, frames, moving_digits
from skipdit_fast.evaluation.digits import DigitClassifier, frame_accuracy, frame_classifier_path
from skipdit_fast.models import Latte, LatteConfig, save_safetensors
from skipdit_fast.pretrained import PAIRS, TINY_VIDEO, VIDEO_MODELS, WEIGHTS_DIR, load_pretrained, weights_path
from skipdit_fast.sampling.diffusion import sample

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def decode_gif(data: bytes) -> list[np.ndarray]:
    """The frames of a GIF as RGB arrays, decoded by Pillow."""
    Image = pytest.importorskip("PIL.Image")
    im = Image.open(io.BytesIO(data))
    out = []
    for k in range(im.n_frames):
        im.seek(k)
        out.append(np.array(im.convert("RGB")))
    return out


# ---- data ------------------------------------------------------------------------------------------------

def test_moving_digits():
    x, y = moving_digits(num_frames=6, canvas=16, per_digit=2, seed=0)
    assert x.shape == (3594, 6, 1, 16, 16) and y.shape == (3594,) and x.is_contiguous()
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    from sklearn.datasets import load_digits
    d = load_digits()
    assert torch.equal(y[::2], torch.from_numpy(d.target).long()) and torch.equal(y[1::2], y[::2])
    digit = torch.from_numpy(d.images[5]).float() / 8 - 1
    clip = x[10, :, 0]  # clip 10 shows digit 5
    for f in range(6):
        # the digit is somewhere in the frame, whole, on a dark background
        hits = [(r, c) for r in range(9) for c in range(9) if torch.equal(clip[f, r:r + 8, c:c + 8], digit)]
        assert hits, f
        mask = torch.ones(16, 16, dtype=torch.bool)
        r, c = hits[0]
        mask[r:r + 8, c:c + 8] = False
        assert bool((clip[f][mask] == -1).all())
    # it moves: consecutive positions differ by the velocity (1 or 2 px per axis), bouncing at the edges
    pos = [next((r, c) for r in range(9) for c in range(9) if torch.equal(clip[f, r:r + 8, c:c + 8], digit))
           for f in range(6)]
    assert all(1 <= abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(pos, pos[1:]))
    assert torch.equal(moving_digits(6, 16, 2, 0)[0], x)  # deterministic
    assert not torch.equal(moving_digits(6, 16, 2, 1)[0], x)
    assert frames(x).shape == (3594 * 6, 1, 16, 16)
    tr, te = clip_split(per_digit=2)
    assert len(tr) + len(te) == 3594 and not set((tr // 2).tolist()) & set((te // 2).tolist())
    with pytest.raises(ValueError):
        moving_digits(canvas=6)


# ---- writing videos -----------------------------------------------------------------------------------------

def test_gif_round_trip_grey_and_colour(tmp_path):
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (4, 40, 70, 1), dtype=torch.uint8, generator=g).expand(-1, -1, -1, 3).contiguous()
    grey[2, :20] = 9  # long runs too (LZW table resets and long codes)
    decoded = decode_gif(gif_bytes(grey, fps=5))
    assert len(decoded) == 4 and all(np.array_equal(d, grey[k].numpy()) for k, d in enumerate(decoded))
    colour = torch.randint(0, 256, (2, 9, 11, 3), dtype=torch.uint8, generator=g)
    dec = decode_gif(gif_bytes(colour))
    assert all(np.abs(d.astype(int) - colour[k].numpy().astype(int)).max() <= 64 for k, d in enumerate(dec))
    write_video(tmp_path / "v.gif", grey)
    assert (tmp_path / "v.gif").read_bytes()[:6] == b"GIF89a"
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="gif or .mp4"):
        write_video(tmp_path / "v.avi", grey)
    with pytest.raises(ValueError, match="uint8"):
        gif_bytes(grey.float())


def test_mp4_needs_imageio_ffmpeg(tmp_path):
    frames_ = torch.zeros(3, 15, 17, 3, dtype=torch.uint8)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="imageio-ffmpeg"):
            write_video(tmp_path / "v.mp4", frames_)
        assert not list(tmp_path.iterdir())
        return
    write_video(tmp_path / "v.mp4", frames_)  # odd sides are padded for yuv420p
    assert (tmp_path / "v.mp4").stat().st_size > 100


def test_video_grid_layout():
    v = torch.zeros(3, 2, 1, 4, 4)
    v[1, 1] = 1.0
    g = video_grid(v, cols=2, scale=2, pad=1)
    assert g.shape == (2, 2 * 9 + 1, 2 * 9 + 1, 3) and g.dtype == torch.uint8
    assert int(g[1, 1, 1 + 9, 0]) == 255 and int(g[0, 1, 1 + 9, 0]) == 0 and int(g[1, 1, 1, 0]) == 0
    with pytest.raises(ValueError, match="N, F, C, H, W"):
        video_grid(torch.zeros(2, 1, 4, 4))


# ---- the sample CLI -----------------------------------------------------------------------------------------

def test_cli_sample_video_random_weights(tmp_path, capsys):
    out = tmp_path / "v.gif"
    args = ["sample", "--model", "Latte-S/8-skip", "--image-size", "256", "--num-frames", "3", "--classes", "1", "7",
            "--steps", "4", "--cfg", "2", "--cache-interval", "2", "--seed", "3", "--out", str(out)]
    assert cli.main(args) == 0
    cap = capsys.readouterr()
    assert "random weights" in cap.err and "sampling [" in cap.err
    assert "2 videos, 3 frames, Latte-S/8-skip (random weights), ddpm 4 steps" in cap.out
    assert "Skip-Cache N=2 K=1" in cap.out and "block pairs" in cap.out
    decoded = decode_gif(out.read_bytes())
    assert len(decoded) == 3 and decoded[0].shape == (2 + 256 + 2, 2 * (256 + 2) + 2, 3)
    # the same run through the Python API gives the same pixels
    torch.manual_seed(3)
    model = Latte.from_name("Latte-S/8-skip", num_frames=3, extras=2, num_classes=101).eval()
    from skipdit_fast import SkipCache
    res = sample(model, [1, 7], steps=4, cfg_scale=2.0, cache=SkipCache.for_model(model, interval=2), seed=3)
    idx, palette = _gif_palette(video_grid(latents_as_images(res.latents), cols=2))  # colour: the 3-3-2 palette
    want = np.frombuffer(palette, np.uint8).reshape(256, 3)[idx.numpy()]
    assert all(np.array_equal(d, want[k]) for k, d in enumerate(decoded))


def _tiny_latte(extras):
    cfg = LatteConfig(depth=4, hidden_size=64, num_heads=4, patch_size=8, input_size=32, num_frames=2,
                      extras=extras, num_classes=3, skip=True)
    torch.manual_seed(0)
    return Latte(cfg)


def test_cli_sample_reads_frames_and_labels_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    import skipdit_fast.models as models_pkg

    # a checkpoint of a small Latte-S-like model: the CLI takes frames / classes from it
    ck = tmp_path / "c.safetensors"
    save_safetensors(_tiny_latte(2), ck)
    real = models_pkg.from_name
    monkeypatch.setattr(models_pkg, "from_name", lambda name, image_size=256, **kw: real(
        name, image_size, **{**kw, "depth": 4, "hidden_size": 64, "num_heads": 4}))
    out = tmp_path / "c.gif"
    assert cli.main(["sample", "--model", "Latte-S/8-skip", "--ckpt", str(ck), "--classes", "2", "--steps", "2",
                     "--no-progress", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "2 frames (its temp_embed)" in cap.err and "3 classes (its label table)" in cap.err
    assert "1 videos, 2 frames" in cap.out and len(decode_gif(out.read_bytes())) == 2
    assert cli.main(["sample", "--model", "Latte-S/8-skip", "--ckpt", str(ck), "--classes", "3", "--steps", "2",
                     "--no-progress", "--out", str(out)]) == 1
    assert "0..2" in capsys.readouterr().err
    # unconditional checkpoint: --num-samples, no --classes
    uk = tmp_path / "u.pt"
    torch.save({"ema": _tiny_latte(1).state_dict()}, uk)
    assert cli.main(["sample", "--model", "Latte-S/8-skip", "--ckpt", str(uk), "--num-samples", "3", "--steps", "2",
                     "--no-progress", "--out", str(out)]) == 0
    assert "3 videos, 2 frames" in capsys.readouterr().out
    assert cli.main(["sample", "--model", "Latte-S/8-skip", "--ckpt", str(uk), "--classes", "1", "--steps", "2",
                     "--no-progress", "--out", str(out)]) == 1
    assert "unconditional" in capsys.readouterr().err
    # frames given that the checkpoint does not have: a clear error naming temp_embed
    assert cli.main(["sample", "--model", "Latte-S/8-skip", "--ckpt", str(uk), "--num-frames", "5", "--steps", "2",
                     "--no-progress", "--out", str(out)]) == 1
    assert "temp_embed" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "Latte-S/8", "--out", str(tmp_path / "x.png")]) == 1
    assert ".gif or .mp4" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "DiT-S/8", "--num-frames", "4", "--out", str(tmp_path / "x.png")]) == 1
    assert "Latte" in capsys.readouterr().err


def test_vae_decodes_videos_per_frame_in_chunks(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    calls = []
    orig = diffusers.AutoencoderKL.decode

    def counting(self, z, *a, **k):
        calls.append(len(z))
        return orig(self, z, *a, **k)

    z = torch.randn(2, 5, 4, 4, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers.AutoencoderKL, "decode", counting)
        out = decode_with_vae(z, str(tmp_path / "vae"), torch.device("cpu"), chunk=2)
    assert out.shape == (2, 5, 3, 8, 8) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert calls == [2, 2, 1, 2, 2, 1]  # per video, at most 2 frames per decode
    with torch.no_grad():
        one = ((vae.decode(z[1, 3:4] / 0.18215).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out[1, 3:4], one, rtol=1e-4, atol=1e-5)
    imgs = decode_with_vae(z[0], str(tmp_path / "vae"), torch.device("cpu"), chunk=3)
    assert imgs.shape == (5, 3, 8, 8)


# ---- training a Latte ------------------------------------------------------------------------------------------

SMALL_VIDEO = LatteConfig(depth=4, hidden_size=32, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                          num_frames=4, extras=2, num_classes=10, mlp_ratio=2.0, skip=True)


@pytest.fixture(scope="module")
def clips():
    x, y = moving_digits(num_frames=4, canvas=16, per_digit=1)
    return x[:256], y[:256]


def test_trainer_on_a_latte(clips, tmp_path):
    cfg = TrainConfig(model="small-video", steps=30, batch_size=16, warmup=2, eval_every=10, eval_size=32)
    tr = Trainer(cfg, data=clips, model_cfg=SMALL_VIDEO)
    first = tr.eval_loss()["loss"]
    tr.run(progress=False)
    assert tr.eval_loss()["loss"] < 0.85 * first
    x0, t, y, noise = tr.batch(3)
    assert x0.shape == (16, 4, 1, 16, 16) and y.max() <= 10
    # resume from a checkpoint continues exactly
    short = replace(cfg, steps=8, eval_every=0)
    a = Trainer(short, data=clips, model_cfg=SMALL_VIDEO).run(progress=False)
    b = Trainer(short, data=clips, model_cfg=SMALL_VIDEO)
    b.run(4, progress=False)
    b.save(tmp_path / "c.pt")
    b = Trainer(short, data=clips, model_cfg=SMALL_VIDEO).load(tmp_path / "c.pt").run(progress=False)
    assert [r.loss for r in a.log] == [r.loss for r in b.log]
    for (k, p), q in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(p, q), k
    with pytest.raises(ValueError, match="checkpoint model"):  # a Latte-skip's checkpoint is not a Latte's
        Trainer(short, data=clips, model_cfg=replace(SMALL_VIDEO, skip=False)).load(tmp_path / "c.pt")
    tr.export(tmp_path / "v.safetensors", dtype=torch.float32)
    model = load_pretrained(str(tmp_path / "v.safetensors"))
    assert isinstance(model, Latte) and model.config == SMALL_VIDEO
    for (k, p), q in zip(tr.ema.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), k
    with pytest.raises(ValueError, match="does not fit"):
        Trainer(cfg, data=(clips[0][:, :3], clips[1]), model_cfg=SMALL_VIDEO)


def test_trainer_unconditional_latte(clips):
    cfg = TrainConfig(model="u", steps=3, batch_size=8, warmup=1, eval_every=0)
    tr = Trainer(cfg, data=clips, model_cfg=replace(SMALL_VIDEO, extras=1)).run(progress=False)
    assert tr.batch(0)[2] is None and not hasattr(tr.model, "y_embedder") and len(tr.log) == 3


def test_video_recipe_and_config():
    assert VIDEO_MODELS["tiny-latte"] == replace(VIDEO_MODELS["tiny-latte-skip"], skip=False)
    assert {k: getattr(VIDEO_MODELS["tiny-latte"], k) for k in TINY_VIDEO} == TINY_VIDEO
    a, b = (default_train_config(n) for n in PAIRS["video"])
    assert replace(a, model="") == replace(b, model="") and a.steps > 0


# ---- the shipped video models and the demo --------------------------------------------------------------------

def test_shipped_video_weights_and_logs():
    from safetensors.torch import load_file

    runs = {n: json.loads((WEIGHTS_DIR / f"{n}.train.json").read_text()) for n in PAIRS["video"]}
    a, b = (runs[n] for n in PAIRS["video"])
    assert a["steps"] == b["steps"] == default_train_config(PAIRS["video"][0]).steps
    for key in ("steps", "batch_size", "seed", "lr", "ema_decay"):
        assert a["train_config"][key] == b["train_config"][key]
    total = 0
    for name, cfg in VIDEO_MODELS.items():
        path = weights_path(name)
        total += path.stat().st_size
        model = load_pretrained(name)
        assert isinstance(model, Latte) and model.config == cfg
        sd = load_file(str(path))
        assert set(sd) == set(Latte(cfg).state_dict()) and all(torch.isfinite(v).all() for v in sd.values())
        assert all(v.dtype == torch.float16 for v in sd.values())
    assert total <= 5 * 2 ** 20


@pytest.fixture(scope="module")
def frame_classifier():
    return DigitClassifier.load(frame_classifier_path())


def test_frame_classifier(frame_classifier):
    cfg = VIDEO_MODELS["tiny-latte-skip"]
    x, y = moving_digits(cfg.num_frames, cfg.input_size)
    _, te = clip_split()
    assert frame_classifier.test_accuracy > 0.85
    assert frame_accuracy(frame_classifier, x[te[:200]], y[te[:200]]) > 0.85
    assert frame_accuracy(frame_classifier, torch.rand(20, 8, 1, 16, 16) * 2 - 1, torch.arange(20) % 10) < 0.5


@pytest.mark.parametrize("name", PAIRS["video"])
def test_shipped_video_models_denoise_moving_digits(name, frame_classifier):
    """What the shipped (weak, see bench/results/fidelity-cpu/FINDINGS.md)
    video models do: they denoise real clips at small noise levels into recognizable
    digits, and their samples are finite videos in which something moves."""
    from skipdit_fast.sampling.diffusion import Diffusion

    model = load_pretrained(name)
    cfg = model.config
    x, y = moving_digits(cfg.num_frames, cfg.input_size)
    _, te = clip_split()
    x0, y0 = x[te[:40]], y[te[:40]]
    d = Diffusion(1000)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((40,), 100)
    xt = d.q_sample(x0, t, noise)
    with torch.no_grad():
        eps = model(xt, t, y0)[:, :, :1]
    pred = (d.coef("sqrt_recip_ac", 100, xt) * xt - d.coef("sqrt_recipm1_ac", 100, xt) * eps).clamp(-1, 1)
    assert float((pred - x0).abs().mean()) < 0.5 * float((xt.clamp(-1, 1) - x0).abs().mean())
    assert frame_accuracy(frame_classifier, pred, y0) >= 0.5
    labels = torch.arange(10)
    v = sample(model, labels, steps=20, seed=0).latents
    assert v.shape == (10, 8, 1, 16, 16) and torch.isfinite(v).all()
    change = (v[:, 1:] - v[:, :-1]).abs().mean()
    assert 0.01 < float(change) < 0.5


def _demo_args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(["--video", "--steps", "12", "--per-class", "1", "--repeats", "1", "--no-progress",
                         "--out-dir", str(tmp_path), *extra])


def test_demo_video_end_to_end(tmp_path, capsys):
    rc = cli.main(["demo", "--video", "--steps", "12", "--per-class", "1", "--repeats", "1", "--no-progress",
                   "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("no cache:", "Skip-Cache:", "speedup", "per frame", "temporal consistency", "frame classifier",
                 "one row per digit", "demo done"):
        assert word in out, out
    for name in ("nocache.gif", "skipcache.gif"):
        decoded = decode_gif((tmp_path / name).read_bytes())
        assert len(decoded) == 8 and decoded[0].shape == (2 + 10 * (64 + 2), 2 + 64 + 2, 3)


def test_demo_video_numbers(tmp_path):
    res = demo.run(_demo_args(tmp_path, "--interval", "2"), log=lambda *a: None)
    assert res["speedup"] == pytest.approx(res["seconds_nocache"] / res["seconds_cache"])
    assert res["cpu_speedup"] == pytest.approx(res["cpu_seconds_nocache"] / res["cpu_seconds_cache"])
    assert res["block_ratio"] > 1.0 and len(res["psnr_per_frame"]) == 8
    assert 5.0 < res["psnr"] < math.inf and all(p > 5.0 for p in res["psnr_per_frame"])
    assert res["temporal_change_nocache"] > 0 and res["temporal_change_cache"] > 0
    assert 0.0 <= res["accuracy_cache"] <= 1.0


def test_demo_video_refuses_an_image_model_and_a_model_without_skips(tmp_path, capsys):
    assert cli.main(["demo", "--video", "--weights", "tiny-skipdit", "--steps", "2", "--no-progress",
                     "--out-dir", str(tmp_path)]) == 1
    assert "not a video model" in capsys.readouterr().err
    assert cli.main(["demo", "--video", "--weights", "tiny-latte", "--steps", "2", "--no-progress",
                     "--out-dir", str(tmp_path)]) == 1
    assert "Latte-skip" in capsys.readouterr().err
