"""The data of the shipped tiny models: scikit-learn's handwritten digits
(`sklearn.datasets.load_digits`: 1797 images, 8x8, 16 grey levels, 10 classes; the
data ships inside scikit-learn, nothing is downloaded).

    x, y = digits(size=16)            # [1797, 1, 16, 16] in [-1, 1], [1797] labels
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a requirement
        raise ImportError("the digits data comes from scikit-learn (pip install scikit-learn)") from e
    return load_digits()


def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as a one-channel "latent" [N, 1, size, size], float32 in
    [-1, 1] (grey level g in 0..16 -> g / 8 - 1), bilinearly upsampled from 8x8
    (size 8: as they are), and their labels [N] (int64, 0..9)."""
    if size % 8:
        raise ValueError(f"size must be a multiple of 8, got {size}")
    d = _load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous(), torch.from_numpy(d.target.astype(np.int64))


def split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/test split of n items: (train indices, test indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * test_fraction))
    return perm[k:].sort().values, perm[:k].sort().values


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1] (clamped)."""
    return ((x.float() + 1) / 2).clamp(0, 1)
