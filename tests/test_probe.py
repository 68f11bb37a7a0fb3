"""The feature-stability probe (skipdit_fast.analysis.probe, `skipdit-fast probe`)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from skipdit_fast.analysis.probe import FeatureProbe, jacobian_spectral_norm, power_iteration, probe
from skipdit_fast.apps import cli
from skipdit_fast.models import DiT, DiTConfig
from skipdit_fast.models.layers import BlockState
from skipdit_fast.ops import use_backend

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = DiTConfig(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1,
                 num_classes=4, learn_sigma=True, mlp_ratio=2.0, skip=True)


def test_power_iteration_on_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    s = torch.tensor([7.0, 4.0] + [1.0 / (i + 1) for i in range(28)], dtype=torch.float64)
    A = U[:, :30] @ torch.diag(s) @ V.T
    sigma, history = power_iteration(lambda v: A @ v, lambda u: A.T @ u,
                                     torch.randn(30, generator=g, dtype=torch.float64), iters=20)
    assert abs(sigma - 7.0) <= 0.01 * 7.0 and len(history) == 20
    assert history[-1] >= history[0] - 1e-9  # the estimate grows towards sigma_max


def _deep_stack(model, K):
    """(fn, x): the deep stack of a tiny Skip-DiT at its block depth-K input."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    h, state = model.embed(x, torch.tensor([400]), torch.tensor([1]))
    h = model.run_blocks(h, 0, model.depth - K, state)
    skips = list(state.skips)

    def fn(z):
        st = BlockState(state.c)
        st.skips = list(skips)
        return model.run_blocks(z, model.depth - K, model.depth, st)

    return fn, h.detach()


def test_estimate_matches_the_explicit_jacobian():
    torch.manual_seed(0)
    model = DiT(TINY).double().eval()
    with use_backend("reference"):
        fn, x = _deep_stack(model, 2)
        J = torch.autograd.functional.jacobian(fn, x).reshape(x.numel(), x.numel())
        want = torch.linalg.svdvals(J)[0].item()
        got, _ = jacobian_spectral_norm(fn, x, iters=30, generator=torch.Generator().manual_seed(1))
    assert abs(got - want) <= 0.05 * want, (got, want)


def test_probe_records_every_step_and_leaves_the_samples_alone():
    from skipdit_fast.sampling import sample

    torch.manual_seed(0)
    model = DiT(TINY).eval()
    r = probe(model, [0, 1, 2], steps=5, branch=1, power_iters=3, name="tiny")
    assert len(r.steps) == 5 and r.steps[0].deep_cosine is None
    for s in r.steps[1:]:
        assert -1.0 <= s.deep_cosine <= 1.0 and s.deep_delta >= 0
        assert len(s.block_cosine) == len(s.block_delta) == TINY.depth
    assert all(s.amplification > 0 for s in r.steps)
    summary = r.summary()
    assert summary["mean_deep_cosine"] is not None and len(summary["mean_block_cosine"]) == TINY.depth
    # the probe's run is a full (uncached) run: same latents as without it
    obs = FeatureProbe(1, power_iters=2)
    a = sample(model, [0, 1, 2], steps=5, seed=0, cache=obs).latents
    b = sample(model, [0, 1, 2], steps=5, seed=0).latents
    assert torch.equal(a, b)
    assert obs.report().full_steps == 5 and obs.report().cached_steps == 0


def test_probe_on_a_vanilla_dit():
    torch.manual_seed(0)
    from dataclasses import replace

    r = probe(DiT(replace(TINY, skip=False)).eval(), [0, 1], steps=3, branch=2, spectral_every=2, power_iters=2)
    assert [s.amplification is not None for s in r.steps] == [True, False, True]


def test_bad_arguments():
    model = DiT(TINY).eval()
    with pytest.raises(ValueError, match="branch"):
        probe(model, [0], steps=2, branch=3)
    with pytest.raises(ValueError, match="branch must be an integer"):
        FeatureProbe(0)
    with pytest.raises(ValueError, match="iters"):
        power_iteration(lambda v: v, lambda u: u, torch.ones(3), iters=0)


def test_cli_on_the_shipped_models(tmp_path, capsys):
    t0 = time.perf_counter()
    assert cli.main(["probe", "--out-dir", str(tmp_path)]) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "probe.json").read_text())
    assert [r["model"] for r in data["results"]] == ["tiny-dit", "tiny-skipdit"]
    assert all(len(r["steps"]) == 50 for r in data["results"])
    assert "tiny-skipdit vs tiny-dit" in out
    for f in ("similarity.png", "amplification.png"):
        assert (tmp_path / f).stat().st_size > 1000
    assert seconds < 60, f"the probe of the tiny models took {seconds:.0f} s"


@pytest.mark.parametrize("argv, msg, rc", [
    (["--steps", "1"], "argument --steps: must be an integer in 2..1000", 2),   # argparse
    (["--model", "DiT-S/8-skip", "--ckpt", "a.pt", "--ckpt", "b.pt"], "give one per such model", 1),
    (["--model", "tiny-dit", "--model", "DiT-S/8", "--ckpt", "/nonexistent.pt"], "nonexistent", 1),
    (["--model", "DiT-Q/8"], "unknown model", 1),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, msg, rc):
    try:
        got = cli.main(["probe", "--out-dir", str(tmp_path), *argv])
    except SystemExit as e:
        got = e.code
    assert got == rc
    assert msg in capsys.readouterr().err
