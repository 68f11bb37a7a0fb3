"""The models that ship with the package (trained by `make train-default`, weights in
skipdit_fast/weights/): their configs, files and loader. Layer: above models,
below the applications (demo, train) and the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import DiT, DiTConfig, load_checkpoint

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# The shipped tiny models: same everything but the long skips.
TINY = dict(depth=12, hidden_size=64, num_heads=4, patch_size=2, input_size=16, in_channels=1,
            num_classes=10, learn_sigma=True, mlp_ratio=4.0)
MODELS = {"tiny-dit": DiTConfig(**TINY, skip=False), "tiny-skipdit": DiTConfig(**TINY, skip=True)}


def model_config(name: str) -> DiTConfig:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def load_pretrained(name_or_path: str = "tiny-skipdit", device=None, dtype=torch.float32) -> DiT:
    """A model from safetensors written by Trainer.export: a shipped name
    ('tiny-skipdit', 'tiny-dit') or a path. Strict: every key must match the config
    stored with the weights."""
    from safetensors import safe_open

    path = Path(name_or_path)
    if name_or_path in MODELS:
        path = weights_path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `make train-default` to train the shipped models")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "model_config" not in meta:
        raise ValueError(f"{path}: no model_config in the safetensors metadata (not written by `skipdit-fast train`)")
    model = DiT(DiTConfig(**json.loads(meta["model_config"])))
    model.load_state_dict_strict(load_checkpoint(path))
    return model.to(device=device, dtype=dtype).eval()
