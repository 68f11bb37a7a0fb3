"""`skipdit-fast sample`: images from a DiT / Skip-DiT (one PNG grid) or videos from a
Latte / Latte-skip (one grid video, .gif or .mp4), with or without Skip-Cache.

    skipdit-fast sample --model DiT-XL/2-skip --ckpt DiT-XL-2-skip.pt --classes 207 360 \\
        --steps 250 --cfg 4.0 --cache-interval 2 --cache-branch 4 --out grid.png
    skipdit-fast sample --model Latte-XL/2-skip --ckpt UCF101-skip.pt --num-frames 16 --classes 3 \\
        --cache-interval 2 --cache-branch 1 --out video.gif
    skipdit-fast sample --model Latte-XL/2-skip --ckpt sky-skip.pt --num-samples 2 --out sky.mp4

Without --ckpt the model has random weights (said so). A Latte's label table comes
from its checkpoint: with `y_embedder` weights it is class-conditional (extras 2,
num_classes = rows - 1, e.g. UCF101's 101), without them unconditional (extras 1,
ffs / sky / taichi: --num-samples instead of --classes); --num-frames defaults to
the checkpoint's temp_embed rows. With --vae (a diffusers AutoencoderKL folder, e.g.
a local copy of stabilityai/sd-vae-ft-ema, or an AutoencoderKLTemporalDecoder) and
diffusers installed, the latents are decoded (videos per frame, --vae-chunk frames
at a time, to bound memory); otherwise the output shows the latents' first three
channels as RGB, and says so. .mp4 needs imageio-ffmpeg (pip install
'skipdit-fast[video]'); .gif needs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .common import (DTYPES, Progress, UsageError, VIDEO_FORMATS, check_branch, check_input_file, check_output_file,
                     default_dtype, device_arg, device_from_arg, finite_float, make_grid, nonneg_float, nonneg_int,
                     positive_float, positive_int, read_checkpoint, seed_int, steps_int, video_grid, write_png,
                     write_video)

DEFAULT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py
UCF101_CLASSES = 101


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="DiT-XL/2-skip",
                   help="DiT-{S,B,L,XL}/{2,4,8}[-skip] or Latte-{S,B,L,XL}/{2,4,8}[-skip] (default DiT-XL/2-skip)")
    p.add_argument("--ckpt", help="checkpoint (.pt or .safetensors) with the official keys; random weights without")
    p.add_argument("--image-size", type=int, default=256, choices=(256, 512))
    p.add_argument("--num-frames", type=positive_int, help="Latte: frames (default: the checkpoint's, else 16)")
    p.add_argument("--classes", type=int, nargs="+",
                   help="class ids (DiT default: DiT's eight ImageNet classes; a class-conditional Latte: one video each)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="unconditional Latte: how many videos (default 1)")
    p.add_argument("--steps", type=steps_int, default=250,
                   help="sampling steps, 1..1000 (the training timesteps; default 250)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--cfg", type=finite_float, default=4.0,
                   help="classifier-free guidance scale (<= 1: none; unconditional models: none)")
    p.add_argument("--cache-interval", type=nonneg_int, default=0, help="Skip-Cache interval N (0: no cache)")
    p.add_argument("--cache-branch", type=positive_int,
                   help="Skip-Cache branch K (default: the model's official one, DiT 4 blocks, Latte 1 pair)")
    p.add_argument("--cache-threshold", type=nonneg_float, help="adaptive Skip-Cache: recompute above this cache_delta")
    p.add_argument("--cache-schedule", metavar="FILE",
                   help="Skip-Cache with a schedule file (skipdit-fast calibrate writes one): per step full, "
                   "cached or hybrid with its K, or reuse, in place of --cache-interval / --cache-branch")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--vae", help="diffusers AutoencoderKL (or AutoencoderKLTemporalDecoder) folder or id; "
                   "else latents are shown")
    p.add_argument("--vae-chunk", type=positive_int, default=8, help="frames (or images) per VAE decode call (default 8)")
    p.add_argument("--fps", type=positive_float, default=8.0, help="video frames per second (default 8)")
    p.add_argument("--out", help="output file: .png for images (default grid.png), .gif / .mp4 for videos "
                   "(default video.gif)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def latents_as_images(latents: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """The first three latent channels of each sample, min-max normalized per sample
    (over all its frames for a video), enlarged `scale` times (nearest): images
    [N, C, L, L] -> [N, 3, scale*L, scale*L], videos [N, F, C, L, L] ->
    [N, F, 3, scale*L, scale*L], in [0, 1]."""
    z = latents[..., :3, :, :].float()
    dims = tuple(range(1, z.dim()))
    lo, hi = z.amin(dim=dims, keepdim=True), z.amax(dim=dims, keepdim=True)
    z = (z - lo) / (hi - lo).clamp_min(1e-12)
    return z.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _diffusers_vae(path: str):
    """(class, None) or (None, why) for the VAE at path: AutoencoderKLTemporalDecoder
    when its config says so, else AutoencoderKL."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        return None, str(e)
    name = None
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            name = json.load(f).get("_class_name")
    if name == "AutoencoderKLTemporalDecoder":
        from diffusers.models import AutoencoderKLTemporalDecoder

        return AutoencoderKLTemporalDecoder, None
    return AutoencoderKL, None


