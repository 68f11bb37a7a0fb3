"""A small digit classifier trained on the shipped models' data (skipdit_fast.data.
digits) that scores generated samples without a download: its accuracy on them (does
a sample of class c look like a c?) and its penultimate features for the Frechet
distance (an FID on digits, metrics.frechet_distance). The same network trained on
the frames of moving digits (fit_frame_classifier) scores the video models' frames.

    clf = DigitClassifier.fit(seed=0) # ~98% on its held-out split, a few s on 2 cores
    clf.accuracy(samples, labels)
    frechet_distance(clf.features(samples), clf.features(x))
    frame_accuracy(DigitClassifier.load(frame_classifier_path()), videos, labels)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import NUM_CLASSES, digits, split

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
    def fit(cls, size: int = 16, seed: int = 0, epochs: int = 20, batch_size: int = 64,
            data: tuple | None = None) -> "DigitClassifier":
        """Trains on 80% of the digits (fixed split), reports accuracy on the rest.
        Light augmentation (random shifts by up to one 8x8 pixel, small noise) so that
        it judges shapes, not exact pixel positions. Deterministic for a seed.
        data: (x_train, y_train, x_test, y_test) images [N, 1, size, size] instead of
        the digits (fit_frame_classifier: frames of moving digits)."""
        if data is None:
            x, y = digits(size)
            tr, te = split(len(x), seed=0)
            xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
        else:
            xtr, ytr, xte, yte = data
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _Net(size)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        shift = size // 8
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
        clf.test_accuracy = clf.accuracy(xte, yte)
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
    from ..pretrained import WEIGHTS_DIR

    return WEIGHTS_DIR / "digit-classifier.safetensors"


FRAME_CLASSIFIER = "frame-classifier.safetensors"


def frame_classifier_path():
    from ..pretrained import WEIGHTS_DIR

    return WEIGHTS_DIR / FRAME_CLASSIFIER


def fit_frame_classifier(config, seed: int = 0, epochs: int = 4) -> DigitClassifier:
    """The classifier of the video models' frames: the same CNN trained on the frames
    of moving digits (data.moving_digits at the config's frames and canvas) of the
    train split of the digits; test_accuracy on the frames of the other clips."""
    from ..data.moving_digits import clip_split, frames, moving_digits

    x, y = moving_digits(config.num_frames, config.input_size)
    tr, te = clip_split()
    per_clip = config.num_frames
    data = (frames(x[tr]), y[tr].repeat_interleave(per_clip), frames(x[te]), y[te].repeat_interleave(per_clip))
    return DigitClassifier.fit(config.input_size, seed=seed, epochs=epochs, data=data)


def frame_accuracy(clf: DigitClassifier, videos: torch.Tensor, labels) -> float:
    """Share of the frames of videos [N, F, 1, H, W] (in [-1, 1]) that clf labels as
    their video's class."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    return clf.accuracy(videos.reshape(-1, *videos.shape[2:]), labels.repeat_interleave(videos.shape[1]))


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Samples as images: videos [N, F, C, H, W] -> their frames [N * F, C, H, W]."""
    from ..data.moving_digits import frames

    return frames(x) if x.dim() == 5 else x


def scores(clf: DigitClassifier, real_feats: np.ndarray, x: torch.Tensor, labels=None) -> dict:
    """Classifier accuracy (every frame of a video against its video's label; None
    without labels) and the Frechet distance of the classifier features of the
    samples (all frames) to real_feats (metrics.frechet_distance): the scores of
    bench/fidelity.py and `skipdit-fast evaluate`. x in [-1, 1]."""
    from .metrics import frechet_distance

    per = x.shape[1] if x.dim() == 5 else 1
    imgs = as_images(x)
    acc = None if labels is None else clf.accuracy(imgs, torch.as_tensor(labels).repeat_interleave(per))
    return {"accuracy": acc, "fd": frechet_distance(clf.features(imgs), real_feats)}


def real_samples(video: bool, num_frames: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The real data the shipped models learnt, as samples in [-1, 1] with labels:
    the 1797 digits [N, 1, size, size], or the moving-digit clips
    [N, num_frames, 1, size, size] (data.moving_digits)."""
    if video:
        from ..data.moving_digits import moving_digits

        return moving_digits(num_frames, size)
    return digits(size)
