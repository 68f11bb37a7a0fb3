"""DiT's training loss on the samplers' schedule (diffusion.Diffusion with 1000 steps
is the unrespaced schedule): for x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps at a uniform
t, the MSE of the predicted eps, plus, with learn_sigma, DiT's variational bound term
(RESCALED_MSE, which is 1x for 1000 steps): the KL between the true posterior
q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t) whose mean is built from the
*frozen* eps prediction (so the VB term trains only the variance output), and at
t = 0 the discretized-Gaussian decoder NLL (bits per dimension). The posterior and the
model's p are Diffusion's own (one step per sample)."""

from __future__ import annotations

import math

import torch

from .diffusion import CHANNELS, Diffusion


class DiffusionLoss:
    """Per-sample DiT loss terms; coefficients in float64, gathered per sample and
    applied in float32. Latents [..., C, H, W] (images or videos, channels at dim -3);
    y None for an unconditional model."""

    def __init__(self, num_timesteps: int = 1000, learn_sigma: bool = True):
        self.diffusion = Diffusion(num_timesteps, num_timesteps, learn_sigma=learn_sigma)
        self.num_timesteps = self.diffusion.steps
        self.learn_sigma = learn_sigma

    def q_sample(self, x0, t, noise):
        return self.diffusion.q_sample(x0, t, noise)

    def __call__(self, model, x0, t, y, noise) -> dict[str, torch.Tensor]:
        """Per-sample terms [B]: 'loss', 'mse' and (learn_sigma) 'vb' in bits/dim."""
        xt = self.diffusion.q_sample(x0, t, noise)
        out = model(xt, t, y)
        C = x0.shape[CHANNELS]
        eps = out.narrow(CHANNELS, 0, C)
        dims = tuple(range(1, x0.dim()))
        mse = (eps.float() - noise).square().mean(dims)
        terms = {"mse": mse}
        if self.learn_sigma:
            v = out.narrow(CHANNELS, C, C).float()
            # the model's p(x_{t-1} | x_t) from the frozen eps: the VB term trains the variance only
            frozen = torch.cat([eps.detach().float(), v], CHANNELS)
            mean, log_var, _, _ = self.diffusion.p_mean_variance(frozen, xt, t)
            true_mean, true_log_var = self.diffusion.q_posterior(x0, xt, t)
            kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dims) / math.log(2.0)
            nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dims) / math.log(2.0)
            terms["vb"] = torch.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of data in [-1, 1] quantized to 256 bins under N(means, e^(2 log_scales)),
    the edge bins taking the tails (ADM / DiT)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    plus = inv_std * (centered + 1.0 / 255.0)
    minus = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus)
    log_one_minus_cdf_min = torch.special.log_ndtr(-minus)
    delta = (torch.special.ndtr(plus) - torch.special.ndtr(minus)).clamp_min(1e-12)
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(delta)))
