"""The trainer (skipdit_fast.apps.train), the training loss, the digits data and
classifier, the caching baselines and the shipped weights (skipdit_fast.pretrained). The trainer tests use a 2-block model so that they run in seconds."""

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from skipdit_fast import SkipCache
from skipdit_fast.cache.baselines import CachedModel, ForaCache
from skipdit_fast.sampling.diffusion import Diffusion, sample
from skipdit_fast.data.digits import digits, split
from skipdit_fast.evaluation.digits import DigitClassifier
from skipdit_fast.evaluation.metrics import frechet_distance, psnr, ssim
from skipdit_fast.models import CheckpointError, DiT, DiTConfig
from skipdit_fast.apps.train import TrainConfig, Trainer
from skipdit_fast.pretrained import MODELS, TINY, WEIGHTS_DIR, load_pretrained, weights_path
from skipdit_fast.sampling.loss import DiffusionLoss, discretized_gaussian_log_likelihood, normal_kl

SMALL = DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1,
                  num_classes=10, learn_sigma=True, mlp_ratio=2.0, skip=True)


@pytest.fixture(scope="module")
def data8():
    return digits(8)


def small_trainer(data, **kw):
    cfg = TrainConfig(**{"model": "small", "steps": 20, "batch_size": 16, "warmup": 2, "eval_every": 0, **kw})
    return Trainer(cfg, data=data, model_cfg=SMALL)


# ---- data ---------------------------------------------------------------------------

def test_digits_pipeline_shapes_and_range():
    x, y = digits(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert sorted(torch.bincount(y).tolist())[0] >= 170  # every class ~180 times
    x8, y8 = digits(8)
    from sklearn.datasets import load_digits
    d = load_digits()
    assert torch.equal(x8[:, 0], torch.from_numpy(d.images).float() / 8 - 1)
    assert torch.equal(y8, y)
    # upsampling keeps the image: 2x2 average pooling of 16x16 is close to the 8x8 original
    down = torch.nn.functional.avg_pool2d(x, 2)
    assert np.corrcoef(down.flatten().numpy(), x8.flatten().numpy())[0, 1] > 0.97
    with pytest.raises(ValueError):
        digits(12)


def test_split_is_fixed_and_disjoint():
    tr, te = split(1797)
    assert len(tr) + len(te) == 1797 and len(set(tr.tolist()) & set(te.tolist())) == 0
    assert torch.equal(split(1797)[1], te)


# ---- the loss -------------------------------------------------------------------------

def test_loss_schedule_is_the_samplers():
    loss, d = DiffusionLoss(), Diffusion(1000)
    assert loss.num_timesteps == 1000
    assert np.array_equal(loss.diffusion.alphas_cumprod, d.alphas_cumprod)
    # p(x_{t-1} | x_t) with one step per sample equals the sampler's at every t
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 4, generator=g)
    out = torch.randn(3, 2, 4, 4, generator=g).clamp(-1, 1)
    for i in (0, 1, 17, 500, 999):
        mean, log_var, x0, eps = d.p_mean_variance(out, x, i)
        m2, lv2, x02, eps2 = d.p_mean_variance(out, x, torch.full((3,), i))
        for a, b in ((m2, mean), (lv2, log_var), (x02, x0), (eps2, eps)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        # the true posterior and the forward process at one step per sample too
        pm, plv = d.q_posterior(x0, x, i)
        pm2, plv2 = d.q_posterior(x0, x, torch.full((3,), i))
        torch.testing.assert_close(pm2, pm, rtol=1e-6, atol=1e-6)
        assert torch.allclose(plv2, torch.tensor(plv, dtype=torch.float32))
        noise = torch.randn(3, 1, 4, 4, generator=g)
        torch.testing.assert_close(loss.q_sample(x0, torch.full((3,), i), noise), d.q_sample(x0, i, noise))


def test_normal_kl_and_decoder_likelihood():
    m, lv = torch.randn(5), torch.randn(5)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(5), atol=1e-7)
    assert (normal_kl(m, lv, m + 0.5, lv) > 0).all()
    # the 256 bins of [-1, 1] carry all the probability mass
    centers = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.3, math.log(0.2)), (-0.9, math.log(0.05)), (0.0, math.log(2.0))):
        ll = discretized_gaussian_log_likelihood(centers, torch.full_like(centers, mean),
                                                 torch.full_like(centers, log_scale))
        assert abs(float(ll.exp().sum()) - 1.0) < 1e-6


