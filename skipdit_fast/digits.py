"""The data of the shipped tiny models: scikit-learn's handwritten digits
(`sklearn.datasets.load_digits`: 1797 images, 8x8, 16 grey levels, 10 classes; the
data ships inside scikit-learn, nothing is downloaded), and a small digit classifier
trained on the same data that scores generated samples without a download:
its accuracy on them (does a sample of class c look like a c?) and the Frechet
distance of its penultimate features (an FID on digits).

    x, y = digits(size=16)            # [1797, 1, 16, 16] in [-1, 1], [1797] labels
    clf = DigitClassifier.fit(seed=0) # ~98% on its held-out split, a few s on 2 cores
    clf.accuracy(samples, labels)
    frechet_distance(clf.features(samples), clf.features(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
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


class _Net(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * (size // 4) ** 2, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


@dataclass
class DigitClassifier:
    """A small CNN (2 conv + 2 linear) on [N, 1, size, size] digits in [-1, 1];
    `features` are its 64 penultimate (post-ReLU) activations."""

    net: _Net
    size: int
    test_accuracy: float  # on the held-out split of the real digits

    @classmethod
    def fit(cls, size: int = 16, seed: int = 0, epochs: int = 20, batch_size: int = 64) -> "DigitClassifier":
        """Trains on 80% of the digits (fixed split), reports accuracy on the rest.
        Light augmentation (random shifts by up to one 8x8 pixel, small noise) so that
        it judges shapes, not exact pixel positions. Deterministic for a seed."""
        x, y = digits(size)
        tr, te = split(len(x), seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _Net(size)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        shift = size // 8
        xtr, ytr = x[tr], y[tr]
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=g)
            for k in range(0, len(perm), batch_size):
                idx = perm[k:k + batch_size]
                xb = xtr[idx]
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                xb = xb + 0.1 * torch.randn(xb.shape, generator=g)
                loss = F.cross_entropy(net(xb), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        clf = cls(net, size, 0.0)
        clf.test_accuracy = clf.accuracy(x[te], y[te])
        return clf

    def save(self, path) -> None:
        from safetensors.torch import save_file

        meta = {"size": str(self.size), "test_accuracy": repr(self.test_accuracy)}
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path=None) -> "DigitClassifier":
        """The classifier saved by `save` (default: the one shipped in
        skipdit_fast/weights/, trained by `make train-default`)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = str(path or default_classifier_path())
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        size = int(meta.get("size", 16))
        net = _Net(size)
        net.load_state_dict(load_file(path), strict=True)
        net.eval()
        return cls(net, size, float(meta.get("test_accuracy", "nan")))

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, self.size, self.size):
            raise ValueError(f"expected digits [N, 1, {self.size}, {self.size}], got {tuple(x.shape)}")
        return x.detach().float().cpu().clamp(-1, 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._check(x)).argmax(1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.net.features(self._check(x)).double().numpy()

    def accuracy(self, x: torch.Tensor, labels) -> float:
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        return float((self.predict(x) == labels).float().mean())


def default_classifier_path():
    from pathlib import Path

    return Path(__file__).resolve().parent / "weights" / "digit-classifier.safetensors"


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


# ---------------------------------------------------------------------------------
# image agreement (cached vs uncached samples), on images in [0, 1]

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image sets in [0, 1] (one MSE over all
    pixels of all images; inf when identical)."""
    mse = float((a.double() - b.double()).square().mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


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
