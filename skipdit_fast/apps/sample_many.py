"""`skipdit-fast sample-many`: many samples (an FID-50K set) on one or many processes,
resumable, merged into one `samples.npz` in the ADM evaluation layout.

    torchrun --nproc_per_node=8 -m skipdit_fast sample-many --model DiT-XL/2-skip \\
        --ckpt DiT-XL-2-skip.pt --vae sd-vae-ft-ema --num-samples 50000 --per-proc-batch 32 \\
        --cfg 1.5 --steps 250 --cache-interval 2 --cache-branch 4 --out samples/
    skipdit-fast sample-many --num-samples 1000 --steps 50 --out samples/       # shipped tiny Skip-DiT
    skipdit-fast sample-many --model tiny-latte-skip --num-samples 100 --out videos/

Without torchrun it runs as one process. Under torchrun every process (rank) takes
its device (cuda:LOCAL_RANK, or the CPU) and joins a process group (NCCL on CUDA,
gloo on the CPU). Sample i has class i % num_classes and its own seed from
(--seed, i) (skipdit_fast.sampling.shards); the work is cut into shards of
--shard-size consecutive samples (default: --per-proc-batch), each sampled in fixed
batches of --per-proc-batch and written as <out>/shard-NNNNNN.npz (temporary name,
fsync, rename); shards go to the ranks round-robin. So sample i is the same, bit for
bit, for any number of processes on the same device type, dtype and threads per
process. A rerun with the same settings skips the complete shards (checked: ids,
shape, dtype, settings) and redoes the others; a killed run loses only the shards in
flight. At the end rank 0 merges the shards into <out>/samples.npz (`arr_0` uint8
[N, H, W, C], videos [N, F, H, W, C]; `arr_1` the labels) and writes
<out>/manifest.json (model, checkpoint sha256, settings, backends, world size,
version, times, Skip-Cache totals per rank and summed).

The shipped tiny models (tiny-skipdit, the default, tiny-dit, tiny-latte,
tiny-latte-skip) sample pixels directly; a DiT / Latte of latents needs --vae (a
diffusers AutoencoderKL folder) to write images.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from .common import (DTYPES, Progress, default_dtype, device_arg, finite_float, nonneg_float, nonneg_int, positive_float,
                     positive_int, steps_int)

DEFAULT_MODEL = "tiny-skipdit"
# test hook: "fail-rank:R" (rank R raises at its first shard), "kill-rank:R" (rank R is
# SIGKILLed at its first shard), "hang-rank:R" (rank R sleeps an hour), "kill-after:N" (SIGKILL
# after writing N shards), "kill-in-write:N" (SIGKILL halfway through writing shard N+1)
TEST_HOOK = "SKIPDIT_SAMPLE_MANY_TEST"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a shipped model (tiny-skipdit (default), tiny-dit, tiny-latte, tiny-latte-skip) or "
                   "DiT-{S,B,L,XL}/{2,4,8}[-skip] / Latte-... with --ckpt")
    p.add_argument("--ckpt", help="checkpoint (.pt or .safetensors, official keys) of a DiT / Latte by name")
    p.add_argument("--image-size", type=int, default=256, choices=(256, 512), help="DiT / Latte by name")
    p.add_argument("--num-frames", type=positive_int, help="Latte by name: frames (default: the checkpoint's, else 16)")
    p.add_argument("--num-samples", type=positive_int, default=50000, help="samples in all (default 50000)")
    p.add_argument("--per-proc-batch", type=positive_int, default=32, help="samples per forward batch (default 32)")
    p.add_argument("--shard-size", type=positive_int, help="samples per shard file (default: --per-proc-batch)")
    p.add_argument("--steps", type=steps_int, default=250, help="sampling steps (default 250)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--cfg", type=finite_float, default=1.5,
                   help="classifier-free guidance scale (default 1.5, DiT's FID setting; <= 1: none)")
    p.add_argument("--cache-interval", type=nonneg_int, default=0, help="Skip-Cache interval N (0: no cache)")
    p.add_argument("--cache-branch", type=positive_int, help="Skip-Cache branch K (default: the model's official one)")
    p.add_argument("--cache-threshold", type=nonneg_float, help="adaptive Skip-Cache: recompute above this cache_delta")
    p.add_argument("--seed", type=nonneg_int, default=0, help="global seed; sample i's seed comes from (seed, i)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=positive_int, help="torch threads per process (default: torch's)")
    p.add_argument("--vae", help="diffusers AutoencoderKL folder: decode latents to RGB (models of latents)")
    p.add_argument("--vae-chunk", type=positive_int, default=8, help="images per VAE decode call (default 8)")
    p.add_argument("--timeout", type=positive_float, default=1800.0,
                   help="seconds a rank waits for the others at a collective before the job fails (default 1800)")
    p.add_argument("--out", default="samples", help="output folder (default samples/)")
    p.add_argument("--no-progress", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    """ValueError (one line) for arguments that cannot work, before anything runs."""
    for name in ("num_samples", "per_proc_batch", "steps"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.shard_size is not None and args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.cache_interval < 0:
        raise ValueError(f"--cache-interval must be >= 0 (0: no cache), got {args.cache_interval}")
    if args.cache_branch is not None and args.cache_branch < 1:
        raise ValueError(f"--cache-branch must be >= 1, got {args.cache_branch}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.vae_chunk < 1:
        raise ValueError(f"--vae-chunk must be >= 1, got {args.vae_chunk}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, not a folder")
    from ..pretrained import SHIPPED

    name = args.model or DEFAULT_MODEL
    if name in SHIPPED and args.ckpt:
        raise ValueError(f"{name} is a shipped model (its weights come with the package): no --ckpt")


def build_model(args, device, dtype, log):
    """(model, model description, checkpoint path or None)."""
    import torch

    from ..pretrained import SHIPPED, load_pretrained, weights_path

    name = args.model or DEFAULT_MODEL
    if name in SHIPPED:
        return load_pretrained(name, device=device, dtype=dtype), name, str(weights_path(name))
    from .sample import build_model as build_named

    torch.manual_seed(args.seed)  # random weights (no --ckpt) are the same on every rank
    ns = argparse.Namespace(model=name, ckpt=args.ckpt, image_size=args.image_size, num_frames=args.num_frames,
                            classes=None)
    model = build_named(ns, log=log)
    if not args.ckpt:
        log(f"no --ckpt: {name} with random weights (the samples are not meaningful)")
    return model.to(device=device, dtype=dtype).eval(), name, args.ckpt


def sample_layout(cfg, vae=None) -> tuple[int, ...]:
    """One sample's uint8 shape: (H, W, C), videos (F, H, W, C); with a diffusers VAE
    its upsampling (2 ** (levels - 1): 8 for sd-vae-ft-ema) and RGB."""
    if vae is not None:
        side, ch = cfg.input_size * 2 ** (len(vae.config.block_out_channels) - 1), vae.config.out_channels
    else:
        side, ch = cfg.input_size, cfg.in_channels
    frames = (cfg.num_frames,) if hasattr(cfg, "num_frames") else ()
    return (*frames, side, side, ch)


def package_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class _Hook:
    """The test hook (TEST_HOOK): lets the tests fail a rank or kill a run at a known point."""

    def __init__(self, rank: int):
        spec = os.environ.get(TEST_HOOK, "")
        self.kind, _, n = spec.partition(":")
        self.n = int(n) if n else 0
        self.rank, self.written = rank, 0

    def before_shard(self) -> None:
        if self.kind == "fail-rank" and self.rank == self.n:
            raise RuntimeError(f"{TEST_HOOK}: rank {self.rank} fails on purpose")
        if self.kind == "kill-rank" and self.rank == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang-rank" and self.rank == self.n:
            time.sleep(3600)

    def write(self, write, path: str) -> None:
        if self.kind == "kill-in-write" and self.written == self.n:
            tmp = f"{path}.tmp-{os.getpid()}"
            write()
            with open(path, "rb") as f:
                half = f.read()[: os.path.getsize(path) // 2]
            os.unlink(path)
            with open(tmp, "wb") as f:   # a half-written temporary file, as a kill mid-write leaves it
                f.write(half)
            os.kill(os.getpid(), signal.SIGKILL)
        write()
        self.written += 1
        if self.kind == "kill-after" and self.written == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace, log=None) -> dict | None:
    """The job on this rank; returns the manifest on rank 0 (None elsewhere). Raises
    distributed.RankFailed on every rank when any rank failed."""
    import numpy as np
    import torch

    from ..cache import SkipCache
    from ..data.digits import to_unit
    from ..pretrained import SHIPPED
    from ..sampling import distributed as D
    from ..sampling import shards as S
    from ..sampling.diffusion import sample
    from .demo import backends_used
    from .sample import decode_with_vae, load_vae

    t_start = time.perf_counter()
    group = D.init(args.device, args.timeout)
    try:
        rank, world = group.rank, group.world_size

        def say(msg: str) -> None:
            if rank == 0:
                (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

        if args.threads:
            torch.set_num_threads(args.threads)

        def setup():
            device = group.device
            dtype = default_dtype(device, args.dtype)
            model, name, ckpt = build_model(args, device, dtype, say)
            cfg = model.config
            if not args.vae and cfg.in_channels not in (1, 3):
                raise ValueError(f"{name} samples {cfg.in_channels}-channel latents: pass --vae (a diffusers "
                                 "AutoencoderKL folder) to write images")
            cache = None
            if args.cache_interval > 0:
                if not cfg.skip:
                    raise ValueError(f"Skip-Cache needs a model with long skips, {name} has none")
                extra = {} if args.cache_branch is None else {"branch": args.cache_branch}
                cache = SkipCache.for_model(model, interval=args.cache_interval, threshold=args.cache_threshold,
                                            **extra)
            vae = load_vae(args.vae, device) if args.vae else None
            return model, name, ckpt, dtype, cache, vae

        model, name, ckpt, dtype, cache, vae = group.agree(setup)
        cfg = model.config
        conditional = cfg.class_conditional
        cfg_scale = args.cfg if conditional else 1.0
        sha = group.broadcast(group.agree(lambda: S.file_sha256(ckpt) if rank == 0 and ckpt else None))
        plan = S.ShardPlan(args.num_samples, args.shard_size or args.per_proc_batch, args.per_proc_batch)
        layout = sample_layout(cfg, vae)
        run_key = {"model": name, "checkpoint_sha256": sha, "image_size": None if name in SHIPPED else args.image_size,
                   "num_frames": getattr(cfg, "num_frames", None),
                   "shard_size": plan.shard_size, "batch_size": plan.batch_size, "steps": args.steps,
                   "sampler": args.sampler, "cfg_scale": cfg_scale, "seed": args.seed,
                   "cache": None if cache is None else repr(cache), "dtype": str(dtype).replace("torch.", ""),
                   "device_type": group.device.type, "vae": args.vae, "layout": list(layout)}

        def scan():
            if rank != 0:
                return None
            os.makedirs(args.out, exist_ok=True)
            stale = S.remove_stale_temporaries(args.out)
            done, todo, why = S.scan(args.out, plan, layout, run_key)
            return done, todo, why, stale

        done, todo, why, stale = group.broadcast(group.agree(scan))
        for s, reason in why.items():
            say(f"{S.shard_path(args.out, s)}: redone ({reason})")
        if stale:
            say(f"removed {len(stale)} temporary file(s) a killed run left")
        done_before = sum(len(plan.shard_ids(s)) for s in done)
        todo_samples = args.num_samples - done_before
        say(f"{args.num_samples} samples of {name}, {plan.num_shards} shards of {plan.shard_size} (batches of "
            f"{plan.batch_size}), {world} process(es) ({group.backend or 'no process group'}) on "
            f"{group.device.type}: {len(done)} shards done before, {len(todo)} to do")

        mine = S.ShardPlan.assign(todo, rank, world)
        rounds = -(-len(todo) // world)
        hook = _Hook(rank)
        bar = Progress("samples", enabled=rank == 0 and not args.no_progress and todo_samples > 0, unit="samples",
                       eta=True)
        mine_seconds, mine_samples, reports = 0.0, 0, []
        total_done = 0
        t_rounds = time.perf_counter()
        for r in range(rounds):
            count, failed, message = 0, False, ""
            if r < len(mine):
                s = mine[r]
                try:
                    hook.before_shard()
                    xs, labels, secs, shard_reports = [], [], 0.0, []
                    for ids in plan.batches(s):
                        y = S.class_labels(ids, cfg.num_classes) if conditional else None
                        kw = {"labels": y} if conditional else {"num_samples": len(ids)}
                        res = sample(model, steps=args.steps, sampler=args.sampler, cfg_scale=cfg_scale,
                                     cache=cache, seeds=S.sample_seeds(args.seed, ids), **kw)
                        x01 = decode_with_vae(res.latents, vae, group.device, args.vae_chunk) if vae is not None \
                            else to_unit(res.latents)
                        xs.append(S.to_uint8(x01))
                        labels += y if conditional else [-1] * len(ids)
                        secs += res.seconds
                        shard_reports.append(S.report_totals(res.report))
                    arr, totals = np.concatenate(xs), S.add_reports(shard_reports)
                    hook.write(lambda: S.write_shard(args.out, s, arr, labels, list(plan.shard_ids(s)), secs,
                                                     totals, run_key), S.shard_path(args.out, s))
                    mine_seconds += secs
                    mine_samples += len(arr)
                    reports.append(totals)
                    count = len(arr)
                except Exception as e:  # noqa: BLE001 - it must reach the other ranks
                    failed, message = True, D.describe(e)
            n, errors = group.status(failed, count, message)
            if errors:
                raise D.RankFailed(errors)
            total_done += n
            bar(total_done, todo_samples)
        sampling_wall = time.perf_counter() - t_rounds

        per_rank = group.all_gather({"rank": rank, "shards": len(mine), "samples": mine_samples,
                                     "seconds": mine_seconds, "cache": S.add_reports(reports),
                                     "device": str(group.device), "threads": torch.get_num_threads()})

        def finish():
            if rank != 0:
                return None
            merged = S.merge(args.out, plan, layout, run_key, labelled=conditional)
            head_dim = cfg.hidden_size // cfg.num_heads
            samples_now = sum(p["samples"] for p in per_rank)
            seconds_now = sum(p["seconds"] for p in per_rank)
            wall = time.perf_counter() - t_start
            import skipdit_fast

            manifest = {
                "samples": os.path.basename(merged["path"]),
                "layout": {"arr_0": ["uint8", args.num_samples, *layout],
                           "arr_1": ["int64", args.num_samples] if conditional else None,
                           "order": "sample id 0..N-1", "axes": "N, F, H, W, C" if len(layout) == 4 else "N, H, W, C"},
                "model": {"name": name, "class": type(model).__name__, "config": _config_dict(cfg),
                          "checkpoint": ckpt, "checkpoint_sha256": sha, "vae": args.vae},
                "sampler": {"sampler": args.sampler, "steps": args.steps, "cfg_scale": cfg_scale, "seed": args.seed,
                            "class_schedule": S.CLASS_SCHEDULE if conditional else "unconditional",
                            "seed_rule": S.SEED_RULE, "dtype": run_key["dtype"]},
                "cache": {"settings": None if cache is None else repr(cache),
                          "per_rank": [p["cache"] for p in per_rank],
                          "total": S.add_reports(p["cache"] for p in per_rank),
                          "total_all_shards": merged["cache"]},
                "shards": {"count": plan.num_shards, "shard_size": plan.shard_size, "batch_size": plan.batch_size,
                           "done_before": len(done), "done_now": len(todo), "redone": {str(k): v for k, v in
                                                                                        why.items()}},
                "backends": {"process_group": group.backend, "ops": backends_used(group.device, dtype, head_dim,
                                                                                  cfg.hidden_size)},
                "world_size": world, "per_rank": [{k: v for k, v in p.items() if k != "cache"} for p in per_rank],
                "package": {"version": skipdit_fast.__version__, "commit": package_commit(),
                            "torch": torch.__version__},
                "timing": {"wall_seconds": wall, "samples_this_run": samples_now,
                           "sampling_wall_seconds": sampling_wall,
                           "samples_per_second": samples_now / sampling_wall if samples_now else None,
                           "sampling_seconds_this_run": seconds_now,
                           "seconds_per_sample": seconds_now / samples_now if samples_now else None,
                           "wall_seconds_per_sample": wall / samples_now if samples_now else None,
                           "merge_seconds": merged["merge_seconds"],
                           "sampling_seconds_all_shards": merged["seconds"]},
            }
            manifest["manifest"] = os.path.basename(S.write_manifest(args.out, manifest))
            return manifest

        manifest = group.agree(finish)
        if rank == 0:
            t = manifest["timing"]
            per = f", {t['seconds_per_sample']:.3f} s per sample per process" if t["seconds_per_sample"] else ""
            say(f"wrote {os.path.join(args.out, manifest['samples'])} ({args.num_samples} x "
                f"{'x'.join(map(str, layout))} uint8) and {manifest['manifest']}: {t['wall_seconds']:.1f} s, "
                f"{world} process(es){per}")
        return manifest
    finally:
        group.close()


def _config_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def main(args: argparse.Namespace) -> int:
    from ..sampling.distributed import RankFailed

    def fail(msg: str, code: int) -> int:
        print(f"skipdit-fast sample-many: {msg}", file=sys.stderr)
        return code

    try:
        check_args(args)
    except ValueError as e:
        return fail(str(e), 2)
    try:
        run(args)
    except RankFailed as e:
        # every rank gets the same errors: rank 0 says them, the others only exit non-zero
        if os.environ.get("RANK", "0") == "0" or any(r == int(os.environ.get("RANK", "0")) for r, _ in e.errors):
            fail(f"failed: {e}", 1)
        return 1
    except (ValueError, FileNotFoundError, ImportError) as e:
        return fail(str(e), 2)
    return 0
