"""`skipdit-fast demo` (what `make demo` runs): the package doing its job on the
shipped model, with nothing to download.

Loads the shipped tiny Skip-DiT (trained on scikit-learn's digits by
`make train-default`), samples every digit class without cache and with Skip-Cache
from the same seed, and prints the time of each, the speedup, the PSNR / SSIM
between the two grids and how many samples a small digit classifier recognizes as
their class; writes both grids as PNG (one column per class).

`--video`: the same with the shipped tiny Latte-skip on moving digits: writes
nocache.gif and skipcache.gif (one row per class), prints both times, the speedup,
the PSNR of every frame between cached and uncached videos, the temporal
consistency (mean frame-to-frame change of the cached videos next to the uncached
ones': a cache that made the videos flicker or freeze would show there) and how
many frames the frame classifier recognizes as their video's class.

On a machine with a CUDA GPU it runs there in bf16 on our GPU kernels; on the CPU in
fp32 on our C++ kernels. Under a minute on 2 CPU cores with the defaults (each mode).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from .common import (DTYPES, Progress, UsageError, check_branch, check_input_file, check_output_dir, default_dtype,
                     device_arg, device_from_arg, positive_int, seed_int, steps_int, video_grid, write_png,
                     write_video)

if TYPE_CHECKING:
    import torch

# torch and the library are imported where they are used: `skipdit-fast demo --help`
# and argument errors answer before paying for them.

# the defaults of each mode (an argument left at None takes its mode's)
IMAGE_DEFAULTS = dict(weights="tiny-skipdit", per_class=4, steps=100, interval=3, branch=2)
VIDEO_DEFAULTS = dict(weights="tiny-latte-skip", per_class=2, steps=50, interval=3, branch=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", action="store_true",
                   help="the video demo: the shipped tiny Latte-skip on moving digits, GIFs")
    p.add_argument("--weights", help="shipped model name or a .safetensors written by `skipdit-fast train` "
                   "(default tiny-skipdit; --video: tiny-latte-skip)")
    p.add_argument("--per-class", type=positive_int, help="samples per digit class (default 4; --video: 2)")
    p.add_argument("--steps", type=steps_int, help="DDPM sampling steps, 1..1000 (default 100; --video: 50)")
    p.add_argument("--interval", type=positive_int, help="Skip-Cache interval N (default 3)")
    p.add_argument("--branch", type=positive_int, help="Skip-Cache branch K (default 2 blocks; --video: 1 pair)")
    p.add_argument("--repeats", type=positive_int, default=2,
                   help="timed runs of each path, interleaved; the fastest counts (default 2)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out-dir", default="demo-out", help="where the PNGs / GIFs go (default demo-out/)")
    p.add_argument("--scale", type=positive_int, default=4, help="pixel scale of the PNG grids and GIFs (default 4)")
    p.add_argument("--no-progress", action="store_true")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """args with the mode's defaults filled in."""
    defaults = VIDEO_DEFAULTS if getattr(args, "video", False) else IMAGE_DEFAULTS
    out = argparse.Namespace(**vars(args))
    for k, v in defaults.items():
        if getattr(out, k, None) is None:
            setattr(out, k, v)
    return out


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


def time_both(model, labels, args, cache) -> tuple:
    """Warm-up, then `args.repeats` interleaved runs without and with the cache from
    the same seed (a shared machine's load spikes hit single runs, rarely all of
    them): (uncached result, cached result, uncached times, cached times), times as
    (wall, process CPU) seconds: on a shared machine the CPU time is the steadier."""
    from ..sampling import sample

    # warm-up (allocator, kernel compilation on a GPU): a short run of each path
    sample(model, labels, steps=min(6, args.steps), seed=args.seed)
    sample(model, labels, steps=min(6, args.steps), seed=args.seed, cache=cache)
    show = not args.no_progress
    base_t, fast_t = [], []
    for _ in range(max(1, args.repeats)):
        c0 = time.process_time()
        base = sample(model, labels, steps=args.steps, seed=args.seed, progress=Progress("no cache  ", show))
        c1 = time.process_time()
        fast = sample(model, labels, steps=args.steps, seed=args.seed, cache=cache,
                      progress=Progress("Skip-Cache", show))
        base_t.append((base.seconds, c1 - c0))
        fast_t.append((fast.seconds, time.process_time() - c1))
    return base, fast, base_t, fast_t