def decode_with_vae(latents: torch.Tensor, vae_path, device: torch.device, chunk: int = 8) -> torch.Tensor:
    """Decodes as DiT / Latte do it, vae.decode(z / 0.18215), to [0, 1] on the CPU
    (vae_path: a VAE folder or id, or a VAE load_vae loaded),
    `chunk` images (or frames of a video) per decode call so that memory stays
    bounded: images [N, 4, h, w] -> [N, 3, H, W], videos [N, F, 4, h, w] ->
    [N, F, 3, H, W] (a temporal decoder gets the frames of one video per call)."""
    import torch

    with torch.no_grad():
        return _decode(latents, vae_path, device, chunk)


def load_vae(vae_path: str, device):
    """The diffusers VAE at vae_path on device, in eval mode."""
    cls, why = _diffusers_vae(vae_path)
    if cls is None:
        raise ImportError(f"--vae needs the diffusers package ({why})")
    return cls.from_pretrained(vae_path, local_files_only=True).to(device).eval()


def _decode(latents, vae, device, chunk: int):
    import torch

    if chunk < 1:
        raise ValueError(f"--vae-chunk must be >= 1, got {chunk}")
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(vae, device)
    dtype = next(vae.parameters()).dtype
    temporal = type(vae).__name__ == "AutoencoderKLTemporalDecoder"
    video = latents.dim() == 5
    groups = latents if video else latents[None]           # [G, frames, 4, h, w]
    out = []
    for g in groups:
        frames = []
        for k in range(0, len(g), chunk):
            z = g[k:k + chunk].to(device=device, dtype=dtype) / 0.18215
            img = vae.decode(z, num_frames=len(z)).sample if temporal else vae.decode(z).sample
            frames.append(((img.float().cpu() + 1) / 2).clamp(0, 1))
        out.append(torch.cat(frames))
    return torch.stack(out) if video else out[0]


