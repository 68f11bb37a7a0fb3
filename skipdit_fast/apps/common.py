"""What the applications share: the device / dtype arguments, a progress bar, atomic
file writing, PNG and GIF writing (no imaging library needed), MP4 through the
optional imageio-ffmpeg, and image / video grids."""

from __future__ import annotations

import argparse
import math
import os
import re
import struct
import sys
import tempfile
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

# DDPM training timesteps of every model here (sampling.Diffusion's default): the most
# sampling steps there can be
TRAINING_TIMESTEPS = 1000


class UsageError(Exception):
    """A problem with the command line found after parsing (a model that cannot do
    what was asked, an output that cannot be written, a file that is not what its
    argument says): cli.main prints it as one line, `skipdit-fast CMD: error: ...`,
    and exits 1. The message names the argument and says what to do."""


# ---- argparse type= helpers: a bad value is argparse's one-line
# `error: argument --x: ...` (exit 2), before any work starts

def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def int_range(lo: int | None = None, hi: int | None = None):
    """type=: an integer in lo..hi (either end open when None)."""
    def parse(text: str) -> int:
        v = _number(text, int)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            want = (f"in {lo}..{hi}" if lo is not None and hi is not None
                    else f">= {lo}" if lo is not None else f"<= {hi}")
            raise argparse.ArgumentTypeError(f"must be an integer {want}, got {v}")
        return v
    parse.__name__ = "integer"   # argparse names the type in `invalid <name> value`
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
steps_int = int_range(1, TRAINING_TIMESTEPS)   # sampling steps: 1..the training timesteps
seed_int = int_range(0, 2 ** 64 - 1)           # a seed torch.Generator.manual_seed takes


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """type=: a finite float >= lo (> lo with lo_open) and <= hi."""
    def parse(text: str) -> float:
        v = _number(text, float)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {v}")
        return v
    parse.__name__ = "number"
    return parse


finite_float = float_range()
nonneg_float = float_range(0.0)
positive_float = float_range(0.0, lo_open=True)

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_arg(text: str) -> str:
    """type= of --device: auto, cpu, cuda or cuda:N, and a CUDA device must exist here
    (torch is imported only to check a cuda device)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or auto, got {text!r}")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device here (torch.cuda.is_available() is "
                                             "False); use --device cpu or auto")
        n = torch.cuda.device_count()
        if ":" in text and int(text.split(":")[1]) >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return text


device_arg.__name__ = "device"


def device_from_arg(name: str) -> torch.device:
    """--device: cpu, cuda, cuda:N, or auto (the GPU when there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_arg(name))


def check_branch(model, branch: int | None, flag: str, name: str = "this model") -> None:
    """UsageError unless Skip-Cache branch K fits the model (the cache itself finds
    out only at the first step of the run)."""
    if branch is None:
        return
    max_k = getattr(model, "max_branch", model.depth // 2)
    if branch > max_k:
        raise UsageError(f"{flag} {branch}: too large for {name} (depth {model.depth}: at most {max_k})")


# ---- checks of files, before the work

def _probe_dir(folder: str, flag: str, path: str) -> None:
    """UsageError unless a file can be created in folder (tried: permissions alone do
    not say it, e.g. for root or on a read-only mount)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".skipdit-fast-probe-")
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_file(path: str, flag: str = "--out") -> None:
    """UsageError unless `path` can be written: its folder exists and takes a new
    file, and path is not a folder. Called before the work, so that a long run does
    not end in an error."""
    path = os.fspath(path)
    if not path:
        raise UsageError(f"{flag}: empty path")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist (create it first)")
    _probe_dir(folder, flag, path)


def check_output_dir(path: str, flag: str = "--out-dir") -> None:
    """Creates folder `path` (and its parents) and checks that it takes files:
    UsageError if not."""
    path = os.fspath(path)
    if not path:
        raise UsageError(f"{flag}: empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, ...
        raise UsageError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    _probe_dir(path, flag, path)


def check_input_file(path: str, flag: str) -> None:
    """UsageError unless `path` is an existing, non-empty file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path}: the file is empty")


def read_checkpoint(path: str, flag: str = "--ckpt") -> dict:
    """models.load_checkpoint(path) for a file named on the command line: a missing,
    empty, truncated or corrupt file is a UsageError that names the flag and the file
    (torch.load / safetensors say it with EOFError, UnpicklingError, RuntimeError or
    SafetensorError; only the file read is inside the try)."""
    import pickle

    from ..models import CheckpointError, load_checkpoint

    check_input_file(path, flag)
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"{flag} {e}") from None
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError) as e:
        raise UsageError(f"{flag} {path}: not a readable checkpoint, truncated or corrupt "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise UsageError(f"{flag} {path}: not a readable .safetensors file, truncated or corrupt "
                             f"({_first_line(e)})") from None
        raise


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


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
