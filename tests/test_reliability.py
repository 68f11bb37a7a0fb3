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
    (dict(hidden_size=36, num_heads=8), ValueError, "hidden_size 36 must be a multiple of num_heads 8"),
    (dict(hidden_size=30, num_heads=2), ValueError, "hidden_size must be a multiple of 4 .* got 30"),
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


# ---- Skip-Cache sampling runs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def skip_dit():
    torch.manual_seed(0)
    return DiT(DiTConfig(depth=4, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10,
                         skip=True)).eval()


def _steps(model, cache, timesteps, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([1])
    with torch.no_grad():
        return [model(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([tv]), y, cache=cache)
                for tv in timesteps]


SCHEDULE = list(range(980, -1, -20))  # a 50-step run: steps of 20


def test_new_run_without_reset_is_refused(skip_dit):
    from skipdit_fast.cache import SkipCacheRunError

    cache = SkipCache(interval=2, branch=1)
    _steps(skip_dit, cache, SCHEDULE[:10])           # interrupted between steps, at t=800
    with pytest.raises(SkipCacheRunError, match="timestep 980 after 800 .* without cache.reset"):
        _steps(skip_dit, cache, SCHEDULE[:3])        # the next run from the top
    cache.reset()
    _steps(skip_dit, cache, SCHEDULE[:10])
    # an img2img-style run starting below the interrupted run's last timestep
    with pytest.raises(SkipCacheRunError, match="timestep 300 after 800, a step of 500 where this run's steps"):
        _steps(skip_dit, cache, [300, 280])
    # a run that ended past `stop` dropped its features: the next needs no reset (official)
    cache.reset()
    _steps(skip_dit, cache, SCHEDULE)
    _steps(skip_dit, cache, SCHEDULE[:4])
    # the same timestep twice (Heun-style samplers) stays one run
    cache.reset()
    _steps(skip_dit, cache, [980, 960, 960, 940, 940])
    assert cache.report().steps == 5


def test_exception_inside_a_forward_ends_the_run(skip_dit):
    from skipdit_fast.cache import SkipCacheRunError

    cache = SkipCache(interval=2, branch=1)
    _steps(skip_dit, cache, SCHEDULE[:4])
    block = skip_dit.blocks[3]
    handle = block.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            _steps(skip_dit, cache, [SCHEDULE[4]])
    finally:
        handle.remove()
    with pytest.raises(SkipCacheRunError, match="previous forward with this cache raised"):
        _steps(skip_dit, cache, [SCHEDULE[5]])       # even one that continues the schedule
    cache.reset()
    want = _steps(skip_dit, SkipCache(interval=2, branch=1), SCHEDULE[:4], seed=1)
    got = _steps(skip_dit, cache, SCHEDULE[:4], seed=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sampling_run_scope(skip_dit):
    cache = SkipCache(interval=2, branch=1)
    want = _steps(skip_dit, SkipCache(interval=2, branch=1), SCHEDULE[:6], seed=2)
    with pytest.raises(RuntimeError, match="stop here"), cache.sampling_run():
        _steps(skip_dit, cache, SCHEDULE[:10])
        raise RuntimeError("stop here")
    # the scope ended the run: the next forward starts a new one, whatever its timestep
    got = _steps(skip_dit, cache, SCHEDULE[:6], seed=2)
    assert cache.report().steps == 6 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_sample_ends_its_run_even_when_interrupted(skip_dit):
    from skipdit_fast.sampling import sample

    cache = SkipCache(interval=2, branch=1)

    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(skip_dit, labels=[1], steps=20, cache=cache, progress=interrupt)
    # a manual img2img-style run on the same cache afterwards: a new run, nothing reused
    got = _steps(skip_dit, cache, [300, 250, 200], seed=3)
    want = _steps(skip_dit, SkipCache(interval=2, branch=1), [300, 250, 200], seed=3)
    assert cache.report().kinds[0] == "full" and all(torch.equal(a, b) for a, b in zip(got, want))
    r1 = sample(skip_dit, labels=[1], steps=5, cache=cache, seed=4)
    r2 = sample(skip_dit, labels=[1], steps=5, cache=SkipCache(interval=2, branch=1), seed=4)
    assert torch.equal(r1.latents, r2.latents)


def test_enable_skip_cache_interrupted_then_new_run(skip_dit):
    import copy

    from skipdit_fast import disable_skip_cache, enable_skip_cache
    from skipdit_fast.cache import SkipCacheRunError

    model = copy.deepcopy(skip_dit)
    cache = enable_skip_cache(model, interval=2, branch=1)
    try:
        _steps(model, None, SCHEDULE[:10])            # interrupted between steps at t=800
        with pytest.raises(SkipCacheRunError, match="timestep 300 after 800"):
            _steps(model, None, [300, 280])           # img2img-style: refused, not mixed
        _steps(model, None, SCHEDULE[:3])             # t went up: the hook starts a new run
        assert cache.report().kinds == ["full", "cached", "full"]
        handle = model.blocks[3].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            _steps(model, None, [SCHEDULE[3]])
        handle.remove()
        _steps(model, None, [300, 280])               # after a forward that raised: a new run
        assert cache.report().kinds == ["full", "cached"]
    finally:
        disable_skip_cache(model)


def test_one_cache_two_threads_refused(skip_dit):
    import threading

    from skipdit_fast.cache import SkipCacheRunError

    cache = SkipCache(interval=2, branch=1)
    _steps(skip_dit, cache, SCHEDULE[:2])
    errors = []

    def other():
        try:
            _steps(skip_dit, cache, SCHEDULE[2:4])
        except SkipCacheRunError as e:
            errors.append(str(e))

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert len(errors) == 1 and "use one SkipCache per thread" in errors[0]
    _steps(skip_dit, cache, SCHEDULE[2:4])            # the owning thread goes on
    cache.reset()                                      # a new run may belong to another thread
    th = threading.Thread(target=lambda: _steps(skip_dit, cache, SCHEDULE[:2]))
    th.start()
    th.join()
    assert cache.report().steps == 2


@pytest.mark.parametrize("kw, exc, match", [
    (dict(cfg_scale=math.inf), ValueError, "cfg_scale must be a finite number, got inf"),
    (dict(cfg_scale=math.nan), ValueError, "cfg_scale must be a finite number, got nan"),
    (dict(cfg_scale="4"), TypeError, "cfg_scale must be a finite number"),
    (dict(sampler="ddim", eta=math.nan), ValueError, r"eta must be a number in \[0, 1\], got nan"),
    (dict(sampler="ddim", eta=math.inf), ValueError, r"eta must be a number in \[0, 1\]"),
    (dict(sampler="ddim", eta=-1.0), ValueError, r"eta must be a number in \[0, 1\]"),
    (dict(sampler="ddim", eta=1.5), ValueError, r"eta must be a number in \[0, 1\]"),
    (dict(seed=2 ** 64), ValueError, r"seed must be in .*2?\.\.18446744073709551615 \(a 64-bit generator seed\)"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seeds=[0.5]), TypeError, r"seeds\[0\] must be an integer"),
    (dict(seeds=[-(2 ** 64)]), ValueError, r"seeds\[0\] must be in"),
])
def test_sample_rejects_non_finite_guidance(skip_dit, kw, exc, match):
    from skipdit_fast.sampling import sample

    with pytest.raises(exc, match=match):
        sample(skip_dit, labels=[1], steps=2, **kw)


# ---- autocast: patch() never changes what a model computes -------------------------------------

def _needs_diffusers():
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed (requirements-test.txt pins it)")
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import diffusers_models

    return diffusers_models


def _hunyuan_under_autocast(device, dtype, backend):
    import copy

    import skipdit_fast as sf

    M = _needs_diffusers()
    model = M.hunyuan(num_layers=6).to(device)
    x, t, kw = M.hunyuan_inputs(device=device)
    with torch.no_grad():
        full = model(x, t, **kw)[0]
        with torch.autocast(device, dtype):
            want = model(x, t, **kw)[0]
        patched = copy.deepcopy(model)
        report = sf.patch(patched, backend=backend)
        assert report.counts() == {"attention": 12, "skip merge": 2}
        with torch.autocast(device, dtype):
            got = patched(x, t, **kw)[0]
        assert (patched(x, t, **kw)[0] - full).abs().max() <= 1e-4 * full.abs().max()  # autocast off: fp32
    assert got.dtype == want.dtype == dtype
    # within what autocast itself changes (the bf16 rounding of the composition)
    autocast_effect = (want.float() - full).abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2 * autocast_effect + 1e-3, (err, autocast_effect)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "torch"])
