"""Cache schedules (skipdit_fast.cache.schedule), SkipCache(schedule=...), calibration
(skipdit_fast.analysis.calibrate, skipdit-fast calibrate), the first-block residual
check baseline, and enable_skip_cache(schedule=...)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from skipdit_fast import SkipCache, disable_skip_cache, enable_skip_cache
from skipdit_fast.analysis.calibrate import budget_for, calibrate, choose_schedule, measure_errors, search_schedule
from skipdit_fast.apps import cli
from skipdit_fast.cache.baselines import CachedModel, FirstBlockCache, ForaCache
from skipdit_fast.cache.schedule import CacheSchedule, ScheduleError
from skipdit_fast.models import DiT, DiTConfig
from skipdit_fast.sampling.diffusion import Diffusion, sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

STEPS = 8


def fixed_times(table, cheap=0.3):
    """The table with made-up step times (a full step 10 ms, every other kind `cheap`
    of it): for the tests whose subject is not the timing, as a tiny model's measured
    times are mostly its embedding and head, and noisy on a loaded machine."""
    table.seconds = {"F": 0.01, **{a.code: 0.01 * cheap for a in table.actions}}
    table.keep_seconds = 0.0
    return table


def tiny(skip=True, depth=6, seed=0):
    cfg = DiTConfig(depth=depth, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10, skip=skip)
    torch.manual_seed(seed)
    return DiT(cfg).eval()


def test_all_full_schedule_is_the_uncached_run_bitwise():
    m = tiny()
    want = sample(m, [1, 2], steps=STEPS, seed=0)
    for sched in (CacheSchedule.full(STEPS, m.depth),
                  CacheSchedule.full(STEPS, m.depth, timesteps=list(reversed(Diffusion(STEPS).timesteps)))):
        r = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(schedule=sched))
        assert torch.equal(r.latents, want.latents)
        assert r.report.full_steps == STEPS and r.report.blocks_run == STEPS * m.depth


def test_schedule_budget_equals_the_report_and_the_interval_mode():
    m = tiny()
    sched = CacheSchedule.from_branches([0, 1, 3, 0, 2, 2, 0, 1], m.depth)
    assert sched.block_budget == 6 + 2 + 6 + 6 + 4 + 4 + 6 + 2
    cache = SkipCache(schedule=sched)
    r = sample(m, [1, 2], steps=STEPS, seed=0, cache=cache)
    assert r.report.blocks_run == sched.block_budget and r.report.kinds == ["full" if k == 0 else "cached"
                                                                             for k in sched.branches]
    # the same run again (reset by the sampler) gives the same samples
    assert torch.equal(sample(m, [1, 2], steps=STEPS, seed=0, cache=cache).latents, r.latents)
    # a cached step with branch K equals the interval mode with that K (no start / stop)
    fixed = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(3, 2, start=2000, stop=-1))
    got = sample(m, [1, 2], steps=STEPS, seed=0,
                 cache=SkipCache(schedule=CacheSchedule.interval(STEPS, m.depth, 3, 2)))
    assert torch.equal(got.latents, fixed.latents) and got.report.blocks_run == fixed.report.blocks_run
    # per-step K matters: not the all-full result
    assert not torch.equal(r.latents, sample(m, [1, 2], steps=STEPS, seed=0).latents)


def test_schedule_file_round_trip_and_path_or_object(tmp_path):
    m = tiny()
    ts = list(reversed(Diffusion(STEPS).timesteps))
    sched = CacheSchedule.from_branches([0, 2, 2, 0, 1, 3, 0, 1], m.depth, ts, meta={"note": "x"})
    p = tmp_path / "s.json"
    sched.save(p)
    back = CacheSchedule.load(p)
    assert back.to_dict() == sched.to_dict() and back.branches == sched.branches and back.meta == {"note": "x"}
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary name
    a = sample(m, [3], steps=STEPS, seed=1, cache=SkipCache(schedule=sched))
    b = sample(m, [3], steps=STEPS, seed=1, cache=SkipCache(schedule=str(p)))
    assert torch.equal(a.latents, b.latents)


def _bad(tmp_path, text):
    p = tmp_path / "bad.json"
    p.write_text(text)
    return p


def test_bad_schedule_files_name_the_field(tmp_path):
    good = CacheSchedule.from_branches([0, 1, 1, 0], 6).to_dict()

    def variant(**kw):
        if "entries" in kw and "steps" not in kw:
            kw["steps"] = len(kw["entries"])
        return json.dumps({**good, **kw})

    cases = [
        ("{not json", "not JSON"),
        (variant(version=4), "version"),
        (variant(version=2, entries=[{"kind": "full"}, {"kind": "reuse", "extrapolate": True}]),
         r"entries\[1\]: extrapolate needs version 3"),
        (variant(version=3, entries=[{"kind": "full"}, {"kind": "cached", "branch": 1, "extrapolate": True}]),
         r"entries\[1\].extrapolate: only a reuse step"),
        (variant(version=3, entries=[{"kind": "full"}, {"kind": "reuse", "extrapolate": "yes"}]),
         r"entries\[1\].extrapolate must be true or false"),
        (variant(version=True), "version"),
        (variant(entries=[{"kind": "full"}, {"kind": "reuse"}]), r"entries\[1\]: reuse steps .* need version 2"),
        (variant(version=2, entries=[{"kind": "full"}, {"kind": "reuse", "branch": 1}]), r"entries\[1\].branch"),
        (variant(version=2, entries=[{"kind": "full", "reuse_outer": True}]), r"entries\[0\].reuse_outer"),
        (variant(version=2, entries=[{"kind": "full"}, {"kind": "cached", "branch": 1, "reuse_outer": 1}]),
         r"entries\[1\].reuse_outer"),
        (variant(version=2, entries=[{"kind": "reuse"}]), r"entries\[0\].kind"),
        (variant(format="other"), "format"),
        (variant(entries=[{"kind": "full"}, {"kind": "cached", "branch": 4}]), r"entries\[1\].branch"),
        (variant(entries=[{"kind": "full"}, {"kind": "cached", "branch": -1}]), r"entries\[1\].branch"),
        (variant(entries=[{"kind": "full"}, {"kind": "cached"}]), r"entries\[1\].branch"),
        (variant(entries=[{"kind": "cached", "branch": 1}]), r"entries\[0\].kind"),
        (variant(entries=[{"kind": "full"}, {"kind": "sometimes"}]), r"entries\[1\].kind"),
        (variant(entries=[{"kind": "full", "t": -5}]), r"entries\[0\].t"),
        (variant(depth=-3), "depth"),
        (variant(steps=7), "steps"),
        (variant(entries=[]), "entries"),
        ("[1, 2]", "JSON object"),
    ]
    for text, field in cases:
        with pytest.raises(ScheduleError, match=field):
            SkipCache(schedule=_bad(tmp_path, text))
    with pytest.raises(ScheduleError, match="cannot read"):
        CacheSchedule.load(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="schedule must be"):
        SkipCache(schedule=3)
    with pytest.raises(ValueError, match="threshold"):
        SkipCache(schedule=CacheSchedule.full(4, 6), threshold=0.1)


def test_schedule_refuses_another_step_count_or_model():
    m = tiny()
    ts = list(reversed(Diffusion(STEPS).timesteps))
    sched = CacheSchedule.from_branches([0, 1] * (STEPS // 2), m.depth, ts)
    with pytest.raises(ScheduleError, match=r"entries\[1\].t"):
        sample(m, [1], steps=STEPS * 2, seed=0, cache=SkipCache(schedule=sched))
    short = CacheSchedule.from_branches([0, 1, 1], m.depth)  # no timesteps: the length still counts
    with pytest.raises(ScheduleError, match="steps=3"):
        sample(m, [1], steps=STEPS, seed=0, cache=SkipCache(schedule=short))
    with pytest.raises(ValueError, match="depth"):
        sample(tiny(depth=4), [1], steps=STEPS, seed=0, cache=SkipCache(schedule=sched))


def test_measure_errors_follows_the_uncached_run_and_calibrate_meets_the_budget():
    m = tiny()
    table = measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=7)
    # cached K=1, 2; hybrid K=1, 2; reuse; extrapolated reuse
    assert table.branches == [1, 2] and table.err.shape == (STEPS, 8, 6)
    assert [a.code for a in table.actions] == ["1", "2", "a", "b", "R", "X"]
    assert torch.isinf(torch.from_numpy(table.err[0])).all()  # step 0 cannot be cached
    assert (table.err[1:, 1] >= 0).all() and (table.amplification > 0).all()
    assert set(table.seconds) == {"F", "1", "2", "a", "b", "R", "X"} and all(v > 0 for v in table.seconds.values())
    # extrapolated reuse: plain reuse until there are two full steps (step i - 2g >= 0)
    R, X = table.err[:, :, 4], table.err[:, :, 5]
    for i in range(1, STEPS):
        for g in range(1, min(i, 7) + 1):
            if i < 2 * g:
                assert X[i, g] == R[i, g]
            else:
                assert X[i, g] != R[i, g]
    for speedup in (1.0, 1.5, 2.0, 2.4):
        sched = choose_schedule(table, speedup=speedup, cost="blocks")
        assert all(e.kind != "reuse" and not e.reuse_outer for e in sched.entries)  # blocks: plain cached only
        assert sched.block_budget <= budget_for(speedup, STEPS, m.depth) and sched.entries[0].kind == "full"
        r = sample(m, [1, 2], steps=STEPS, seed=3, cache=SkipCache(schedule=sched))
        assert r.report.blocks_run == sched.block_budget
        assert sched.meta["predicted_error"] == pytest.approx(table.predicted_error(sched))
    assert choose_schedule(table, speedup=1.0, cost="blocks").branches == [0] * STEPS  # no pressure: all full
    # the DP's choice is no worse than fixed intervals under the same budget
    for n, k in ((2, 1), (3, 2), (4, 1)):
        fixed = CacheSchedule.interval(STEPS, m.depth, n, k)
        best = choose_schedule(table, budget=fixed.block_budget)
        assert table.predicted_error(best) <= table.predicted_error(fixed) + 1e-12
    with pytest.raises(ValueError, match="no schedule"):
        choose_schedule(table, budget=m.depth + 1)
    with pytest.raises(ValueError, match="exactly one"):
        choose_schedule(table)
    with pytest.raises(ValueError, match="branches"):
        measure_errors(m, [1], steps=STEPS, branches=[4])
    with pytest.raises(ValueError, match="modes"):
        measure_errors(m, [1], steps=STEPS, modes=["fora"])
    s = calibrate(m, speedup=1.6, steps=STEPS, labels=[0], max_gap=3, cost="blocks", rollouts=0)
    assert s.block_budget <= budget_for(1.6, STEPS, m.depth)
    with pytest.raises(ValueError, match="plain cached steps only"):
        calibrate(m, budget=30, steps=STEPS, labels=[0], modes=["reuse"])


def test_time_plan_meets_the_target_in_measured_time_and_search_beats_its_start():
    m = tiny()
    labels = [1, 2, 3]
    table = measure_errors(m, labels, steps=STEPS, seed=0, max_gap=7)
    full = table.seconds["F"]
    for speedup in (1.15, 1.3):  # (this tiny model's embedding and head bound what caching can save)
        sched = choose_schedule(table, speedup=speedup)  # time: the default with measured step times
        assert sched.meta["cost"] == "time" and sched.meta["predicted_speedup"] >= speedup
        assert table.step_seconds(sched) <= STEPS * full / speedup
        # the fixed intervals the search starts from are within the budget too
        search = search_schedule(m, table, speedup=speedup, rollouts=6, validate_seeds=[])
        assert table.predicted_speedup(search) >= speedup
        want = sample(m, labels, steps=STEPS, seed=0).latents
        got = sample(m, labels, steps=STEPS, seed=0, cache=SkipCache(schedule=search)).latents
        assert search.meta["measured_error"] == pytest.approx(float((got.double() - want.double()).pow(2).mean().sqrt()))
        # never worse on the calibration run than what it was compared with (planned and fixed intervals)
        assert search.meta["measured_error"] <= min(c["error"] for c in search.meta["compared"]) + 1e-12
        assert search.meta["rollouts"] >= 3 and search.meta["start"]["error"] >= search.meta["measured_error"]
    blocks = search_schedule(m, table, budget=30, rollouts=2)  # a block budget: plain cached steps only
    assert blocks.block_budget <= 30 and not blocks.needs_reuse and blocks.meta["cost"] == "blocks"
    with pytest.raises(ValueError, match="budget= is a block count"):
        choose_schedule(table, budget=20, cost="time")
    with pytest.raises(ValueError, match="rollouts"):
        search_schedule(m, table, speedup=2, rollouts=-1)
    no_times = measure_errors(m, labels, steps=STEPS, seed=0, max_gap=3, time_steps=False)
    with pytest.raises(ValueError, match="measured step times"):
        choose_schedule(no_times, speedup=2, cost="time")


def test_reuse_and_hybrid_steps_are_the_fora_and_hybrid_modes_bitwise():
    m = tiny()
    fora = sample(CachedModel(m), [1, 2], steps=STEPS, seed=0, cache=ForaCache(3))
    sched = CacheSchedule.from_code("FRRFRRFR", m.depth)
    got = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(schedule=sched))
    assert torch.equal(got.latents, fora.latents)
    assert got.report.kinds == ["full", "reuse", "reuse"] * 2 + ["full", "reuse"]
    assert got.report.blocks_run == sched.block_budget == fora.report.blocks_run == 3 * m.depth
    hybrid = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(3, 2, start=2000, stop=-1, reuse_outer=True))
    got = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(schedule=CacheSchedule.from_code("FbbFbbFb", 6)))
    assert torch.equal(got.latents, hybrid.latents) and got.report.blocks_run == hybrid.report.blocks_run
    # all kinds in one run: plain steps run their blocks, hybrid / reuse none
    mixed = CacheSchedule.from_code("F1aRF2bR", m.depth)
    assert mixed.block_budget == 6 + 2 + 0 + 0 + 6 + 4 + 0 + 0 and mixed.needs_reuse
    r = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(schedule=mixed))
    assert r.report.blocks_run == mixed.block_budget and r.report.kinds.count("reuse") == 2
    assert not torch.equal(r.latents, got.latents)


def test_schedule_code_and_versions(tmp_path):
    s = CacheSchedule.from_code("F1aRF2b(h3)(3)", 6)
    assert s.code == "F1aRF2bc3" and [e.kind for e in s.entries][:4] == ["full", "cached", "cached", "reuse"]
    assert s.entries[2].reuse_outer and s.entries[2].branch == 1 and s.entries[7].branch == 3
    assert CacheSchedule.from_code("F12", 6).to_dict()["version"] == 1  # what older readers load
    assert s.to_dict()["version"] == 2
    s.save(tmp_path / "s.json")
    back = CacheSchedule.load(tmp_path / "s.json")
    assert back.code == s.code and back.to_dict() == s.to_dict()
    with pytest.raises(ScheduleError, match="position 2"):
        CacheSchedule.from_code("F1x", 6)
    with pytest.raises(ScheduleError, match="branch"):
        CacheSchedule.from_code("F(h9)", 6)
    with pytest.raises(ScheduleError, match="entries\\[0\\].kind"):
        CacheSchedule.from_code("RF", 6)


def test_calibrate_command_writes_a_schedule_that_sample_uses(tmp_path, capsys):
    from skipdit_fast.analysis import calibrate as cal

    out = tmp_path / "sched.json"
    assert cli.main(["calibrate", "--speedup", "1.3", "--steps", "6", "--max-gap", "3", "--classes", "1",
                     "--out", str(out)]) == 0
    sched = CacheSchedule.load(out)
    assert sched.steps == 6 and sched.meta["cost"] == "time"
    v = sched.meta["validation"]
    if v["picked_speedup"] is not None and "(predicted" in v["picked"]:   # a near interval, timed on target
        assert v["picked_speedup"] >= 1.3 and sched.meta["predicted_speedup"] >= 1.3 * (1 - cal.NEAR)
    else:
        assert sched.meta["predicted_speedup"] >= 1.3
    blocks = tmp_path / "blocks.json"
    assert cli.main(["calibrate", "--speedup", "2", "--steps", "6", "--max-gap", "3", "--classes", "1",
                     "--cost", "blocks", "--rollouts", "2", "--out", str(blocks)]) == 0
    assert CacheSchedule.load(blocks).block_budget <= budget_for(2, 6, sched.depth)
    assert sched.meta["validation"]["seeds"] == [1, 2, 3] and len(sched.meta["retimed"]) >= 1
    quick = tmp_path / "quick.json"
    assert cli.main(["calibrate", "--speedup", "1.5", "--steps", "6", "--max-gap", "3", "--classes", "1", "2",
                     "--rollouts", "1", "--validate-seeds", "--retime", "0", "--propagate-samples", "1",
                     "--out", str(quick)]) == 0
    q = CacheSchedule.load(quick).meta
    assert q["validation"] is None and q["retimed"] == [] and q["calibration"]["propagate_samples"] == 1
    assert cli.main(["calibrate", "--speedup", "2", "--steps", "6", "--classes", "1", "--cost", "blocks",
                     "--modes", "reuse", "--out", str(blocks)]) == 2
    assert "plain cached steps only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # argparse: one error line, exit 2
        cli.main(["calibrate", "--speedup", "0.5", "--out", str(out)])
    assert e.value.code == 2 and "argument --speedup" in capsys.readouterr().err
    grid = tmp_path / "g.png"
    assert cli.main(["sample", "--model", "DiT-S/2-skip", "--steps", "6", "--cfg", "1", "--classes", "1",
                     "--cache-schedule", str(out), "--out", str(grid), "--no-progress"]) == 0
    assert f"blocks {sched.block_budget}/" in capsys.readouterr().out
    assert cli.main(["sample", "--model", "DiT-S/2-skip", "--steps", "7", "--cfg", "1", "--classes", "1",
                     "--cache-schedule", str(out), "--out", str(grid), "--no-progress"]) == 1
    assert "--cache-schedule" in (err := capsys.readouterr().err) and "has 7 steps" in err


def test_first_block_check_runs_and_counts():
    for skip in (False, True):
        m = CachedModel(tiny(skip=skip))
        want = sample(m, [1, 2], steps=STEPS, seed=0)
        never = sample(m, [1, 2], steps=STEPS, seed=0, cache=FirstBlockCache(threshold=0.0))
        assert torch.equal(never.latents, want.latents)
        r = never.report
        assert r.full_steps == STEPS and r.checks == STEPS - 1 and r.blocks_run == STEPS * 6
        always = sample(m, [1, 2], steps=STEPS, seed=0, cache=FirstBlockCache(threshold=1e9, max_cached=2)).report
        assert always.kinds == ["full", "cached", "cached"] * 2 + ["full", "cached"]
        assert always.blocks_run == 3 * 6 + 5 * 1 and always.blocks_total == STEPS * 6
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCache(-1)


def test_enable_skip_cache_with_a_schedule(tmp_path):
    a = tiny()
    b = copy.deepcopy(a)
    sched = CacheSchedule.from_branches([0, 2, 1, 0, 2, 1, 1], a.depth)
    sched.save(tmp_path / "s.json")
    want = sample(a, [1, 3], steps=7, seed=0, cache=SkipCache(schedule=sched))
    cache = enable_skip_cache(b, schedule=tmp_path / "s.json")
    got = sample(b, [1, 3], steps=7, seed=0)
    assert torch.equal(got.latents, want.latents) and cache.report().blocks_run == sched.block_budget
    again = sample(b, [1, 3], steps=7, seed=0)  # a new run: reset by the timestep
    assert torch.equal(again.latents, want.latents)
    assert disable_skip_cache(b) is cache
    with pytest.raises(ValueError, match="not both"):
        enable_skip_cache(b, schedule=sched, cache=SkipCache())


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_enable_skip_cache_schedule_on_hunyuan():
    import diffusers_models as M

    model = M.hunyuan(num_layers=10)
    inputs = M.hunyuan_inputs()
    x, _, kw = inputs
    times = (900.0, 800.0, 700.0, 600.0, 500.0)
    sched = CacheSchedule.from_branches([0, 2, 1, 0, 2], 10)
    with torch.no_grad():
        cache = enable_skip_cache(model, schedule=sched)
        outs = [model(x, torch.full((x.shape[0],), t), **kw)[0] for t in times]
        r = cache.report()
        assert r.kinds == ["full", "cached", "cached", "full", "cached"] and r.blocks_run == sched.block_budget
        disable_skip_cache(model)
        native = model(x, torch.full((x.shape[0],), times[0]), **kw)[0]
    assert torch.equal(outs[0], native) and not torch.equal(outs[1], outs[0])


def test_hybrid_mode_runs_and_counts():
    m = tiny()
    want = sample(m, [1, 2], steps=STEPS, seed=0)
    # all steps full: the kept-output path computes the same blocks
    allfull = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(1, 2, reuse_outer=True))
    torch.testing.assert_close(allfull.latents, want.latents, rtol=1e-5, atol=1e-5)
    cache = SkipCache(3, 2, start=2000, stop=-1, reuse_outer=True)
    r = sample(m, [1, 2], steps=STEPS, seed=0, cache=cache).report
    assert r.kinds == ["full", "cached", "cached"] * 2 + ["full", "cached"]
    assert r.blocks_run == 3 * m.depth and r.blocks_total == STEPS * m.depth  # cached steps: no attention / MLP
    plain = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(3, 2, start=2000, stop=-1))
    hybrid = sample(m, [1, 2], steps=STEPS, seed=0, cache=cache)
    assert not torch.equal(hybrid.latents, plain.latents)
    assert (hybrid.latents - want.latents).abs().mean() < 0.2 * want.latents.abs().mean()  # near the uncached one
    sched = CacheSchedule.from_branches([0, 1, 3, 0, 2, 2, 0, 1], m.depth)  # with a schedule too
    rs = sample(m, [1, 2], steps=STEPS, seed=0, cache=SkipCache(schedule=sched, reuse_outer=True)).report
    assert rs.blocks_run == rs.full_steps * m.depth and rs.cached_steps == 5
    with pytest.raises(ValueError, match="reuse_outer"):
        SkipCache(2, 2, threshold=0.1, reuse_outer=True)


def test_search_checks_schedules_with_classifier_free_guidance():
    m = tiny()
    labels = [1, 4]
    table = fixed_times(measure_errors(m, labels, steps=STEPS, seed=2, max_gap=4))
    sched = search_schedule(m, table, speedup=1.5, cfg_scale=3.0, rollouts=3, retime=0)
    assert sched.meta["cfg_scale"] == 3.0
    want = sample(m, labels, steps=STEPS, seed=2, cfg_scale=3.0).latents
    got = sample(m, labels, steps=STEPS, seed=2, cfg_scale=3.0, cache=SkipCache(schedule=sched))
    err = float((got.latents.double() - want.double()).pow(2).mean().sqrt())
    assert sched.meta["measured_error"] == pytest.approx(err)
    assert got.report.steps == STEPS  # one forward (both CFG halves) per step


def test_propagation_on_a_subset_of_samples():
    m = tiny()
    labels = [1, 2, 3, 4]
    kw = dict(steps=STEPS, seed=0, max_gap=4, time_steps=False)
    full = measure_errors(m, labels, **kw)
    same = measure_errors(m, labels, propagate_samples=4, **kw)   # all of them: the same table
    assert (full.err == same.err).all() and (full.amplification == same.amplification).all()
    part = measure_errors(m, labels, propagate_samples=1, **kw)
    # the errors are of the uncached run (the copies only share its batch)
    assert torch.allclose(torch.from_numpy(part.err), torch.from_numpy(full.err), rtol=1e-4, atol=1e-6, equal_nan=True)
    assert part.info["propagate_samples"] == 1 and (part.amplification > 0).all()
    assert not (part.amplification == full.amplification).all()  # measured on sample 0 alone
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="propagate_samples"):
            measure_errors(m, labels, propagate_samples=bad, **kw)


def test_overhead_makes_the_predicted_speedup_the_measured_one():
    from skipdit_fast.analysis.calibrate import _with_overhead

    m = tiny()
    table = fixed_times(measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=4))
    sched = choose_schedule(table, speedup=1.5)
    pred = table.predicted_speedup(sched)
    fixed, o = _with_overhead(table, sched, 0.9 * pred)
    assert o > 0 and fixed.predicted_speedup(sched) == pytest.approx(0.9 * pred)
    assert all(fixed.seconds[k] == pytest.approx(v + o) for k, v in table.seconds.items())
    assert table.predicted_speedup(sched) == pred   # the table itself is left as it was
    faster, o = _with_overhead(table, sched, 1.05 * pred)   # faster than predicted: a negative overhead
    assert o < 0 and faster.predicted_speedup(sched) == pytest.approx(1.05 * pred)
    floor, o = _with_overhead(table, sched, 100 * pred)     # held above -half the cheapest step
    assert o == pytest.approx(-0.5 * min(table.seconds.values())) and min(floor.seconds.values()) > 0


def test_search_searches_again_when_the_measured_speedup_misses(monkeypatch):
    from skipdit_fast.analysis import calibrate as cal

    m = tiny()
    labels = [1, 2]
    table = fixed_times(measure_errors(m, labels, steps=STEPS, seed=0, max_gap=4))
    calls = []

    def slow_then_on_target(self, sched, rounds=2):   # the first plan measures 5% short of the target
        calls.append(sched.code)
        return 1.3 * (0.95 if len(calls) == 1 else 1.0)

    monkeypatch.setattr(cal.Rollouts, "speedup", slow_then_on_target)
    s = search_schedule(m, table, speedup=1.3, rollouts=2, validate_seeds=[])
    r = s.meta["retimed"]
    assert len(r) == 2 and len(calls) == 2 and r[0]["overhead_added_s"] > 0 and "overhead_added_s" not in r[1]
    assert s.meta["step_seconds"]["F"] == pytest.approx(table.seconds["F"] + r[0]["overhead_added_s"])
    first = CacheSchedule.from_code(r[0]["code"], m.depth)
    # the second search plans with the overhead, so it is at least as cheap in the first table's times
    assert table.step_seconds(s) <= table.step_seconds(first) + 1e-12
    monkeypatch.setattr(cal.Rollouts, "speedup", lambda self, sched, rounds=2: 1.28)   # always a little short
    with pytest.warns(RuntimeWarning, match="below the target 1.3x"):
        s = search_schedule(m, table, speedup=1.3, rollouts=1, retime=1, validate_seeds=[])
    assert len(s.meta["retimed"]) == 2   # at most `retime` searches again (each one timed)
    assert sum(bool(r.get("picked")) for r in s.meta["retimed"]) == 1
    monkeypatch.setattr(cal.Rollouts, "speedup", lambda self, sched, rounds=2: 1.01)   # far short: out of reach
    with pytest.warns(RuntimeWarning, match="below the target 1.3x"):
        s = search_schedule(m, table, speedup=1.3, rollouts=1, validate_seeds=[])
    assert "no schedule" in s.meta["retimed"][0]["target_missed"] and s.meta["predicted_speedup"] >= 1.3
    with pytest.raises(ValueError, match="retime"):
        search_schedule(m, table, speedup=1.3, retime=-1)
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="overshoot"):
            search_schedule(m, table, speedup=1.3, overshoot=bad)


def test_search_spends_an_overshoot_and_keeps_what_met_the_target(monkeypatch):
    from skipdit_fast.analysis import calibrate as cal

    m = tiny()
    table = fixed_times(measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=4))
    speeds = iter([1.8, 1.25, 1.32])   # far above the target, then short of it, then on it

    monkeypatch.setattr(cal.Rollouts, "speedup", lambda self, sched, rounds=2: next(speeds))
    s = search_schedule(m, table, speedup=1.3, rollouts=2, retime=2, validate_seeds=[])
    r = s.meta["retimed"]
    assert [x["measured_speedup"] for x in r] == [1.8, 1.25, 1.32]
    assert r[0]["overhead_added_s"] < 0 < r[1]["overhead_added_s"]
    # the first search left time unspent: the negative overhead makes every step cheaper in the second
    assert s.meta["step_seconds"]["F"] < table.seconds["F"] or not r[1].get("picked")
    met = [x for x in r if x["measured_speedup"] >= 1.3]
    kept = min(met, key=lambda x: x["error"])
    assert kept.get("picked") and s.code == kept["code"] and s.meta["measured_error"] == pytest.approx(kept["error"])
    assert sum(bool(x.get("picked")) for x in r) == 1
    speeds = iter([1.33])   # within overshoot: not searched again
    s = search_schedule(m, table, speedup=1.3, rollouts=2, retime=2, validate_seeds=[])
    assert len(s.meta["retimed"]) == 1 and s.meta["retimed"][0]["picked"]
    speeds = iter([1.5, 1.45])   # overshoot 0.2 allows 1.5
    s = search_schedule(m, table, speedup=1.3, rollouts=2, retime=2, overshoot=0.2, validate_seeds=[])
    assert len(s.meta["retimed"]) == 1


def test_search_validates_on_other_seeds():
    m = tiny()
    labels = [1, 2]
    table = fixed_times(measure_errors(m, labels, steps=STEPS, seed=0, max_gap=4))
    s = search_schedule(m, table, speedup=1.5, rollouts=3, retime=0)   # default: seeds 1, 2, 3
    v = s.meta["validation"]
    assert v["seeds"] == [1, 2, 3] and len(v["candidates"]) >= 2
    picked = min(v["candidates"], key=lambda d: d["error"])   # untimed: no target to meet
    assert picked["what"] == v["picked"] and picked["code"] == s.code and "measured_speedup" not in picked
    sq = []
    for seed in (1, 2, 3):
        want = sample(m, labels, steps=STEPS, seed=seed).latents
        got = sample(m, labels, steps=STEPS, seed=seed, cache=SkipCache(schedule=s)).latents
        sq.append((got.double() - want.double()).pow(2).mean())
    assert picked["error"] == pytest.approx(float(torch.stack(sq).mean().sqrt()))
    two = search_schedule(m, table, speedup=1.5, rollouts=0, retime=0, validate_seeds=[5, 6])
    assert two.meta["validation"]["seeds"] == [5, 6]
    assert search_schedule(m, table, speedup=1.5, rollouts=0, retime=0, validate_seeds=[]).meta["validation"] is None
    with pytest.raises(ValueError, match="calibration seed"):
        search_schedule(m, table, speedup=1.5, validate_seeds=[0])


def test_validation_picks_only_what_met_the_target(monkeypatch):
    from skipdit_fast.analysis import calibrate as cal

    m = tiny()
    table = fixed_times(measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=4))
    calls = []

    def kept_on_target_rest_short(self, sched, rounds=3):   # the retime's schedule meets it, no other does
        calls.append(sched.code)
        return 1.32 if len(calls) == 1 else 1.0

    monkeypatch.setattr(cal.Rollouts, "speedup", kept_on_target_rest_short)
    s = search_schedule(m, table, speedup=1.3, rollouts=2, retime=2, validate_seeds=[4, 5])
    v, kept = s.meta["validation"], s.meta["retimed"][0]
    assert v["picked"] == "searched" and s.code == kept["code"]
    won = next(c for c in v["candidates"] if c["what"] == "searched")
    better = [c for c in v["candidates"] if c["error"] < won["error"]]
    # every candidate with less validation error was timed, measured short and passed over
    assert all(c["measured_speedup"] == 1.0 and c["passed_over"] for c in better)
    assert len(calls) == 1 + len(better) and won["measured_speedup"] == 1.32
    monkeypatch.setattr(cal.Rollouts, "speedup", lambda self, sched, rounds=3: 1.31)   # every one meets it
    s = search_schedule(m, table, speedup=1.3, rollouts=2, retime=2, validate_seeds=[4, 5])
    v = s.meta["validation"]
    best = min(v["candidates"], key=lambda d: d["error"])
    assert v["picked"] == best["what"] and s.code == best["code"] and not any(c.get("passed_over")
                                                                              for c in v["candidates"])
    near = "(predicted" in v["picked"]   # a fixed interval the time model puts just short, timed on target
    assert s.meta["predicted_speedup"] >= (1.3 * (1 - cal.NEAR) if near else 1.3)
    B = cal._budget(table, "time", 1.3, None)
    for w, sched in cal._near_intervals(table, B, 1.3, count=10):
        assert w.startswith("interval") and cal._cost_of(table, sched, "time") > B
        assert 1.3 > table.predicted_speedup(sched) >= 1.3 * (1 - cal.NEAR)


def test_step_times_come_from_long_intervals_of_each_action(monkeypatch):
    from skipdit_fast.analysis import calibrate as cal

    m = tiny()
    acts = cal.make_actions(m, ["cached", "reuse"], [1])
    seen = []
    real = cal.fastest_runs

    def record(run, scheds, rounds, device):
        seen.append({k: (v.code if v is not None else None) for k, v in scheds.items()})
        return real(run, scheds, 1, device)

    monkeypatch.setattr(cal, "fastest_runs", record)
    sec = cal.measure_step_seconds(m, acts, batch=2, labels=[1], steps=STEPS, period=5)
    # a full step, then period - 1 steps of the action: most of the run is the action
    # and the cheapest reuse action at period 2 too, which tells the keeping cost apart
    assert seen[-1] == {"F": None, "1": "F1111F11", "R": "FRRRRFRR", "keep": "FRFRFRFR"}
    assert set(sec) == {"F", "1", "R", "keep"} and all(v >= 0 for v in sec.values())
    cal.measure_step_seconds(m, acts, batch=2, labels=[1], steps=STEPS, period=50)   # held to the run
    assert seen[-1]["R"] == "F" + "R" * (STEPS - 1)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="period"):
            cal.measure_step_seconds(m, acts, batch=2, labels=[1], steps=STEPS, period=bad)
    table = measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=3, modes=["reuse"], time_batch=3)
    assert seen[-1]["R"] == "FRRRFRRR"   # measure_errors times the period max_gap + 1
    assert table.info["time_batch"] == 3


def test_speedups_are_measured_at_the_time_batch(monkeypatch):
    from skipdit_fast.analysis import calibrate as cal

    m = tiny()
    ro = cal.Rollouts(m, [1, 2], steps=STEPS, seed=0, time_batch=5)
    batches = []
    real = ro._sample
    ro._sample = lambda model, **kw: batches.append(len(kw["labels"])) or real(model, **kw)
    sched = CacheSchedule.interval(STEPS, m.depth, 2, 1)
    ro.error(sched)
    assert batches == [2]   # the error on the calibration labels
    ro.speedup(sched, rounds=1)
    assert batches[1:] == [5, 5]   # the uncached and the cached run, at the time batch (labels repeated)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="time_batch"):
            cal.Rollouts(m, [1], steps=STEPS, time_batch=bad)
    # search_schedule times at the batch the table's step times were measured at
    table = fixed_times(measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=3, time_batch=4))
    made = []
    monkeypatch.setattr(cal.Rollouts, "speedup", lambda self, s, rounds=3: made.append(self.time_kw) or 1.3)
    search_schedule(m, table, speedup=1.3, rollouts=1, retime=1, validate_seeds=[])
    assert made and len(made[0]["labels"]) == 4
    search_schedule(m, table, speedup=1.3, rollouts=1, retime=1, validate_seeds=[], time_batch=6)
    assert len(made[-1]["labels"]) == 6


def test_full_steps_keep_only_where_a_reuse_step_reads_them():
    m = tiny()
    code = "FRFF1FbF"   # step 0 keeps for R, step 5 for b; steps 2, 3 and 7 keep nothing
    sched = CacheSchedule.from_code(code, m.depth)
    assert sched.keeping_steps == {0, 5}
    assert CacheSchedule.from_code("F1F2", m.depth).keeping_steps == frozenset()
    assert CacheSchedule.from_code("F1RF", m.depth).keeping_steps == {0}   # the gap's later step reads it
    every = SkipCache(schedule=sched)
    every._keeping = None   # as before: every full step keeps
    want = sample(m, [1, 2], steps=STEPS, seed=0, cache=every)
    lean = SkipCache(schedule=sched)
    got = sample(m, [1, 2], steps=STEPS, seed=0, cache=lean)
    assert torch.equal(got.latents, want.latents) and got.report.kinds == want.report.kinds
    # the last full step keeps nothing, and it frees what the one before kept
    assert every._reuse.attn and not lean._reuse.attn and not lean._reuse.mlp


def test_plan_pays_the_keeping_cost_once_per_gap_and_is_optimal():
    """The DP against every schedule of a small table: the least predicted error within
    the budget, with each keeping full step charged its keep cost."""
    import itertools

    import numpy as np

    from skipdit_fast.analysis import calibrate as cal

    S, G = 6, 3
    acts = [cal.Action("cached", 1), cal.Action("cached", 1, reuse_outer=True), cal.Action("reuse")]
    rng = np.random.default_rng(0)
    err = rng.uniform(0.1, 1.0, (S, G + 1, len(acts)))
    err[:, 0] = np.inf
    for g in range(1, G + 1):
        err[:g, g] = np.inf
    table = cal.ErrorTable(err, acts, 4, list(range(S)), seconds={"F": 1.0, "1": 0.5, "a": 0.2, "R": 0.1},
                           keep_seconds=0.3)
    Q, costs, _, keep = cal._plan_costs(table, "time")
    assert keep == math.ceil(0.3 * Q)
    for speedup in (1.3, 1.6, 1.9, 2.5):
        B = cal._budget(table, "time", speedup, None)
        best = math.inf
        for tail in itertools.product("F1aR", repeat=S - 1):
            sc = CacheSchedule.from_code("F" + "".join(tail), 4)
            if cal._cost_of(table, sc, "time") <= B:
                best = min(best, table.predicted_error(sc))
        if speedup == 2.5:   # two full steps and two keeps at the least: out of reach
            assert best == math.inf
            with pytest.raises(ValueError, match="no schedule"):
                choose_schedule(table, speedup=speedup)
            continue
        got = choose_schedule(table, speedup=speedup)
        assert cal._cost_of(table, got, "time") <= B
        assert table.predicted_error(got) == pytest.approx(best) == pytest.approx(got.meta["predicted_error"])
    sc = CacheSchedule.from_code("FRRFaF", 4)   # 2 keeping full steps, 3 F
    assert table.step_seconds(sc) == pytest.approx(3 * 1.0 + 0.1 * 2 + 0.2 + 2 * 0.3)
    assert cal._cost_of(table, sc, "time") == 3 * Q + 2 * costs[2] + costs[1] + 2 * keep


def test_keeping_cost_is_solved_from_the_two_periods(monkeypatch):
    from skipdit_fast.analysis import calibrate as cal

    m = tiny()
    modes = ["cached", "hybrid", "reuse"]
    acts = cal.make_actions(m, modes, [1])
    F, cost, keep = 1.0, {"1": 0.4, "a": 0.2, "R": 0.1}, 0.07

    def model_times(run, scheds, rounds, device):   # run times of an exact additive model
        out = {}
        for k, sc in scheds.items():
            if sc is None:
                out[k] = STEPS * F
                continue
            out[k] = sum(F if e.kind == "full" else cost[e.code] for e in sc.entries)
            out[k] += keep * len(sc.keeping_steps)
        return out

    monkeypatch.setattr(cal, "fastest_runs", model_times)
    sec = cal.measure_step_seconds(m, acts, batch=2, labels=[1], steps=STEPS, period=3)
    assert sec["keep"] == pytest.approx(keep) and sec["F"] == pytest.approx(F)
    assert all(sec[c] == pytest.approx(v) for c, v in cost.items())
    plain = cal.measure_step_seconds(m, acts[:1], batch=2, labels=[1], steps=STEPS, period=3)
    assert "keep" not in plain and plain["1"] == pytest.approx(0.4)   # no reuse action: nothing keeps
    table = measure_errors(m, [1, 2], steps=STEPS, seed=0, max_gap=3, modes=modes, branches=[1])
    assert table.keep_seconds == pytest.approx(keep) and "keep" not in table.seconds
    assert table.info["keep_seconds"] == pytest.approx(keep)
