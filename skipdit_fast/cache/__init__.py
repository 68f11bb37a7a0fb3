"""Skip-Cache: the engine that reuses a long-skip model's deep features across
sampling steps (engine.py), and the caching baselines it is compared with
(baselines.py: FORA-style reuse). Layer: above skipdit_fast.ops and models (the
baselines reuse the blocks' pieces), below the samplers and integrations."""

from .engine import CACHED, FULL, SkipCache, SkipCacheReport, SkipModel
from .runs import SkipCacheRunError

__all__ = ["CACHED", "FULL", "SkipCache", "SkipCacheReport", "SkipCacheRunError", "SkipModel"]