def timing(base_t, fast_t, fast) -> dict:
    """The fastest wall and CPU time of each path and their ratios; block_ratio is
    SkipCacheReport.ideal_speedup, blocks an uncached run runs / blocks this run ran: the
    speedup if the blocks were all of a step's cost and all cost the same. It is not a
    bound on the measured speedup, which can exceed it (noise, unequal blocks)."""
    bw, bc = min(t[0] for t in base_t), min(t[1] for t in base_t)
    fw, fc = min(t[0] for t in fast_t), min(t[1] for t in fast_t)
    return {"seconds_nocache": bw, "seconds_cache": fw, "speedup": bw / fw, "cpu_seconds_nocache": bc,
            "cpu_seconds_cache": fc, "cpu_speedup": bc / fc, "block_ratio": fast.report.ideal_speedup}


def load_weights(name_or_path: str, flag: str, **kw):
    """pretrained.load_pretrained for a name or file given on the command line: a
    missing shipped model, a missing, empty or corrupt file, or a file without our
    metadata is a UsageError naming the flag (only the load is inside the try)."""
    from ..pretrained import SHIPPED, load_pretrained

    if name_or_path not in SHIPPED:
        if not os.path.splitext(name_or_path)[1]:
            raise UsageError(f"{flag} {name_or_path}: not a shipped model ({', '.join(SHIPPED)}) "
                             "nor a .safetensors file")
        check_input_file(name_or_path, flag)
    try:
        return load_pretrained(name_or_path, **kw)
    except (FileNotFoundError, ValueError) as e:   # CheckpointError is a ValueError
        raise UsageError(f"{flag} {name_or_path}: {e}") from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise UsageError(f"{flag} {name_or_path}: not a readable .safetensors file, truncated or corrupt "
                             f"({e})") from None
        raise


