"""Models: DiT and Skip-DiT (dit.py), Latte and Latte-skip (latte.py) over shared
layers (layers.py), checkpoint files (checkpoint.py). Layer: above skipdit_fast.ops
(the blocks call its ops), below the cache engine, samplers and integrations; imports
only skipdit_fast.ops. A model takes a Skip-Cache as a forward argument and never
imports the cache package.

    model = from_name("Latte-XL/2-skip", extras=2, num_classes=101)   # or "DiT-XL/2-skip"
    model = from_config(LatteConfig(...))                            # DiTConfig -> DiT, ...
"""

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_safetensors
from .dit import PATCHES, SIZES, DiT, DiTConfig, dit_names
from .latte import Latte, LatteConfig, latte_names
from .layers import sincos_pos_embed

# config class -> model class, for from_config and the shipped models' metadata
MODEL_CLASSES = {DiTConfig: DiT, LatteConfig: Latte}
FAMILIES = {"dit": dit_names, "latte": latte_names}


def model_names(family: str | None = None) -> list[str]:
    """Every model name from_name knows ('DiT-XL/2-skip', 'Latte-S/4', ...), or those
    of one family ('dit', 'latte')."""
    if family is None:
        return [n for names in FAMILIES.values() for n in names()]
    try:
        return FAMILIES[family]()
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}") from None


def from_name(name: str, image_size: int = 256, **overrides):
    """A DiT / Skip-DiT ('DiT-...') or Latte / Latte-skip ('Latte-...') by name."""
    cls = Latte if name.startswith("Latte") else DiT
    return cls.from_name(name, image_size, **overrides)


def from_config(config):
    """The model of a config (DiTConfig -> DiT, LatteConfig -> Latte)."""
    try:
        return MODEL_CLASSES[type(config)](config)
    except KeyError:
        raise TypeError(f"not a model config: {type(config).__name__}") from None


__all__ = ["FAMILIES", "MODEL_CLASSES", "PATCHES", "SIZES", "CheckpointError", "DiT", "DiTConfig", "Latte",
           "LatteConfig", "check_state_dict", "dit_names", "from_config", "from_name", "latte_names",
           "load_checkpoint", "model_names", "save_safetensors", "sincos_pos_embed"]
