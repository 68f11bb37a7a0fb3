"""Sampling at scale, the parts that do not talk to other processes: which sample is
which (class schedule, seeds), the shard plan, shard files, the merge into one
`samples.npz` (the ADM / guided-diffusion evaluation layout) and the manifest.

    plan = ShardPlan(num_samples=50000, shard_size=32, batch_size=32)
    plan.shard_ids(5)                       # sample ids of shard 5: range(160, 192)
    plan.batches(5)                         # its fixed batches: [range(160, 192)]
    class_labels(range(160, 192), 1000)     # balanced round-robin: i % num_classes
    sample_seeds(0, range(160, 192))        # one 63-bit seed per sample, from (seed, i)

The unit of work is a shard of K consecutive samples, processed in fixed batches of
at most B inside the shard: sample i is computed in the same batch (same members,
same order) whatever the number of processes, so that CPU GEMMs, whose bits can
depend on the batch, give the same bits. Shards go to ranks round-robin
(ShardPlan.assign); nothing about a sample depends on which rank computes it.

Shard files `shard-000005.npz` hold `samples` (uint8 [k, H, W, C], videos
[k, F, H, W, C]), `labels` (int64 [k], -1 for an unconditional model), `ids`
(int64 [k]), `seconds` (the shard's sampling time), `cache` (its Skip-Cache report
totals, JSON) and `run` (the run's fingerprint, JSON: a shard of other settings is
never mixed in). They are written through skipdit_fast.files.atomic_path with fsync:
a killed run leaves complete shards and at most temporary files, which the next run
removes (remove_stale_temporaries) before it skips the shards that load and match
(check_shard) and redoes the others.

Layer: above skipdit_fast.files and numpy only (no torch, no models)."""

from __future__ import annotations

import glob
import json
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..files import atomic_path, write_atomic

SHARD_NAME = "shard-{:06d}.npz"
SHARD_RE = re.compile(r"^shard-(\d{6})\.npz$")
MERGED_NAME = "samples.npz"
MANIFEST_NAME = "manifest.json"
SHARD_KEYS = ("samples", "labels", "ids", "seconds", "cache", "run")
# the Skip-Cache report fields that add up over runs (cache.SkipCacheReport)
REPORT_TOTALS = ("steps", "full_steps", "cached_steps", "blocks_run", "blocks_total", "flops_run", "flops_total",
                 "checks")

CLASS_SCHEDULE = "round-robin: sample i has class i % num_classes"
SEED_RULE = "numpy SeedSequence([seed, i]).generate_state(2, uint32) as one 63-bit integer, per sample i"


def class_labels(ids: Iterable[int], num_classes: int) -> list[int]:
    """The fixed class schedule: sample i has class i % num_classes (balanced:
    every class num_samples // num_classes or one more times)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return [int(i) % num_classes for i in ids]


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i of a run with global seed `seed`: a 63-bit integer from
    numpy's SeedSequence of (seed, i), so nearby (seed, i) give unrelated streams."""
    if seed < 0 or i < 0:
        raise ValueError(f"seed and sample id must be >= 0, got seed {seed}, id {i}")
    lo, hi = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, np.uint32)
    return int((int(hi) << 32 | int(lo)) & ((1 << 63) - 1))


def sample_seeds(seed: int, ids: Iterable[int]) -> list[int]:
    return [sample_seed(seed, i) for i in ids]


