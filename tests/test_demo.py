"""`skipdit-fast demo` end to end on the shipped Skip-DiT (few steps)."""

import argparse
import math

import pytest
import torch

from skipdit_fast.apps import cli, demo


def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    argv = ["--steps", "8", "--per-class", "1", "--repeats", "1", "--no-progress", "--out-dir", str(tmp_path)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def test_demo_cli_end_to_end(tmp_path, capsys):
    rc = cli.main(["demo", "--steps", "8", "--per-class", "1", "--repeats", "1", "--no-progress",
                   "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("no cache:", "Skip-Cache:", "speedup", "PSNR", "digit classifier", "demo done"):
        assert word in out, out
    for name in ("nocache.png", "skipcache.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 500


def test_demo_numbers(tmp_path):
    res = demo.run(_args(tmp_path, interval=2, branch=2), log=lambda *a: None)
    assert res["seconds_nocache"] > 0 and res["seconds_cache"] > 0
    assert res["speedup"] == pytest.approx(res["seconds_nocache"] / res["seconds_cache"])
    assert res["block_ratio"] > 1.0
    assert 5.0 < res["psnr"] < math.inf and 0.0 < res["ssim"] < 1.0
    assert 0.0 <= res["accuracy_cache"] <= 1.0


def test_demo_refuses_a_model_without_skips(tmp_path, capsys):
    rc = cli.main(["demo", "--weights", "tiny-dit", "--steps", "4", "--no-progress", "--out-dir", str(tmp_path)])
    assert rc == 1 and "long skips" in capsys.readouterr().err


def test_digit_grid_layout():
    imgs = torch.zeros(12, 1, 4, 4)
    imgs[3] = 1.0  # row 0, column 3
    imgs[11] = 0.5  # row 1, column 1
    g = demo.digit_grid(imgs, cols=10, scale=2, pad=1)
    assert g.shape == (2 * 9 + 1, 10 * 9 + 1, 3) and g.dtype == torch.uint8
    assert int(g[1, 1 + 3 * 9, 0]) == 255 and int(g[1, 1 + 2 * 9, 0]) == 0
    assert int(g[1 + 9, 1 + 9, 0]) == 128


@pytest.mark.gpu
def test_demo_on_the_gpu_uses_our_kernels(tmp_path):
    res = demo.run(_args(tmp_path, device="cuda"), log=lambda *a: None)
    assert res["device"].startswith("cuda")
    assert res["backends"]["skip_fuse"] in ("cuda", "triton"), res["backends"]
    assert 5.0 < res["psnr"] and res["accuracy_cache"] >= 0.0
