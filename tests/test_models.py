"""DiT / Skip-DiT: golden outputs of the official code, an independent plain-torch
re-implementation of the official forward, names and sizes, strict loading, dtypes,
the ops the blocks call, torch.compile."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import skipdit_fast
from skipdit_fast import ops
from skipdit_fast.models import (CheckpointError, DiT, DiTConfig, load_checkpoint, model_names,
                                 save_safetensors, sincos_pos_embed)

DATA = Path(__file__).parent / "data" / "official_skipdit_small.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA, weights_only=True)


def golden_config(g, skip: bool) -> DiTConfig:
    c = g["config"]
    return DiTConfig(depth=c["depth"], hidden_size=c["hidden_size"], num_heads=c["num_heads"],
                     patch_size=c["patch_size"], input_size=c["input_size"], in_channels=c["in_channels"],
                     num_classes=c["num_classes"], learn_sigma=c["learn_sigma"], mlp_ratio=c["mlp_ratio"],
                     skip=skip)




# ---------------------------------------------------------------------------------------
# An independent re-implementation of the official forward (OpenSparseLLMs/Skip-DiT
# class-to-image/models.py: DiT_skip / DiT, with timm's PatchEmbed, Attention, Mlp),
# written against the state dict alone, plain torch, no skipdit_fast code.

def official_timestep_embedding(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def official_pos_embed(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed, as DiT uses it."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = one_d(embed_dim // 2, grid[0])
    emb_w = one_d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def official_forward(sd, cfg: DiTConfig, x, t, y, skip: bool):
    lin = lambda v, p: F.linear(v, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    modulate = lambda v, shift, scale: v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # noqa: E731
    ln = lambda v: F.layer_norm(v, (v.shape[-1],), eps=1e-6)  # noqa: E731
    p = cfg.patch_size
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    t_freq = official_timestep_embedding(t).to(sd["t_embedder.mlp.0.weight"].dtype)  # (fp32 in fp32 runs)
    temb = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    def block(i, v):
        pre = f"blocks.{i}."
        mods = lin(F.silu(c), pre + "adaLN_modulation.1").chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        a = modulate(ln(v), shift_msa, scale_msa)
        B, N, C = a.shape
        H = cfg.num_heads
        qkv = lin(a, pre + "attn.qkv").reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, vv = qkv.unbind(0)
        attn = (q * (C // H) ** -0.5) @ k.transpose(-2, -1)
        o = (attn.softmax(dim=-1) @ vv).transpose(1, 2).reshape(B, N, C)
        v = v + gate_msa.unsqueeze(1) * lin(o, pre + "attn.proj")
        m = modulate(ln(v), shift_mlp, scale_mlp)
        m = lin(F.gelu(lin(m, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        return v + gate_mlp.unsqueeze(1) * m

    depth = cfg.depth
    skips = []
    for index in range(depth):
        if skip and index >= depth // 2:
            j = index - depth // 2
            cat = torch.cat([h, skips.pop()], dim=-1)
            w, b = sd[f"skip_norms.{j}.weight"], sd[f"skip_norms.{j}.bias"]
            cat = F.layer_norm(cat.float(), (cat.shape[-1],), w.float(), b.float(), 1e-6).to(cat.dtype)
            h = lin(cat, f"skip_linears.{j}.linear")
        h = block(index, h)
        if skip and index < depth // 2:
            skips.append(h)
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(ln(h), shift, scale), "final_layer.linear")
    co = cfg.out_channels
    g = int(h.shape[1] ** 0.5)
    h = h.reshape(h.shape[0], g, g, p, p, co)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(h.shape[0], co, g * p, g * p)


def official_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    """The official keys and shapes (listed here, not taken from our model)."""
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    inner = int(D * cfg.mlp_ratio)
    shapes = {
        "pos_embed": (1, cfg.num_patches, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, D),
        "final_layer.linear.weight": (p * p * cfg.out_channels, D),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        shapes.update({pre + "attn.qkv.weight": (3 * D, D), pre + "attn.qkv.bias": (3 * D,),
                       pre + "attn.proj.weight": (D, D), pre + "attn.proj.bias": (D,),
                       pre + "mlp.fc1.weight": (inner, D), pre + "mlp.fc1.bias": (inner,),
                       pre + "mlp.fc2.weight": (D, inner), pre + "mlp.fc2.bias": (D,),
                       pre + "adaLN_modulation.1.weight": (6 * D, D), pre + "adaLN_modulation.1.bias": (6 * D,)})
    if cfg.skip:
        for j in range(cfg.depth // 2):
            shapes.update({f"skip_norms.{j}.weight": (2 * D,), f"skip_norms.{j}.bias": (2 * D,),
                           f"skip_linears.{j}.linear.weight": (D, 2 * D), f"skip_linears.{j}.linear.bias": (D,)})
    return shapes


def random_official_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values under the official keys, scaled so that every path (adaLN gates
    included) matters."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_shapes(cfg).items():
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else 1
        scale = 0.5 if len(shape) == 1 else fan_in ** -0.5
        sd[k] = torch.randn(shape, generator=gen) * scale
    for j in range(cfg.depth // 2 if cfg.skip else 0):
        sd[f"skip_norms.{j}.weight"] += 1.0
    return sd


SMALL = DiTConfig(depth=6, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)


def model_with(sd, cfg) -> DiT:
    m = DiT(cfg).eval()
    m.load_state_dict_strict(sd)
    return m


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dit"])
def test_matches_golden_outputs_of_official_code(golden, skip):
    cfg = golden_config(golden, skip)
    model = model_with(golden["skip_state_dict" if skip else "dit_state_dict"], cfg)
    with torch.no_grad():
        out = model(golden["x"], golden["t_single"], golden["y"])
    ref = golden["skip_out" if skip else "dit_out"]
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dit"])
def test_independent_reimplementation_on_golden_weights(golden, skip):
    cfg = golden_config(golden, skip)
    sd = golden["skip_state_dict" if skip else "dit_state_dict"]
    model = model_with(sd, cfg)
    with torch.no_grad():
        ours = model(golden["x"], golden["t_single"], golden["y"])
        theirs = official_forward(sd, cfg, golden["x"], golden["t_single"], golden["y"], skip)
    # the re-implementation itself reproduces the official golden output
    assert rel_err(theirs, golden["skip_out" if skip else "dit_out"]) <= 1e-5
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dit"])
@pytest.mark.parametrize("shape", [dict(), dict(patch_size=4, input_size=16, num_heads=2, depth=4),
                                   dict(learn_sigma=False, depth=8, hidden_size=96, num_heads=2)],
                         ids=["p2", "p4", "no-sigma"])
def test_independent_reimplementation_random_official_weights(skip, shape):
    cfg = DiTConfig(**{**SMALL.__dict__, **shape, "skip": skip})
    sd = random_official_state_dict(cfg, seed=3)
    sd["pos_embed"] = torch.from_numpy(official_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)).float()[None]
    model = model_with(sd, cfg)
    x = torch.randn(5, 4, cfg.input_size, cfg.input_size)
    t = torch.tensor([0, 1, 250, 999, 500])
    y = torch.tensor([0, 3, 9, 10, 10])  # 10: the null label
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = official_forward(sd, cfg, x, t, y, skip)
    assert ours.shape == (5, cfg.out_channels, cfg.input_size, cfg.input_size)
    assert rel_err(ours, theirs) <= 1e-5


def test_pos_embed_is_official_sincos():
    for dim, grid in ((64, 8), (1152, 16), (384, 4)):
        ours = sincos_pos_embed(dim, grid)
        ref = torch.from_numpy(official_pos_embed(dim, grid)).float()
        assert torch.equal(ours, ref)
    model = DiT(SMALL)
    assert torch.equal(model.pos_embed[0], sincos_pos_embed(64, 4))


def test_names_and_sizes():
    names = model_names("dit")
    assert len(names) == 24 and "DiT-XL/2-skip" in names and "DiT-S/8" in names
    assert model_names() == names + model_names("latte")
    expect = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name in names:
        for size in (256, 512):
            cfg = DiTConfig.from_name(name, image_size=size)
            s = name.split("-")[1].split("/")[0]
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == expect[s]
            assert cfg.patch_size == int(name.split("/")[1][0])
            assert cfg.input_size == size // 8 and cfg.skip == name.endswith("-skip")
            assert cfg.num_classes == 1000 and cfg.learn_sigma and cfg.out_channels == 8
    assert DiTConfig.from_name("DiT-skip") == DiTConfig.from_name("DiT-XL/2-skip")
    with pytest.raises(ValueError, match="unknown model"):
        DiTConfig.from_name("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model"):
        DiTConfig.from_name("DiT-S/3")
    with pytest.raises(ValueError, match="multiple of"):
        DiTConfig.from_name("DiT-S/8", image_size=200)


@pytest.mark.parametrize("name,size", [("DiT-XL/2-skip", 256), ("DiT-XL/2", 256), ("DiT-XL/2", 512),
                                       ("DiT-S/4-skip", 512)])
def test_official_key_layout(name, size):
    with torch.device("meta"):
        model = DiT.from_name(name, image_size=size)
    cfg = model.config
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_shapes(cfg)
    assert got == want
    T = (size // 8 // cfg.patch_size) ** 2
    assert got["pos_embed"] == (1, T, cfg.hidden_size)
    assert got["y_embedder.embedding_table.weight"] == (1001, cfg.hidden_size)
    if name == "DiT-XL/2-skip":
        assert sum(k.startswith("skip_norms.") for k in got) == 28 and got["skip_linears.13.linear.weight"] == (1152, 2304)


# ---- loading ------------------------------------------------------------------------------

def test_strict_loading_names_the_key(golden):
    cfg = golden_config(golden, True)
    model = DiT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(golden["skip_state_dict"])
    missing = dict(sd)
    del missing["blocks.3.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.3\.mlp\.fc1\.bias"):
        model.load_state_dict_strict(missing)
    extra = dict(sd, **{"blocks.3.attn.q_norm.weight": torch.zeros(16)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.3\.attn\.q_norm\.weight"):
        model.load_state_dict_strict(extra)
    wrong = dict(sd, **{"y_embedder.embedding_table.weight": torch.zeros(10, 64)})
    with pytest.raises(CheckpointError, match=r"y_embedder\.embedding_table\.weight: checkpoint \[10, 64\], model \[11, 64\]"):
        model.load_state_dict_strict(wrong)
    with pytest.raises(CheckpointError, match="vanilla DiT"):
        model.load_state_dict_strict(golden["dit_state_dict"])
    with pytest.raises(CheckpointError, match="Skip-DiT"):
        DiT(golden_config(golden, False)).load_state_dict_strict(sd)
    # the failed attempts loaded nothing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _golden_model_and_output(golden):
    cfg = golden_config(golden, True)
    model = model_with(golden["skip_state_dict"], cfg)
    with torch.no_grad():
        want = model(golden["x"], golden["t_single"], golden["y"])
    return cfg, model, want


def _load_and_run(cfg, path, golden):
    with torch.no_grad():
        return DiT(cfg).load_checkpoint(path).eval()(golden["x"], golden["t_single"], golden["y"])


def test_pt_round_trip(golden, tmp_path):
    cfg, _, want = _golden_model_and_output(golden)
    sd = golden["skip_state_dict"]
    pt = tmp_path / "w.pt"
    torch.save(sd, pt)
    ema = tmp_path / "train.pt"  # a DiT training checkpoint: {"model", "ema", ...}
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd}, ema)
    for path in (pt, ema):
        assert set(load_checkpoint(path)) == set(sd)
        assert torch.equal(_load_and_run(cfg, path, golden), want), path.name
    bad = tmp_path / "bad.pt"
    torch.save([torch.zeros(1)], bad)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(bad)
    evil = tmp_path / "evil.pt"
    torch.save({"args": _NotATensor()}, evil)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(evil)


def test_safetensors_round_trip(golden, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors (requirements.txt) is not installed")
    cfg, model, want = _golden_model_and_output(golden)
    st = tmp_path / "w.safetensors"
    save_safetensors(model, st)
    assert set(load_checkpoint(st)) == set(golden["skip_state_dict"])
    assert torch.equal(_load_and_run(cfg, st, golden), want)
    wrong = tmp_path / "wrong.safetensors"
    save_safetensors({k: v for k, v in golden["skip_state_dict"].items() if k != "pos_embed"}, wrong)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): pos_embed"):
        DiT(cfg).load_checkpoint(wrong)


class _NotATensor:  # what weights_only=True must refuse to unpickle
    pass


# ---- dtypes, ops, compile ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(golden, dtype):
    cfg = golden_config(golden, True)
    sd = golden["skip_state_dict"]
    model = model_with(sd, cfg)
    x, t, y = golden["x"], golden["t_single"], golden["y"]
    with torch.no_grad():
        ref64 = model.double()(x.double(), t, y)
        low = model.to(dtype)(x.to(dtype), t, y)
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert rel_err(low, ref64) < 3e-2
    # the official code's own dtype path: the same in the low dtype
    with torch.no_grad():
        off = official_forward({k: v.to(dtype) for k, v in sd.items()}, cfg, x.to(dtype), t, y, True)
    assert rel_err(low, ref64) <= 2 * rel_err(off, ref64) + 1e-2


def test_skip_norm_params_passed_in_fp32(golden, monkeypatch):
    cfg = golden_config(golden, True)
    model = model_with(golden["skip_state_dict"], cfg).to(torch.bfloat16)
    seen = []
    real = ops.skip_fuse

    def spy(x, skip, nw, nb, w, b=None, eps=1e-6):
        seen.append((x.dtype, nw.dtype, nb.dtype, w.dtype, eps))
        return real(x, skip, nw, nb, w, b, eps)

    monkeypatch.setattr(ops, "skip_fuse", spy)
    with torch.no_grad():
        model(golden["x"].bfloat16(), golden["t_single"], golden["y"])
    assert seen == [(torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, 1e-6)] * (cfg.depth // 2)


def test_blocks_call_ops_on_fused_qkv_views(golden, monkeypatch):
    cfg = golden_config(golden, True)
    model = model_with(golden["skip_state_dict"], cfg)
    calls = {"attention": 0, "skip_fuse": 0}
    real_attn, real_fuse = ops.attention, ops.skip_fuse

    def attn(q, k, v, scale=None):
        calls["attention"] += 1
        B, N, H, Dh = q.shape
        assert (H, Dh) == (cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        # views of one fused [B, N, 3, H, Dh] tensor: no copies
        assert q.stride() == (N * 3 * H * Dh, 3 * H * Dh, Dh, 1)
        assert k.data_ptr() - q.data_ptr() == H * Dh * q.element_size()
        assert v.data_ptr() - k.data_ptr() == H * Dh * q.element_size()
        return real_attn(q, k, v, scale)

    def fuse(*a, **kw):
        calls["skip_fuse"] += 1
        return real_fuse(*a, **kw)

    monkeypatch.setattr(ops, "attention", attn)
    monkeypatch.setattr(ops, "skip_fuse", fuse)
    with torch.no_grad():
        model(golden["x"], golden["t_single"], golden["y"])
    assert calls == {"attention": cfg.depth, "skip_fuse": cfg.depth // 2}


def test_reference_backend_agrees(golden):
    cfg = golden_config(golden, True)
    model = model_with(golden["skip_state_dict"], cfg)
    with torch.no_grad():
        a = model(golden["x"], golden["t_single"], golden["y"])
        with skipdit_fast.use_backend("reference"):
            b = model(golden["x"], golden["t_single"], golden["y"])
    assert rel_err(a, b) <= 1e-5


def test_forward_with_cfg_official_convention(golden):
    cfg = golden_config(golden, True)
    model = model_with(golden["skip_state_dict"], cfg)
    x = torch.randn(4, 4, 16, 16)
    t = torch.full((4,), 300)
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 4.0)
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = plain[:2], plain[2:]
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:2, :3], guided)
    torch.testing.assert_close(out[2:, :3], guided)
    assert torch.equal(out[:, 3:], plain[:, 3:])  # channel 3 and the variance: unguided


def test_vanilla_dit_refuses_cache(golden):
    model = model_with(golden["dit_state_dict"], golden_config(golden, False))
    with pytest.raises(ValueError, match="long skips"):
        model(golden["x"], golden["t_single"], golden["y"], cache=skipdit_fast.SkipCache())


def test_training_init_and_wrong_input_size():
    model = DiT(SMALL).initialize_weights()
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: zero output at init
    with pytest.raises(ValueError, match="expects 8x8"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_backward_runs():
    cfg = DiTConfig(**{**SMALL.__dict__, "skip": True})
    model = DiT(cfg)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 10]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.skip_norms[0].weight.grad.abs().sum() > 0


def test_torch_compile_fullgraph():
    cfg = DiTConfig(**{**SMALL.__dict__, "depth": 4, "skip": True})
    model = DiT(cfg).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 10])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(x, t, y)
        got = compiled(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cfg_guides_only_noise_channels_of_narrow_models():
    """A 1-channel learn_sigma model outputs [eps, variance]: guidance must not touch the
    variance channel (the official [:3] would)."""
    from skipdit_fast.models import DiT

    torch.manual_seed(0)
    m = DiT.from_name("DiT-S/8", image_size=256, in_channels=1, input_size=16, num_classes=10).eval()
    x = torch.randn(2, 1, 16, 16)
    x = torch.cat([x[:1], x[:1]])
    y = torch.tensor([3, 10])
    t = torch.tensor([500, 500])
    with torch.no_grad():
        raw = m(x, t, y)
        out = m.forward_with_cfg(x, t, y, 4.0)
    assert out.shape == raw.shape == (2, 2, 16, 16)
    torch.testing.assert_close(out[:, 1:], raw[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(out[0, :1], raw[1, :1] + 4.0 * (raw[0, :1] - raw[1, :1]))
