"""Issue 16 (reliability): bad arguments, configs and checkpoint metadata get one
clear exception naming the argument; Skip-Cache refuses to mix sampling runs; a
patched model computes what the unpatched one does under autocast."""

import math

import pytest
import torch

from skipdit_fast.cache import SkipCache
from skipdit_fast.models import DiT, DiTConfig, Latte, LatteConfig

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- SkipCache arguments ----------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, match", [
    (dict(interval=math.nan), ValueError, "interval must be an integer >= 1, got nan"),
    (dict(interval=math.inf), ValueError, "interval must be an integer >= 1, got inf"),
    (dict(interval=None), TypeError, "interval must be an integer >= 1, got None"),
    (dict(interval=True), TypeError, "interval must be an integer >= 1, got True"),
    (dict(interval="2"), TypeError, "interval must be an integer"),
    (dict(interval=2.5), ValueError, "interval must be an integer"),
    (dict(branch=math.inf), ValueError, "branch must be an integer >= 1"),
    (dict(branch=None), TypeError, "branch must be an integer >= 1"),
    (dict(threshold="0.1"), TypeError, "threshold must be None or a number >= 0, got '0.1'"),
    (dict(threshold=math.nan), ValueError, "threshold must be None .* >= 0, got nan"),
    (dict(threshold=-1), ValueError, "threshold must be None .* >= 0, got -1"),
    (dict(threshold=True), TypeError, "threshold"),
    (dict(start="1000"), TypeError, "start must be a number"),
    (dict(stop=math.nan), ValueError, "stop must be a number"),
    (dict(start=None), TypeError, "start must be a number"),
])
def test_skip_cache_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        SkipCache(**kw)


def test_skip_cache_good_arguments_kept():
    c = SkipCache(interval=3.0, branch=2, start=math.inf, stop=-1, threshold=0)
    assert (c.interval, c.branch, c.threshold) == (3, 2, 0.0)
    assert type(c.interval) is int and c.start == math.inf


# ---- model configs -----------------------------------------------------------------------

SMALL = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10)


@pytest.mark.parametrize("cls", [DiTConfig, LatteConfig])
@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_heads=0), ValueError, "num_heads must be an integer >= 1, got 0"),
    (dict(depth=-2), ValueError, "depth must be an integer >= 1, got -2"),
    (dict(depth="2"), TypeError, "depth must be an integer"),
    (dict(depth=2.0), TypeError, "depth must be an integer"),
    (dict(input_size=9), ValueError, "input_size 9 .* must be a multiple of patch_size 2"),
    (dict(hidden_size=30, num_heads=4), ValueError, "hidden_size 30 must be a multiple of num_heads 4"),
    (dict(hidden_size=0), ValueError, "hidden_size must be an integer >= 1"),
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(mlp_ratio=math.nan), ValueError, "mlp_ratio"),
    (dict(mlp_ratio="4"), TypeError, "mlp_ratio"),
    (dict(skip=1), TypeError, "skip must be True or False"),
])
def test_config_fields(cls, kw, exc, match):
    with pytest.raises(exc, match=f"{cls.__name__}: {match}"):
        cls(**{**SMALL, **kw})


def test_latte_config_fields():
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        LatteConfig(**SMALL, num_frames=0)
    with pytest.raises(ValueError, match="extras must be 1 .* or 2"):
        LatteConfig(**SMALL, extras=3)


@pytest.mark.parametrize("image_size, exc", [(0, ValueError), (-16, ValueError), (256.0, TypeError)])
@pytest.mark.parametrize("cls", [DiT, Latte])
def test_from_name_image_size(cls, image_size, exc):
    with pytest.raises(exc, match="image_size must be an integer >= 1"):
        cls.from_name(f"{cls.__name__}-S/2", image_size=image_size)


def test_good_configs_still_build():
    DiT(DiTConfig(**SMALL, skip=True))
    Latte(LatteConfig(**{**SMALL, "depth": 4}, num_frames=2, extras=2, skip=True))
    assert DiTConfig.from_name("DiT-XL/2-skip", image_size=256).input_size == 32


# ---- checkpoint files and their metadata ------------------------------------------------------

def _safetensors(path, meta, tensors=(), pad_data=True):
    """A safetensors file written by hand: metadata and zero tensors {name: shape} (F32)."""
    import json
    import struct

    header, data = {"__metadata__": meta}, 0
    for name, shape in dict(tensors).items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [data, data + n]}
        data += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + (b"\0" * data if pad_data else b""))
    return path