def _load(args, log):
    from ..cache import SkipCache

    device = device_from_arg(args.device)
    dtype = default_dtype(device, args.dtype)
    model = load_weights(args.weights, "--weights", device=device, dtype=dtype)
    cfg = model.config
    if not cfg.skip:
        raise UsageError(f"--weights {args.weights} has no long skips: the demo needs a {type(model).SKIP_NAME}")
    if not args.video and hasattr(cfg, "num_frames"):
        raise UsageError(f"--weights {args.weights} is a video model: add --video")
    if args.video and not hasattr(cfg, "num_frames"):
        raise UsageError(f"--weights {args.weights} is not a video model: --video needs a Latte-skip")
    check_branch(model, args.branch, "--branch")
    cache = SkipCache.for_model(model, interval=args.interval, branch=args.branch)
    used = backends_used(device, dtype, cfg.hidden_size // cfg.num_heads, cfg.hidden_size)
    frames = f"{cfg.num_frames} frames of " if hasattr(cfg, "num_frames") else ""
    log(f"{args.weights}: {type(model).__name__}, {cfg.depth} blocks, width {cfg.hidden_size}, {frames}"
        f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents, {cfg.num_classes} classes; "
        f"DDPM {args.steps} steps, {str(dtype).replace('torch.', '')} on {device} "
        f"(ops: attention -> {used['attention']}, skip_fuse -> {used['skip_fuse']})")
    return model, cache, {"device": str(device), "backends": used}


def _timing_lines(res, args, fast, n_runs, log) -> None:
    runs = f" (fastest of {n_runs})" if n_runs > 1 else ""
    log(f"no cache:   {res['seconds_nocache']:.2f} s, CPU {res['cpu_seconds_nocache']:.2f} s{runs}")
    log(f"Skip-Cache: {res['seconds_cache']:.2f} s, CPU {res['cpu_seconds_cache']:.2f} s{runs}  "
        f"(N={args.interval}, K={args.branch}: {fast.report})")


def _speedup_line(res, log) -> None:
    log(f"speedup {res['speedup']:.2f}x wall, {res['cpu_speedup']:.2f}x CPU measured; block-count ratio "
        f"{res['block_ratio']:.2f}x (the speedup if blocks were all the cost, each the same; not a bound)")


def run(args: argparse.Namespace, log=print) -> dict:
    """The demo (the video demo with args.video); returns what it printed as numbers
    (tests use it)."""
    args = resolve(args)
    if args.video:
        return run_video(args, log)
    import torch

    from ..data.digits import to_unit
    from ..evaluation.digits import DigitClassifier, default_classifier_path
    from ..evaluation.metrics import psnr, ssim

    model, cache, info = _load(args, log)
    cfg = model.config
    labels = torch.arange(cfg.num_classes).repeat(args.per_class)  # row r: one sample of every class
    log(f"{len(labels)} samples")
    base, fast, base_t, fast_t = time_both(model, labels, args, cache)
    a, b = to_unit(base.latents.cpu()), to_unit(fast.latents.cpu())
    res = {**timing(base_t, fast_t, fast), "psnr": psnr(a, b), "ssim": ssim(a, b), **info}
    if default_classifier_path().exists():
        clf = DigitClassifier.load()
        res["accuracy_nocache"] = clf.accuracy(a * 2 - 1, labels)
        res["accuracy_cache"] = clf.accuracy(b * 2 - 1, labels)

    os.makedirs(args.out_dir, exist_ok=True)
    paths = [os.path.join(args.out_dir, f) for f in ("nocache.png", "skipcache.png")]
    for path, img in zip(paths, (a, b)):
        write_png(path, digit_grid(img, cfg.num_classes, args.scale))
    res["pngs"] = paths

    _timing_lines(res, args, fast, len(base_t), log)
    _speedup_line(res, log)
    log(f"cached vs uncached: PSNR {res['psnr']:.1f} dB, SSIM {res['ssim']:.3f}")
    _accuracy_line(res, "digit classifier", "samples as their class", cfg.num_classes, log)
    log(f"wrote {paths[0]} and {paths[1]} (one column per digit 0..9)")
    return res


def _accuracy_line(res: dict, classifier: str, what: str, num_classes: int, log) -> None:
    """The classifier's verdict on both sample sets, when a classifier was found."""
    if "accuracy_cache" in res:
        log(f"{classifier} recognizes {100 * res['accuracy_nocache']:.0f}% (no cache) and "
            f"{100 * res['accuracy_cache']:.0f}% (Skip-Cache) of the {what} (chance: {100 / num_classes:.0f}%)")


def temporal_change(videos: torch.Tensor) -> float:
    """Mean absolute frame-to-frame change of videos [N, F, ...] in [0, 1]."""
    return float((videos[:, 1:].double() - videos[:, :-1].double()).abs().mean())


def run_video(args: argparse.Namespace, log=print) -> dict:
    """The video demo (args resolved); returns what it printed as numbers."""
    import torch

    from ..data.digits import to_unit
    from ..evaluation.digits import DigitClassifier, frame_accuracy, frame_classifier_path
    from ..evaluation.metrics import psnr

    model, cache, info = _load(args, log)
    cfg = model.config
    if not hasattr(cfg, "num_frames"):
        raise ValueError(f"{args.weights} is not a video model: --video needs a Latte-skip")
    labels = torch.arange(cfg.num_classes).repeat_interleave(args.per_class)  # row c: the videos of class c
    log(f"{len(labels)} videos ({args.per_class} per class)")
    base, fast, base_t, fast_t = time_both(model, labels, args, cache)
    a, b = to_unit(base.latents.cpu()), to_unit(fast.latents.cpu())   # [N, F, 1, H, W]
    per_frame = [psnr(a[:, f], b[:, f]) for f in range(cfg.num_frames)]
    res = {**timing(base_t, fast_t, fast), "psnr": psnr(a, b), "psnr_per_frame": per_frame,
           "temporal_change_nocache": temporal_change(a), "temporal_change_cache": temporal_change(b), **info}
    if frame_classifier_path().exists():
        clf = DigitClassifier.load(frame_classifier_path())
        res["accuracy_nocache"] = frame_accuracy(clf, a * 2 - 1, labels)
        res["accuracy_cache"] = frame_accuracy(clf, b * 2 - 1, labels)

    os.makedirs(args.out_dir, exist_ok=True)
    paths = [os.path.join(args.out_dir, f) for f in ("nocache.gif", "skipcache.gif")]
    for path, vid in zip(paths, (a, b)):
        write_video(path, video_grid(vid, cols=args.per_class, scale=args.scale), fps=4)
    res["gifs"] = paths

    _timing_lines(res, args, fast, len(base_t), log)
    _speedup_line(res, log)
    log(f"cached vs uncached: PSNR {res['psnr']:.1f} dB; per frame " + " ".join(f"{p:.1f}" for p in per_frame))
    log(f"temporal consistency: mean frame-to-frame change {res['temporal_change_nocache']:.4f} (no cache), "
        f"{res['temporal_change_cache']:.4f} (Skip-Cache): ratio "
        f"{res['temporal_change_cache'] / max(res['temporal_change_nocache'], 1e-12):.2f}")
    _accuracy_line(res, "frame classifier", "frames as their video's class", cfg.num_classes, log)
    log(f"wrote {paths[0]} and {paths[1]} (one row per digit 0..9)")
    return res


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_output_dir(args.out_dir, "--out-dir")   # before the work, not after it
    run(args)
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0
