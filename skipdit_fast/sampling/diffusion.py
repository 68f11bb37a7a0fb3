"""DiT's Gaussian diffusion for sampling: the linear beta schedule over 1000 training
steps, respaced to the sampling steps the way DiT respaces it, with DDPM (learned-range
variance, as DiT's p_mean_variance) and DDIM steps, classifier-free guidance with the
official convention (model.forward_with_cfg), and a Skip-Cache per run.

    result = sample(model, labels=[207, 360], steps=250, cfg_scale=4.0,
                    cache=SkipCache(interval=2, branch=4), seed=0)
    result.latents      # [2, 4, 32, 32]; a Latte: [2, 16, 4, 32, 32] (B, F, C, H, W)
    result.report       # what the cache did in this run
    sample(latte_sky, num_samples=2, steps=250, cache=dict(interval=3))   # unconditional video

Coefficients are computed in float64 (numpy) and applied to float32 latents; the
model runs in its own dtype. Everything random comes from one seeded generator, so a
run on the CPU is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..cache import SkipCache, SkipCacheReport, checks, runs

CHANNELS = -3  # the channel dim of latents [..., C, H, W]: images [B, C, H, W], videos [B, F, C, H, W]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT / ADM linear schedule, scaled so that 1000 steps span 1e-4 .. 0.02."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The `count` training timesteps DiT keeps when respacing to `count` steps
    (evenly strided, rounded with Python's round, first 0 and last num_timesteps-1)."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    taken, cur = [], 0.0
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


class Diffusion:
    """The respaced diffusion: index i = 0..steps-1 of the sampling schedule, where
    `timesteps[i]` is the training timestep the model sees."""

    def __init__(self, steps: int = 250, num_train_timesteps: int = 1000, learn_sigma: bool = True):
        base = np.cumprod(1.0 - linear_betas(num_train_timesteps))
        self.timesteps = space_timesteps(num_train_timesteps, steps)
        betas, last = [], 1.0
        for t in self.timesteps:
            betas.append(1.0 - base[t] / last)
            last = base[t]
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        self.steps = len(b)
        self.learn_sigma = learn_sigma
        self.betas = b
        self.log_betas = np.log(b)
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_ac, self.sqrt_1m_ac = np.sqrt(ac), np.sqrt(1.0 - ac)
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1.0)
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 \
            else np.log(np.maximum(post_var, 1e-20))
        self.post_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.post_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        # fixed-large variance (DiT without learn_sigma)
        self.fixed_log_var = np.log(np.append(post_var[1], b[1:])) if len(b) > 1 else np.log(b)
        self._tensors: dict = {}

    def coef(self, name: str, i, like: torch.Tensor):
        """Coefficient array `name` at step i: a float for an int i; for a LongTensor i
        [B] (one step per sample, the training loss) a tensor [B, 1, ...] in like's
        dtype and device, gathered in float64 first."""
        if not isinstance(i, torch.Tensor):
            return float(getattr(self, name)[i])
        key = (name, like.device)
        table = self._tensors.get(key)
        if table is None:
            table = self._tensors[key] = torch.from_numpy(np.asarray(getattr(self, name))).to(like.device)
        return table[i].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def p_mean_variance(self, out: torch.Tensor, x: torch.Tensor, i):
        """(mean, log_variance, pred_x0, eps) of p(x_{i-1} | x_i) from the model output
        (DiT / Latte: eps, then the variance interpolation values in [-1, 1] if
        learn_sigma). Latents are [..., C, H, W] with the channels at dim -3: images
        [B, C, H, W], videos [B, F, C, H, W]. i: the step (int), or one step per
        sample (LongTensor [B])."""
        C = x.shape[CHANNELS]
        if self.learn_sigma:
            if out.shape[CHANNELS] != 2 * C:
                raise ValueError(f"learn_sigma model output must have {2 * C} channels, got {out.shape[CHANNELS]}")
            eps, v = out.split(C, dim=CHANNELS)
            frac = (v + 1) / 2
            log_var = frac * self.coef("log_betas", i, x) + (1 - frac) * self.coef("post_log_var_clipped", i, x)
        else:
            eps = out.narrow(CHANNELS, 0, C)
            fixed = self.coef("fixed_log_var", i, x)
            log_var = torch.full_like(x, fixed) if isinstance(fixed, float) else fixed.expand_as(x).clone()
        x0 = self.coef("sqrt_recip_ac", i, x) * x - self.coef("sqrt_recipm1_ac", i, x) * eps
        mean = self.coef("post_coef1", i, x) * x0 + self.coef("post_coef2", i, x) * x
        return mean, log_var, x0, eps

    def q_sample(self, x0: torch.Tensor, i, noise: torch.Tensor) -> torch.Tensor:
        """x_i = sqrt(ab_i) x0 + sqrt(1 - ab_i) noise."""
        return self.coef("sqrt_ac", i, x0) * x0 + self.coef("sqrt_1m_ac", i, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x: torch.Tensor, i):
        """(mean, clipped log variance) of the true posterior q(x_{i-1} | x_i, x0)."""
        mean = self.coef("post_coef1", i, x0) * x0 + self.coef("post_coef2", i, x0) * x
        return mean, self.coef("post_log_var_clipped", i, x0)

    def ddpm_step(self, out, x, i: int, generator: torch.Generator | None):
        mean, log_var, _, _ = self.p_mean_variance(out, x, i)
        if i == 0:
            return mean
        noise = randn(x.shape, generator, x.device, x.dtype)
        return mean + torch.exp(0.5 * log_var) * noise

    def ddim_step(self, out, x, i: int, generator: torch.Generator | None, eta: float = 0.0):
        _, _, x0, _ = self.p_mean_variance(out, x, i)
        eps = (float(self.sqrt_recip_ac[i]) * x - x0) / float(self.sqrt_recipm1_ac[i])
        ab, ab_prev = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
        x_next = float(np.sqrt(ab_prev)) * x0 + float(np.sqrt(1 - ab_prev - sigma ** 2)) * eps
        if i == 0 or sigma == 0:
            return x_next
        noise = randn(x.shape, generator, x.device, x.dtype)
        return x_next + float(sigma) * noise


def randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` from one generator, or from one generator per
    sample (a list: row j of shape[0] from generator j % len, so that the doubled CFG
    batch repeats each sample's noise); a sample's noise then depends on its generator
    only, not on the other samples of its batch."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    rows = torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return rows.repeat(shape[0] // len(generator), *([1] * (len(shape) - 1)))


@dataclass
class SampleResult:
    latents: torch.Tensor                # [n, *latent_shape], float32: [n, C, L, L] or [n, F, C, L, L]
    seconds: float
    report: SkipCacheReport | None       # the cache's report for this run, if any


class Sampleable(Protocol):
    """What sample() needs from a model (models.DiT, models.Latte, cache.baselines.
    CachedModel, or an adapter): parameters (their device and dtype are the run's),
    `config` with `latent_shape` (one sample's latents, channels at dim -3: (C, H, W)
    or (F, C, H, W)), `learn_sigma`, `class_conditional` and `num_classes` (the null
    label for CFG), `forward(x, t, y, cache=None)` (y None for an unconditional
    model) and, for cfg_scale > 1, `forward_with_cfg(x, t, y, cfg_scale, cache=None)`."""

    config: Any

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, cache=None) -> torch.Tensor: ...


@torch.no_grad()
def sample(model: Sampleable, labels: Sequence[int] | torch.Tensor | None = None, *, num_samples: int | None = None,
           steps: int = 250, sampler: str = "ddpm", cfg_scale: float = 1.0, cache: SkipCache | dict | None = None,
           seed: int = 0, eta: float = 0.0, noise: torch.Tensor | None = None,
           seeds: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None) -> SampleResult:
    """Samples latents with a DiT / Skip-DiT (images [n, C, L, L]) or a Latte /
    Latte-skip (videos [n, F, C, L, L]); see Sampleable for other models.

    labels: one class per sample for a class-conditional model; an unconditional
    model (Latte extras=1) takes num_samples instead. sampler: 'ddpm' (DiT's default)
    or 'ddim' (eta, default 0). cfg_scale > 1 uses classifier-free guidance the
    official way: the latents are doubled, the second half labelled with the null
    class, one forward_with_cfg per step. cache: a SkipCache (reset here: its state is
    this run's; a ForaCache works the same way with CachedModel) or a dict of
    SkipCache arguments (a new one is made with SkipCache.for_model: the model's
    official thresholds, overridden by the dict). noise: the initial latents
    [n, *latent_shape] (else drawn from the seeded generator). seeds: one seed per
    sample instead of `seed` (a generator each, for its initial noise and its noise at
    every step: sample j's result does not depend on the other samples' seeds).
    progress(done, total) is called after each step.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    cfg_scale, eta = checks.finite("cfg_scale", cfg_scale), checks.unit_interval("eta", eta)
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    conditional = getattr(cfg, "class_conditional", True)
    if conditional:
        if labels is None:
            raise ValueError("this model is class-conditional: pass labels (one class per sample)")
        y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if ((y < 0) | (y > cfg.num_classes)).any():
            raise ValueError(f"labels must be in 0..{cfg.num_classes} ({cfg.num_classes} = null label)")
        if num_samples is not None and num_samples != y.numel():
            raise ValueError(f"num_samples {num_samples} != {y.numel()} labels")
        n = y.numel()
    else:
        if labels is not None:
            raise ValueError("this model is unconditional: pass num_samples, not labels")
        if cfg_scale > 1.0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        if num_samples is None or int(num_samples) < 1:
            raise ValueError(f"an unconditional model needs num_samples >= 1, got {num_samples}")
        y, n = None, int(num_samples)
    if seeds is None:
        gen = torch.Generator(device=device).manual_seed(checks.seed("seed", seed))
    else:
        if len(seeds) != n:
            raise ValueError(f"seeds must have one seed per sample ({n}), got {len(seeds)}")
        gen = [torch.Generator(device=device).manual_seed(checks.seed(f"seeds[{j}]", s)) for j, s in enumerate(seeds)]
    shape = (n, *cfg.latent_shape)
    if noise is None:
        x = randn(shape, gen, device)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=torch.float32)
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        x = torch.cat([x, x])
        y = torch.cat([y, torch.full_like(y, cfg.num_classes)])
    if isinstance(cache, dict):
        cache = SkipCache.for_model(model, **cache)
    elif cache is not None:
        cache.reset()
    diffusion = Diffusion(steps, learn_sigma=cfg.learn_sigma)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    run = runs.scope(cache)  # one sampling run, ended when sample() returns or raises (cache/runs.py)
    try:
        for k, i in enumerate(reversed(range(diffusion.steps))):
            tv = diffusion.timesteps[i]
            t = torch.full((x.shape[0],), tv, dtype=torch.long, device=device)
            if cache is not None:
                cache.next_timestep(tv)
            xin = x.to(dtype)
            if use_cfg:
                out = model.forward_with_cfg(xin, t, y, cfg_scale, cache=cache)
            else:
                out = model(xin, t, y, cache=cache)
            out = out.float()
            if sampler == "ddpm":
                x = diffusion.ddpm_step(out, x, i, gen)
            else:
                x = diffusion.ddim_step(out, x, i, gen, eta)
            if progress is not None:
                progress(k + 1, diffusion.steps)
    finally:
        run.close()
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return SampleResult(x[:n], seconds, cache.report() if cache is not None else None)