def _meta(**fields):
    import json

    return {"model_config": json.dumps(fields), "model_class": "DiT"}


def test_small_file_claiming_a_huge_model_is_refused_before_allocating(tmp_path, monkeypatch):
    from skipdit_fast.models import CheckpointError
    from skipdit_fast.pretrained import load_pretrained

    built = []
    monkeypatch.setattr(DiT, "__init__", lambda self, cfg: built.append(cfg) or (_ for _ in ()).throw(AssertionError))
    huge = _safetensors(tmp_path / "huge.safetensors", _meta(depth=200, hidden_size=16384, num_heads=16),
                        {"x": (1,)})
    assert huge.stat().st_size < 400
    with pytest.raises(CheckpointError, match="depth 200 does not match the file, which holds 0 blocks"):
        load_pretrained(str(huge))
    # a header that lists a huge model's tensors in a 300-byte file: truncated, before any build
    lying = _safetensors(tmp_path / "lying.safetensors", _meta(depth=1, hidden_size=16384, num_heads=16),
                         {"blocks.0.mlp.fc1.weight": (65536, 16384)}, pad_data=False)
    with pytest.raises(CheckpointError, match="truncated: the header describes"):
        load_pretrained(str(lying))
    assert built == []


def test_metadata_must_describe_the_tensors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from skipdit_fast.models import CheckpointError
    from skipdit_fast.pretrained import load_pretrained, weights_path

    sd = load_file(str(weights_path("tiny-dit")))
    from safetensors import safe_open

    with safe_open(str(weights_path("tiny-dit")), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["model_config"])
    for field, value, match in [("hidden_size", 128, "hidden_size=128 needs x_embedder.proj.weight of size 128"),
                                ("input_size", 32, "input_size=32 needs pos_embed of size 256"),
                                ("depth", 200, "depth 200 does not match the file, which holds 12 blocks"),
                                ("num_classes", 1000, "num_classes=1000 needs y_embedder")]:
        p = tmp_path / f"{field}.safetensors"
        save_file(sd, str(p), metadata={**meta, "model_config": json.dumps({**cfg, field: value})})
        with pytest.raises(CheckpointError, match=match):
            load_pretrained(str(p))
    p = tmp_path / "heads.safetensors"  # the heads do not show in any shape: built, loaded, and it runs
    save_file(sd, str(p), metadata={**meta, "model_config": json.dumps({**cfg, "num_heads": 8})})
    assert load_pretrained(str(p)).config.num_heads == 8


@pytest.mark.parametrize("meta, match", [
    ({"model_config": "{not json"}, "model_config is not JSON"),
    ({"model_config": "[1, 2]"}, "model_config must be a JSON object of DiTConfig fields, got a list"),
    (_meta(depth="2", hidden_size=32, num_heads=2), "model_config: DiTConfig: depth must be an integer"),
    (_meta(depth=2, hidden_size=32, num_heads=0), "num_heads must be an integer >= 1, got 0"),
    (_meta(depth=-2, hidden_size=32, num_heads=2), "depth must be an integer >= 1, got -2"),
    (_meta(depth=2, foo=1), "fields DiTConfig does not know: 'foo'"),
    ({"model_config": "{}", "model_class": "Unet"}, "unknown model_class 'Unet'"),
    ({}, "no model_config"),
])
def test_malformed_metadata(tmp_path, meta, match):
    from skipdit_fast.models import CheckpointError
    from skipdit_fast.pretrained import load_pretrained

    p = _safetensors(tmp_path / "m.safetensors", meta, {"x": (1,)})
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(str(p))


def test_bad_files(tmp_path):
    import shutil

    from skipdit_fast.models import CheckpointError, load_checkpoint
    from skipdit_fast.pretrained import load_pretrained, weights_path

    empty = tmp_path / "e.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        load_checkpoint(empty)
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        load_pretrained(str(tmp_path / "e.safetensors"))
    src = weights_path("tiny-dit").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src[: len(src) // 2])
    for load in (load_checkpoint, lambda p: load_pretrained(str(p))):
        with pytest.raises(CheckpointError, match="truncated"):
            load(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 300)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_pretrained(str(junk))
    pt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(100)}, pt)
    pt.write_bytes(pt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a loadable .pt checkpoint"):
        load_checkpoint(pt)
    caps = tmp_path / "W.SAFETENSORS"
    shutil.copy(weights_path("tiny-dit"), caps)
    assert len(load_checkpoint(caps)) == len(load_checkpoint(weights_path("tiny-dit")))
    assert isinstance(load_pretrained(str(caps)), DiT)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
