"""Moving digits, the video data of the shipped tiny Latte / Latte-skip: each of
scikit-learn's 1797 handwritten digits (8x8, 16 grey levels; nothing is downloaded)
slides across a larger dark canvas and bounces off its edges, `per_digit` clips per
digit with different starts and velocities.

    x, y = moving_digits()          # [3594, 8, 1, 16, 16] in [-1, 1], [3594] labels
    frames(x)                       # [3594 * 8, 1, 16, 16]: every frame as an image

A clip: the digit at its native 8x8 size, start position uniform on the canvas,
velocity (vx, vy) with each component in {-2, -1, 1, 2} pixels per frame; a
coordinate that would leave [0, canvas - 8] is reflected back (a bounce). Clips are
ordered digit-major (clip k shows digit k // per_digit), so a split of the digits
(digits.split) is a split of the clips. Everything is drawn from one seeded
generator: the same arguments give the same data.
"""

from __future__ import annotations

import torch

from .digits import NUM_CLASSES, _load_digits, split

__all__ = ["NUM_CLASSES", "clip_split", "frames", "moving_digits"]

DIGIT = 8  # the digits' native size


def _bounce(p: torch.Tensor, r: int) -> torch.Tensor:
    """Positions p reflected into [0, r] (period 2r)."""
    if r == 0:
        return torch.zeros_like(p)
    p = p.remainder(2 * r)
    return torch.where(p > r, 2 * r - p, p)


def moving_digits(num_frames: int = 8, canvas: int = 16, per_digit: int = 2,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips [N, num_frames, 1, canvas, canvas], float32 in [-1, 1] (grey level g in
    0..16 -> g / 8 - 1, background -1), and their labels [N] (int64, 0..9),
    N = 1797 * per_digit."""
    if num_frames < 1 or per_digit < 1:
        raise ValueError(f"num_frames and per_digit must be >= 1, got {num_frames} and {per_digit}")
    if canvas < DIGIT:
        raise ValueError(f"canvas must be at least the digit size {DIGIT}, got {canvas}")
    d = _load_digits()
    img = torch.from_numpy(d.images).float() / 8.0 - 1.0           # [1797, 8, 8]
    labels = torch.from_numpy(d.target).long()
    n = len(img) * per_digit
    g = torch.Generator().manual_seed(seed)
    r = canvas - DIGIT
    start = torch.randint(0, r + 1, (n, 2), generator=g)
    speeds = torch.tensor([-2, -1, 1, 2])
    vel = speeds[torch.randint(0, 4, (n, 2), generator=g)]
    f = torch.arange(num_frames)
    pos = _bounce(start[:, None, :] + vel[:, None, :] * f[None, :, None], r)  # [n, F, 2] (row, col)
    x = torch.full((n, num_frames, canvas, canvas), -1.0)
    rows = pos[..., 0, None] + torch.arange(DIGIT)                  # [n, F, 8]
    cols = pos[..., 1, None] + torch.arange(DIGIT)
    src = img.repeat_interleave(per_digit, 0)[:, None].expand(n, num_frames, DIGIT, DIGIT)
    ni = torch.arange(n)[:, None, None, None]
    fi = f[None, :, None, None]
    x[ni, fi, rows[..., :, None], cols[..., None, :]] = src
    return x[:, :, None].contiguous(), labels.repeat_interleave(per_digit)


def frames(x: torch.Tensor) -> torch.Tensor:
    """Clips [N, F, C, H, W] -> their frames as images [N * F, C, H, W] (a view)."""
    if x.dim() != 5:
        raise ValueError(f"expected clips [N, F, C, H, W], got shape {list(x.shape)}")
    return x.reshape(-1, *x.shape[2:])


def clip_split(per_digit: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The train / test clips of moving_digits(per_digit=...): those of the digits in
    digits.split's train / test split (no digit on both sides)."""
    tr, te = split(len(_load_digits().images), seed=seed)
    expand = lambda idx: (idx[:, None] * per_digit + torch.arange(per_digit)).reshape(-1)  # noqa: E731
    return expand(tr), expand(te)
