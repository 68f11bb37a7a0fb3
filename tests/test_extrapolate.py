"""Extrapolated reuse steps (schedule code X; cache/reuse.py): the damped line through
the last two full steps' attention / MLP outputs, what full steps keep for it, its
file version, and the plan's exact accounting of what it keeps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from skipdit_fast import SkipCache
from skipdit_fast.analysis import calibrate as cal
from skipdit_fast.cache.baselines import CachedModel
from skipdit_fast.cache.reuse import EXTRAPOLATION_DAMPING
from skipdit_fast.cache.schedule import CacheSchedule, ScheduleError
from skipdit_fast.models import DiT, DiTConfig
from skipdit_fast.models.layers import layer_norm, modulate
from skipdit_fast.sampling.diffusion import sample

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

STEPS = 10


def tiny(skip=True):
    cfg = DiTConfig(depth=6, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10, skip=skip)
    torch.manual_seed(0)
    return DiT(cfg).eval()


class LineCache:
    """An independent reference for a schedule code of F / R / X on models.DiT: full
    steps record every block's attention and MLP output per step index; R takes the
    last full step's, X the damped line through the last two full steps (the last
    one's alone while there is one)."""

    def __init__(self, code):
        self.code = code
        self.reset()

    def reset(self):
        self.i, self.history = 0, []   # [(step, {block: (attn, mlp)})]

    def next_timestep(self, t):
        pass

    def report(self):
        return None

    def run(self, model, h, state, t):
        kind, i = self.code[self.i], self.i
        rec = {}

        def block(b, blk, h, c, seq_len):
            shift1, scale1, gate1, shift2, scale2, gate2 = blk.modulation(c)
            if kind == "F":
                a = blk.attn(modulate(layer_norm(h), shift1, scale1), seq_len)
                h = h + gate1 * a
                m = blk.mlp(modulate(layer_norm(h), shift2, scale2))
                rec[b] = (a, m)
                return h + gate2 * m
            j1, last = self.history[-1]
            a, m = last[b]
            if kind == "X" and len(self.history) > 1:
                j0, before = self.history[-2]
                w = EXTRAPOLATION_DAMPING * (i - j1) / (j1 - j0)
                a = a * (1 + w) - before[b][0] * w
                m = m * (1 + w) - before[b][1] * w
            h = h + gate1 * a
            return h + gate2 * m

        state.run_block = block
        try:
            out = model.run_blocks(h, 0, model.depth, state)
        finally:
            state.run_block = None
        if kind == "F":
            self.history.append((i, rec))
        self.i += 1
        return out


class Wrapped(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x, t, y=None, cache=None):
        h, state = self.model.embed(x, t, y)
        return self.model.head(cache.run(self.model, h, state, t), state)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("code", ["FXFXXFFXXX", "FRXFXRFXFX", "FFXXXFXXFX"])
def test_extrapolated_steps_follow_the_damped_line_of_the_last_two_full_steps(skip, code):
    m = tiny(skip)
    want = sample(Wrapped(m), [1, 2], steps=STEPS, seed=0, cache=LineCache(code)).latents
    runner = m if skip else CachedModel(m)   # a vanilla DiT through the block protocol
    got = sample(runner, [1, 2], steps=STEPS, seed=0, cache=SkipCache(schedule=CacheSchedule.from_code(code, 6)))
    torch.testing.assert_close(got.latents, want, rtol=1e-5, atol=1e-5)
    assert got.report.kinds.count("reuse") == code.count("R") + code.count("X")
    assert got.report.blocks_run == code.count("F") * 6
    plain = sample(runner, [1, 2], steps=STEPS, seed=0,
                   cache=SkipCache(schedule=CacheSchedule.from_code(code.replace("X", "R"), 6))).latents
    assert not torch.equal(got.latents, plain)


def test_with_one_full_step_so_far_it_is_plain_reuse():
    m = tiny()
    run = lambda code: sample(m, [1, 2], steps=STEPS, seed=0,  # noqa: E731
                              cache=SkipCache(schedule=CacheSchedule.from_code(code, 6))).latents
    assert torch.equal(run("F" + "X" * (STEPS - 1)), run("F" + "R" * (STEPS - 1)))


