"""Skip-Cache: reuse the deep features of a Skip-DiT across sampling steps.

    cache = SkipCache(interval=2, branch=4)        # official DiT_cache semantics
    for t in timesteps:                            # one sampling run
        out = model(x, t, y, cache=cache)
    print(cache.report())
    cache.reset()                                  # before the next run

    cache = SkipCache.for_model(latte, interval=2) # official Latte_skip_cache: K=1 pair,
                                                   # start 900, stop 50 (strict)

Semantics (DESIGN.md section 3; the official `DiT_cache` by default). A counter runs
over the forward calls of a run. A step is *full* when counter % interval == 0, or
nothing is cached, or t >= start; it runs every unit of the model's U (a block of a
DiT; a spatial/temporal block pair of a Latte) and keeps the input of unit depth-K
(K = branch), taken before that unit's long-skip merge. Any other step is *cached*:
it runs units 0..K-1 (which push their skips) and depth-K..depth-1 (whose merges pop
them), unit depth-K taking the kept tensor as its input: 2K units instead of depth.
After a step with t <= stop (strict_stop: t < stop) the cache is dropped and the
counter restarts, so later steps (t decreasing) are full.

The official thresholds differ between the official models: DiT_cache uses start
1000, stop 20 (t <= stop), the class-to-video Latte_skip_cache start 900, stop 50 with
t < stop and K counted in block pairs. They are the same engine with other arguments;
a model states its own as `cache_defaults` (models.Latte does), and
SkipCache.for_model(model, ...) starts from them.

Beyond the official code:
- state per run: reset() (the samplers call it) starts a run; the first forward of a
  run fixes the model and the hidden-state shape (batch, tokens, width), dtype and
  device, and a different one inside the run is an error, not a silently wrong reuse;
  `with cache.sampling_run():` scopes a run (sample() uses it), and what would mix two
  runs (a new one without reset() while features are held, the run after a forward
  that raised, a second thread) is a SkipCacheRunError (cache/runs.py);
- classifier-free guidance: the cond and uncond halves go through one forward (the
  model's forward_with_cfg), so each half keeps its own cached features and one step
  advances the counter once. A pipeline that calls the model twice per step (cond,
  then uncond) uses one SkipCache per branch;
- adaptive mode (threshold=...): a step that would be cached first runs the shallow
  blocks 0..K-1, then compares their output with the one of the last full step,
  ops.cache_delta(now, then) = sum|now - then| / sum|then|; above the threshold the
  step continues as a full step (the shallow blocks are not run twice). That decision
  is the only host synchronization of a step. `interval` caps the refresh period: at
  most interval-1 cached steps in a row;
- static buffers (static=True): the kept tensor (and the adaptive reference) live in
  buffers allocated once and overwritten in place, reused across steps and runs of
  the same shape, so a full step and a cached step can each be captured as a CUDA
  graph: capture them under `with cache.capture("full")` / `capture("cached")`, then
  per step call `kind = cache.step(t, model)` and replay graphs[kind];
- a per-run report(): steps full / cached, blocks run, estimated FLOPs saved;
- a schedule (schedule=CacheSchedule or a schedule file, cache/schedule.py): forward
  call i of a run is what its entry i says, in place of interval / start / stop: full,
  cached with a branch K (plain or hybrid), or a FORA-style reuse step (every block
  reuses its kept attention / MLP output, or with extrapolate extrapolates it from the
  last two full steps; the report's kinds say "reuse"); a full step
  keeps the input of block depth-K for every K the schedule uses, and every block's
  attention / MLP output when a hybrid or reuse step follows before the next full
  step or an extrapolated one after it (CacheSchedule.keeping_steps; keeping has a
  cost, which calibrate measures); `skipdit-fast calibrate`
  writes one, chosen per step from measured errors and measured step times;
- hybrid mode (reuse_outer=True, cache/reuse.py): on a cached step the outer blocks
  reuse their attention and MLP outputs from the last full step (FORA-style), so a
  cached step runs no attention or MLP; the report counts 0 blocks for it.

The engine works for any model with the skip structure (protocol SkipModel below):
ours (models.DiT and models.Latte with config.skip), images or videos alike (the
engine only sees hidden states [B, tokens, D]) and, through an adapter, e.g.
diffusers' HunyuanDiT2DModel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import torch

from .. import ops
from . import checks
from .runs import RunTracker

FULL, CACHED, REUSE = "full", "cached", "reuse"


@runtime_checkable
class SkipModel(Protocol):
    """What SkipCache needs from a model with long-skip connections.

    The model is a sequence of `depth` units (DiT: its blocks; Latte: its spatial /
    temporal block pairs, so depth = config.depth // 2 there) that form a U: each unit
    of the shallow range [0, K) pushes its output on a stack kept in `state`, each
    unit of the last range [depth-K, depth) first merges (pops) the top of the stack,
    so that unit depth-1-i pairs with unit i; the cache's branch K counts units. Below,
    "block" means unit. SkipCache runs blocks in three ranges, always in order:

        shallow  run_blocks(h, 0, K, state)
        deep     run_blocks(h, K, depth - K, state)       (full steps only)
        last     run_blocks(h, depth - K, depth, state)   (h: the cached tensor on
                                                           cached steps)

    run_blocks must do the pushes/pops of the blocks it runs and nothing else; the
    input of block depth-K is its input before its merge. For DiT-style models all
    of this is `for i in range(start, stop)` over the model's own block loop.
    `max_branch` (optional, default depth // 2) is the largest K for which the
    shallow range only pushes and the last range only pops (HunyuanDiT, with 40
    blocks of which 19 and 20 neither push nor pop: 19). `block_flops(h)` (optional)
    gives the estimated FLOPs of each block for the report, `cache_unit` (optional,
    default "blocks") what a unit is called in it, `cache_defaults` (optional) the
    model's official SkipCache arguments (SkipCache.for_model). The hidden states h
    are [B, ...] with the batch first (classifier-free guidance keeps the cond and
    uncond halves along it); everything else about their layout is the model's.

    An adapter for a model whose forward is not split this way wraps it: embed the
    inputs, call cache.run(adapter, h, state, t) where the model loops over its
    blocks, then the output head. For diffusers' HunyuanDiT2DModel (merges inside the
    block, `skip=` argument; 40 layers: 0..18 push, 21..39 pop) the loop would be

        def run_blocks(self, h, start, stop, st):          # depth 40, max_branch 19
            for i in range(start, stop):
                kw = dict(temb=st.temb, encoder_hidden_states=st.text, image_rotary_emb=st.rope)
                if i > self.depth // 2:
                    kw["skip"] = st.skips.pop()
                h = self.model.blocks[i](h, **kw)
                if i < self.depth // 2 - 1:
                    st.skips.append(h)
            return h
    """

    depth: int

    def run_blocks(self, h: torch.Tensor, start: int, stop: int, state: Any) -> torch.Tensor: ...


@dataclass
class SkipCacheReport:
    """What one sampling run did (SkipCache.report())."""

    steps: int = 0
    full_steps: int = 0
    cached_steps: int = 0
    blocks_run: int = 0
    blocks_total: int = 0        # blocks an uncached run would have run
    unit: str = "blocks"         # what a block is (the model's cache_unit: Latte "block pairs")
    flops_run: float = 0.0       # estimated, when the model gives block_flops
    flops_total: float = 0.0
    checks: int = 0              # adaptive mode: cache_delta decisions (host syncs)
    deltas: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per step: "full" / "cached"

    @property
    def flops_saved(self) -> float:
        return self.flops_total - self.flops_run

    @property
    def ideal_speedup(self) -> float:
        """Uncached / cached block count: the speedup if blocks were all the cost."""
        return self.blocks_total / self.blocks_run if self.blocks_run else 1.0

    def __str__(self) -> str:
        s = (f"{self.steps} steps: {self.full_steps} full, {self.cached_steps} cached; "
             f"{self.unit} {self.blocks_run}/{self.blocks_total} run (ideal {self.ideal_speedup:.2f}x)")
        if self.flops_total:
            s += f"; ~{_flop_str(self.flops_saved)} saved ({100 * self.flops_saved / self.flops_total:.0f}%)"
        if self.checks:
            s += f"; {self.checks} adaptive checks"
        return s


def _flop_str(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(f) >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


class SkipCache:
    """Skip-Cache for one sampling run at a time; see the module docstring.

    interval: N, a full step every N forward calls (adaptive mode: at the latest).
    branch:   K, the cached step runs blocks (units) 0..K-1 and depth-K..depth-1.
    start:    steps with t >= start are full (official DiT 1000: never for t < 1000;
              Latte 900).
    stop:     after a step with t <= stop the cache is dropped (official DiT 20).
    strict_stop: drop it after a step with t < stop instead (official Latte, stop 50).
    threshold: adaptive mode when set (see the module docstring).
    static:   keep the cached tensors in static buffers (CUDA graphs).
    """

    def __init__(self, interval: int = 2, branch: int = 4, start: float = 1000, stop: float = 20, *,
                 strict_stop: bool = False, threshold: float | None = None, static: bool = False,
                 schedule=None, reuse_outer: bool = False):
        interval, branch = checks.positive_int("interval", interval), checks.positive_int("branch", branch)
        threshold = checks.threshold(threshold)
        self.schedule = None
        if schedule is not None:
            from .schedule import as_schedule

            if threshold is not None or static:
                raise ValueError("schedule: a scheduled SkipCache takes no threshold and no static=True")
            self.schedule = as_schedule(schedule)
            branch = self.schedule.max_branch or 1  # the deepest K it uses (all full: none)
        self.reuse_outer = bool(reuse_outer)       # hybrid mode: cache/reuse.py
        if self.reuse_outer and (threshold is not None or static):
            raise ValueError("reuse_outer (the hybrid mode) takes no threshold and no static=True")
        # full steps keep every block's attention / MLP output (hybrid or reuse steps follow);
        # a schedule's only where a hybrid or reuse step reads them (CacheSchedule.keeping_steps)
        self._keeps_outputs = self.reuse_outer or (self.schedule is not None and self.schedule.needs_reuse)
        self._keeping = (None if self.reuse_outer or self.schedule is None
                         else self.schedule.keeping_steps)   # None: every full step keeps
        # full steps that hold on to the last full step's outputs (extrapolated reuse follows)
        self._holding = frozenset() if self.schedule is None else self.schedule.extrapolating_steps
        self._extrapolate = False                # the current reuse step extrapolates
        self._hybrid = self.reuse_outer          # the current cached step reuses its outer blocks' outputs
        self.interval, self.branch = interval, branch
        self._k = self.branch                   # K of the current step
        self.start, self.stop = checks.timestep_bound("start", start), checks.timestep_bound("stop", stop)
        self.strict_stop = bool(strict_stop)
        self.threshold = threshold
        self.static = static
        self._buf: torch.Tensor | None = None   # input of block depth-K at the last full step
        self._ref: torch.Tensor | None = None   # adaptive: shallow output at the last full step
        self._forced: str | None = None
        self._t = 0.0
        self._runs = RunTracker()
        self.reset()

    @classmethod
    def for_model(cls, model, **kwargs) -> "SkipCache":
        """A SkipCache with the model's official arguments (its `cache_defaults`,
        e.g. models.Latte: branch 1, start 900, stop 50, strict_stop), overridden by
        kwargs; a model without cache_defaults gets SkipCache's (official DiT)."""
        return cls(**{**getattr(model, "cache_defaults", {}), **kwargs})

    @property
    def adaptive(self) -> bool:
        return self.threshold is not None

    def __repr__(self) -> str:
        extra = ", strict_stop=True" if self.strict_stop else ""
        extra += f", threshold={self.threshold}" if self.adaptive else ""
        extra += ", static=True" if self.static else ""
        extra += ", reuse_outer=True" if self.reuse_outer else ""
        if self.schedule is not None:
            return f"SkipCache(schedule={self.schedule!r})"
        return (f"SkipCache(interval={self.interval}, branch={self.branch}, start={self.start}, "
                f"stop={self.stop}{extra})")

    # ---- per-run state ---------------------------------------------------------------
    def reset(self) -> None:
        """Starts a new sampling run: counter 0, nothing cached, a fresh report.
        Static buffers are kept for reuse (they are overwritten before being read)."""
        self._counter = 0
        self._valid = False
        self._cached_in_row = 0
        self._run_key: tuple | None = None
        self._next_t: float | None = None
        self._report = SkipCacheReport()
        self._runs.reset()
        if not self.static:
            self._buf = self._ref = None
        self._bufs: dict[int, torch.Tensor] = {}  # schedule: K -> input of block depth-K
        if self._keeps_outputs:
            from .reuse import OuterReuse

            self._reuse = OuterReuse()

    @contextlib.contextmanager
    def sampling_run(self) -> Iterator["SkipCache"]:
        """`with cache.sampling_run(): <the steps of one run>`: starts a run (reset)
        and ends it when left, normally or by an exception, so that the next forward
        starts a new one by itself (cache/runs.py: what the cache refuses outside one)."""
        self.reset()
        self._runs.open_scope()
        try:
            yield self
        finally:
            self._runs.close_scope()

    def report(self) -> SkipCacheReport:
        return self._report

    def next_timestep(self, t: float) -> None:
        """The timestep of the next forward, known on the host (the samplers call
        this); saves reading t from the device."""
        self._next_t = float(t)

    # ---- decisions (host only) -----------------------------------------------------------
    def _timestep(self, t) -> float:
        if self._next_t is not None:
            value, self._next_t = self._next_t, None
            return value
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0].item())  # the official code reads t[0]
        return float(t)

    def _plan(self, t: float) -> str:
        """FULL, CACHED, or (adaptive) 'check': run the shallow blocks, then decide."""
        self._k = self.branch
        self._hybrid = self.reuse_outer
        if self.schedule is not None:
            e = self.schedule.check_step(self._report.steps, t)
            self._k = e.branch or self.branch
            self._hybrid = self.reuse_outer or e.reuse_outer
            self._extrapolate = e.extrapolate
            return e.kind
        if not self._valid or t >= self.start:
            return FULL
        if self.adaptive:
            return FULL if self._cached_in_row >= self.interval - 1 else "check"
        return FULL if self._counter % self.interval == 0 else CACHED

    def _commit(self, kind: str, t: float, depth: int, flops: Sequence[float] | None,
                unit: str = "blocks") -> None:
        r, K = self._report, self._k
        r.unit = unit
        r.steps += 1
        r.kinds.append(kind)
        r.blocks_total += depth
        if flops is not None:
            r.flops_total += sum(flops)
        if kind == FULL:
            r.full_steps += 1
            r.blocks_run += depth
            if flops is not None:
                r.flops_run += sum(flops)
            self._valid = True
            self._cached_in_row = 0
        else:
            r.cached_steps += 1
            plain = kind == CACHED and not self._hybrid   # hybrid and reuse: no attention / MLP runs
            r.blocks_run += 2 * K if plain else 0
            if flops is not None and plain:
                r.flops_run += sum(flops[:K]) + sum(flops[depth - K:])
            self._cached_in_row += 1
        self._counter += 1
        if self.schedule is not None:
            pass  # the schedule alone decides
        elif t < self.stop if self.strict_stop else t <= self.stop:  # official: then drop the cache
            self._counter = 0
            self._valid = False
            self._cached_in_row = 0
            if not self.static:
                self._buf = self._ref = None

    def _check_model(self, model, h: torch.Tensor) -> None:
        depth = model.depth
        max_k = getattr(model, "max_branch", depth // 2)
        if self.schedule is not None and self.schedule.depth != depth:
            raise ValueError(f"cache schedule depth is {self.schedule.depth} {self.schedule.unit}, this model has "
                             f"depth {depth}: the schedule was made for another model")
        if self.branch > max_k:
            raise ValueError(f"SkipCache branch {self.branch} too large for this model "
                             f"(depth {depth}: at most {max_k})")
        key = (id(model), tuple(h.shape), h.dtype, h.device)
        if self._run_key is None:
            self._run_key = key
        elif key != self._run_key:
            _, shape, dtype, device = self._run_key
            if key[0] != self._run_key[0]:
                what = "another model"
            else:
                what = f"hidden states {tuple(h.shape)} {h.dtype} on {h.device}"
            raise ValueError(
                f"SkipCache: this sampling run started with hidden states {shape} {dtype} on {device} "
                f"and now gets {what} (a batch-size or resolution change inside one run); "
                "call cache.reset() (or use a new SkipCache) for each run")

    # ---- storage ------------------------------------------------------------------------
    def _keep(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if not self.static:
            setattr(self, name, h)
            return h
        buf = getattr(self, name)
        if buf is None or buf.shape != h.shape or buf.dtype != h.dtype or buf.device != h.device:
            if self._forced is not None:
                raise RuntimeError("SkipCache.capture: run one eager step of the same shape first, "
                                   "so that the static buffers exist before capture")
            buf = torch.empty_like(h, memory_format=torch.contiguous_format)
            setattr(self, name, buf)
        buf.copy_(h)
        return buf

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors the cache holds now (static mode: its static buffers)."""
        return {k: v for k, v in (("cached", self._buf), ("reference", self._ref)) if v is not None}

    # ---- the step --------------------------------------------------------------------------
    def run(self, model: SkipModel, h: torch.Tensor, state: Any, t) -> torch.Tensor:
        """Runs the blocks of one forward call (the model's forward calls this between
        its embedding and its output head) and returns the last block's output."""
        depth = model.depth
        kind = self._begin(model, h, t)
        K = self._k
        reusing = self._keeps_outputs and (kind == REUSE or self._hybrid or kind == FULL and (
            self._keeping is None or self._report.steps in self._keeping))
        if reusing:  # keep the outputs (full step) or reuse them
            i = self._report.steps
            self._reuse.attach(state, kind == FULL, step=i, hold_previous=i in self._holding,
                               extrapolate=kind == REUSE and self._extrapolate)
        elif self._keeps_outputs and kind == FULL:   # no step reads this one's: free the last ones
            self._reuse.clear()
        if kind == FULL:
            out = self._full(model, h, state, K, depth)
        elif kind == REUSE:  # FORA-style: every block on its kept attention / MLP outputs
            out = model.run_blocks(h, 0, depth, state)
        elif kind == CACHED:
            if (self._bufs.get(K) if self.schedule is not None else self._buf) is None:
                raise RuntimeError("SkipCache: a cached step with nothing cached (capture a full step first)")
            out = self._cached(model, h, state, K, depth)
        else:  # adaptive: decide after the shallow blocks
            s = model.run_blocks(h, 0, K, state)
            delta = ops.cache_delta(s, self._ref)
            if self._decide_adaptive(delta) == FULL:
                kind = FULL
                out = self._rest_full(model, s, state, K, depth)
            else:
                kind = CACHED
                out = model.run_blocks(self._buf, depth - K, depth, state)
        if reusing:
            self._reuse.detach(state)
        self._end(kind, model, h)
        return out

    # The host-side bookkeeping stays out of torch.compile's graphs: a compiled forward
    # breaks the graph there and specializes only on the step kind.
    @torch._dynamo.disable
    def _begin(self, model, h, t) -> str:
        if self._forced is not None:  # capture: a fixed path, no state change
            return self._forced
        tv = self._timestep(t)
        if self._runs.begin(tv, self._valid):  # a sampling_run() scope ended: a new run
            self.reset()
            self._runs.begin(tv, False)
        try:
            self._check_model(model, h)
        except ValueError:
            self._runs.end()
            raise
        self._t = tv
        return self._plan(self._t)

    @torch._dynamo.disable
    def _decide_adaptive(self, delta: torch.Tensor) -> str:
        d = float(delta)  # the step's one host sync
        self._report.checks += 1
        self._report.deltas.append(d)
        return FULL if d > self.threshold else CACHED

    @torch._dynamo.disable
    def _end(self, kind: str, model, h) -> None:
        if self._forced is not None:
            return
        self._runs.end()
        flops_fn = getattr(model, "block_flops", None)
        self._commit(kind, self._t, model.depth, flops_fn(h) if flops_fn is not None else None,
                     getattr(model, "cache_unit", "blocks"))

    def _full(self, model, h, state, K, depth):
        if self.schedule is not None:
            from .schedule import run_full_keeping

            out, self._bufs = run_full_keeping(model, h, state, self.schedule.used_branches)
            return out
        s = model.run_blocks(h, 0, K, state)
        return self._rest_full(model, s, state, K, depth)

    def _rest_full(self, model, s, state, K, depth):
        if self.adaptive:
            self._keep("_ref", s)
        h = model.run_blocks(s, K, depth - K, state)
        h = self._keep("_buf", h)
        return model.run_blocks(h, depth - K, depth, state)

    def _cached(self, model, h, state, K, depth):
        model.run_blocks(h, 0, K, state)  # pushes the fresh shallow skips
        buf = self._bufs[K] if self.schedule is not None else self._buf
        return model.run_blocks(buf, depth - K, depth, state)

    # ---- CUDA graphs -------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, kind: str) -> Iterator[None]:
        """Forward calls inside run the given path (FULL or CACHED) on the static
        buffers without touching the run's state: for torch.cuda.graph capture.
        Run one eager full step of the same shape first (it allocates the buffers)."""
        if kind not in (FULL, CACHED):
            raise ValueError(f"kind must be {FULL!r} or {CACHED!r}, got {kind!r}")
        if not self.static:
            raise RuntimeError("SkipCache.capture needs static=True")
        if self.adaptive:
            raise RuntimeError("adaptive mode decides inside the step; capture the interval mode")
        prev, self._forced = self._forced, kind
        try:
            yield
        finally:
            self._forced = prev

    def step(self, t: float, model: SkipModel) -> str:
        """For graph replay: decides the next step at timestep t (a host value),
        records it as if it ran, and returns FULL or CACHED: replay that graph."""
        if self.adaptive:
            raise RuntimeError("step() serves the interval mode; adaptive decisions need the device")
        if not self.static or self._buf is None:
            raise RuntimeError("step() replays captured graphs: needs static=True and captured buffers")
        t = float(t)
        if self._runs.begin(t, self._valid):
            self.reset()
            self._runs.begin(t, False)
        self._runs.end()
        kind = self._plan(t)
        flops_fn = getattr(model, "block_flops", None)
        flops = flops_fn(torch.empty(self._buf.shape, device="meta")) if flops_fn is not None else None
        self._commit(kind, t, model.depth, flops, getattr(model, "cache_unit", "blocks"))
        return kind
