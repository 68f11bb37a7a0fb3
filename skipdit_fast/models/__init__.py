"""Models: DiT and Skip-DiT (dit.py) over shared layers (layers.py), checkpoint files
(checkpoint.py). Layer: above skipdit_fast.ops (the blocks call its ops), below the
cache engine, samplers and integrations; imports only skipdit_fast.ops. A model
takes a Skip-Cache as a forward argument and never imports the cache package."""

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_safetensors
from .dit import PATCHES, SIZES, DiT, DiTConfig, model_names
from .layers import sincos_pos_embed

__all__ = ["PATCHES", "SIZES", "CheckpointError", "DiT", "DiTConfig", "check_state_dict", "load_checkpoint",
           "model_names", "save_safetensors", "sincos_pos_embed"]
