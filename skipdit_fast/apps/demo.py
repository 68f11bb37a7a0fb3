"""`skipdit-fast demo` (what `make demo` runs): the package doing its job on the
shipped model, with nothing to download.

Loads the shipped tiny Skip-DiT (trained on scikit-learn's digits by
`make train-default`), samples every digit class without cache and with Skip-Cache
from the same seed, and prints the time of each, the speedup, the PSNR / SSIM
between the two grids and how many samples a small digit classifier recognizes as
their class; writes both grids as PNG (one column per class). On a machine with a
CUDA GPU it runs there in bf16 on our GPU kernels; on the CPU in fp32 on our C++
kernels. Under a minute on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .common import DTYPES, Progress, default_dtype, device_from_arg, write_png

# torch and the library are imported where they are used: `skipdit-fast demo --help`
# and argument errors answer before paying for them.


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="tiny-skipdit",
                   help="shipped model name or a .safetensors written by `skipdit-fast train` (default tiny-skipdit)")
    p.add_argument("--per-class", type=int, default=4, help="samples per digit class (default 4)")
    p.add_argument("--steps", type=int, default=100, help="DDPM sampling steps (default 100)")
    p.add_argument("--interval", type=int, default=3, help="Skip-Cache interval N (default 3)")
    p.add_argument("--branch", type=int, default=2, help="Skip-Cache branch K (default 2)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each path, interleaved; the fastest counts (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out-dir", default="demo-out", help="where the PNGs go (default demo-out/)")
    p.add_argument("--scale", type=int, default=4, help="pixel scale of the PNG grids (default 4)")
    p.add_argument("--no-progress", action="store_true")


def digit_grid(images: torch.Tensor, cols: int, scale: int = 4, pad: int = 2) -> torch.Tensor:
    """images [N, 1, H, W] in [0, 1], sample k in column k % cols -> uint8 [H', W', 3]."""
    import torch

    n, _, h, w = images.shape
    rows = -(-n // cols)
    img = images.float().clamp(0, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    grid = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img[k, 0]
    g = (grid * 255 + 0.5).to(torch.uint8)
    return g[..., None].expand(*g.shape, 3).contiguous()


def backends_used(device: torch.device, dtype: torch.dtype, head_dim: int, hidden: int) -> dict[str, str]:
    """Which backend `auto` picks for the model's ops on this device (inference)."""
    from ..ops.backends import pick

    return {"attention": pick("attention", device, dtype, False, (head_dim,)).backend,
            "skip_fuse": pick("skip_fuse", device, dtype, False, (hidden, hidden)).backend}


def run(args: argparse.Namespace, log=print) -> dict:
    """The demo; returns what it printed as numbers (tests use it)."""
    import torch

    from ..cache import SkipCache
    from ..data.digits import to_unit
    from ..evaluation.digits import DigitClassifier, default_classifier_path
    from ..evaluation.metrics import psnr, ssim
    from ..pretrained import load_pretrained
    from ..sampling import sample

    device = device_from_arg(args.device)
    dtype = default_dtype(device, args.dtype)
    model = load_pretrained(args.weights, device=device, dtype=dtype)
    cfg = model.config
    if not cfg.skip:
        raise ValueError(f"{args.weights} has no long skips: the demo needs a Skip-DiT")
    labels = torch.arange(cfg.num_classes).repeat(args.per_class)  # row r: one sample of every class
    cache = SkipCache(interval=args.interval, branch=args.branch)
    used = backends_used(device, dtype, cfg.hidden_size // cfg.num_heads, cfg.hidden_size)
    log(f"{args.weights}: depth {cfg.depth}, width {cfg.hidden_size}, {cfg.input_size}x{cfg.input_size}x"
        f"{cfg.in_channels} latents, {cfg.num_classes} classes; {len(labels)} samples, DDPM {args.steps} steps, "
        f"{str(dtype).replace('torch.', '')} on {device} (ops: attention -> {used['attention']}, "
        f"skip_fuse -> {used['skip_fuse']})")

    # warm-up (allocator, kernel compilation on a GPU): a short run of each path
    sample(model, labels, steps=min(6, args.steps), seed=args.seed)
    sample(model, labels, steps=min(6, args.steps), seed=args.seed, cache=cache)

    # interleaved repeats, the fastest of each counts: a shared machine's load spikes
    # hit single runs, rarely all of them
    show = not args.no_progress
    base_t, fast_t = [], []
    for _ in range(max(1, args.repeats)):
        base = sample(model, labels, steps=args.steps, seed=args.seed, progress=Progress("no cache  ", show))
        fast = sample(model, labels, steps=args.steps, seed=args.seed, cache=cache,
                      progress=Progress("Skip-Cache", show))
        base_t.append(base.seconds)
        fast_t.append(fast.seconds)
    a, b = to_unit(base.latents.cpu()), to_unit(fast.latents.cpu())
    rep = fast.report
    # blocks an uncached run runs / blocks this run ran (SkipCacheReport.ideal_speedup):
    # the speedup if the blocks were all of a step's cost and all cost the same. Not a
    # bound on the measured speedup, which can exceed it (noise, unequal blocks).
    res = {"seconds_nocache": min(base_t), "seconds_cache": min(fast_t),
           "speedup": min(base_t) / min(fast_t), "block_ratio": rep.ideal_speedup,
           "psnr": psnr(a, b), "ssim": ssim(a, b), "device": str(device), "backends": used}
    if default_classifier_path().exists():
        clf = DigitClassifier.load()
        res["accuracy_nocache"] = clf.accuracy(a * 2 - 1, labels)
        res["accuracy_cache"] = clf.accuracy(b * 2 - 1, labels)

    os.makedirs(args.out_dir, exist_ok=True)
    paths = [os.path.join(args.out_dir, f) for f in ("nocache.png", "skipcache.png")]
    for path, img in zip(paths, (a, b)):
        write_png(path, digit_grid(img, cfg.num_classes, args.scale))
    res["pngs"] = paths

    runs = f" (fastest of {len(base_t)})" if len(base_t) > 1 else ""
    log(f"no cache:   {res['seconds_nocache']:.2f} s{runs}")
    log(f"Skip-Cache: {res['seconds_cache']:.2f} s{runs}  (N={args.interval}, K={args.branch}: {rep.steps} steps, "
        f"{rep.full_steps} full, {rep.cached_steps} cached; {rep.blocks_run} of {rep.blocks_total} blocks run)")
    log(f"speedup {res['speedup']:.2f}x measured; block-count ratio {res['block_ratio']:.2f}x (the speedup if "
        "blocks were all the cost, each the same; not a bound)")
    log(f"cached vs uncached: PSNR {res['psnr']:.1f} dB, SSIM {res['ssim']:.3f}")
    if "accuracy_cache" in res:
        log(f"digit classifier recognizes {100 * res['accuracy_nocache']:.0f}% (no cache) and "
            f"{100 * res['accuracy_cache']:.0f}% (Skip-Cache) of the samples as their class "
            f"(chance: {100 / cfg.num_classes:.0f}%)")
    log(f"wrote {paths[0]} and {paths[1]} (one column per digit 0..9)")
    return res


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"skipdit-fast demo: {e}", file=sys.stderr)
        return 2
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0
