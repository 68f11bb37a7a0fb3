"""Checks of the model configs' fields (DiTConfig, LatteConfig): every field its type
and range, so that a bad config is one clear error when it is made (a ValueError or
TypeError naming the field and what was expected), not a ZeroDivisionError in a
constructor, nor a model that builds and computes something wrong (a latent side
that the patch size does not divide, a negative depth). Checkpoint metadata goes
through the same checks (skipdit_fast.pretrained)."""

from __future__ import annotations

import math
import numbers

# fields -> (kind, smallest value); "int" excludes bool
_INT_FIELDS = {"depth": 1, "hidden_size": 1, "num_heads": 1, "patch_size": 1, "input_size": 1, "in_channels": 1,
               "num_classes": 1, "num_frames": 1, "extras": 1}
_BOOL_FIELDS = ("learn_sigma", "skip")


def _name(config) -> str:
    return type(config).__name__


def check_int(where: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value}")


def check_config(config) -> None:
    """Raises TypeError / ValueError naming the first bad field of a DiTConfig /
    LatteConfig."""
    where = _name(config)
    fields = vars(config) if not hasattr(config, "__dataclass_fields__") else \
        {f: getattr(config, f) for f in config.__dataclass_fields__}
    for name, minimum in _INT_FIELDS.items():
        if name in fields:
            check_int(where, name, fields[name], minimum)
    for name in _BOOL_FIELDS:
        if name in fields and not isinstance(fields[name], bool):
            raise TypeError(f"{where}: {name} must be True or False, got {fields[name]!r}")
    r = fields.get("mlp_ratio")
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        raise TypeError(f"{where}: mlp_ratio must be a number > 0, got {r!r} ({type(r).__name__})")
    if not (math.isfinite(r) and r > 0) or int(fields["hidden_size"] * r) < 1:
        raise ValueError(f"{where}: mlp_ratio must be finite and > 0 (an MLP of at least one unit), got {r}")
    D, H = fields["hidden_size"], fields["num_heads"]
    if D % 4:
        raise ValueError(f"{where}: hidden_size must be a multiple of 4 (the 2-D sin-cos position embedding "
                         f"gives each axis D/2 channels of sines and cosines), got {D}")
    if D % H:
        raise ValueError(f"{where}: hidden_size {D} must be a multiple of num_heads {H}")
    L, p = fields["input_size"], fields["patch_size"]
    if L % p:
        raise ValueError(f"{where}: input_size {L} (the latent side) must be a multiple of patch_size {p}")
    if "extras" in fields and fields["extras"] not in (1, 2):
        raise ValueError(f"{where}: extras must be 1 (unconditional) or 2 (class-conditional), got {fields['extras']}")


def check_image_size(image_size) -> None:
    """from_name's image_size: pixels, a positive integer."""
    check_int("from_name", "image_size", image_size, 1)
