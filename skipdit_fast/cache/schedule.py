"""Cache schedules: per sampling step, full, cached with which branch K (plain or
hybrid), or FORA-style reuse (plain or extrapolated).

    sched = CacheSchedule.from_branches([0, 2, 2, 0, 1, 1, 1, 0], depth=12)   # 0: full
    sched = CacheSchedule.from_code("F22F1a1RFX", depth=12)  # F full, 1-9 cached K, a-i hybrid K, R reuse,
                                                            # X extrapolated reuse
    sched.block_budget          # blocks a run with it runs: 12 + 4 + 4 + 12 + 2 + 2 + 2 + 12
    sched.save("sched.json")    # versioned JSON, written atomically
    cache = SkipCache(schedule="sched.json")   # or schedule=sched

A schedule replaces SkipCache's interval / start / stop decisions: forward call i of
a run does what entry i says. Step 0 must be full (nothing is cached before it).
The step kinds are the modes of the one engine (cache/engine.py):

- "full": every block runs; it keeps the input of block depth-K for every K the
  schedule's cached steps use and, when the schedule has hybrid or reuse steps, every
  block's attention and MLP output (cache/reuse.py);
- "cached" with branch K: Skip-Cache, blocks 0..K-1 and depth-K..depth-1 run, block
  depth-K taking the kept input: 2K blocks; with "reuse_outer": true (hybrid) those
  2K blocks also reuse their kept attention / MLP outputs, so no attention or MLP runs;
- "reuse": FORA-style, every block reuses its kept attention and MLP outputs and runs
  only its cheap parts (adaLN modulation, gates, residuals; the long-skip merges run);
  with "extrapolate": true (code X) the kept outputs are extrapolated to the step from
  the last two full steps (cache/reuse.py: first order, damped), so the full step
  before the last one keeps them too; with a single full step so far, plain reuse.

Block counts (block_budget, SkipCacheReport.blocks_run) count the blocks whose
attention and MLP ran: hybrid and reuse steps count 0, as the FORA baseline does; what
such a step costs in time is measured by the calibration (analysis/calibrate.py), which
plans in measured time. `skipdit-fast calibrate` writes a schedule.

File format (version 3; versions 1 and 2 still load):

    {"format": "skipdit-fast-cache-schedule", "version": 2,
     "depth": 12, "unit": "blocks", "steps": 50,
     "entries": [{"kind": "full", "t": 999}, {"kind": "cached", "branch": 2, "t": 979},
                 {"kind": "cached", "branch": 1, "reuse_outer": true, "t": 959},
                 {"kind": "reuse", "t": 939}, {"kind": "reuse", "extrapolate": true, "t": 919}, ...],
     "meta": {...}}                    # free-form: how it was made (calibrate writes its numbers)

A file gets the lowest version that can hold it, so older readers load what they can
run: version 1 without hybrid or reuse steps, version 2 without extrapolated reuse
steps, else 3 (a reader of version 2 would take an extrapolated step for a plain one). "t" (optional, per entry) is the timestep the sampler gives that step; when
present the engine checks it, so a schedule made for 50 DDPM steps refuses a 100-step
run at its first differing step instead of caching the wrong steps.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

FORMAT, VERSION = "skipdit-fast-cache-schedule", 3
READS = (1, 2, 3)                    # the file versions this module loads
FULL, CACHED, REUSE = "full", "cached", "reuse"
KINDS = (FULL, CACHED, REUSE)
_TOKEN = re.compile(r"F|R|X|[1-9]|[a-i]|\((h?)(\d+)\)")


class ScheduleError(ValueError):
    """A schedule (file or object) that is not valid; the message names the field."""


@dataclass(frozen=True)
class ScheduleEntry:
    kind: str                   # "full", "cached" or "reuse"
    branch: int | None = None   # K of a cached step
    t: float | None = None      # the timestep of this step, if known
    reuse_outer: bool = False   # a cached step in the hybrid mode
    extrapolate: bool = False   # a reuse step that extrapolates from the last two full steps

    def blocks(self, depth: int) -> int:
        """Blocks whose attention and MLP run (hybrid and reuse steps: none)."""
        if self.kind == FULL:
            return depth
        return 0 if self.kind == REUSE or self.reuse_outer else 2 * int(self.branch)

    @property
    def code(self) -> str:
        """One token of CacheSchedule.code: F, R, X (extrapolated reuse), K (1-9 or (K)),
        hybrid a-i or (hK)."""
        if self.kind == FULL:
            return "F"
        if self.kind == REUSE:
            return "X" if self.extrapolate else "R"
        k = int(self.branch)
        if k <= 9:
            return chr(ord("a") + k - 1) if self.reuse_outer else str(k)
        return f"(h{k})" if self.reuse_outer else f"({k})"


def _int(value, where: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{where} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ScheduleError(f"{where} must be {rng}, got {value}")
    return value


@dataclass
class CacheSchedule:
    """Per-step decisions for one sampling run of a model with `depth` units."""

    entries: list[ScheduleEntry]
    depth: int
    unit: str = "blocks"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_branches(cls, branches: Sequence[int], depth: int, timesteps: Sequence[float] | None = None,
                      **kwargs) -> "CacheSchedule":
        """branches[i] = 0: step i full; K > 0: cached with branch K."""
        if timesteps is not None and len(timesteps) != len(branches):
            raise ScheduleError(f"timesteps has {len(timesteps)} values for {len(branches)} steps")
        entries = []
        for i, k in enumerate(branches):
            k = _int(k, f"branches[{i}]", 0)
            t = None if timesteps is None else float(timesteps[i])
            entries.append(ScheduleEntry(FULL, None, t) if k == 0 else ScheduleEntry(CACHED, k, t))
        return cls(entries, depth, **kwargs)

    @classmethod
    def from_code(cls, code: str, depth: int, timesteps: Sequence[float] | None = None,
                  **kwargs) -> "CacheSchedule":
        """From the compact form repr() and .code show: per step F (full), R (reuse),
        X (extrapolated reuse), 1-9 (cached with that K), a-i (hybrid with K 1-9),
        (K) / (hK) for K >= 10."""
        if not isinstance(code, str):
            raise ScheduleError(f"code must be a string, got {type(code).__name__}")
        entries, pos = [], 0
        while pos < len(code):
            m = _TOKEN.match(code, pos)
            if m is None:
                raise ScheduleError(f"code: unexpected {code[pos]!r} at position {pos} "
                                    "(F, R, X, 1-9, a-i, (K), (hK))")
            tok, pos = m.group(0), m.end()
            if tok == "F":
                entries.append(ScheduleEntry(FULL))
            elif tok in "RX":
                entries.append(ScheduleEntry(REUSE, extrapolate=tok == "X"))
            elif tok.isdigit():
                entries.append(ScheduleEntry(CACHED, int(tok)))
            elif tok.isalpha():
                entries.append(ScheduleEntry(CACHED, ord(tok) - ord("a") + 1, reuse_outer=True))
            else:
                entries.append(ScheduleEntry(CACHED, int(m.group(2)), reuse_outer=bool(m.group(1))))
        if timesteps is not None:
            if len(timesteps) != len(entries):
                raise ScheduleError(f"timesteps has {len(timesteps)} values for {len(entries)} steps")
            entries = [replace(e, t=float(t)) for e, t in zip(entries, timesteps)]
        return cls(entries, depth, **kwargs)

    @classmethod
    def full(cls, steps: int, depth: int, **kwargs) -> "CacheSchedule":
        return cls.from_branches([0] * steps, depth, **kwargs)

    @classmethod
    def interval(cls, steps: int, depth: int, interval: int, branch: int, **kwargs) -> "CacheSchedule":
        """Fixed-interval Skip-Cache as a schedule (without the official start / stop)."""
        return cls.from_branches([0 if i % interval == 0 else branch for i in range(steps)], depth, **kwargs)

    # ---- what it says ----------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.entries)

    @property
    def branches(self) -> list[int]:
        """Per step: 0 full or reuse, else the K of the cached step."""
        return [int(e.branch) if e.kind == CACHED else 0 for e in self.entries]

    @property
    def code(self) -> str:
        return "".join(e.code for e in self.entries)

    @property
    def used_branches(self) -> list[int]:
        """The K of the cached steps, sorted (the tensors a full step keeps)."""
        return sorted({e.branch for e in self.entries if e.kind == CACHED})

    @property
    def needs_reuse(self) -> bool:
        """Whether full steps keep every block's attention / MLP output (hybrid or reuse steps)."""
        return any(e.kind == REUSE or e.reuse_outer for e in self.entries)

    @property
    def keeping_steps(self) -> frozenset[int]:
        """The full steps that keep every block's attention / MLP output: those whose
        gap (the steps up to the next full one) has a hybrid or reuse step, which
        reads what they kept, and the full step before each of extrapolating_steps
        (an extrapolated step reads both). The other full steps keep nothing
        (SkipCache frees the store there), so a schedule pays for keeping only where
        it reuses."""
        out, fulls = set(), []
        for i, e in enumerate(self.entries):
            if e.kind == FULL:
                fulls.append(i)
            elif e.kind == REUSE or e.reuse_outer:
                out.add(fulls[-1])
                if e.extrapolate and len(fulls) > 1:
                    out.add(fulls[-2])
        return frozenset(out)

    @property
    def extrapolating_steps(self) -> frozenset[int]:
        """The full steps whose gap has an extrapolated reuse step (and a full step
        before them to extrapolate from): there the kept outputs of the full step
        before are held on, not replaced."""
        out, fulls = set(), []
        for i, e in enumerate(self.entries):
            if e.kind == FULL:
                fulls.append(i)
            elif e.extrapolate and len(fulls) > 1:
                out.add(fulls[-1])
        return frozenset(out)

    @property
    def max_branch(self) -> int:
        return max(self.used_branches, default=0)

    @property
    def block_budget(self) -> int:
        """Blocks (units) a run with this schedule runs; SkipCacheReport.blocks_run."""
        return sum(e.blocks(self.depth) for e in self.entries)

    @property
    def ideal_speedup(self) -> float:
        return self.steps * self.depth / self.block_budget

    @property
    def full_steps(self) -> int:
        return sum(e.kind == FULL for e in self.entries)

    def __repr__(self) -> str:
        s = self.code
        return (f"CacheSchedule({self.steps} steps, {self.full_steps} full, {self.unit} {self.block_budget}/"
                f"{self.steps * self.depth} (ideal {self.ideal_speedup:.2f}x): {s})")

    def validate(self) -> None:
        _int(self.depth, "depth", 2)
        if not isinstance(self.entries, list) or not self.entries:
            raise ScheduleError("entries must be a non-empty list (one entry per sampling step)")
        if not isinstance(self.unit, str):
            raise ScheduleError(f"unit must be a string, got {self.unit!r}")
        for i, e in enumerate(self.entries):
            if e.kind not in KINDS:
                raise ScheduleError(f"entries[{i}].kind must be 'full', 'cached' or 'reuse', got {e.kind!r}")
            if not isinstance(e.reuse_outer, bool):
                raise ScheduleError(f"entries[{i}].reuse_outer must be true or false, got {e.reuse_outer!r}")
            if not isinstance(e.extrapolate, bool):
                raise ScheduleError(f"entries[{i}].extrapolate must be true or false, got {e.extrapolate!r}")
            if e.extrapolate and e.kind != REUSE:
                raise ScheduleError(f"entries[{i}].extrapolate: only a reuse step has it (a {e.kind} step)")
            if e.kind == CACHED:
                _int(e.branch, f"entries[{i}].branch", 1, self.depth // 2)
            else:
                if e.branch is not None:
                    raise ScheduleError(f"entries[{i}].branch: a {e.kind} step takes no branch, got {e.branch!r}")
                if e.reuse_outer:
                    raise ScheduleError(f"entries[{i}].reuse_outer: only a cached step has it (a {e.kind} step)")
        if self.entries[0].kind != FULL:
            raise ScheduleError("entries[0].kind must be 'full': nothing is cached before the first step")

    def check_timesteps(self, timesteps: Sequence[float]) -> None:
        """Before a run: ScheduleError unless the run's timesteps (in call order) are
        the ones this schedule was made for (same count; same t where it records t)."""
        if len(timesteps) != self.steps:
            raise ScheduleError(f"this cache schedule has steps={self.steps} entries and the sampling run has "
                                f"{len(timesteps)} steps: make the schedule for the sampler's step count")
        for i, t in enumerate(timesteps):
            self.check_step(i, t)

    def check_step(self, i: int, t: float) -> ScheduleEntry:
        """The entry of forward call i (timestep t) of a run; a clear error when the
        run is longer than the schedule or its timesteps are not the schedule's."""
        if i >= self.steps:
            raise ScheduleError(f"this cache schedule has steps={self.steps} entries and the sampling run has more "
                                "forward calls: make the schedule for the sampler's step count (or call "
                                "cache.reset() between runs)")
        e = self.entries[i]
        if e.t is not None and abs(e.t - float(t)) > 1e-3:
            raise ScheduleError(f"cache schedule entries[{i}].t is {e.t:g} but the sampler's step {i} has timestep "
                                f"{float(t):g}: the schedule was made for another step count (steps={self.steps}) "
                                "or sampler")
        return e

    # ---- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        ents = []
        for e in self.entries:
            d: dict[str, Any] = {"kind": e.kind}
            if e.kind == CACHED:
                d["branch"] = int(e.branch)
            if e.reuse_outer:
                d["reuse_outer"] = True
            if e.extrapolate:
                d["extrapolate"] = True
            if e.t is not None:
                d["t"] = e.t
            ents.append(d)
        # the lowest version that holds it: what older readers can run, they load
        version = 3 if any(e.extrapolate for e in self.entries) else 2 if self.needs_reuse else 1
        return {"format": FORMAT, "version": version, "depth": self.depth, "unit": self.unit, "steps": self.steps,
                "entries": ents, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any, source: str = "cache schedule") -> "CacheSchedule":
        if not isinstance(d, dict):
            raise ScheduleError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ScheduleError(f"{source}: format must be {FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") not in READS or isinstance(d.get("version"), bool):
            raise ScheduleError(f"{source}: version must be one of {list(READS)} (the versions this skipdit_fast "
                                f"reads), got {d.get('version')!r}")
        for key in ("depth", "entries"):
            if key not in d:
                raise ScheduleError(f"{source}: missing field {key!r}")
        ents = d["entries"]
        if not isinstance(ents, list):
            raise ScheduleError(f"{source}: entries must be a list, got {type(ents).__name__}")
        entries = []
        for i, e in enumerate(ents):
            if not isinstance(e, dict) or "kind" not in e:
                raise ScheduleError(f"{source}: entries[{i}] must be an object with a 'kind', got {e!r}")
            unknown = set(e) - {"kind", "branch", "t", "reuse_outer", "extrapolate"}
            if unknown:
                raise ScheduleError(f"{source}: entries[{i}] has unknown fields {sorted(unknown)}")
            if d["version"] == 1 and (e.get("kind") == REUSE or "reuse_outer" in e):
                raise ScheduleError(f"{source}: entries[{i}]: reuse steps and reuse_outer need version 2")
            if d["version"] < 3 and "extrapolate" in e:
                raise ScheduleError(f"{source}: entries[{i}]: extrapolate needs version 3")
            t = e.get("t")
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
                raise ScheduleError(f"{source}: entries[{i}].t must be a number >= 0, got {t!r}")
            entries.append(ScheduleEntry(e["kind"], e.get("branch"), None if t is None else float(t),
                                         e.get("reuse_outer", False), e.get("extrapolate", False)))
        if "steps" in d and d["steps"] != len(entries):
            raise ScheduleError(f"{source}: steps is {d['steps']!r} but entries has {len(entries)}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ScheduleError(f"{source}: meta must be an object, got {type(meta).__name__}")
        try:
            return cls(entries, d["depth"], d.get("unit", "blocks"), meta)
        except ScheduleError as err:
            raise ScheduleError(f"{source}: {err}") from None

    def save(self, path) -> None:
        from ..files import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "CacheSchedule":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise ScheduleError(f"cache schedule {path}: cannot read it ({err.strerror or err})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ScheduleError(f"cache schedule {path}: not JSON ({err})") from None
        return cls.from_dict(d, f"cache schedule {path}")


def as_schedule(schedule) -> CacheSchedule:
    """A CacheSchedule from a CacheSchedule, a path (str / PathLike) or a dict."""
    if isinstance(schedule, CacheSchedule):
        schedule.validate()
        return schedule
    if isinstance(schedule, dict):
        return CacheSchedule.from_dict(schedule)
    if isinstance(schedule, (str, os.PathLike)):
        return CacheSchedule.load(schedule)
    raise TypeError(f"schedule must be a CacheSchedule, a path to a schedule file or a dict, "
                    f"got {type(schedule).__name__}")


def run_full_keeping(model, h, state, ks: Sequence[int]):
    """A full step that keeps the input of block depth-K (before its merge) for every
    K in ks: the blocks run in order in ranges split at depth-K. Returns (output,
    {K: tensor})."""
    depth = model.depth
    kept, pos = {}, 0
    for k in sorted(ks, reverse=True):  # ascending depth - K
        h = model.run_blocks(h, pos, depth - k, state)
        pos = depth - k
        kept[k] = h
    return model.run_blocks(h, pos, depth, state), kept
