"""enable_skip_cache / disable_skip_cache: drive a model's block loop with the
SkipCache engine (skipdit_fast.cache): skipdit_fast.models.DiT / Latte with long skips, and
through diffusers.py diffusers' HunyuanDiT2DModel and pipelines holding one. A
sampling run starts when the pipeline sets its timesteps, or, for a bare model, when
a forward's timestep is above the previous one's, or after a forward that raised (an
interrupted run); what else would mix two runs the engine refuses (cache/runs.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..cache import SkipCache
from .common import _CACHE, _unwrap, uses_diffusers

class _CacheHook:
    """What enable_skip_cache() leaves on a model: its SkipCache and the run
    boundaries (a pipeline's set_timesteps, or a timestep above the previous one)."""

    def __init__(self, cache: SkipCache, auto_reset: bool, kind: str):
        self.cache, self.auto_reset, self.kind = cache, auto_reset, kind
        self.last_t: float | None = None
        self.scheduler = None

    def reset(self) -> None:
        self.cache.reset()
        self.last_t = None

    @torch._dynamo.disable
    def before_step(self, t) -> None:
        if isinstance(t, torch.Tensor):
            tv = float(t.reshape(-1)[0].item())
        else:
            tv = float(t)
        if self.auto_reset and (self.last_t is not None and tv > self.last_t or self.cache._runs.interrupted()):
            self.cache.reset()  # a new run: a timestep above the last one, or the last forward raised
        self.last_t = tv
        self.cache.next_timestep(tv)


class _ResetOnSetTimesteps:
    """Instance-level scheduler.set_timesteps: the original, then a cache reset."""

    def __init__(self, scheduler, hook: _CacheHook):
        self.scheduler, self.hook = scheduler, hook

    def __call__(self, *args, **kwargs):
        out = type(self.scheduler).set_timesteps(self.scheduler, *args, **kwargs)
        self.hook.reset()
        return out


def _dit_cached_forward(self, x, t, y=None, cache=None):
    hook = self.__dict__[_CACHE]
    if cache is None:
        cache = hook.cache
        hook.before_step(t)
    return type(self).forward(self, x, t, y, cache=cache)


def enable_skip_cache(target, interval: int = 2, branch: int | None = None, *, start: float | None = None,
                      stop: float | None = None, strict_stop: bool | None = None, threshold: float | None = None,
                      cache: SkipCache | None = None, auto_reset: bool = True, schedule=None) -> SkipCache:
    """Turns Skip-Cache on for a model with long skips and returns its SkipCache
    (read .report() after a run). target: skipdit_fast.models.DiT or Latte
    (skip=True), a diffusers HunyuanDiT2DModel, or a pipeline holding one as
    .transformer (HunyuanDiTPipeline; its classifier-free guidance runs both halves in
    one forward, so each half keeps its own cached features). interval / branch /
    start / stop / strict_stop / threshold: SkipCache's arguments, those left at None
    the model's official ones (SkipCache.for_model: DiT branch 4, start 1000, stop 20;
    Latte branch 1 pair, start 900, stop 50 strict), or pass a ready `cache`. schedule:
    a CacheSchedule or a schedule file (skipdit-fast calibrate): per step full,
    cached or hybrid with its K, or reuse (hybrid and reuse steps need a model whose
    blocks run through BlockState.block: ours), in place of interval / branch / start / stop. auto_reset: a
    forward whose timestep is above the previous one, or the first after a forward
    that raised, starts a new sampling run (a pipeline's set_timesteps always does);
    a run that would reuse another's features otherwise is a SkipCacheRunError.
    Enabling again replaces the cache."""
    pipe = None if isinstance(target, nn.Module) else target
    model = _unwrap(target)
    if cache is not None and schedule is not None:
        raise ValueError("enable_skip_cache: pass a schedule or a ready cache, not both")
    if cache is None and schedule is not None:
        cache = SkipCache.for_model(model, schedule=schedule)
    if cache is None:
        given = dict(branch=branch, start=start, stop=stop, strict_stop=strict_stop)
        cache = SkipCache.for_model(model, interval=interval, threshold=threshold,
                                    **{k: v for k, v in given.items() if v is not None})
    if _CACHE in model.__dict__:
        disable_skip_cache(target)
    from .. import models

    if isinstance(model, (models.DiT, models.Latte)):
        kind = type(model).__name__
        if not model.config.skip:
            raise ValueError(f"Skip-Cache needs long skips: this {kind} has none (a '-skip' model has)")
        if cache.branch > model.depth // 2:
            raise ValueError(f"SkipCache branch {cache.branch} too large for this model "
                             f"(depth {model.depth} {getattr(model, 'cache_unit', 'blocks')}: at most "
                             f"{model.depth // 2})")
        hook = _CacheHook(cache, auto_reset, kind)
        model.__dict__[_CACHE] = hook
        model.__dict__["forward"] = functools.partial(_dit_cached_forward, model)
    elif uses_diffusers(model):
        from . import diffusers as diff

        hook = _CacheHook(cache, auto_reset, type(model).__name__)
        diff.enable_cache(model, hook)  # raises with the reason when it cannot
    else:
        raise ValueError(
            f"enable_skip_cache: {type(model).__name__} is not a model whose block loop skipdit_fast can "
            "drive (skipdit_fast.models.DiT / Latte with skip=True, diffusers HunyuanDiT2DModel or a pipeline "
            "holding one as .transformer)")
    sched = getattr(pipe, "scheduler", None) if pipe is not None else None
    if sched is not None and callable(getattr(sched, "set_timesteps", None)) and "set_timesteps" not in vars(sched):
        sched.__dict__["set_timesteps"] = _ResetOnSetTimesteps(sched, hook)
        hook.scheduler = sched
    return cache


def disable_skip_cache(target) -> SkipCache | None:
    """Turns Skip-Cache off again (the model's own forward back); returns the cache
    that was enabled (its last report stays readable), or None if none was."""
    model = _unwrap(target)
    hook = model.__dict__.pop(_CACHE, None)
    if hook is None:
        return None
    model.__dict__.pop("forward", None)
    sched = hook.scheduler
    if sched is not None and isinstance(vars(sched).get("set_timesteps"), _ResetOnSetTimesteps):
        del sched.__dict__["set_timesteps"]
    return hook.cache