def test_loss_terms(data8):
    torch.manual_seed(0)
    model = DiT(SMALL)  # random (not zero) init: a non-trivial output
    x0, y = data8[0][:6], data8[1][:6]
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    noise = torch.randn_like(x0)
    terms = DiffusionLoss()(model, x0, t, y, noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (6,) and torch.isfinite(v).all() for v in terms.values())
    assert (terms["vb"] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # the VB term trains only the variance channels: its gradient does not reach eps
    out = model(DiffusionLoss().q_sample(x0, t, noise), t, y)
    assert out.shape == (6, 2, 8, 8)
    nosig = DiffusionLoss(learn_sigma=False)
    assert set(nosig(DiT(replace(SMALL, learn_sigma=False)), x0, t, y, noise)) == {"loss", "mse"}


# ---- the trainer --------------------------------------------------------------------------

def test_training_reduces_the_loss_on_a_tiny_batch(data8):
    x, y = data8
    tr = small_trainer((x[:16], y[:16]), lr=3e-3, steps=40, eval_every=40, eval_size=16, class_dropout=0.0)
    before = tr.eval_loss()["loss"]
    tr.run(progress=False)
    after = tr.eval_loss()["loss"]
    assert before > 0.9  # adaLN-Zero: the output starts at 0, the MSE at ~1
    assert after < 0.6 * before, (before, after)
    assert len(tr.log) == 40 and tr.log[-1].step == 40
    assert not math.isnan(tr.log[-1].eval_loss) and math.isnan(tr.log[-2].eval_loss)


def test_resume_reproduces_the_same_state(data8, tmp_path):
    straight = small_trainer(data8, steps=6)
    straight.run(progress=False)
    first = small_trainer(data8, steps=6)
    first.run(3, progress=False)
    first.save(tmp_path / "ck.pt")
    resumed = small_trainer(data8, steps=6).load(tmp_path / "ck.pt")
    assert resumed.step == 3 and len(resumed.log) == 3
    resumed.run(progress=False)
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert [r.loss for r in straight.log] == [r.loss for r in resumed.log]
    # a different seed is a different run; other settings refuse the checkpoint
    other = small_trainer(data8, steps=6, seed=1)
    other.run(1, progress=False)
    assert other.log[0].loss != straight.log[0].loss
    with pytest.raises(ValueError, match="other settings"):
        small_trainer(data8, lr=5e-4).load(tmp_path / "ck.pt")


def test_ema_update(data8):
    tr = small_trainer(data8, ema_decay=0.9)
    ema0 = [p.detach().clone() for p in tr.ema.parameters()]
    tr.train_step()  # step 0: decay min(0.9, 1/10) = 0.1
    for e0, e, p in zip(ema0, tr.ema.parameters(), tr.model.parameters()):
        torch.testing.assert_close(e, 0.1 * e0 + 0.9 * p.detach(), rtol=1e-6, atol=1e-7)
    for _ in range(30):
        tr.train_step()
    ema1 = [p.detach().clone() for p in tr.ema.parameters()]
    tr.train_step()  # step 31: decay min(0.9, 32/41) = 0.78
    d = 32 / 41
    for e1, e, p in zip(ema1, tr.ema.parameters(), tr.model.parameters()):
        torch.testing.assert_close(e, d * e1 + (1 - d) * p.detach(), rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in tr.ema.parameters())


def test_batches_are_seeded_and_label_drop(data8):
    tr = small_trainer(data8, class_dropout=0.5)
    a, b = tr.batch(5), tr.batch(5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x0, t, y, noise = a
    assert x0.shape == (16, 1, 8, 8) and t.shape == y.shape == (16,) and noise.shape == x0.shape
    assert (y == 10).any() and (y < 10).any()  # null label 10 for dropped labels
    # one epoch visits each image at most once
    per_epoch = len(data8[0]) // 16
    seen = torch.cat([tr._perm[k * 16:(k + 1) * 16] for k in range(per_epoch)])
    assert len(set(seen.tolist())) == len(seen)


def test_lr_schedule():
    tr = Trainer.__new__(Trainer)
    tr.cfg = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr_ratio=0.1)
    assert tr.lr_at(0) == pytest.approx(1e-5) and tr.lr_at(99) == pytest.approx(1e-3)
    assert tr.lr_at(100) == pytest.approx(1e-3) and tr.lr_at(1000) == pytest.approx(1e-4)
    assert tr.lr_at(550) == pytest.approx(0.55e-3)


def test_export_roundtrip(data8, tmp_path):
    tr = small_trainer(data8, steps=2)
    tr.run(progress=False)
    path = tmp_path / "m.safetensors"
    tr.export(path, dtype=torch.float32)
    model = load_pretrained(str(path))
    assert model.config == SMALL
    for (k, a), b in zip(tr.ema.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    tr.write_logs(tmp_path / "m.train")
    rows = list(csv.DictReader(open(tmp_path / "m.train.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert json.loads((tmp_path / "m.train.json").read_text())["steps"] == 2


# ---- the shipped weights --------------------------------------------------------------------

def test_shipped_weights_load_strictly_and_are_small():
    from safetensors.torch import load_file

    total = 0
    for name, cfg in MODELS.items():
        path = weights_path(name)
        total += path.stat().st_size
        model = load_pretrained(name)
        assert model.config == cfg and cfg.depth >= 12
        sd = load_file(str(path))
        assert set(sd) == set(DiT(cfg).state_dict())
        assert all(torch.isfinite(v).all() for v in sd.values())
    assert total <= 5 * 2 ** 20
    assert MODELS["tiny-dit"] == replace(MODELS["tiny-skipdit"], skip=False)
    assert {k: getattr(MODELS["tiny-dit"], k) for k in TINY} == TINY
    with pytest.raises(CheckpointError):  # strict: a vanilla DiT's weights are not a Skip-DiT's
        DiT(MODELS["tiny-skipdit"]).load_checkpoint(weights_path("tiny-dit"))


def test_shipped_training_logs_are_equal_budget():
    runs = {n: json.loads((WEIGHTS_DIR / f"{n}.train.json").read_text()) for n in MODELS}
    a, b = runs["tiny-dit"], runs["tiny-skipdit"]
    assert a["steps"] == b["steps"] > 0
    for key in ("steps", "batch_size", "seed", "lr", "ema_decay"):
        assert a["train_config"][key] == b["train_config"][key]
    for n in MODELS:
        rows = list(csv.DictReader(open(WEIGHTS_DIR / f"{n}.train.csv")))
        assert len(rows) == runs[n]["steps"]
        first = np.mean([float(r["loss"]) for r in rows[:20]])
        last = np.mean([float(r["loss"]) for r in rows[-50:]])
        assert last < 0.5 * first


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier.load()


def test_classifier_knows_real_digits(classifier):
    x, y = digits(16)
    _, te = split(len(x))
    assert classifier.accuracy(x[te], y[te]) > 0.9
    assert classifier.test_accuracy > 0.9
    assert classifier.accuracy(torch.rand(50, 1, 16, 16) * 2 - 1, torch.arange(50) % 10) < 0.5
    f = classifier.features(x[:40])
    assert f.shape == (40, 64)


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_models_make_recognizable_digits(name, classifier):
    model = load_pretrained(name)
    labels = torch.arange(10).repeat(2)
    x = sample(model, labels, steps=20, seed=0).latents
    assert x.shape == (20, 1, 16, 16) and torch.isfinite(x).all()
    acc = classifier.accuracy(x, labels)
    assert acc >= 0.4, f"{name}: {acc:.2f} of samples recognized (chance 0.1)"


# ---- metrics -----------------------------------------------------------------------------------

def test_image_metrics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 16, 16, generator=g)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    very = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    assert 20 < psnr(a, noisy) < 30 and psnr(a, very) < psnr(a, noisy)
    assert ssim(a, very) < ssim(a, noisy) < 1.0
    assert psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)) == pytest.approx(20.0)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2 * 2)
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 0, 0])
    assert frechet_distance(a, b) == pytest.approx(1.0 + 3.0, rel=0.1)


