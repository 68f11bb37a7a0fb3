"""skipdit_fast.patch on diffusers models (tiny, random weights, built locally):
HunyuanDiT2DModel (self / cross attention with QK-norm and the rotary embedding, the
native long-skip merges), DiTTransformer2DModel, PixArtTransformer2DModel (processor
API, cross-attention, masks), LatteTransformer3DModel (spatial + temporal attention);
and the fingerprints that pin the diffusers code skipdit_fast mirrors."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from skipdit_fast import patch, unpatch

from skipdit_fast.integrations import diffusers as _diffusers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import diffusers_models as M  # noqa: E402
from helpers import assert_grads_match, rel_err  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")




def hy_forward(model, inputs):
    x, t, kw = inputs
    return model(x, t, **kw)[0]


def test_installed_diffusers_is_mirrored_code():
    """Every function skipdit_fast/integrations/diffusers.py mirrors has, in the
    installed diffusers, one of the fingerprints recorded for the supported range."""
    from packaging.version import Version

    import diffusers

    first, last = (Version(v) for v in _diffusers.SUPPORTED)
    assert first <= Version(diffusers.__version__) <= last, diffusers.__version__
    for name, known in _diffusers.MIRRORED.items():
        assert _diffusers.fingerprint(_diffusers.installed(name)) in known, name
    rope = _diffusers.variant("apply_rotary_emb", _diffusers.installed("apply_rotary_emb"))
    assert rope == ("sequence_dim" if Version(diffusers.__version__) >= Version("0.35.0") else "bhsd")


def test_fingerprint_of_source_text_is_fingerprint_of_function():
    """tools/diffusers_fingerprints.py reads the release archives' source text."""
    import inspect

    for name in _diffusers.MIRRORED:
        fn = _diffusers.installed(name)
        assert _diffusers.fingerprint_source(inspect.getsource(fn)) == _diffusers.fingerprint(fn), name


def test_fingerprint_ignores_docstrings_annotations_and_comments():
    def a(x: int, y=2) -> int:
        """doc"""
        return x + y  # comment

    def b(x, y=2):
        return x + y

    def c(x, y=3):
        return x + y

    fa, fb, fc = (_diffusers.fingerprint(f) for f in (a, b, c))
    assert fa is not None and fa == fb and fa != fc


@pytest.mark.parametrize("layers", [6, 10])
def test_hunyuan_patched_close_counts_and_unpatch_bitwise(layers):
    model = M.hunyuan(num_layers=layers)
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        want = hy_forward(model, inputs)
        report = patch(model)
        got = hy_forward(model, inputs)
    merges = layers // 2 - 1  # blocks layer > num_layers // 2 merge a skip
    assert report.counts() == {"attention": 2 * layers, "skip merge": merges}, str(report)
    assert not report.left_alone
    assert [c.module for c in report.changed if c.what == "skip merge"] == \
        [f"blocks.{i}" for i in range(layers - merges, layers)]
    details = {c.module: c.detail for c in report.changed}
    assert details["blocks.0.attn1"] == "self, rotary on q and k, qk-norm"
    assert details["blocks.0.attn2"] == "cross, rotary on q, qk-norm"
    assert rel_err(got, want) <= 1e-5
    assert all(served == 1 and delegated == 0 for served, delegated in report.calls().values())
    assert unpatch(model) == 2 * layers + merges
    with torch.no_grad():
        assert torch.equal(hy_forward(model, inputs), want)
    assert all(type(m.processor).__name__ == "HunyuanAttnProcessor2_0"
               for m in model.modules() if hasattr(m, "set_processor"))


def test_hunyuan_with_text_padding_and_reference_backend():
    model = M.hunyuan()
    inputs = M.hunyuan_inputs(padded=True)
    with torch.no_grad():
        want = hy_forward(model, inputs)
        report = patch(model, backend="reference")
        assert {c.backend for c in report.changed} == {"reference"}
        assert rel_err(hy_forward(model, inputs), want) <= 1e-5


def test_hunyuan_fused_projections():
    model = M.hunyuan()
    model.fuse_qkv_projections()
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        want = hy_forward(model, inputs)
        report = patch(model)
        assert report.counts()["attention"] == 12
        assert all("FusedHunyuanAttnProcessor2_0" in c.how and "fused projections" in c.detail
                   for c in report.changed if c.what == "attention")
        assert rel_err(hy_forward(model, inputs), want) <= 1e-5
    unpatch(model)
    with torch.no_grad():
        assert torch.equal(hy_forward(model, inputs), want)


