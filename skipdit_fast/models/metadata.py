"""A model config from a checkpoint's metadata, checked before anything is built:
the metadata must be a JSON object of the config's fields, each field passes the
config checks (models.config_checks), and the config must describe the tensors the
file holds (their shapes in the safetensors header), so that a small file whose
metadata claims a huge model is refused before a byte of it is allocated. Every
failure is one CheckpointError naming the file and the field."""

from __future__ import annotations

import dataclasses
import json

import torch

from .checkpoint import CheckpointError, check_state_dict


def config_from_metadata(path, meta: dict[str, str], classes: dict[str, tuple[type, type]]):
    """(config class instance, model class) from the metadata `model_config` (JSON of
    the config's fields) and `model_class` (a key of classes; DiT when absent)."""
    if "model_config" not in meta:
        raise CheckpointError(f"{path}: no model_config in the safetensors metadata "
                              "(not written by `skipdit-fast train`)")
    kind = meta.get("model_class", "DiT")
    if kind not in classes:
        raise CheckpointError(f"{path}: unknown model_class {kind!r} in the metadata; known: {', '.join(classes)}")
    cfg_cls, cls = classes[kind]
    try:
        fields = json.loads(meta["model_config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata model_config is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: metadata model_config must be a JSON object of {cfg_cls.__name__} fields, "
                              f"got a {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{path}: metadata model_config has fields {cfg_cls.__name__} does not know: "
                              f"{', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")
    try:
        config = cfg_cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata model_config: {e}") from None
    return config, cls


# config field -> (tensor, dim) whose size states it: checked before the model is
# built on the meta device, so that its construction (numpy position tables) is bounded
def _stated(config) -> list[tuple[str, str, int, int]]:
    D, p = config.hidden_size, config.patch_size
    out = [("hidden_size", "x_embedder.proj.weight", 0, D),
           ("in_channels", "x_embedder.proj.weight", 1, config.in_channels),
           ("patch_size", "x_embedder.proj.weight", 2, p),
           ("input_size", "pos_embed", 1, config.num_patches),
           ("mlp_ratio", "blocks.0.mlp.fc1.weight", 0, int(D * config.mlp_ratio))]
    if config.class_conditional:
        out.append(("num_classes", "y_embedder.embedding_table.weight", 0, config.num_classes + 1))
    if hasattr(config, "num_frames"):
        out.append(("num_frames", "temp_embed", 1, config.num_frames))
    return out


def check_config_against(path, config, cls, shapes: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError unless the model of config has exactly the file's tensors
    (names and shapes), checked without allocating the model."""
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if len(blocks) != config.depth:
        raise CheckpointError(f"{path}: metadata model_config depth {config.depth} does not match the file, "
                              f"which holds {len(blocks)} blocks")
    for field, name, dim, want in _stated(config):
        shape = shapes.get(name)
        if shape is None or len(shape) <= dim:
            raise CheckpointError(f"{path}: the file has no tensor {name!r} (shape {shape}) to check metadata "
                                  f"model_config {field} against: not a {cls.__name__} checkpoint")
        if shape[dim] != want:
            raise CheckpointError(f"{path}: metadata model_config {field}={getattr(config, field)!r} needs "
                                  f"{name} of size {want} in dim {dim}, the file has {list(shape)}")
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