def test_patched_hunyuan_under_cpu_autocast(backend):
    _hunyuan_under_autocast("cpu", torch.bfloat16, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "cuda", "torch"])
def test_patched_hunyuan_under_cuda_autocast(backend, dtype):
    _hunyuan_under_autocast("cuda", dtype, backend)


def _composition_skip_fuse(x, skip, nw, nb, w, b):
    import torch.nn.functional as F

    z = torch.cat([x, skip], -1)
    return F.linear(F.layer_norm(z.float(), (z.shape[-1],), nw, nb, 1e-6), w, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "cpu"])
def test_ops_under_autocast_follow_the_composition(device, backend):
    import torch.nn.functional as F

    from skipdit_fast import ops

    if backend == "cpu" and device == "cuda":
        backend = "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g).to(device)                 # fp32 residual stream
    skip = torch.randn(6, 64, generator=g).to(device).bfloat16()  # a bf16 block output
    nw, nb = torch.rand(128, generator=g).to(device) + 0.5, torch.randn(128, generator=g).to(device)
    w, b = (torch.randn(32, 128, generator=g) / 11).to(device), torch.randn(32, generator=g).to(device)
    q, k, v = (torch.randn(2, 16, 2, 32, generator=g).to(device) for _ in range(3))
    with ops.use_backend(backend), torch.autocast(device, torch.bfloat16):
        y = ops.skip_fuse(x, skip, nw, nb, w, b)
        want = _composition_skip_fuse(x, skip, nw, nb, w, b)
        o = ops.attention(q, k, v)
        want_o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        with pytest.raises(TypeError, match="skip dtype"), torch.autocast(device, enabled=False):
            ops.skip_fuse(x, skip, nw, nb, w, b)  # without autocast a dtype mix is still an error
        d = ops.skip_fuse(x.double(), skip.double(), nw.double(), nb.double(), w.double(), b.double())
    assert y.dtype == want.dtype == torch.bfloat16 and o.dtype == want_o.dtype == torch.bfloat16
    assert d.dtype == torch.float64  # autocast leaves fp64 alone, so do the ops
    assert (y.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    assert (o.float() - want_o.float()).abs().max() <= 0.02 * want_o.float().abs().max()


def test_skip_dit_under_autocast_compiles():
    m = DiT(DiTConfig(depth=2, hidden_size=64, num_heads=4, input_size=4, in_channels=4, num_classes=10,
                      skip=True)).eval()
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([500, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        full = m(x, t, y)
        with torch.autocast("cpu", torch.bfloat16):
            eager = m(x, t, y)
            compiled = torch.compile(m, fullgraph=True)(x, t, y)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    effect = (eager.float() - full).abs().max()
    assert (compiled.float() - eager.float()).abs().max() <= 2 * effect + 1e-3


# ---- ops: 0-d tensors, Triton's interpreter -------------------------------------------------------

def _op_args(D=64):
    return {"skip_fuse": [torch.randn(4, D), torch.randn(4, D), torch.ones(2 * D), torch.zeros(2 * D),
                          torch.randn(D, 2 * D), torch.zeros(D)],
            "attention": [torch.randn(1, 8, 2, 16) for _ in range(3)],
            "cache_delta": [torch.randn(4, D), torch.randn(4, D)]}


@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "cpu"])
@pytest.mark.parametrize("op, i", [(op, i) for op, args in _op_args().items() for i in range(len(args))])
def test_zero_dim_tensor_to_any_op(op, i, backend):
    from skipdit_fast import ops

    args = _op_args()[op]
    args[i] = torch.tensor(1.0)
    with ops.use_backend(backend), pytest.raises(ValueError, match=f"{op}.*(at least one dimension|must be 4-D|"
                                                                   "must have shape|must have the shape)"):
        getattr(ops, op)(*args)


def test_triton_skip_fuse_bf16_refused_in_the_interpreter():
    from skipdit_fast import ops
    from skipdit_fast.ops import triton_ops

    if not triton_ops.interpreting() or triton_ops.triton_missing_reason():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 and a triton that runs it)")
    x, skip, nw, nb, w, b = (a.bfloat16() if a.shape[0] != 128 else a for a in _op_args()["skip_fuse"])
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match="interpreter computes bf16"):
        ops.skip_fuse(x, skip, nw, nb, w, b)
    with pytest.raises(ValueError, match="skip_fuse_triton: Triton's interpreter computes bf16"):
        torch.ops.skipdit.skip_fuse_triton(x, skip, nw, nb, w, b, 1e-6)
