"""Sampling-run boundaries of a SkipCache: what keeps the deep features of one run
out of another. A run is what reset() starts; its features are only valid for the
steps of that run. The engine (engine.py) asks a RunTracker at the start and end of
every forward, and the tracker refuses, with a SkipCacheRunError, a forward that
would reuse features across runs, rather than guess:

- an explicit scope, `with cache.sampling_run(): ...` (skipdit_fast.sampling.sample
  uses it): it starts a run, and once it is left (normally or by an exception) the
  next forward starts a new run by itself;
- a forward that raised inside the engine (an interrupted run): the next forward
  outside a scope is refused until reset() (enable_skip_cache's hook resets instead:
  it owns the run boundaries of its model);
- the timestep schedule, while features are held: a timestep above the previous
  one (a new run's first step; the same timestep again is allowed: samplers such
  as Heun call it twice), or a step down more than JUMP times the largest step of
  the run so far (after at least two steps: e.g. a 50-step run, steps of 20,
  interrupted at t=800 and followed by an img2img-style run starting at t=300). A run that
  drops its features at `stop` (the official end of a run) may be followed by the
  next one without reset(), as in the official code;
- threads: a run belongs to the thread of its first forward; a forward from another
  thread before reset() is refused (a SkipCache holds one run's state: one cache
  per thread).

What cannot be seen is not refused: a new run whose first timestep continues the old
run's schedule plausibly (below its last, within JUMP of its steps) after an
interruption outside a forward, or a run whose first timestep equals the last one.
Use sampling_run() or reset() for each run.
"""

from __future__ import annotations

import contextlib
import threading

# a step down larger than JUMP x the largest step so far in the run is a new run; the
# respaced schedules DiT and diffusers use have near-uniform steps (ratios <= 2 from
# rounding), Karras-style ones change their step gradually; hand-made schedules that
# skip to the end (the tests': 550, 500, 30: 9.4x) stay below it
JUMP = 10.0


class SkipCacheRunError(RuntimeError):
    """A SkipCache was asked to mix two sampling runs (the message says why and what
    to do: reset() or a sampling_run() scope per run)."""


class RunTracker:
    """Run-boundary bookkeeping of one SkipCache (host only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.last_t: float | None = None
        self.max_step = 0.0
        self.steps_seen = 0
        self.owner: int | None = None
        self.in_forward = False      # between begin() and end(): set after a forward that raised
        self.closed = False          # a sampling_run() scope was left: the next forward starts a run
        self.scoped = False

    # ---- scope ----------------------------------------------------------------------
    def open_scope(self) -> None:
        self.scoped = True

    def close_scope(self) -> None:
        self.scoped = False
        self.closed = True

    def interrupted(self) -> bool:
        """Whether the last forward of the run raised before it finished."""
        return self.in_forward

    # ---- per forward ------------------------------------------------------------------
    def begin(self, t: float, holding: bool) -> bool:
        """At the start of a forward with timestep t; holding: the cache holds features
        of this run. True: a closed scope, the caller starts a new run (reset) and
        calls begin again; SkipCacheRunError when the forward would mix runs."""
        me = threading.get_ident()
        with self._lock:
            if self.closed:
                return True
            if self.owner is not None and self.owner != me:
                raise SkipCacheRunError(
                    f"SkipCache: a sampling run of thread {self.owner} is in progress and thread {me} calls a "
                    "forward with this cache; a SkipCache holds one run's state: use one SkipCache per thread "
                    "(or reset() it between runs of different threads)")
            if self.in_forward:
                self.in_forward = False
                self.owner = None
                raise SkipCacheRunError(
                    "SkipCache: the previous forward with this cache raised before it finished (an interrupted "
                    "run); its cached features are not to be reused: call cache.reset() (or use "
                    "`with cache.sampling_run():`) before the next sampling run")
            if holding and self.last_t is not None:
                if t > self.last_t:
                    raise SkipCacheRunError(
                        f"SkipCache: timestep {t:g} after {self.last_t:g} in one run: a new sampling run started "
                        "without cache.reset(), and the cache still holds the previous run's features; call "
                        "cache.reset() (or use `with cache.sampling_run():`) for each run")
                step = self.last_t - t
                if self.steps_seen >= 2 and step > JUMP * self.max_step:
                    raise SkipCacheRunError(
                        f"SkipCache: timestep {t:g} after {self.last_t:g}, a step of {step:g} where this run's "
                        f"steps were at most {self.max_step:g}: a new sampling run (e.g. after an interrupted "
                        "one) started without cache.reset(), and the cache still holds the previous run's "
                        "features; call cache.reset() (or use `with cache.sampling_run():`) for each run")
            if self.last_t is not None and t > self.last_t:  # nothing held: the next run, as officially
                self.max_step, self.steps_seen = 0.0, 0
            elif self.last_t is not None and t < self.last_t:
                self.max_step = max(self.max_step, self.last_t - t)
                self.steps_seen += 1
            self.last_t = t
            self.owner = me
            self.in_forward = True
            return False

    def end(self) -> None:
        self.in_forward = False


def scope(cache) -> contextlib.ExitStack:
    """The sampling_run() scope of a cache, entered (an ExitStack: close() leaves it);
    nothing for None or a cache without scopes (cache.baselines.ForaCache)."""
    stack = contextlib.ExitStack()
    if cache is not None and hasattr(cache, "sampling_run"):
        stack.enter_context(cache.sampling_run())
    return stack