def test_hunyuan_switches():
    model = M.hunyuan()
    assert patch(model, attention=False).counts() == {"attention": 0, "skip merge": 2}
    unpatch(model)
    assert patch(model, skip_fuse=False).counts() == {"attention": 12, "skip merge": 0}


def test_hunyuan_train_mode_gradients():
    ref = M.hunyuan().train()
    model = copy.deepcopy(ref)
    patch(model)
    x, t, kw = M.hunyuan_inputs()
    ref(x, t, **kw)[0].square().mean().backward()
    model(x, t, **kw)[0].square().mean().backward()
    assert_grads_match(model, ref)
    assert model.blocks[5].skip_norm.weight.grad.abs().sum() > 0


def test_hunyuan_to_dtype_after_patch():
    model = M.hunyuan()
    truth_model = copy.deepcopy(model).double()
    x, t, kw = M.hunyuan_inputs(dtype=torch.float64)
    with torch.no_grad():
        truth = truth_model(x, t, **kw)[0]
        patch(model)
        model.double()  # the ops in fp64; the original's FP32LayerNorm skip_norm rounds through fp32
        assert rel_err(model(x, t, **kw)[0], truth) <= 1e-6
        low = copy.deepcopy(truth_model).bfloat16()
        xl, tl, kwl = M.hunyuan_inputs(dtype=torch.bfloat16)
        err_ref = (low(xl, tl, **kwl)[0].double() - truth).abs().max()
        model.bfloat16()
        err = (model(xl, tl, **kwl)[0].double() - truth).abs().max()
        assert err <= 2 * err_ref + 1e-2 * truth.abs().max(), (err, err_ref)


def test_hunyuan_torch_compile():
    model = M.hunyuan(num_layers=4)
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        want = hy_forward(model, inputs)
        patch(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        assert rel_err(hy_forward(compiled, inputs), want) <= 1e-5


def test_dit_transformer_2d():
    model = M.dit(num_layers=3)
    kw = M.dit_inputs()
    with torch.no_grad():
        want = model(**kw)[0]
        report = patch(model)
        got = model(**kw)[0]
    assert report.counts() == {"attention": 3, "skip merge": 0}
    assert all(c.detail == "self" and "AttnProcessor2_0 -> SkipditAttnProcessor" in c.how for c in report.changed)
    assert rel_err(got, want) <= 1e-5 and all(v == (1, 0) for v in report.calls().values())
    unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], want)


def test_pixart_self_and_cross_through_set_attn_processor(monkeypatch):
    model = M.pixart()
    calls = []
    real = type(model).set_attn_processor
    monkeypatch.setattr(type(model), "set_attn_processor", lambda self, p: (calls.append(len(p)), real(self, p)))
    kw, kw_masked = M.pixart_inputs(), M.pixart_inputs(masked=True)
    with torch.no_grad():
        want, want_masked = model(**kw)[0], model(**kw_masked)[0]
        report = patch(model)
        assert calls == [4]  # one dict with every processor, through diffusers' AttentionMixin
        assert sorted(c.detail for c in report.changed) == ["cross", "cross", "self", "self"]
        assert rel_err(model(**kw)[0], want) <= 1e-5
        assert rel_err(model(**kw_masked)[0], want_masked) <= 1e-5
    served = report.calls()
    assert served["transformer_blocks.0.attn1"] == (2, 0)
    assert served["transformer_blocks.0.attn2"] == (1, 1)  # the masked call ran the original processor
    unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**kw_masked)[0], want_masked)


def test_latte_spatial_and_temporal():
    model = M.latte(num_layers=2)
    kw = M.latte_inputs()
    with torch.no_grad():
        want = model(**kw)[0]
        report = patch(model)
        got = model(**kw)[0]
    names = {c.module: c.detail for c in report.changed}
    assert report.counts() == {"attention": 6, "skip merge": 0}
    assert names["transformer_blocks.1.attn2"] == "cross"
    assert names["temporal_transformer_blocks.1.attn1"] == "self"
    assert rel_err(got, want) <= 1e-5
    assert all(v == (1, 0) for v in report.calls().values())
    unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], want)


