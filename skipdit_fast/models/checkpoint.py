"""Checkpoint files of the models: official .pt / .pth state dicts (weights only) and
.safetensors, strict key checking with messages that name the keys."""

from __future__ import annotations

import os

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint does not match the model (the message names the keys)."""


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """A state dict from .pt/.pth (torch.load with weights_only=True; a DiT training
    checkpoint's 'ema' entry is taken) or .safetensors."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("loading .safetensors needs the 'safetensors' package") from e
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
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
