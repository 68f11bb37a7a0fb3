"""Bad command lines end in one line that says what to do (issue 16.6b), never a
traceback, and before any work: argparse's `error: argument --x: ...` (exit 2) for a
bad value, `skipdit-fast CMD: error: ...` (exit 1) for what is found after parsing
(a checkpoint that is not one, an output that cannot be written, a model that cannot
do what was asked). Every case runs with the work itself (sampling, training,
tuning, benchmarking, the demo) replaced by a function that fails the test: the
checks must come first. A bug (any other exception) still raises."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from skipdit_fast.apps import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad input files: {name: path}."""
    d = tmp_path_factory.mktemp("cli-errors")
    f = {"dir": str(d), "ro": str(d / "ro")}
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt").write_bytes(b"not a checkpoint " * 20)
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (d / "empty.safetensors").write_bytes(b"")
    torch.save({"a": torch.zeros(1000)}, d / "whole.pt")
    data = (d / "whole.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save([1, 2, 3], d / "list.pt")
    (d / "a-file").write_text("x")
    (d / "vae-no-config").mkdir()
    for k in ("empty.pt", "garbage.pt", "garbage.safetensors", "empty.safetensors", "truncated.pt", "list.pt",
              "a-file", "vae-no-config"):
        f[k.replace(".", "_")] = str(d / k)
    return f


def _f(argv, files):
    return [a.format(**files) for a in argv]


# (argv, exit code, text the one error line must contain); {name} -> files[name].
# Cheap settings (DiT-S/8, few steps) keep a case short even when its check is missing.
S = ["sample", "--model", "DiT-S/8", "--steps", "2", "--out", "{dir}/x.png"]
SS = ["sample", "--model", "DiT-S/8-skip", "--steps", "2", "--out", "{dir}/x.png"]
CASES = {
    # sample: argparse
    "sample steps 0": (S + ["--steps", "0"], 2, "argument --steps"),
    "sample steps negative": (S + ["--steps", "-5"], 2, "argument --steps"),
    "sample steps above the timesteps": (S + ["--steps", "1001"], 2, "argument --steps: must be an integer in 1..1000"),
    "sample steps not a number": (S + ["--steps", "many"], 2, "argument --steps"),
    "sample cfg nan": (S + ["--cfg", "nan"], 2, "argument --cfg: must be a finite number"),
    "sample cfg inf": (S + ["--cfg", "inf"], 2, "argument --cfg"),
    "sample cache interval -1": (SS + ["--cache-interval", "-1"], 2, "argument --cache-interval"),
    "sample cache branch 0": (SS + ["--cache-interval", "2", "--cache-branch", "0"], 2, "argument --cache-branch"),
    "sample cache branch text": (SS + ["--cache-interval", "2", "--cache-branch", "x"], 2, "argument --cache-branch"),
    "sample cache threshold nan": (SS + ["--cache-interval", "2", "--cache-threshold", "nan"], 2,
                                   "argument --cache-threshold"),
    "sample cache threshold negative": (SS + ["--cache-interval", "2", "--cache-threshold", "-0.1"], 2,
                                        "argument --cache-threshold"),
    "sample device gpu7": (S + ["--device", "gpu7"], 2, "argument --device"),
    "sample device cuda:x": (S + ["--device", "cuda:x"], 2, "argument --device"),
    "sample vae chunk 0": (S + ["--vae-chunk", "0"], 2, "argument --vae-chunk"),
    "sample fps 0": (S + ["--fps", "0"], 2, "argument --fps"),
    "sample num-samples 0": (S + ["--num-samples", "0"], 2, "argument --num-samples"),
    "sample num-frames 0": (S + ["--num-frames", "0"], 2, "argument --num-frames"),
    "sample seed -1": (S + ["--seed", "-1"], 2, "argument --seed"),
    "sample image-size 300": (S + ["--image-size", "300"], 2, "argument --image-size"),
    # sample: after parsing
    "sample ckpt missing": (S + ["--ckpt", "{dir}/none.pt"], 1, "--ckpt"),
    "sample ckpt empty": (S + ["--ckpt", "{empty_pt}"], 1, "--ckpt"),
    "sample ckpt garbage": (S + ["--ckpt", "{garbage_pt}"], 1, "--ckpt"),
    "sample ckpt truncated": (S + ["--ckpt", "{truncated_pt}"], 1, "--ckpt"),
    "sample ckpt not a state dict": (S + ["--ckpt", "{list_pt}"], 1, "--ckpt"),
    "sample ckpt a folder": (S + ["--ckpt", "{dir}"], 1, "--ckpt"),
    "sample ckpt garbage safetensors": (S + ["--ckpt", "{garbage_safetensors}"], 1, "--ckpt"),
    "sample ckpt empty safetensors": (S + ["--ckpt", "{empty_safetensors}"], 1, "--ckpt"),
    "sample out folder missing": (S + ["--out", "{dir}/no/such/x.png"], 1, "--out"),
    "sample out is a folder": (S + ["--out", "{dir}"], 1, "--out"),
    "sample out under a file": (S + ["--out", "{a-file}/x.png"], 1, "--out"),
    "sample out extension": (S + ["--out", "{dir}/x.jpg"], 1, "--out"),
    "sample latte out extension": (["sample", "--model", "Latte-S/8", "--out", "{dir}/x.png"], 1, "--out"),
    "sample vae a hub id": (S + ["--vae", "someone/some-vae"], 1, "--vae"),
    "sample vae without config": (S + ["--vae", "{vae-no-config}"], 1, "--vae"),
    "sample unknown model": (["sample", "--model", "DiT-Q/8", "--out", "{dir}/x.png"], 1, "--model"),
    "sample class out of range": (S + ["--classes", "5000"], 1, "--classes"),
    "sample cache without skips": (S + ["--cache-interval", "2"], 1, "--cache-interval"),
    "sample cache branch too large": (SS + ["--cache-interval", "2", "--cache-branch", "9"], 1, "--cache-branch"),
    "sample branch without cache": (SS + ["--cache-branch", "2"], 1, "--cache-branch"),
    "sample num-frames on a DiT": (S + ["--num-frames", "4"], 1, "--num-frames"),
    # demo
    "demo scale 0": (["demo", "--scale", "0"], 2, "argument --scale"),
    "demo steps 0": (["demo", "--steps", "0"], 2, "argument --steps"),
    "demo steps 5000": (["demo", "--steps", "5000"], 2, "argument --steps"),
    "demo per-class 0": (["demo", "--per-class", "0"], 2, "argument --per-class"),
    "demo interval -1": (["demo", "--interval", "-1"], 2, "argument --interval"),
    "demo branch 0": (["demo", "--branch", "0"], 2, "argument --branch"),
    "demo repeats 0": (["demo", "--repeats", "0"], 2, "argument --repeats"),
    "demo device": (["demo", "--device", "tpu"], 2, "argument --device"),
    "demo weights unknown": (["demo", "--weights", "tiny-nothing", "--out-dir", "{dir}/d"], 1, "--weights"),
    "demo weights missing file": (["demo", "--weights", "{dir}/none.safetensors", "--out-dir", "{dir}/d"], 1,
                                  "--weights"),
    "demo weights garbage": (["demo", "--weights", "{garbage_safetensors}", "--out-dir", "{dir}/d"], 1, "--weights"),
    "demo weights empty": (["demo", "--weights", "{empty_safetensors}", "--out-dir", "{dir}/d"], 1, "--weights"),
    "demo weights without skips": (["demo", "--weights", "tiny-dit", "--out-dir", "{dir}/d"], 1, "--weights"),
    "demo video weights without --video": (["demo", "--weights", "tiny-latte-skip", "--out-dir", "{dir}/d"], 1,
                                           "--video"),
    "demo image weights with --video": (["demo", "--video", "--weights", "tiny-skipdit", "--out-dir", "{dir}/d"], 1,
                                        "--video"),
    "demo branch too large": (["demo", "--branch", "9", "--out-dir", "{dir}/d"], 1, "--branch"),
    "demo out-dir is a file": (["demo", "--out-dir", "{a-file}"], 1, "--out-dir"),
    # probe
    "probe steps 1": (["probe", "--steps", "1"], 2, "argument --steps"),
    "probe steps 2000": (["probe", "--steps", "2000"], 2, "argument --steps"),
    "probe branch 0": (["probe", "--branch", "0"], 2, "argument --branch"),
    "probe power-iters 0": (["probe", "--power-iters", "0"], 2, "argument --power-iters"),
    "probe spectral-every -1": (["probe", "--spectral-every", "-1"], 2, "argument --spectral-every"),
    "probe device": (["probe", "--device", "gpu7"], 2, "argument --device"),
    "probe ckpt count": (["probe", "--model", "DiT-S/8", "--ckpt", "a.pt", "--ckpt", "b.pt", "--out-dir", "{dir}/p"],
                         1, "--ckpt"),
    "probe ckpt missing": (["probe", "--model", "DiT-S/8", "--ckpt", "{dir}/none.pt", "--out-dir", "{dir}/p"], 1,
                           "--ckpt"),
    "probe ckpt truncated": (["probe", "--model", "DiT-S/8", "--ckpt", "{truncated_pt}", "--out-dir", "{dir}/p"], 1,
                             "--ckpt"),
    "probe unknown model": (["probe", "--model", "DiT-Q/8", "--out-dir", "{dir}/p"], 1, "--model"),
    "probe shipped with ckpt": (["probe", "--model", "tiny-dit", "--ckpt", "{garbage_pt}", "--out-dir", "{dir}/p"], 1,
                                "--ckpt"),
    "probe branch too large": (["probe", "--branch", "9", "--out-dir", "{dir}/p"], 1, "--branch"),
    "probe class out of range": (["probe", "--classes", "10", "--out-dir", "{dir}/p"], 1, "--classes"),
    "probe class negative": (["probe", "--classes", "-1"], 2, "argument --classes"),
    "probe seed past 64 bits": (["probe", "--seed", str(2 ** 64)], 2, "argument --seed"),
    "sample seed past 64 bits": (["sample", "--seed", str(2 ** 64), "--out", "{dir}/g.png"], 2, "argument --seed"),
    "calibrate seed past 64 bits": (["calibrate", "--speedup", "2", "--seed", str(2 ** 64), "--out", "{dir}/s.json"],
                                    2, "argument --seed"),
    "probe out-dir is a file": (["probe", "--out-dir", "{a-file}"], 1, "--out-dir"),
    # train
    "train threads -1": (["train", "--threads", "-1"], 2, "argument --threads"),
    "train threads 0": (["train", "--threads", "0"], 2, "argument --threads"),
    "train steps 0": (["train", "--steps", "0"], 2, "argument --steps"),
    "train batch-size 0": (["train", "--batch-size", "0"], 2, "argument --batch-size"),
    "train lr nan": (["train", "--lr", "nan"], 2, "argument --lr"),
    "train lr negative": (["train", "--lr", "-1e-3"], 2, "argument --lr"),
    "train seed -1": (["train", "--seed", "-1"], 2, "argument --seed"),
    "train unknown model": (["train", "--model", "tiny-nothing"], 2, "argument --model"),
    "train batch larger than the data": (["train", "--batch-size", "100000", "--out", "{dir}/t"], 1, "--batch-size"),
    "train only without default": (["train", "--only", "tiny-dit", "--out", "{dir}/t"], 1, "--only"),
    "train no-classifier without default": (["train", "--no-classifier", "--out", "{dir}/t"], 1, "--no-classifier"),
    "train out with default": (["train", "--default", "--out", "{dir}/t"], 1, "--out"),
    "train out is a file": (["train", "--out", "{a-file}"], 1, "--out"),
    # tune
    "tune batch 0": (["tune", "--batch", "0"], 2, "argument --batch"),
    "tune image-size 0": (["tune", "--image-size", "0"], 2, "argument --image-size"),
    "tune device": (["tune", "--device", "gpu7"], 2, "argument --device"),
    "tune image-size not a multiple": (["tune", "--model", "DiT-S/8", "--image-size", "100", "--device", "cpu"], 1,
                                       "--image-size"),
    "tune json folder missing": (["tune", "--model", "DiT-S/8", "--json", "{dir}/no/t.json", "--device", "cpu"], 1,
                                 "--json"),
    "tune markdown is a folder": (["tune", "--model", "DiT-S/8", "--markdown", "{dir}", "--device", "cpu"], 1,
                                  "--markdown"),
    # bench
    "bench threads -1": (["bench", "--threads", "-1"], 2, "argument --threads"),
    "bench budget 0": (["bench", "--budget", "0"], 2, "argument --budget"),
    "bench budget nan": (["bench", "--budget", "nan"], 2, "argument --budget"),
    "bench device": (["bench", "--device", "gpu7"], 2, "argument --device"),
    "bench json folder missing": (["bench", "--quick", "--json", "{dir}/no/b.json"], 1, "--json"),
    "bench plot is a folder": (["bench", "--quick", "--plot", "{dir}"], 1, "--plot"),
    "bench save-dir is a file": (["bench", "--quick", "--save-dir", "{a-file}"], 1, "--save-dir"),
    # info
    "info unknown argument": (["info", "--bogus"], 2, "unrecognized arguments: --bogus"),
}
try:
    import imageio_ffmpeg  # noqa: F401
except ImportError:   # found before sampling (it was an ImportError after the run)
    CASES["sample mp4 without imageio-ffmpeg"] = (["sample", "--model", "Latte-S/8", "--steps", "2", "--out",
                                                   "{dir}/v.mp4"], 1, "--out .mp4 needs imageio-ffmpeg")
if not torch.cuda.is_available():
    CASES["sample device cuda without one"] = (S + ["--device", "cuda"], 2, "argument --device: cuda: no CUDA device")
    CASES["tune device cuda without one"] = (["tune", "--device", "cuda:0"], 2, "argument --device")


class WorkStarted(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """The work of every subcommand fails the test if it starts."""
    import skipdit_fast.apps.demo as demo
    import skipdit_fast.apps.train as train
    import skipdit_fast.benchmark as bench
    import skipdit_fast.ops.tuning as tuning
    import skipdit_fast.sampling as sampling
    import skipdit_fast.analysis.probe as probe

    def work(*a, **k):
        raise WorkStarted("the work started before the bad argument was found")

    monkeypatch.setattr(sampling, "sample", work)
    monkeypatch.setattr(demo, "time_both", work)
    monkeypatch.setattr(train.Trainer, "run", work)
    monkeypatch.setattr(train, "train_default", work)
    monkeypatch.setattr(tuning, "tune", work)
    monkeypatch.setattr(bench, "run", work)
    monkeypatch.setattr(probe, "probe", work)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_one_line(case, files, no_work, capsys):
    argv, rc, text = CASES[case]
    argv = _f(argv, files)
    try:
        got = cli.main(argv)
    except SystemExit as e:   # argparse
        got = e.code
    err = capsys.readouterr().err
    assert got == rc, f"{argv}: exit {got}, want {rc}; stderr:\n{err}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"skipdit-fast {argv[0]}: error:") or errors[0].startswith("skipdit-fast: error:")
    assert text in errors[0], f"{text!r} not in {errors[0]!r}"


@pytest.mark.parametrize("argv, text", [
    (["sample", "--model", "DiT-S/8", "--ckpt", "{truncated_pt}", "--out", "{dir}/s.png"], "--ckpt"),
    (["sample", "--model", "DiT-S/8-skip", "--cache-interval", "-1", "--out", "{dir}/s.png"], "--cache-interval"),
    (["sample", "--device", "gpu7"], "--device"),
    (["train", "--threads", "-1"], "--threads"),
    (["demo", "--scale", "0"], "--scale"),
])
def test_bad_argument_in_a_fresh_process(argv, text, files):
    r = subprocess.run([sys.executable, "-m", "skipdit_fast", *_f(argv, files)], capture_output=True, text=True,
                       timeout=120, cwd=files["dir"], env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode not in (0, None), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert text in r.stderr.strip().splitlines()[-1], r.stderr


def test_a_bug_still_raises(monkeypatch, files):
    """Only the user-error family becomes one line: anything else keeps its traceback."""
    import skipdit_fast.apps.info as info

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(info, "main", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["info"])


def test_user_error_family(monkeypatch, capsys):
    import skipdit_fast.apps.info as info
    from skipdit_fast.models import CheckpointError
    from skipdit_fast.ops import BackendError

    for exc in (CheckpointError("ckpt x: missing keys\n  a\n  b"), BackendError("backend cuda: no GPU"),
                FileNotFoundError(2, "No such file or directory", "/x/y")):
        monkeypatch.setattr(info, "main", lambda args, e=exc: (_ for _ in ()).throw(e))
        assert cli.main(["info"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("skipdit-fast info: error: "), err
    assert "/x/y" in err


def test_resume_from_a_corrupt_checkpoint(files, no_work, capsys, tmp_path):
    (tmp_path / "tiny-skipdit.pt").write_bytes(b"\x00" * 100)
    assert cli.main(["train", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--no-resume" in err and "Traceback" not in err