def test_vae_attention_4d_input_group_norm_residual():
    """The processor's other paths: 4-D input, group norm, residual connection, output rescale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    vae.decoder.mid_block.attentions[0].rescale_output_factor = 2.0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = vae(x).sample
        report = patch(vae)
        got = vae(x).sample
    assert report.counts() == {"attention": 2, "skip merge": 0}
    assert all(v == (1, 0) for v in report.calls().values())
    assert rel_err(got, want) <= 1e-5


def test_other_processors_and_changed_code_are_left_alone():
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.transformers.hunyuan_transformer_2d import HunyuanDiTBlock

    class MyProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return 2 * super().__call__(attn, hidden_states, *args, **kwargs)

    class HunyuanAttnProcessor2_0:  # same name, other code
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     image_rotary_emb=None):
            return hidden_states

    class GatedBlock(HunyuanDiTBlock):
        def forward(self, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None, skip=None):
            return 0.5 * super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, skip)

    model = M.hunyuan()
    model.blocks[0].attn1.set_processor(MyProcessor())
    model.blocks[0].attn2.set_processor(HunyuanAttnProcessor2_0())
    model.blocks[5].__class__ = GatedBlock
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        want = hy_forward(model, inputs)
        report = patch(model)
        assert rel_err(hy_forward(model, inputs), want) <= 1e-5
    why = {a.module: a.reason for a in report.left_alone}
    assert set(why) == {"blocks.0.attn1", "blocks.0.attn2", "blocks.5"}
    assert "MyProcessor: not one skipdit_fast stands in for" in why["blocks.0.attn1"]
    assert "differs from the code skipdit_fast mirrors (HunyuanAttnProcessor2_0.__call__ of diffusers 0.30.0 " \
        "to 0.42.1)" in why["blocks.0.attn2"]
    assert "GatedBlock.forward" in why["blocks.5"] and "differs" in why["blocks.5"] and "0.30.0" in why["blocks.5"]
    assert report.counts() == {"attention": 10, "skip merge": 1}


def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
    # diffusers 0.30.0-0.34.0 apply_rotary_emb (Apache-2.0, The HuggingFace Team), verbatim
    # but for its docstring and annotations: [B, H, S, D] only, no sequence_dim.
    if use_real:
        cos, sin = freqs_cis  # [S, D]
        cos = cos[None, None]
        sin = sin[None, None]
        cos, sin = cos.to(x.device), sin.to(x.device)

        if use_real_unbind_dim == -1:
            # Use for example in Lumina
            x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, S, H, D//2]
            x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        elif use_real_unbind_dim == -2:
            # Use for example in Stable Audio
            x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)  # [B, S, H, D//2]
            x_rotated = torch.cat([-x_imag, x_real], dim=-1)
        else:
            raise ValueError(f"`use_real_unbind_dim={use_real_unbind_dim}` but should be -1 or -2.")

        out = (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

        return out
    else:
        x_rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(2)
        x_out = torch.view_as_real(x_rotated * freqs_cis).flatten(3)

        return x_out.type_as(x)


def patched_hunyuan_with_rotary(monkeypatch, fn):
    """(report, patched output, unpatched output) of a tiny HunyuanDiT patched while
    diffusers' apply_rotary_emb is fn."""
    from diffusers.models import embeddings

    monkeypatch.setattr(embeddings, "apply_rotary_emb", fn)
    model = M.hunyuan(num_layers=6)
    inputs = M.hunyuan_inputs()
    with torch.no_grad():
        want = hy_forward(model, inputs)
        report = patch(model)
        return report, hy_forward(model, inputs), want


def test_hunyuan_attention_on_pre_0_35_rotary_embedding(monkeypatch):
    """Releases 0.30-0.34: apply_rotary_emb takes [B, H, S, D] only. The processors run it
    on the transposed BSHD view (and the original processor, which imports it at call
    time, runs the same old code): every attention patched, the same output."""
    assert _diffusers.variant("apply_rotary_emb", apply_rotary_emb) == "bhsd"
    report, got, want = patched_hunyuan_with_rotary(monkeypatch, apply_rotary_emb)
    assert report.counts() == {"attention": 12, "skip merge": 2} and not report.left_alone, str(report)
    assert all(p.rope == "bhsd" for p in report._processors.values())
    assert rel_err(got, want) <= 1e-5