@dataclass(frozen=True)
class ShardPlan:
    """num_samples samples in shards of shard_size consecutive ids (the last one may
    be shorter), each processed in batches of batch_size consecutive ids from the
    shard's start (the last batch of a shard may be shorter)."""

    num_samples: int
    shard_size: int
    batch_size: int

    def __post_init__(self):
        for name in ("num_samples", "shard_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_ids(self, s: int) -> range:
        if not 0 <= s < self.num_shards:
            raise ValueError(f"shard {s} out of range 0..{self.num_shards - 1}")
        return range(s * self.shard_size, min((s + 1) * self.shard_size, self.num_samples))

    def batches(self, s: int) -> list[range]:
        ids = self.shard_ids(s)
        return [ids[k:k + self.batch_size] for k in range(0, len(ids), self.batch_size)]

    @staticmethod
    def assign(shards: Sequence[int], rank: int, world_size: int) -> list[int]:
        """Rank `rank`'s part of the shards to do: every world_size-th, from the rank's
        position (round-robin)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        return list(shards[rank::world_size])


def shard_path(out_dir: str, s: int) -> str:
    return os.path.join(out_dir, SHARD_NAME.format(s))


def to_uint8(x01) -> np.ndarray:
    """Samples in [0, 1], channels at dim -3 ([k, C, H, W] or [k, F, C, H, W], a
    torch tensor or an array) -> uint8 channels-last ([k, H, W, C] / [k, F, H, W, C]),
    rounded to the nearest of 0..255."""
    a = np.asarray(x01.detach().float().cpu().numpy() if hasattr(x01, "detach") else x01, np.float64)
    if a.ndim not in (4, 5):
        raise ValueError(f"samples must be [k, C, H, W] or [k, F, C, H, W], got shape {a.shape}")
    u = np.clip(np.floor(a * 255.0 + 0.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(u, -3, -1))


def write_shard(out_dir: str, s: int, samples: np.ndarray, labels: Sequence[int], ids: Sequence[int],
                seconds: float, cache: dict | None, run: dict) -> str:
    """Writes shard s (temporary name, fsync, rename); returns its path."""
    path = shard_path(out_dir, s)
    arrays = dict(samples=np.ascontiguousarray(samples), labels=np.asarray(labels, np.int64),
                  ids=np.asarray(ids, np.int64), seconds=np.float64(seconds),
                  cache=np.array(json.dumps(cache)), run=np.array(json.dumps(run, sort_keys=True)))
    with atomic_path(path, fsync=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def check_shard(path: str, ids: Sequence[int], sample_shape: tuple, run: dict) -> tuple[dict | None, str]:
    """(the shard's arrays, "") when the file at `path` is a complete shard of this
    run holding samples `ids` of shape sample_shape (uint8), else (None, why).
    Raises ValueError when it is a complete shard of another run (other settings:
    the output folder belongs to that run)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in SHARD_KEYS if k not in z.files]
            if missing:
                return None, f"missing {', '.join(missing)}"
            data = {k: z[k] for k in SHARD_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    try:
        theirs = json.loads(str(data["run"]))
        cache = json.loads(str(data["cache"]))
    except ValueError as e:
        return None, f"bad metadata ({e})"
    if theirs != json.loads(json.dumps(run, sort_keys=True)):
        diff = sorted(k for k in set(theirs) | set(run) if theirs.get(k) != run.get(k))
        raise ValueError(f"{path} is a shard of a run with other settings ({', '.join(diff)} differ): "
                         "use another --out folder, or delete its shards")
    x, want = data["samples"], (len(ids), *sample_shape)
    if x.dtype != np.uint8 or x.shape != want:
        return None, f"samples are {x.dtype} {x.shape}, expected uint8 {want}"
    if data["ids"].shape != (len(ids),) or not np.array_equal(data["ids"], np.asarray(ids, np.int64)):
        return None, "wrong sample ids"
    if data["labels"].shape != (len(ids),):
        return None, f"labels have shape {data['labels'].shape}, expected ({len(ids)},)"
    data["cache"] = cache
    return data, ""


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Removes the temporary files a killed run left (atomic_path's `<name>.tmp-<pid>`
    next to the shards, the merged file and the manifest); returns their paths."""
    gone = []
    for p in sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.tmp-*"))):
        base = os.path.basename(p).split(".tmp-")[0]
        if SHARD_RE.match(base) or base in (MERGED_NAME, MANIFEST_NAME):
            os.unlink(p)
            gone.append(p)
    return gone


def scan(out_dir: str, plan: ShardPlan, sample_shape: tuple, run: dict) -> tuple[list[int], list[int], dict]:
    """(complete shards, shards to do, {shard: why redone} for files that were there
    but not usable) of the plan in out_dir."""
    done, todo, why = [], [], {}
    for s in range(plan.num_shards):
        path = shard_path(out_dir, s)
        if not os.path.exists(path):
            todo.append(s)
            continue
        data, reason = check_shard(path, plan.shard_ids(s), sample_shape, run)
        if data is None:
            todo.append(s)
            why[s] = reason
        else:
            done.append(s)
    return done, todo, why


def add_reports(reports: Iterable[dict | None]) -> dict | None:
    """The sum of Skip-Cache report totals (dicts of REPORT_TOTALS; None: no cache)."""
    total, any_ = {k: 0 for k in REPORT_TOTALS}, False
    for r in reports:
        if r is None:
            continue
        any_ = True
        for k in REPORT_TOTALS:
            total[k] += r.get(k, 0)
    if not any_:
        return None
    total["ideal_speedup"] = total["blocks_total"] / total["blocks_run"] if total["blocks_run"] else 1.0
    return total


def report_totals(report) -> dict | None:
    """A SkipCacheReport's additive fields as a dict (None for no report)."""
    if report is None:
        return None
    return {k: getattr(report, k) for k in REPORT_TOTALS}


def merge(out_dir: str, plan: ShardPlan, sample_shape: tuple, run: dict, path: str | None = None,
          labelled: bool = True) -> dict:
    """Merges the shards (all must be complete) into one .npz in the ADM evaluation
    layout: `arr_0` uint8 [N, H, W, C] (videos [N, F, H, W, C]) in sample order,
    `arr_1` int64 [N] the labels (class-conditional models). Streams shard by shard
    into the zip (memory: one shard). Returns {path, seconds, cache, shards}: the
    shards' summed sampling seconds and Skip-Cache totals."""
    import time

    t0 = time.perf_counter()
    path = path or os.path.join(out_dir, MERGED_NAME)
    shape = (plan.num_samples, *sample_shape)
    labels = np.empty(plan.num_samples, np.int64)
    seconds, reports = 0.0, []
    with atomic_path(path, fsync=True) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": shape})
                for s in range(plan.num_shards):
                    ids = plan.shard_ids(s)
                    data, why = check_shard(shard_path(out_dir, s), ids, sample_shape, run)
                    if data is None:
                        raise ValueError(f"cannot merge: {shard_path(out_dir, s)} is not a complete shard ({why})")
                    f.write(np.ascontiguousarray(data["samples"]).tobytes())
                    labels[ids.start:ids.stop] = data["labels"]
                    seconds += float(data["seconds"])
                    reports.append(data["cache"])
            if labelled:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, labels, allow_pickle=False)
    return {"path": path, "seconds": seconds, "cache": add_reports(reports), "shards": plan.num_shards,
            "merge_seconds": time.perf_counter() - t0}


def write_manifest(out_dir: str, manifest: dict) -> str:
    path = os.path.join(out_dir, MANIFEST_NAME)
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n", fsync=True)
    return path


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
