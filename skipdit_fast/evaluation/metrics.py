"""Agreement and distribution metrics for generated samples: the Frechet distance of
two feature sets (FID's formula) and, for images in [0, 1], PSNR and SSIM (cached vs
uncached samples)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets
    [n, d] (FID's formula), with the matrix square root's trace taken as
    sum(sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))) (symmetric, so eigh is exact)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum()
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image sets in [0, 1] (one MSE over all
    pixels of all images; inf when identical)."""
    return psnr_from_mse(float((a.double() - b.double()).square().mean()))


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for a mean squared error of images in [0, 1] (inf for 0)."""
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity of two image sets [N, C, H, W] in [0, 1]: Gaussian
    window (7 px, sigma 1.5: the usual 11 px is most of a 16 px digit), K1 = 0.01,
    K2 = 0.03, data range 1, over the positions where the window fits."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a.square()
    sbb = blur(b * b) - mu_b.square()
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a.square() + mu_b.square() + c1) * (saa + sbb + c2))
    return float(s.mean())