def check_vae(path: str) -> None:
    """UsageError unless --vae can be decoded with here: diffusers installed and path
    a local folder with a config.json. Nothing is downloaded (a hub id is not
    fetched: a sampling run must not hang on the network, or fail after its work)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--vae needs the diffusers package ({e}); without --vae the output shows the "
                         "latents") from None
    if not os.path.isdir(path):
        raise UsageError(f"--vae {path}: no such folder (nothing is downloaded: fetch the VAE first, e.g. "
                         f"`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`, and pass DIR)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--vae {path}: no config.json in the folder (not a diffusers AutoencoderKL folder)")


def _label_rows(sd: dict) -> int | None:
    w = sd.get("y_embedder.embedding_table.weight")
    return None if w is None else int(w.shape[0])


def build_model(args, log=print):
    """The model the arguments ask for, with the checkpoint's weights when there is
    one (a Latte's frames and label table read from it first, and logged)."""
    from ..models import from_name

    sd = read_checkpoint(args.ckpt) if args.ckpt else None
    overrides = {}
    if args.model.startswith("Latte"):
        frames = args.num_frames
        if frames is None and sd is not None and "temp_embed" in sd:
            frames = int(sd["temp_embed"].shape[1])
            log(f"{args.ckpt}: {frames} frames (its temp_embed)")
        overrides["num_frames"] = frames or 16
        rows = _label_rows(sd) if sd is not None else None
        if rows is not None:
            overrides.update(extras=2, num_classes=rows - 1)
            log(f"{args.ckpt}: class-conditional, {rows - 1} classes (its label table)")
        elif sd is None and args.classes:
            overrides.update(extras=2, num_classes=UCF101_CLASSES)
        else:
            overrides["extras"] = 1
    elif args.num_frames is not None:
        raise UsageError("--num-frames is for Latte models")
    try:
        model = from_name(args.model, image_size=args.image_size, **overrides)
    except ValueError as e:   # an unknown name, a config that cannot be
        raise UsageError(f"--model {args.model}: {e}") from None
    if sd is not None:
        model.load_state_dict_strict(sd)
    return model


def main(args: argparse.Namespace) -> int:
    import torch

    from ..cache import SkipCache
    from ..sampling import sample

    # everything that can be checked before the work is: the run must not end in an error
    is_video = args.model.startswith("Latte")
    out = args.out or ("video.gif" if is_video else "grid.png")
    ext = os.path.splitext(out)[1].lower()
    if is_video and ext not in VIDEO_FORMATS:
        raise UsageError(f"a Latte writes a video: --out must end in {' or '.join(VIDEO_FORMATS)}, got {out!r}")
    if not is_video and ext != ".png":
        raise UsageError(f"a DiT writes an image grid: --out must end in .png, got {out!r}")
    check_output_file(out, "--out")
    if ext == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UsageError("--out .mp4 needs imageio-ffmpeg (pip install 'skipdit-fast[video]'); "
                             "or write a .gif") from None
    if args.vae:
        check_vae(args.vae)
    if args.cache_interval == 0 and (args.cache_branch is not None or args.cache_threshold is not None):
        raise UsageError("--cache-branch / --cache-threshold need --cache-interval N >= 1 (0: no cache)")
    if args.cache_schedule:
        if args.cache_interval > 0:
            raise UsageError("--cache-schedule replaces --cache-interval / --cache-branch: give one of them")
        check_input_file(args.cache_schedule, "--cache-schedule")
    device = device_from_arg(args.device)
    dtype = default_dtype(device, args.dtype)
    torch.manual_seed(args.seed)  # random weights (no --ckpt) are reproducible too
    model = build_model(args, log=lambda m: print(m, file=sys.stderr))
    weights = args.ckpt or "random weights"
    if not args.ckpt:
        print(f"no --ckpt: {args.model} with random weights (the samples are not meaningful)", file=sys.stderr)
    model = model.to(device=device, dtype=dtype).eval()
    cfg = model.config

    if cfg.class_conditional:
        classes = args.classes or (DEFAULT_CLASSES if not is_video else [0])
        bad = [c for c in classes if not 0 <= c < cfg.num_classes]
        if bad:
            raise UsageError(f"--classes: class ids must be in 0..{cfg.num_classes - 1}, got {bad}")
        what, kw, cfg_scale = f"{len(classes)} {'videos' if is_video else 'images'}", {"labels": classes}, args.cfg
    else:
        if args.classes:
            raise UsageError(f"--classes: {weights} is an unconditional model (no label table): use --num-samples")
        what, kw, cfg_scale = f"{args.num_samples} videos", {"num_samples": args.num_samples}, 1.0

    cache = None
    if args.cache_schedule:
        if not cfg.skip:
            raise UsageError(f"--cache-schedule: Skip-Cache needs a '-skip' model, {args.model} has no long skips")
        try:
            cache = SkipCache.for_model(model, schedule=args.cache_schedule)
            from ..sampling.diffusion import Diffusion

            cache.schedule.check_timesteps(list(reversed(Diffusion(steps=args.steps).timesteps)))
        except ValueError as e:
            raise UsageError(f"--cache-schedule {args.cache_schedule}: {e}") from e
    elif args.cache_interval > 0:
        if not cfg.skip:
            raise UsageError(f"--cache-interval: Skip-Cache needs a '-skip' model, {args.model} has no long skips")
        extra = {} if args.cache_branch is None else {"branch": args.cache_branch}
        try:
            cache = SkipCache.for_model(model, interval=args.cache_interval, threshold=args.cache_threshold, **extra)
        except ValueError as e:
            raise UsageError(f"--cache-branch / --cache-interval: {e}") from None
        check_branch(model, cache.branch, "--cache-branch")

    progress = Progress("sampling", enabled=not args.no_progress)
    result = sample(model, steps=args.steps, sampler=args.sampler, cfg_scale=cfg_scale, cache=cache,
                    seed=args.seed, progress=progress, **kw)

    if args.vae:
        images, shown = decode_with_vae(result.latents, args.vae, device, args.vae_chunk), "decoded with the VAE"
    else:
        images = latents_as_images(result.latents.cpu())
        shown = "latents shown as images (no --vae)"
        print("no --vae: the output shows the latents' first 3 channels as RGB, not decoded frames", file=sys.stderr)
    if is_video:
        write_video(out, video_grid(images, cols=math.ceil(math.sqrt(len(images)))), fps=args.fps)
    else:
        write_png(out, make_grid(images))

    cache_part = "no cache" if not cache else (f"Skip-Cache schedule {args.cache_schedule}: {result.report}"
                                               if args.cache_schedule else
                                               f"Skip-Cache N={args.cache_interval} K={cache.branch}: {result.report}")
    frames = f", {cfg.num_frames} frames" if is_video else ""
    print(f"{what}{frames}, {args.model} ({weights}), {args.sampler} {args.steps} steps, "
          f"cfg {cfg_scale}, {str(dtype).replace('torch.', '')} on {device}: {result.seconds:.2f} s; "
          f"{cache_part}; wrote {out} ({shown})")
    return 0
