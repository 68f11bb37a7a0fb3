"""The models that ship with the package (trained by `make train-default`, weights in
skipdit_fast/weights/): their configs, training data, files and loader. Layer: above
models and data, below the applications (demo, train) and the benchmarks.

Two pairs, each the same config but the long skips, trained with the same seed,
steps and batches: the image pair (tiny DiT / Skip-DiT on scikit-learn's digits) and
the video pair (tiny Latte / Latte-skip on moving digits, data.moving_digits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import MODEL_CLASSES, DiTConfig, LatteConfig, load_checkpoint
from .models.checkpoint import safetensors_header
from .models.metadata import check_config_against, config_from_metadata

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# The shipped tiny image models: same everything but the long skips.
TINY = dict(depth=12, hidden_size=64, num_heads=4, patch_size=2, input_size=16, in_channels=1,
            num_classes=10, learn_sigma=True, mlp_ratio=4.0)
MODELS = {"tiny-dit": DiTConfig(**TINY, skip=False), "tiny-skipdit": DiTConfig(**TINY, skip=True)}

# The shipped tiny video models: 8 frames of 16x16x1 moving digits, class-conditional,
# 6 spatial/temporal pairs of the image models' blocks, patch 4 (16 tokens per frame,
# 128 per clip: trains in minutes on 2 cores); same everything but the long skips.
TINY_VIDEO = dict(depth=12, hidden_size=64, num_heads=4, patch_size=4, input_size=16, in_channels=1,
                  num_frames=8, extras=2, num_classes=10, learn_sigma=True, mlp_ratio=4.0)
VIDEO_MODELS = {"tiny-latte": LatteConfig(**TINY_VIDEO, skip=False),
                "tiny-latte-skip": LatteConfig(**TINY_VIDEO, skip=True)}

SHIPPED = {**MODELS, **VIDEO_MODELS}
# kind -> (vanilla, with long skips)
PAIRS = {"image": ("tiny-dit", "tiny-skipdit"), "video": ("tiny-latte", "tiny-latte-skip")}
_CLASS_NAMES = {cls.__name__: (cfg_cls, cls) for cfg_cls, cls in MODEL_CLASSES.items()}


def model_config(name: str):
    try:
        return SHIPPED[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SHIPPED)}") from None


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def training_data(config) -> tuple[torch.Tensor, torch.Tensor]:
    """The data a shipped config is trained on: digits at the config's latent size
    for a DiTConfig, moving digits (its frames and canvas) for a LatteConfig."""
    if isinstance(config, LatteConfig):
        from .data.moving_digits import moving_digits

        return moving_digits(config.num_frames, config.input_size)
    from .data.digits import digits

    return digits(config.input_size)


def config_metadata(config) -> dict[str, str]:
    """What load_pretrained needs in a safetensors file's metadata."""
    from dataclasses import asdict

    return {"model_config": json.dumps(asdict(config)), "model_class": MODEL_CLASSES[type(config)].__name__}


def load_pretrained(name_or_path: str = "tiny-skipdit", device=None, dtype=torch.float32):
    """A model from safetensors written by Trainer.export: a shipped name
    ('tiny-skipdit', 'tiny-dit', 'tiny-latte-skip', 'tiny-latte') or a path. Strict:
    every key must match the config stored with the weights (model_class DiT when
    the metadata does not say). The metadata is checked against the file's header
    before the model is built (models.metadata): malformed metadata, a config that
    does not describe the file's tensors, or a truncated or corrupt file is a
    CheckpointError naming the field, never an allocation the file cannot fill."""
    path = Path(name_or_path)
    if name_or_path in SHIPPED:
        path = weights_path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `make train-default` to train the shipped models")
    # everything about the model is checked against the file's header before it is built
    meta, shapes = safetensors_header(path)
    config, cls = config_from_metadata(path, meta, _CLASS_NAMES)
    check_config_against(path, config, cls, shapes)
    model = cls(config)
    model.load_state_dict_strict(load_checkpoint(path))
    return model.to(device=device, dtype=dtype).eval()