# ---- FORA-style cache and the split without skips ------------------------------------------------

def _counting(model):
    calls = {"attn": [], "mlp": [], "block": [], "merge": 0}
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_hook(lambda m, a, o, i=i: calls["attn"].append(i))
        blk.mlp.register_forward_hook(lambda m, a, o, i=i: calls["mlp"].append(i))
        blk.register_forward_hook(lambda m, a, o, i=i: calls["block"].append(i))
    return calls


def _inputs(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g),
            torch.tensor([3, 7][:n]))


@pytest.mark.parametrize("skip", [False, True])
def test_fora_reuses_each_blocks_attention_and_mlp(skip):
    cfg = replace(SMALL, depth=4, skip=skip)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    model, calls = CachedModel(dit), _counting(dit)
    cache = ForaCache(3)
    x, y = _inputs(cfg)
    with torch.no_grad():
        for step in range(5):
            calls["attn"].clear(), calls["mlp"].clear()
            t = torch.full((2,), 900 - 100 * step)
            out = model(x + 0.1 * step, t, y, cache=cache)
            if step in (0, 3):  # full: every block's attention and MLP run and are kept
                assert calls["attn"] == calls["mlp"] == list(range(4))
                kept = [a.clone() for a in cache.cached()["attn"]], [m.clone() for m in cache.cached()["mlp"]]
                assert torch.equal(out, dit(x + 0.1 * step, t, y))
            else:  # cached: none run; the block update uses the kept outputs with today's gates
                assert calls["attn"] == calls["mlp"] == []
                h, st = dit.embed(x + 0.1 * step, t, y)
                for i, blk in enumerate(dit.blocks):
                    if skip and i >= 2:
                        h = dit.merge(i - 2, h, st.skips.pop())
                    _, _, g1, _, _, g2 = blk.adaLN_modulation(st.c).unsqueeze(1).chunk(6, dim=-1)
                    h = h + g1 * kept[0][i]
                    h = h + g2 * kept[1][i]
                    if skip and i < 2:
                        st.skips.append(h)
                torch.testing.assert_close(out, dit.head(h, st), rtol=1e-6, atol=1e-6)
    rep = cache.report()
    assert rep.kinds == ["full", "cached", "cached", "full", "cached"]
    assert rep.blocks_run == 8 and rep.blocks_total == 20


