"""`skipdit-fast sample`: class-conditional images from a DiT / Skip-DiT, with or
without Skip-Cache, written as one PNG grid.

    skipdit-fast sample --model DiT-XL/2-skip --ckpt DiT-XL-2-skip.pt --classes 207 360 \\
        --steps 250 --cfg 4.0 --cache-interval 2 --cache-branch 4 --out grid.png

Without --ckpt the model has random weights (said so). With --vae (a diffusers
AutoencoderKL folder, e.g. a local copy of stabilityai/sd-vae-ft-ema) and diffusers
installed, the latents are decoded to images; otherwise the grid shows the latents'
first three channels as RGB, and says so.
"""

from __future__ import annotations

import argparse
import sys

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .common import DTYPES, Progress, default_dtype, device_from_arg, make_grid, write_png

DEFAULT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="DiT-XL/2-skip", help="DiT-{S,B,L,XL}/{2,4,8}[-skip] (default DiT-XL/2-skip)")
    p.add_argument("--ckpt", help="checkpoint (.pt or .safetensors) with the official keys; random weights without")
    p.add_argument("--image-size", type=int, default=256, choices=(256, 512))
    p.add_argument("--classes", type=int, nargs="+", default=DEFAULT_CLASSES, help="ImageNet class ids")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (default 250)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--cache-interval", type=int, default=0, help="Skip-Cache interval N (0: no cache)")
    p.add_argument("--cache-branch", type=int, default=4, help="Skip-Cache branch K (default 4)")
    p.add_argument("--cache-threshold", type=float, help="adaptive Skip-Cache: recompute above this cache_delta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--vae", help="diffusers AutoencoderKL folder or id (needs diffusers); else latents are shown")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def latents_as_images(latents: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """The first three latent channels of each sample, min-max normalized per sample,
    enlarged `scale` times (nearest): [N, 3, scale*L, scale*L] in [0, 1]."""
    z = latents[:, :3].float()
    lo = z.amin(dim=(1, 2, 3), keepdim=True)
    hi = z.amax(dim=(1, 2, 3), keepdim=True)
    z = (z - lo) / (hi - lo).clamp_min(1e-12)
    return z.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def _autoencoder_class():
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        return None, str(e)
    return AutoencoderKL, None


def decode_with_vae(latents: torch.Tensor, vae_path: str, device: torch.device) -> torch.Tensor:
    """SD's VAE decode as DiT does it: vae.decode(z / 0.18215), to [0, 1]."""
    cls, why = _autoencoder_class()
    if cls is None:
        raise ImportError(f"--vae needs the diffusers package ({why})")
    import torch

    vae = cls.from_pretrained(vae_path).to(device)
    with torch.no_grad():
        imgs = vae.decode(latents.to(device) / 0.18215).sample
    return ((imgs.float().cpu() + 1) / 2).clamp(0, 1)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..cache import SkipCache
    from ..models import CheckpointError, DiT
    from ..sampling import sample

    if args.vae and _autoencoder_class()[0] is None:
        print(f"skipdit-fast sample: --vae needs the diffusers package ({_autoencoder_class()[1]}); "
              "without --vae the grid shows the latents", file=sys.stderr)
        return 2
    device = device_from_arg(args.device)
    dtype = default_dtype(device, args.dtype)
    torch.manual_seed(args.seed)  # random weights (no --ckpt) are reproducible too
    try:
        model = DiT.from_name(args.model, image_size=args.image_size)
    except ValueError as e:
        print(f"skipdit-fast sample: {e}", file=sys.stderr)
        return 2
    if args.ckpt:
        try:
            model.load_checkpoint(args.ckpt)
        except (CheckpointError, OSError) as e:
            print(f"skipdit-fast sample: {args.ckpt}: {e}", file=sys.stderr)
            return 2
        weights = args.ckpt
    else:
        weights = "random weights"
        print(f"no --ckpt: {args.model} with random weights (the images are not meaningful)", file=sys.stderr)
    model = model.to(device=device, dtype=dtype).eval()
    bad = [c for c in args.classes if not 0 <= c < model.config.num_classes]
    if bad:
        print(f"skipdit-fast sample: class ids must be in 0..{model.config.num_classes - 1}, got {bad}", file=sys.stderr)
        return 2

    cache = None
    if args.cache_interval > 0:
        if not model.config.skip:
            print(f"skipdit-fast sample: Skip-Cache needs a '-skip' model, {args.model} has no long skips",
                  file=sys.stderr)
            return 2
        cache = SkipCache(interval=args.cache_interval, branch=args.cache_branch, threshold=args.cache_threshold)

    progress = Progress("sampling", enabled=not args.no_progress)
    result = sample(model, args.classes, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg,
                    cache=cache, seed=args.seed, progress=progress)

    if args.vae:
        images, shown = decode_with_vae(result.latents, args.vae, device), "decoded with the VAE"
    else:
        images = latents_as_images(result.latents.cpu())
        shown = "latents shown as images (no --vae)"
        print("no --vae: the grid shows the latents' first 3 channels as RGB, not decoded images", file=sys.stderr)
    write_png(args.out, make_grid(images))

    cache_part = f"Skip-Cache N={args.cache_interval} K={args.cache_branch}: {result.report}" if cache else "no cache"
    print(f"{len(args.classes)} images, {args.model} ({weights}), {args.sampler} {args.steps} steps, "
          f"cfg {args.cfg}, {str(dtype).replace('torch.', '')} on {device}: {result.seconds:.2f} s; "
          f"{cache_part}; wrote {args.out} ({shown})")
    return 0
