"""Sampling: DiT's Gaussian diffusion (diffusion.py: schedule, respacing, DDPM / DDIM
steps, classifier-free guidance, `sample` with a Skip-Cache per run) and its training
loss (loss.py). Layer: above models and the cache engine, below integrations and
applications; imports skipdit_fast.cache."""

from . import diffusion
from .diffusion import Diffusion, SampleResult, sample
from .loss import DiffusionLoss

__all__ = ["Diffusion", "DiffusionLoss", "SampleResult", "diffusion", "sample"]
