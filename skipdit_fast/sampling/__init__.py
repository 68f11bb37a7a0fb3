"""Sampling: DiT's Gaussian diffusion (diffusion.py: schedule, respacing, DDPM / DDIM
steps, classifier-free guidance, `sample` with a Skip-Cache per run) and its training
loss (loss.py); sampling at scale: shards.py (shard plan, class schedule, per-sample
seeds, shard files, merge, manifest) and distributed.py (process group, failures that
end the job), imported where used (`skipdit-fast sample-many`). Layer: above models
and the cache engine, below integrations and applications; imports skipdit_fast.cache."""

from . import diffusion
from .diffusion import Diffusion, SampleResult, sample
from .loss import DiffusionLoss

__all__ = ["Diffusion", "DiffusionLoss", "SampleResult", "diffusion", "sample"]