def test_fora_interval_1_is_the_uncached_model():
    cfg = replace(SMALL, depth=3, skip=False)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    x, y = _inputs(cfg)
    ref = sample(dit, y, steps=6, seed=1).latents
    got = sample(CachedModel(dit), y, steps=6, seed=1, cache=ForaCache(1)).latents
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        ForaCache(0)


def test_split_without_skips_runs_skipcache_blocks_and_ignores_the_input():
    cfg = replace(SMALL, depth=6, skip=False)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    model, calls = CachedModel(dit), _counting(dit)
    cache = SkipCache(interval=2, branch=2)
    x, y = _inputs(cfg)
    t = torch.full((2,), 500)
    with torch.no_grad():
        full = model(x, t, y, cache=cache)
        assert calls["block"] == list(range(6))
        torch.testing.assert_close(full, dit(x, t, y))
        calls["block"].clear()
        cached = model(x, t, y, cache=cache)
        assert calls["block"] == [0, 1, 4, 5]  # Skip-Cache's blocks
        # without long skips nothing carries the shallow blocks' output to the head:
        # a cached step's output does not depend on its input at all
        cache2 = SkipCache(interval=2, branch=2)
        model(x, t, y, cache=cache2)
        other = model(torch.randn_like(x), t, y, cache=cache2)
        assert torch.equal(cached, other)
