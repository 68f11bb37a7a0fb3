"""Checkpoint files of the models: official .pt / .pth state dicts (weights only) and
.safetensors, strict key checking with messages that name the keys."""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint does not match the model (the message names the keys)."""


SAFETENSORS = ".safetensors"
# a safetensors header is JSON of about 100 bytes per tensor: 100 MB holds a million
_MAX_HEADER = 100 << 20
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def is_safetensors(path) -> bool:
    """Whether a path names a .safetensors file (the extension in any case)."""
    return os.fspath(path).lower().endswith(SAFETENSORS)


def _size(path: str) -> int:
    size = os.path.getsize(path)  # FileNotFoundError / IsADirectoryError as they are
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    return size


def safetensors_header(path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {tensor name: shape}) of a .safetensors file, read from its header
    alone (nothing else of the file is read or allocated), with the header checked
    against the file: CheckpointError for a file that is not safetensors, a header
    that is not the JSON object of the format, or a file shorter than its header says
    (truncated)."""
    import json
    import struct

    path = os.fspath(path)
    size = _size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated: its header length {n} "
                                  f"does not fit in the file's {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is a {type(header).__name__}, "
                              "not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: the safetensors metadata must map names to strings")
    shapes, end = {}, 0
    for name, info in header.items():
        try:
            shape = tuple(info["shape"])
            lo, hi = info["data_offsets"]
            ok = (all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(lo, int)
                  and isinstance(hi, int) and 0 <= lo <= hi)
            nbytes = _ITEMSIZE.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: the safetensors header entry of {name!r} is malformed: {info!r}")
        if nbytes is not None and hi - lo != nbytes * _prod(shape):
            raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} {info['dtype']} should take "
                                  f"{nbytes * _prod(shape)} bytes, the header gives it {hi - lo}")
        shapes[name] = shape
        end = max(end, hi)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return meta, shapes


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """A state dict from .pt/.pth (torch.load with weights_only=True; a DiT training
    checkpoint's 'ema' entry is taken) or .safetensors (any case of the extension).
    CheckpointError for an empty, truncated or corrupt file."""
    path = os.fspath(path)
    if is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("loading .safetensors needs the 'safetensors' package") from e
        safetensors_header(path)  # a clear error for a bad or truncated file, before any allocation
        try:
            return load_file(path)
        except Exception as e:  # safetensors' own SafetensorError for what the header check missed
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    _size(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise CheckpointError(f"{path}: not a loadable .pt checkpoint (truncated, corrupt, or holding more than "
                              f"tensors): {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def save_safetensors(model_or_state_dict, path) -> None:
    from safetensors.torch import save_file

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.fspath(path))


class StrictLoading:
    """Strict loading of official-key weights, for the models (DiT, Latte)."""

    def load_state_dict_strict(self, state_dict) -> None:
        """Loads official-key weights; any missing, unexpected or mis-shaped key is a
        CheckpointError that names it. Values are cast to the model's dtype."""
        check_state_dict(self, state_dict)
        self.load_state_dict(state_dict, strict=True)

    def load_checkpoint(self, path):
        """Loads a .pt / .pth (weights only; a training checkpoint's 'ema' entry) or
        .safetensors file strictly; returns the model."""
        self.load_state_dict_strict(load_checkpoint(path))
        return self


def check_state_dict(model: nn.Module, state_dict) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)}, model {list(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return

    def listing(title, items):
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more

    msg = "checkpoint does not match the model"
    if missing:
        msg += listing("missing keys", missing)
    if unexpected:
        msg += listing("unexpected keys", unexpected)
    if shapes:
        msg += listing("mis-shaped keys", shapes)
    kind = type(model).__name__
    with_skips = getattr(model, "SKIP_NAME", f"{kind} with long skips")
    if any(k.startswith("skip_") for k in missing):
        msg += f"\n  (the checkpoint has no long-skip weights: a vanilla {kind}; use a name without '-skip')"
    elif any(k.startswith("skip_") for k in unexpected):
        msg += f"\n  (the checkpoint has long-skip weights: a {with_skips}; use a '-skip' model name)"
    label = "y_embedder.embedding_table.weight"
    if label in missing:
        msg += "\n  (the checkpoint has no label embedding: an unconditional model (Latte: extras=1))"
    elif label in unexpected:
        rows = state_dict[label].shape[0]
        msg += (f"\n  (the checkpoint is class-conditional with {rows - 1} classes + the null label "
                f"(Latte: extras=2, num_classes={rows - 1}))")
    elif label in state_dict and label in expected and state_dict[label].shape != expected[label].shape:
        msg += f"\n  (the checkpoint's label table has {state_dict[label].shape[0]} rows: num_classes + 1 null label)"
    if "temp_embed" in state_dict and "temp_embed" in expected and \
            state_dict["temp_embed"].shape != expected["temp_embed"].shape:
        msg += f"\n  (temp_embed has one row per frame: the checkpoint is for num_frames={state_dict['temp_embed'].shape[1]})"
    raise CheckpointError(msg)