def test_hunyuan_attention_left_alone_on_unknown_rotary_embedding(monkeypatch):
    """apply_rotary_emb code skipdit_fast does not know: the attention of HunyuanDiT is
    left alone with the reason; the skip merges and the other models are not affected."""
    from diffusers.models import embeddings

    real = embeddings.apply_rotary_emb

    def changed(x, freqs_cis, *args, **kwargs):
        return real(x, freqs_cis, *args, **kwargs) * 1.0

    report, got, want = patched_hunyuan_with_rotary(monkeypatch, changed)
    assert rel_err(got, want) <= 1e-5
    assert report.counts() == {"attention": 0, "skip merge": 2}
    assert len(report.left_alone) == 12
    assert all("apply_rotary_emb of diffusers" in a.reason and "0.30.0 to 0.42.1" in a.reason
               for a in report.left_alone)
    assert patch(M.dit()).counts()["attention"] == 2


def test_head_dim_the_op_cannot_serve_is_left_alone():
    model = M.hunyuan(num_attention_heads=2, attention_head_dim=12, hidden_size=24)
    x, t, kw = M.hunyuan_inputs()
    kw["image_rotary_emb"] = M.rotary(12, 4)
    with torch.no_grad():
        want = model(x, t, **kw)[0]
        report = patch(model)
        assert torch.allclose(model(x, t, **kw)[0], want, rtol=1e-5, atol=1e-6)
    assert report.counts() == {"attention": 0, "skip merge": 2}
    assert len(report.left_alone) == 12 and all("head dim 12" in a.reason for a in report.left_alone)


def test_hooked_skip_linear_is_left_alone():
    model = M.hunyuan()
    model.blocks[4].skip_linear.register_forward_pre_hook(lambda m, a: None)
    report = patch(model)
    assert report.counts()["skip merge"] == 1
    assert report.left_alone[0].module == "blocks.4" and "hooks" in report.left_alone[0].reason


def hunyuan_bf16_check(device):
    """bf16, DESIGN.md rule: the patched model's error against fp64 truth is at most 2x
    the unpatched model's bf16 error plus a small atol; head dim 88 as in HunyuanDiT."""
    from skipdit_fast.ops import backends

    model = M.hunyuan(num_layers=6, num_attention_heads=4, attention_head_dim=88, hidden_size=352, sample_size=16)
    x, t, kw = M.hunyuan_inputs(size=16, dtype=torch.float64, device=device)
    xl, tl, kwl = M.hunyuan_inputs(size=16, dtype=torch.bfloat16, device=device)
    rope = M.rotary(88, 8)
    kw["image_rotary_emb"] = tuple(r.to(device).double() for r in rope)
    kwl["image_rotary_emb"] = tuple(r.to(device) for r in rope)
    with torch.no_grad():
        truth = copy.deepcopy(model).double().to(device)(x, t, **kw)[0]
        low = model.bfloat16().to(device)
        err_ref = (low(xl, tl, **kwl)[0].double() - truth).abs().max()
        report = patch(low)
        assert report.counts() == {"attention": 12, "skip merge": 2}
        dev = torch.device(device)
        for c in report.changed:
            feats = (88,) if c.op == "attention" else (352, 352)
            assert c.backend == backends.pick(c.op, dev, torch.bfloat16, False, feats).backend, c
        err = (low(xl, tl, **kwl)[0].double() - truth).abs().max()
    assert err <= 2 * err_ref + 1e-3 * truth.abs().max(), (err, err_ref)


def test_hunyuan_bf16_cpu():
    hunyuan_bf16_check("cpu")


@pytest.mark.gpu
def test_hunyuan_bf16_gpu():
    hunyuan_bf16_check("cuda")


def processor_bf16_check(make, inputs, device):
    model = make()
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs().items()}
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    kw16 = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        truth = copy.deepcopy(model).double().to(device)(**kw64)[0]
        low = model.bfloat16().to(device)
        err_ref = (low(**kw16)[0].double() - truth).abs().max()
        report = patch(low)
        err = (low(**kw16)[0].double() - truth).abs().max()
    assert report.counts()["attention"] >= 2 and all(v[0] == 1 for v in report.calls().values())
    assert err <= 2 * err_ref + 1e-3 * truth.abs().max(), (err, err_ref)


BF16_MODELS = [(M.pixart, M.pixart_inputs), (M.latte, M.latte_inputs), (M.dit, M.dit_inputs)]


@pytest.mark.parametrize("make, inputs", BF16_MODELS)
def test_processor_models_bf16_cpu(make, inputs):
    processor_bf16_check(make, inputs, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("make, inputs", BF16_MODELS)
def test_processor_models_bf16_gpu(make, inputs):
    processor_bf16_check(make, inputs, "cuda")
