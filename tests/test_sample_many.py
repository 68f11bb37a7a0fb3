"""`skipdit-fast sample-many` and `skipdit-fast evaluate` (issue 13): determinism across
world sizes (torchrun, gloo), resume after a kill, failure propagation, Skip-Cache
reports per rank, the merged ADM-layout npz and manifest, evaluation, bad arguments;
and the pieces (sampling.shards, sample(seeds=)). On the CPU, a few sampling steps of
the shipped tiny models; every run is a real process (torchrun for 2 ranks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from skipdit_fast.apps import cli
from skipdit_fast.sampling import shards as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# small and fast: 20 samples in shards of 8 (3 shards: 8, 8, 4), batches of 4, 3 steps
BASE = ["--num-samples", "20", "--per-proc-batch", "4", "--shard-size", "8", "--steps", "3", "--threads", "1",
        "--cfg", "1.5", "--seed", "3", "--no-progress"]
CACHE = ["--cache-interval", "2", "--cache-branch", "2"]
TIMEOUT = 180


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SKIPDIT_SAMPLE_MANY_TEST"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_one(out, *args, hook: str | None = None) -> subprocess.CompletedProcess:
    extra = {"SKIPDIT_SAMPLE_MANY_TEST": hook} if hook else {}
    return subprocess.run([PY, "-m", "skipdit_fast", "sample-many", *BASE, *args, "--out", str(out)],
                          env=_env(**extra), capture_output=True, text=True, timeout=TIMEOUT)


def run_torchrun(out, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "skipdit_fast", "sample-many", *BASE, *args, "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out, *args, world: int = 2, hook: str | None = None, timeout: float = 60) -> list:
    """The ranks started by hand with torchrun's variables (so each exit code is seen)."""
    port = free_port()
    procs = []
    for r in range(world):
        env = _env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **({"SKIPDIT_SAMPLE_MANY_TEST": hook} if hook else {}))
        procs.append(subprocess.Popen([PY, "-m", "skipdit_fast", "sample-many", *BASE, *args, "--out", str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank did not exit within {timeout} s")
        results.append((p.returncode, err))
    return results


def load(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return {k: z[k] for k in z.files}


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 1-process run with Skip-Cache: (folder, arrays, manifest)."""
    out = tmp_path_factory.mktemp("ref") / "samples"
    ok(run_one(out, *CACHE))
    return out, load(out), json.load(open(out / "manifest.json"))


def test_merged_layout_and_manifest(reference):
    out, z, m = reference
    assert sorted(z) == ["arr_0", "arr_1"]
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (20, 16, 16, 1)
    assert z["arr_1"].dtype == np.int64 and z["arr_1"].tolist() == [i % 10 for i in range(20)]
    # sample order: shard s holds ids 8s.., in the merged file at the same rows
    with np.load(out / "shard-000001.npz") as sh:
        assert sh["ids"].tolist() == list(range(8, 16))
        assert np.array_equal(sh["samples"], z["arr_0"][8:16])
    assert m["world_size"] == 1 and m["backends"]["process_group"] is None
    assert set(m["backends"]["ops"]) == {"attention", "skip_fuse"}
    assert m["model"]["name"] == "tiny-skipdit" and len(m["model"]["checkpoint_sha256"]) == 64
    assert m["model"]["checkpoint_sha256"] == S.file_sha256(m["model"]["checkpoint"])
    assert m["sampler"]["steps"] == 3 and m["sampler"]["cfg_scale"] == 1.5 and m["sampler"]["seed"] == 3
    assert m["shards"]["count"] == 3 and m["timing"]["samples_this_run"] == 20
    assert m["timing"]["seconds_per_sample"] > 0 and m["package"]["version"]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def _one_call_report():
    """The Skip-Cache report of one sample() call with the test's settings (the block
    counts do not depend on the batch)."""
    from skipdit_fast import SkipCache
    from skipdit_fast.pretrained import load_pretrained
    from skipdit_fast.sampling import sample

    model = load_pretrained("tiny-skipdit")
    return sample(model, [0], steps=3, cfg_scale=1.5, cache=SkipCache.for_model(model, interval=2, branch=2)).report


def test_two_ranks_match_one_bit_for_bit_and_cache_reports(reference, tmp_path):
    _, z1, m1 = reference
    out = tmp_path / "two"
    ok(run_torchrun(out, *CACHE))
    z2, m2 = load(out), json.load(open(out / "manifest.json"))
    assert np.array_equal(z1["arr_0"], z2["arr_0"]) and np.array_equal(z1["arr_1"], z2["arr_1"])
    assert m2["world_size"] == 2 and m2["backends"]["process_group"] == "gloo"
    # shards 0, 2 on rank 0 (2 + 1 batches), shard 1 on rank 1 (2 batches)
    assert [p["shards"] for p in m2["per_rank"]] == [2, 1]
    assert [p["samples"] for p in m2["per_rank"]] == [12, 8]
    one = _one_call_report()
    assert one.cached_steps >= 1
    for rank, batches in ((0, 3), (1, 2)):
        rep = m2["cache"]["per_rank"][rank]
        for k in ("steps", "full_steps", "cached_steps", "blocks_run", "blocks_total"):
            assert rep[k] == batches * getattr(one, k), (rank, k)
    total = m2["cache"]["total"]
    for k in S.REPORT_TOTALS:
        assert total[k] == sum(p[k] for p in m2["cache"]["per_rank"])
        assert total[k] == m1["cache"]["total"][k] == m2["cache"]["total_all_shards"][k]
    assert total["ideal_speedup"] == pytest.approx(one.ideal_speedup)


def test_killed_run_resumes_to_the_same_file(reference, tmp_path):
    _, z1, _ = reference
    out = tmp_path / "killed"
    r = run_one(out, *CACHE, hook="kill-after:1")
    assert r.returncode == -signal.SIGKILL
    assert sorted(os.listdir(out)) == ["shard-000000.npz"]
    r = run_one(out, *CACHE, hook="kill-in-write:0")  # dies halfway through writing its first shard
    assert r.returncode == -signal.SIGKILL
    left = sorted(os.listdir(out))
    assert left[0] == "shard-000000.npz" and len(left) == 2 and left[1].startswith("shard-000001.npz.tmp-")
    r = ok(run_one(out, *CACHE))
    assert "removed 1 temporary file" in r.stderr and "1 shards done before, 2 to do" in r.stderr
    assert np.array_equal(load(out)["arr_0"], z1["arr_0"]) and np.array_equal(load(out)["arr_1"], z1["arr_1"])
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    # a corrupt shard is redone, a complete one is kept
    with open(out / "shard-000001.npz", "r+b") as f:
        f.truncate(100)
    before = os.stat(out / "shard-000000.npz").st_mtime_ns
    r = ok(run_one(out, *CACHE))
    assert "shard-000001.npz: redone" in r.stderr and "2 shards done before, 1 to do" in r.stderr
    assert os.stat(out / "shard-000000.npz").st_mtime_ns == before
    assert np.array_equal(load(out)["arr_0"], z1["arr_0"])
    # shards of other settings are never mixed in
    r = run_one(out, "--seed", "4", *CACHE)
    assert r.returncode != 0 and "other settings" in r.stderr and "seed" in r.stderr


@pytest.mark.parametrize("hook", ["fail-rank:1", "kill-rank:1"])
def test_a_failing_rank_fails_every_rank(tmp_path, hook):
    res = run_ranks(tmp_path / "fail", "--timeout", "30", hook=hook, timeout=90)
    codes = [c for c, _ in res]
    assert all(c != 0 for c in codes), codes
    if hook == "fail-rank:1":
        assert codes == [1, 1]
        assert "rank 1: RuntimeError" in res[0][1] and "fails on purpose" in res[0][1]
        assert len(res[0][1].strip().splitlines()) <= 3, res[0][1]
    else:
        assert codes[1] == -signal.SIGKILL and codes[0] == 1
        assert "did a rank die" in res[0][1]
    assert not os.path.exists(tmp_path / "fail" / "samples.npz")


def test_a_hanging_rank_times_the_others_out(tmp_path):
    port = free_port()
    procs = []
    for r in range(2):
        env = _env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   SKIPDIT_SAMPLE_MANY_TEST="hang-rank:1")
        procs.append(subprocess.Popen([PY, "-m", "skipdit_fast", "sample-many", *BASE, "--timeout", "8", "--out",
                                       str(tmp_path / "hang")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 1 and "did a rank die or hang" in err, err
        assert procs[1].poll() is None          # still asleep: under torchrun the agent stops it
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_video_model_writes_frames(tmp_path):
    out = tmp_path / "video"
    ok(subprocess.run([PY, "-m", "skipdit_fast", "sample-many", "--model", "tiny-latte-skip", "--num-samples", "3",
                       "--per-proc-batch", "2", "--steps", "2", "--cache-interval", "2", "--threads", "1",
                       "--no-progress", "--out", str(out)], env=_env(), capture_output=True, text=True,
                      timeout=TIMEOUT))
    z = load(out)
    assert z["arr_0"].shape == (3, 8, 16, 16, 1) and z["arr_0"].dtype == np.uint8
    assert z["arr_1"].tolist() == [0, 1, 2]
    assert json.load(open(out / "manifest.json"))["layout"]["axes"] == "N, F, H, W, C"
    assert cli.main(["evaluate", str(out / "samples.npz")]) == 0


def _npz(path, x, y=None):
    np.savez(path, *([x] if y is None else [x, y]))
    return str(path)


def test_evaluate_digits(reference, tmp_path, capsys):
    from skipdit_fast.apps.evaluate import as_unit
    from skipdit_fast.data.digits import digits
    from skipdit_fast.evaluation.digits import DigitClassifier, scores

    out, z, _ = reference
    js = tmp_path / "e.json"
    assert cli.main(["evaluate", str(out / "samples.npz"), "--json", str(js)]) == 0
    res = json.load(open(js))
    clf = DigitClassifier.load()
    real, real_y = digits(16)
    direct = scores(clf, clf.features(real), as_unit(z["arr_0"]) * 2 - 1, z["arr_1"])
    assert res["accuracy"] == direct["accuracy"] and res["fd"] == pytest.approx(direct["fd"])
    assert "accuracy" in capsys.readouterr().out
    # real digits, in the same layout: the classifier knows them, FD near 0
    u8 = S.to_uint8((real[:200] + 1) / 2)
    assert cli.main(["evaluate", _npz(tmp_path / "real.npz", u8, real_y[:200].numpy()), "--json", str(js)]) == 0
    real_res = json.load(open(js))
    assert real_res["accuracy"] > 0.9 and real_res["fd"] < res["fd"]


def test_evaluate_psnr_ssim(reference, tmp_path, capsys):
    out, z, _ = reference
    js = tmp_path / "p.json"
    a = str(out / "samples.npz")
    assert cli.main(["evaluate", a, "--ref", a, "--json", str(js)]) == 0
    same = json.load(open(js))
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    other = z["arr_0"][:, ::-1].copy()
    assert cli.main(["evaluate", a, "--ref", _npz(tmp_path / "o.npz", other, z["arr_1"]), "--json", str(js)]) == 0
    diff = json.load(open(js))
    mse = ((z["arr_0"] / 255.0 - other / 255.0) ** 2).mean()
    assert diff["psnr"] == pytest.approx(10 * np.log10(1 / mse)) and diff["ssim"] < 0.99


@pytest.mark.parametrize("argv, needle", [
    # argparse's one line (exit 2) for values the type helpers of apps/common.py refuse
    (["sample-many", "--num-samples", "0"], "argument --num-samples: must be an integer >= 1"),
    (["sample-many", "--num-samples", "-3"], "argument --num-samples: must be an integer >= 1"),
    (["sample-many", "--per-proc-batch", "0"], "argument --per-proc-batch: must be an integer >= 1"),
    (["sample-many", "--shard-size", "0"], "argument --shard-size: must be an integer >= 1"),
    (["sample-many", "--steps", "0"], "argument --steps: must be an integer"),
    (["sample-many", "--cache-interval", "-1"], "argument --cache-interval: must be an integer >= 0"),
    (["sample-many", "--timeout", "0"], "argument --timeout:"),
    (["sample-many", "--cfg", "nan"], "argument --cfg:"),
    (["sample-many", "--device", "gpu7"], "argument --device:"),
    # the app's own checks (one line, exit 2) before any work
    (["sample-many", "--out", "FILE"], "is a file, not a folder"),
    (["sample-many", "--ckpt", "x.pt"], "shipped model"),
    (["evaluate", "MISSING.npz"], "cannot read"),
    (["evaluate", "FILE"], "cannot read"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, argv, needle):
    f = tmp_path / "a_file"
    f.write_text("x")
    argv = [str(f) if a == "FILE" else str(tmp_path / a) if a == "MISSING.npz" else a for a in argv]
    if argv[0] == "sample-many" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    try:
        code = cli.main(argv)
    except SystemExit as e:     # argparse: usage line + one error line
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and needle in err.splitlines()[-1], err


def test_evaluate_rejects_what_it_cannot_score(tmp_path, capsys):
    imagenet = np.zeros((4, 32, 32, 3), np.uint8)
    assert cli.main(["evaluate", _npz(tmp_path / "i.npz", imagenet)]) == 2
    assert "ADM evaluator" in capsys.readouterr().err
    assert cli.main(["evaluate", _npz(tmp_path / "f.npz", np.zeros((4, 16, 16, 1), np.float32))]) == 2
    assert "uint8" in capsys.readouterr().err
    a = _npz(tmp_path / "a.npz", np.zeros((4, 16, 16, 1), np.uint8))
    b = _npz(tmp_path / "b.npz", np.zeros((5, 16, 16, 1), np.uint8))
    assert cli.main(["evaluate", a, "--ref", b]) == 2
    assert "same shape" in capsys.readouterr().err


# ---- the pieces ------------------------------------------------------------------------

def test_shard_plan_schedule_and_seeds():
    plan = S.ShardPlan(20, 8, 3)
    assert plan.num_shards == 3 and list(plan.shard_ids(2)) == [16, 17, 18, 19]
    assert [list(b) for b in plan.batches(1)] == [[8, 9, 10], [11, 12, 13], [14, 15]]
    assert S.ShardPlan.assign([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    assert S.class_labels(range(8, 13), 10) == [8, 9, 0, 1, 2]
    seeds = S.sample_seeds(0, range(100))
    assert len(set(seeds)) == 100 and all(0 <= s < 2 ** 63 for s in seeds)
    assert S.sample_seed(0, 5) == seeds[5] != S.sample_seed(1, 5)
    for bad in (dict(num_samples=0, shard_size=1, batch_size=1), dict(num_samples=1, shard_size=1, batch_size=0)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            S.ShardPlan(**bad)
    with pytest.raises(ValueError, match="rank"):
        S.ShardPlan.assign([0], 2, 2)


def test_check_shard(tmp_path):
    run = {"seed": 1, "steps": 3}
    x = np.zeros((4, 16, 16, 1), np.uint8)
    S.write_shard(str(tmp_path), 0, x, [0, 1, 2, 3], range(4), 1.0, None, run)
    data, why = S.check_shard(S.shard_path(str(tmp_path), 0), range(4), (16, 16, 1), run)
    assert why == "" and np.array_equal(data["samples"], x)
    assert S.check_shard(S.shard_path(str(tmp_path), 0), range(4, 8), (16, 16, 1), run)[1] == "wrong sample ids"
    assert "expected uint8" in S.check_shard(S.shard_path(str(tmp_path), 0), range(4), (8, 8, 1), run)[1]
    with pytest.raises(ValueError, match="other settings"):
        S.check_shard(S.shard_path(str(tmp_path), 0), range(4), (16, 16, 1), {"seed": 2, "steps": 3})
    (tmp_path / "shard-000001.npz").write_bytes(b"not a zip")
    assert "unreadable" in S.check_shard(str(tmp_path / "shard-000001.npz"), range(4), (16, 16, 1), run)[1]


def test_sample_seeds_are_per_sample():
    from skipdit_fast.pretrained import load_pretrained
    from skipdit_fast.sampling import sample

    torch.set_num_threads(1)
    model = load_pretrained("tiny-skipdit")
    both = sample(model, [1, 2], steps=3, seeds=[11, 22]).latents
    alone = sample(model, [2], steps=3, seeds=[22]).latents
    swapped = sample(model, [2, 1], steps=3, seeds=[22, 11]).latents
    # the noise is exactly per sample; the model's GEMMs may round differently for another
    # batch (which is why sample-many fixes the batches), so the samples agree to rounding
    from skipdit_fast.sampling.diffusion import randn

    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    assert torch.equal(randn((2, 3), gens(11, 22), "cpu")[1:], randn((1, 3), gens(22), "cpu"))
    assert torch.equal(randn((4, 3), gens(11, 22), "cpu")[2:], randn((2, 3), gens(11, 22), "cpu"))  # CFG halves
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-3)
    torch.testing.assert_close(both.flip(0), swapped, rtol=0, atol=1e-3)
    assert (both[1:] - sample(model, [2], steps=3, seeds=[23]).latents).abs().max() > 0.1
    # without seeds: one generator, as before
    assert torch.equal(sample(model, [1, 2], steps=3, seed=5).latents, sample(model, [1, 2], steps=3, seed=5).latents)
    with pytest.raises(ValueError, match="one seed per sample"):
        sample(model, [1, 2], steps=3, seeds=[1])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny random AutoencoderKL folder (4 latent channels, 2x upsampling)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def test_model_of_latents_needs_and_uses_a_vae(tmp_path, capsys, tiny_vae):
    argv = ["sample-many", "--model", "DiT-S/8-skip", "--num-samples", "3", "--per-proc-batch", "2", "--steps", "2",
            "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "novae")]) == 1
    assert "pass --vae" in capsys.readouterr().err
    out = tmp_path / "vae-out"
    assert cli.main([*argv, "--vae", str(tiny_vae), "--vae-chunk", "1", "--out", str(out)]) == 0
    assert "random weights" in capsys.readouterr().err
    z = load(out)
    assert z["arr_0"].shape == (3, 64, 64, 3) and z["arr_0"].dtype == np.uint8   # 32x32 latents, 2x upsampling
    assert z["arr_1"].tolist() == [0, 1, 2] and z["arr_0"].std() > 0
    m = json.load(open(out / "manifest.json"))
    assert m["model"]["vae"] == str(tiny_vae) and m["model"]["checkpoint"] is None


def test_unconditional_video_model_with_a_vae(tmp_path, tiny_vae):
    """A Latte without a label table (random weights, no --ckpt): unconditional, no arr_1, no CFG."""
    out = tmp_path / "latte"
    assert cli.main(["sample-many", "--model", "Latte-S/8-skip", "--num-frames", "2", "--num-samples", "3",
                     "--per-proc-batch", "2", "--steps", "2", "--cache-interval", "2", "--vae", str(tiny_vae),
                     "--no-progress", "--out", str(out)]) == 0
    z = load(out)
    assert sorted(z) == ["arr_0"] and z["arr_0"].shape == (3, 2, 64, 64, 3)
    m = json.load(open(out / "manifest.json"))
    assert m["layout"]["arr_1"] is None and m["sampler"]["cfg_scale"] == 1.0
    assert m["sampler"]["class_schedule"] == "unconditional" and m["cache"]["total"]["steps"] == 2 * 2