def test_full_steps_keep_for_the_extrapolated_steps_and_no_more():
    m = tiny()
    sched = CacheSchedule.from_code("F1FF1FXXF2", 6)   # X at 6, 7 read full steps 5 and 3
    assert sched.keeping_steps == {3, 5} and sched.extrapolating_steps == {5}
    assert CacheSchedule.from_code("FXX", 6).keeping_steps == {0}
    assert CacheSchedule.from_code("FXX", 6).extrapolating_steps == frozenset()
    assert CacheSchedule.from_code("FRFX", 6).keeping_steps == {0, 2}
    every = SkipCache(schedule=sched)
    every._keeping = None   # every full step keeps
    want = sample(m, [1, 2], steps=STEPS, seed=0, cache=every)
    lean = SkipCache(schedule=sched)
    got = sample(m, [1, 2], steps=STEPS, seed=0, cache=lean)
    assert torch.equal(got.latents, want.latents)
    # the last full step (8) keeps nothing: the store is freed
    assert not lean._reuse.attn and not lean._reuse.prev_attn


def test_files_with_extrapolated_steps_are_version_3(tmp_path):
    s = CacheSchedule.from_code("FRXF1aX", 6)
    assert s.code == "FRXF1aX" and s.entries[2].extrapolate and not s.entries[1].extrapolate
    d = s.to_dict()
    assert d["version"] == 3 and d["entries"][2] == {"kind": "reuse", "extrapolate": True}
    assert CacheSchedule.from_code("FRF1", 6).to_dict()["version"] == 2   # older readers still load these
    s.save(tmp_path / "s.json")
    back = CacheSchedule.load(tmp_path / "s.json")
    assert back.code == s.code and back.to_dict() == d
    with pytest.raises(ScheduleError, match="position 1"):
        CacheSchedule.from_code("Fx", 6)


def test_plan_charges_the_keeping_of_the_full_step_before_exactly_and_is_optimal():
    """The DP against every schedule of a small table with plain and extrapolated
    reuse: an extrapolated step also makes the full step before its gap's keep."""
    S, G = 7, 3
    acts = [cal.Action("cached", 1), cal.Action("reuse"), cal.Action("reuse", extrapolate=True)]
    rng = np.random.default_rng(1)
    err = rng.uniform(0.1, 1.0, (S, G + 1, len(acts)))
    err[:, :, 2] *= 0.5   # extrapolation pays: the plan wants it where the budget allows
    err[:, 0] = np.inf
    for g in range(1, G + 1):
        err[:g, g] = np.inf
    table = cal.ErrorTable(err, acts, 4, list(range(S)), seconds={"F": 1.0, "1": 0.5, "R": 0.1, "X": 0.12},
                           keep_seconds=0.3)
    Q, costs, _, keep = cal._plan_costs(table, "time")
    sc = CacheSchedule.from_code("F1FXFRX", 4)   # X at 3 makes 0 keep; 4 keeps for R and X, 2 for X at 6
    assert sc.keeping_steps == {0, 2, 4}
    assert cal._cost_of(table, sc, "time") == 3 * Q + costs[0] + costs[1] + 2 * costs[2] + 3 * keep
    checked = 0
    for speedup in (1.4, 1.8, 2.2, 2.6):
        B = cal._budget(table, "time", speedup, None)
        best = math.inf
        for tail in itertools.product("F1RX", repeat=S - 1):
            s = CacheSchedule.from_code("F" + "".join(tail), 4)
            if cal._cost_of(table, s, "time") <= B:
                best = min(best, table.predicted_error(s))
        if best == math.inf:
            with pytest.raises(ValueError, match="no schedule"):
                cal.choose_schedule(table, speedup=speedup)
            continue
        got = cal.choose_schedule(table, speedup=speedup)
        assert cal._cost_of(table, got, "time") <= B
        assert table.predicted_error(got) == pytest.approx(best) == pytest.approx(got.meta["predicted_error"])
        checked += "X" in got.code
    assert checked >= 2   # the case under test: plans with extrapolated steps


def test_calibration_measures_extrapolated_reuse_by_default():
    m = tiny()
    assert [a.code for a in cal.make_actions(m, branches=[1])] == ["1", "a", "R", "X"]
    with pytest.raises(ValueError, match="modes"):
        cal.make_actions(m, ["extrapolated"])
