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
