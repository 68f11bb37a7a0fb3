"""What the applications share: the device / dtype arguments, a progress bar, PNG
writing (no imaging library needed) and image grids."""

from __future__ import annotations

import math
import os
import struct
import sys
import time
import zlib

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported in the functions that use it: the subcommands' add_arguments (and
# so `skipdit-fast CMD --help`) must not pay for it.

# --dtype names -> torch dtype attribute
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def device_from_arg(name: str) -> torch.device:
    """--device: cpu, cuda, cuda:N, or auto (the GPU when there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """--dtype, or bf16 on CUDA and fp32 on the CPU."""
    import torch

    if name:
        return getattr(torch, DTYPES[name])
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def write_atomic(path: str, data: bytes) -> None:
    """Writes data to path through a temporary file in the same folder and a rename, so
    that a crash never leaves a partial file under the name the user asked for."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Progress:
    """A small progress bar on stderr (redrawn in place on a terminal, every 10% otherwise)."""

    def __init__(self, label: str, enabled: bool = True, stream=None):
        self.label, self.enabled = label, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        decile = 10 * done // total
        if not self.tty and decile == self.last_decile and done != total:
            return
        self.last_decile = decile
        el = time.perf_counter() - self.t0
        bar = "#" * (30 * done // total) + "." * (30 - 30 * done // total)
        rate = done / el if el > 0 else 0.0
        line = f"{self.label} [{bar}] {done}/{total} {rate:.2f} it/s"
        self.stream.write(("\r" + line if self.tty else line + "\n") + ("\n" if self.tty and done == total else ""))
        self.stream.flush()


def write_png(path: str, rgb: torch.Tensor) -> None:
    """Writes an 8-bit RGB PNG from a uint8 tensor [H, W, 3] (no imaging library needed)."""
    import torch

    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[2] != 3:
        raise ValueError("write_png wants a uint8 tensor [H, W, 3]")
    h, w, _ = rgb.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rgb.reshape(h, w * 3)], dim=1)  # filter 0
    raw = rows.contiguous().numpy().tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    write_atomic(path, png)


def make_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> uint8 [H', W', 3], ceil(sqrt(N)) per row."""
    import torch

    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y0:y0 + h, x0:x0 + w] = images[k]
    return (grid.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous()
