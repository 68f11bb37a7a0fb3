"""What the applications share: the device / dtype arguments, a progress bar, atomic
file writing, PNG and GIF writing (no imaging library needed), MP4 through the
optional imageio-ffmpeg, and image / video grids."""

from __future__ import annotations

import math
import os
import struct
import sys
import time
import zlib
from typing import TYPE_CHECKING

from ..files import atomic_path, write_atomic

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


class Progress:
    """A small progress bar on stderr (redrawn in place on a terminal, every 10% otherwise):
    done/total, the rate in `unit`s per second and, with eta, the time left at that rate."""

    def __init__(self, label: str, enabled: bool = True, stream=None, unit: str = "it", eta: bool = False):
        self.label, self.enabled, self.unit, self.eta = label, enabled, unit, eta
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
        line = f"{self.label} [{bar}] {done}/{total} {rate:.2f} {self.unit}/s"
        if self.eta and 0 < done < total and rate > 0:
            line += f", ETA {_duration((total - done) / rate)}"
        self.stream.write(("\r" + line if self.tty else line + "\n") + ("\n" if self.tty and done == total else ""))
        self.stream.flush()


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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


def make_grid(images: torch.Tensor, pad: int = 2, cols: int | None = None) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> uint8 [H', W', 3], `cols` per row (default
    ceil(sqrt(N))), image k in row k // cols."""
    import torch

    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y0:y0 + h, x0:x0 + w] = images[k]
    return (grid.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous()


def video_grid(videos: torch.Tensor, cols: int | None = None, scale: int = 1, pad: int = 2) -> torch.Tensor:
    """videos [N, F, C, H, W] in [0, 1] (C = 1 grey or 3 RGB) -> the frames of a grid
    video, uint8 [F, H', W', 3]: frame f shows frame f of every video, video k in
    row k // cols (make_grid), each pixel `scale` x `scale`."""
    import torch

    if videos.dim() != 5 or videos.shape[2] not in (1, 3):
        raise ValueError(f"videos must be [N, F, C, H, W] with C = 1 or 3, got shape {list(videos.shape)}")
    v = videos.float()
    if scale > 1:
        v = v.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    v = v.expand(-1, -1, 3, -1, -1)
    return torch.stack([make_grid(v[:, f], pad, cols) for f in range(v.shape[1])])


def _lzw(indices: bytes, min_code_size: int = 8) -> bytes:
    """GIF's variable-length LZW code stream of palette indices (clear code first,
    a clear whenever the 4096-entry table is full, end code last)."""
    clear, end = 1 << min_code_size, (1 << min_code_size) + 1
    out = bytearray()
    acc = nbits = 0
    size, nxt, table = min_code_size + 1, end + 1, {}

    def emit(code: int) -> None:
        nonlocal acc, nbits
        acc |= code << nbits
        nbits += size
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8

    emit(clear)
    code = indices[0]
    for b in indices[1:]:
        key = (code << 8) | b
        hit = table.get(key)
        if hit is not None:
            code = hit
            continue
        emit(code)
        if nxt < 4096:
            table[key] = nxt
            nxt += 1
            if nxt > (1 << size) and size < 12:
                size += 1
        else:
            emit(clear)
            size, nxt, table = min_code_size + 1, end + 1, {}
        code = b
    emit(code)
    emit(end)
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def _gif_palette(frames: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """(palette indices uint8 [F, H, W], 256-entry RGB palette): 256 grey levels,
    exact, when every pixel is grey; else a fixed 3-3-2 bit RGB palette."""
    import torch

    if bool((frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()):
        return frames[..., 0].contiguous(), bytes(v for i in range(256) for v in (i, i, i))
    f = frames.to(torch.int32)
    idx = ((f[..., 0] >> 5) << 5) | ((f[..., 1] >> 5) << 2) | (f[..., 2] >> 6)
    pal = bytes(v for i in range(256) for v in ((i >> 5) * 255 // 7, ((i >> 2) & 7) * 255 // 7, (i & 3) * 255 // 3))
    return idx.to(torch.uint8).contiguous(), pal


def gif_bytes(frames: torch.Tensor, fps: float = 8.0, loop: int = 0) -> bytes:
    """An animated GIF89a of uint8 RGB frames [F, H, W, 3], looping (`loop` = 0:
    forever), one frame every 1/fps s (GIF counts in 1/100 s)."""
    import torch

    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
        raise ValueError(f"gif_bytes wants uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    n, h, w, _ = frames.shape
    if not (0 < h < 65536 and 0 < w < 65536 and n > 0):
        raise ValueError(f"GIF frames must be 1..65535 pixels per side, got {h}x{w} ({n} frames)")
    idx, palette = _gif_palette(frames)
    delay = max(1, round(100 / fps))
    parts = [b"GIF89a", struct.pack("<HHBBB", w, h, 0xF7, 0, 0), palette,
             b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", loop) + b"\x00"]
    for k in range(n):
        data = _lzw(idx[k].numpy().tobytes())
        blocks = b"".join(bytes([len(data[i:i + 255])]) + data[i:i + 255] for i in range(0, len(data), 255))
        parts += [b"\x21\xf9\x04\x04" + struct.pack("<H", delay) + b"\x00\x00",
                  b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0), b"\x08", blocks, b"\x00"]
    parts.append(b"\x3b")
    return b"".join(parts)


def _write_mp4(path: str, frames: torch.Tensor, fps: float) -> None:
    import torch

    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise ImportError("writing .mp4 needs imageio-ffmpeg (pip install 'skipdit-fast[video]'); "
                          "or write a .gif") from e
    n, h, w, _ = frames.shape
    # yuv420p needs even sides: pad with white
    even = torch.full((n, h + h % 2, w + w % 2, 3), 255, dtype=torch.uint8)
    even[:, :h, :w] = frames
    with atomic_path(path, suffix=".mp4") as tmp:
        gen = imageio_ffmpeg.write_frames(tmp, (even.shape[2], even.shape[1]), fps=fps, macro_block_size=1,
                                          pix_fmt_out="yuv420p", quality=9)
        gen.send(None)
        for f in even:
            gen.send(f.contiguous().numpy().tobytes())
        gen.close()


VIDEO_FORMATS = (".gif", ".mp4")


def write_video(path: str, frames: torch.Tensor, fps: float = 8.0) -> None:
    """Writes uint8 RGB frames [F, H, W, 3] as .gif (no imaging library needed) or
    .mp4 (needs the optional imageio-ffmpeg: pip install 'skipdit-fast[video]'),
    through a temporary file and a rename."""
    import torch

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gif":
        write_atomic(path, gif_bytes(frames, fps))
    elif ext == ".mp4":
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
            raise ValueError(f"write_video wants uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        _write_mp4(path, frames, fps)
    else:
        raise ValueError(f"video files are {' or '.join(VIDEO_FORMATS)}, got {path!r}")
