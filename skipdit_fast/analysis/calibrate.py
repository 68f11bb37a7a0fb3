"""Calibrated cache schedules: measure what each way of caching costs, in error and in
time, at each step, then choose per step full, cached with K, hybrid with K or
FORA-style reuse under a speedup target, and check the choice on real sampling runs.

    sched = calibrate(model, speedup=2.5)            # measure, plan, verify by rollouts
    sched.save("sched.json")                         # SkipCache(schedule="sched.json")

    table = measure_errors(model, labels=range(10), steps=50, seed=1)
    sched = choose_schedule(table, speedup=2.5)      # the plan alone (no rollouts)
    sched = search_schedule(model, table, speedup=2.5, labels=range(10))   # plan + rollouts

Actions. A step that is not full is one of the engine's modes (cache/schedule.py):
"cached" with branch K (Skip-Cache: 2K blocks run), the same with reuse_outer
(hybrid: those 2K blocks reuse their kept attention / MLP outputs), "reuse" (FORA-
style: every block reuses them) or "extrapolate" (reuse extrapolated from the last two
full steps, cache/reuse.py). measure_errors(modes=...) says which are considered.

Error table. One uncached DDPM (or DDIM) run on the calibration labels gives, at every
step i, its input x_i, its posterior mean m_i (what the sampler adds its noise to),
for every K the input of block depth-K and every block's attention / MLP output. For
step i taken with action a on what the full step j = i - g (g = 1..max_gap) kept,

    err[i, g, a] = RMS(m_i(action a) - m_i(full))

over the calibration samples: the step's own contribution to the drift of the run,
measured on the uncached trajectory (an extrapolated reuse step: from the full steps
i - g and i - 2g, the fixed interval's case; the table holds no other previous gap). amplification[i] (measured by carrying one
perturbed copy of the run, cached at step i with the first action, to the end) is
how much a drift injected at step i has grown at the end. A schedule's predicted
error is the sum over its non-full steps of err * amplification.

Cost. Each action's time is measured in whole sampling runs (measure_step_seconds: the
action's fixed interval of period max_gap + 1 against the uncached run, interleaved,
the fastest of several; on a batch of time_batch samples, by default the calibration
batch): the plan is in measured time, so a target speedup is a target time ratio, and
hybrid / reuse steps (which run no attention or MLP, 0 blocks) have their real cost.
A full step whose gap has a hybrid or reuse step keeps every block's attention / MLP
output, which costs time too (keep_seconds, charged once per such full step; the
cheapest reuse action is also timed at period 2, where half the run is such full
steps, to tell the two costs apart).
cost="blocks" plans in block counts instead (full: depth, cached: 2K), with the plain
cached steps only (a block count cannot price the others).

Plan and search. choose_schedule finds the schedule with the least predicted error
within the budget by dynamic programming over (step, steps since the last full step,
cost used); step 0 is always full. The additive error model is only a model, so
search_schedule checks it on real runs: the planned schedules (weighted and not) and
the fixed-interval schedule of every action and period that fits the budget are each
sampled on the calibration labels and seed with SkipCache(schedule=...) and compared
with the uncached run (RMS of the final latents); from the best, a local search
(change one step's action, move a full step by one, trade a full step for a cheaper
one) tries the moves the error model ranks best, keeping a move when the measured
error goes down, for at most `rollouts` runs. Rollouts may use classifier-free
guidance (cfg_scale); the error table is measured at cfg_scale 1.

Two checks follow, as the step times and the calibration run are both samples.
Retime: the searched schedule's speedup is measured on the calibration run (uncached
and cached runs alternating, the fastest of each); when it misses the target or
overshoots it by more than `overshoot`, the per-step overhead that explains the
difference (the step-time runs are samples of the machine's speed too) is added to every step time and the
search runs again on the same rollouts, at most `retime` times; of the timed
schedules that met the target, the least error is kept. Validation: the kept
schedule, the other timed ones that met the target, the best start candidates
(planned, fixed intervals) and, after a retime, the fixed intervals the time
model puts up to NEAR (5%) short of the target are sampled on other seeds
(validate_seeds, by default the 3 after the calibration seed: on one seed of 20 samples two schedules' order
flips by up to 1 dB) and the least error there is returned, so the local search's
gains must carry over from the calibration seed; after a retime the winner must
also have measured at least the target on the calibration run (a candidate never
timed is timed first). meta says what was compared, measured and picked.

Cost of the table: the propagation copies are one per step, so they cost steps^2 x
propagate_samples sample-steps; propagate_samples < the calibration batch makes a
large calibration batch affordable.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from ..cache.checks import SEED_MAX
from ..cache.schedule import CACHED, FULL, REUSE, CacheSchedule, ScheduleEntry, run_full_keeping
from ..sampling.diffusion import Diffusion

MODES = ("cached", "hybrid", "reuse", "extrapolate")
VALIDATE_SEEDS = 3   # search_schedule's default count of validation seeds
NEAR = 0.05   # validation also times fixed intervals predicted this fraction short of the target
PLAN_UNITS = 6000   # cost="time": an uncached run is about this many plan units (steps x units per full step)


@dataclass(frozen=True)
class Action:
    """What a non-full step does: kind "cached" (branch K, reuse_outer for hybrid) or
    "reuse" (extrapolate: from the last two full steps)."""

    kind: str
    branch: int | None = None
    reuse_outer: bool = False
    extrapolate: bool = False

    def entry(self, t: float | None = None) -> ScheduleEntry:
        return ScheduleEntry(self.kind, self.branch, t, self.reuse_outer, self.extrapolate)

    @property
    def code(self) -> str:
        return self.entry().code

    @property
    def reuses(self) -> bool:
        return self.kind == REUSE or self.reuse_outer

    def blocks(self, depth: int) -> int:
        return self.entry().blocks(depth)

    def __str__(self) -> str:
        if self.kind == REUSE:
            return "extrapolated reuse" if self.extrapolate else "reuse"
        return f"{'hybrid' if self.reuse_outer else 'cached'} K={self.branch}"


def interval_code(code: str, steps: int, period: int) -> str:
    """The schedule code of a fixed interval: full at every step i % period == 0, the
    step kind `code` between."""
    return "".join("F" if i % period == 0 else code for i in range(steps))


def action_of(entry: ScheduleEntry) -> Action:
    return Action(entry.kind, entry.branch, entry.reuse_outer, entry.extrapolate)


@dataclass
class ErrorTable:
    """err[i, g, a]: error of taking step i with actions[a] on what the full step
    i - g kept (see the module docstring); inf where i - g < 0. g = 1..max_gap at index g."""

    err: np.ndarray              # [steps, max_gap + 1, len(actions)]
    actions: list[Action]
    depth: int
    timesteps: list[float]       # the timestep of each sampling step, in run order
    unit: str = "blocks"
    info: dict | None = None
    amplification: np.ndarray | None = None   # [steps, actions]: final drift per unit injected at step i
    seconds: dict[str, float] = field(default_factory=dict)  # measured time of a step: "F" and each action's code
    # measured extra time of a full step that keeps every block's attention / MLP output
    # (CacheSchedule.keeping_steps: a hybrid or reuse step follows before the next full one)
    keep_seconds: float = 0.0

    @property
    def branches(self) -> list[int]:
        """The K of the plain cached actions."""
        return [a.branch for a in self.actions if a.kind == CACHED and not a.reuse_outer]

    @property
    def weighted(self) -> np.ndarray:
        """err scaled by each step's measured amplification (what the schedule choice minimizes)."""
        return self.err if self.amplification is None else self.err * self.amplification[:, None, :]

    @property
    def steps(self) -> int:
        return self.err.shape[0]

    @property
    def max_gap(self) -> int:
        return self.err.shape[1] - 1

    def index(self, action: Action) -> int | None:
        try:
            return self.actions.index(action)
        except ValueError:
            return None

    def predicted_error(self, schedule: CacheSchedule, weighted: bool = True) -> float:
        """Sum of (weighted) err over the schedule's non-full steps (inf when a gap is
        past max_gap or a step's action was not measured)."""
        if schedule.steps != self.steps:
            raise ValueError(f"schedule has {schedule.steps} steps, the error table {self.steps}")
        W = self.weighted if weighted else self.err
        total, last = 0.0, 0
        for i, e in enumerate(schedule.entries):
            if e.kind == FULL:
                last = i
                continue
            g, a = i - last, self.index(action_of(e))
            if g > self.max_gap or a is None:
                return math.inf
            total += float(W[i, g, a])
        return total

    def step_seconds(self, schedule: CacheSchedule) -> float:
        """The run's predicted time from the measured step times: its steps' times,
        and keep_seconds for each full step that keeps (schedule.keeping_steps)."""
        if not self.seconds:
            raise ValueError("this error table has no measured step times (measure_errors(time_steps=False))")
        return (sum(self.seconds["F" if e.kind == FULL else e.code] for e in schedule.entries)
                + self.keep_seconds * len(schedule.keeping_steps))

    def predicted_speedup(self, schedule: CacheSchedule) -> float:
        return self.steps * self.seconds["F"] / self.step_seconds(schedule)


def _rms(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Per group of n samples: RMS of a - b. a, b: [G * n, ...] -> [G]."""
    d = (a - b).double().reshape(-1, n, *a.shape[1:]).flatten(1)
    return d.pow(2).mean(1).sqrt()


def make_actions(model, modes: Sequence[str] = MODES, branches: Sequence[int] | None = None) -> list[Action]:
    """The actions of `modes` ("cached", "hybrid", "reuse", "extrapolate") for `model`, every K of
    `branches` (default every K with 2K < depth up to the model's max_branch)."""
    depth = model.depth
    max_k = getattr(model, "max_branch", depth // 2)
    if branches is None:
        branches = [k for k in range(1, max_k + 1) if 2 * k < depth]
    branches = sorted({int(k) for k in branches})
    if not branches or branches[0] < 1 or branches[-1] > max_k:
        raise ValueError(f"branches must be in 1..{max_k} for this model (depth {depth}), got {branches}")
    if isinstance(modes, str) or not modes or set(modes) - set(MODES):
        raise ValueError(f"modes must be a non-empty list of {list(MODES)}, got {modes!r}")
    acts = []
    if "cached" in modes:
        acts += [Action(CACHED, k) for k in branches]
    if "hybrid" in modes:
        acts += [Action(CACHED, k, True) for k in branches]
    if "reuse" in modes:
        acts.append(Action(REUSE))
    if "extrapolate" in modes:
        acts.append(Action(REUSE, extrapolate=True))
    return acts


def _inputs(model, labels, num_samples):
    cfg = model.config
    device = next(model.parameters()).device
    if getattr(cfg, "class_conditional", True):
        if labels is None:
            raise ValueError("this model is class-conditional: pass labels")
        y = torch.as_tensor(list(labels), dtype=torch.long, device=device)
        if y.numel() < 1:
            raise ValueError("labels must not be empty")
        return y, y.numel()
    if num_samples is None or num_samples < 1:
        raise ValueError(f"an unconditional model needs num_samples >= 1, got {num_samples}")
    return None, int(num_samples)


@torch.no_grad()
def measure_errors(model, labels: Sequence[int] | None = None, *, num_samples: int | None = None, steps: int = 50,
                   seed: int = 0, sampler: str = "ddpm", max_gap: int = 12,
                   branches: Sequence[int] | None = None, modes: Sequence[str] = MODES, propagate: bool = True,
                   time_steps: bool = True, time_batch: int | None = None,
                   propagate_samples: int | None = None) -> ErrorTable:
    """The error table of `model` (a model with the SkipModel block structure and
    embed / head: models.DiT / Latte with skips, or cache.baselines.CachedModel's
    .model for a vanilla one) on one uncached run from `seed`, for the actions of
    `modes` and `branches` (make_actions). time_steps: also measure each action's
    step time (measure_step_seconds, in fixed intervals of period max_gap + 1) on a
    batch of time_batch samples (default: the calibration batch; info['time_batch']). propagate_samples: the perturbed copies that measure
    the amplification carry the first this many samples only (default: all); they
    are one copy per step, so their cost grows with steps^2 x this."""
    from ..cache.reuse import OuterReuse

    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if int(max_gap) != max_gap or max_gap < 1:
        raise ValueError(f"max_gap must be an integer >= 1, got {max_gap}")
    actions = make_actions(model, modes, branches)
    depth = model.depth
    ks = sorted({a.branch for a in actions if a.kind == CACHED})
    keep_outputs = any(a.reuses for a in actions)
    extrapolating = any(a.extrapolate for a in actions)
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    y, n = _inputs(model, labels, num_samples)
    if propagate_samples is None:
        m = n
    elif isinstance(propagate_samples, bool) or int(propagate_samples) != propagate_samples or propagate_samples < 1:
        raise ValueError(f"propagate_samples must be an integer >= 1 (or None: all), got {propagate_samples!r}")
    else:
        m = min(n, int(propagate_samples))
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, *cfg.latent_shape), generator=gen, device=device, dtype=torch.float32)
    diffusion = Diffusion(steps, learn_sigma=cfg.learn_sigma)
    S = diffusion.steps
    err = np.full((S, max_gap + 1, len(actions)), np.inf)
    kept: list[dict] = []            # per step: {"deep": {K: tensor}, "attn": {...}, "mlp": {...}}
    timesteps = []
    probes: list[torch.Tensor] = []  # propagation: replica r was perturbed at step r, full since
    injected = np.zeros(S)
    started: list[int] = []

    def rep(v, times):
        return None if v is None else v.repeat(times, *([1] * (v.dim() - 1)))

    def ext(v, copies):  # v for the n samples, then its first m for each perturbed copy
        return v if v is None or not copies else torch.cat([v, rep(v[:m], copies)])

    def step(out, xs, i, z):  # z: the step's noise for every row of xs
        if sampler == "ddpm":
            mean, log_var, _, _ = diffusion.p_mean_variance(out, xs, i)
            return mean if i == 0 else mean + torch.exp(0.5 * log_var) * z
        return diffusion.ddim_step(out, xs, i, None)

    was_training = model.training
    model.eval()
    try:
        for k_step, i in enumerate(reversed(range(S))):
            tv = diffusion.timesteps[i]
            timesteps.append(float(tv))
            z = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype) \
                if sampler == "ddpm" and i > 0 else None
            P = len(probes) if propagate else 0
            xs = torch.cat([x, *probes]) if P else x
            t = torch.full((len(xs),), tv, dtype=torch.long, device=device)
            h, state = model.embed(xs.to(dtype), t, ext(y, P))
            store = OuterReuse() if keep_outputs else None
            if store is not None:
                store.attach(state, True)
            hout, deep = run_full_keeping(model, h, state, ks)
            out = model.head(hout, state).float()
            nxt = step(out, xs, i, ext(z, P))
            x_next, probes = nxt[:n], list(nxt[n:].split(m)) if P else []
            kept.append({"deep": {k: v[:n] for k, v in deep.items()},
                         "attn": {b: v[:n] for b, v in store.attn.items()} if store else {},
                         "mlp": {b: v[:n] for b, v in store.mlp.items()} if store else {}})
            gaps = [g for g in range(1, max_gap + 1) if k_step - g >= 0]
            if gaps:
                G = len(gaps)
                xin = x.to(dtype)
                for ai, a in enumerate(actions):
                    h2, st2 = model.embed(rep(xin, G), t[:1].expand(G * n), rep(y, G))
                    if a.reuses:
                        r2 = OuterReuse()
                        for name in ("attn", "mlp"):
                            getattr(r2, name).update({b: torch.cat([kept[k_step - g][name][b] for g in gaps])
                                                      for b in kept[k_step - 1][name]})
                        if a.extrapolate:   # from the full steps i - g and i - 2g (plain reuse before 2g)
                            for name in ("attn", "mlp"):
                                getattr(r2, "prev_" + name).update({b: torch.cat(
                                    [kept[k_step - 2 * g if k_step >= 2 * g else k_step - g][name][b] for g in gaps])
                                    for b in kept[k_step - 1][name]})
                            r2.step, r2.prev_step = 1, 0   # coefficient damping * g / g for every gap
                        r2.attach(st2, False, step=2, extrapolate=a.extrapolate)
                    if a.kind == REUSE:
                        hc = model.run_blocks(h2, 0, depth, st2)
                    else:
                        K = a.branch
                        model.run_blocks(h2, 0, K, st2)
                        cached = torch.cat([kept[k_step - g]["deep"][K] for g in gaps])
                        hc = model.run_blocks(cached, depth - K, depth, st2)
                    o = model.head(hc, st2).float()
                    xc = step(o, rep(x, G), i, rep(z, G))
                    e = _rms(xc, rep(x_next, G), n).cpu().numpy()
                    err[k_step, gaps, ai] = e
                    if propagate and ai == 0:  # the gap-1 step with the first action starts replica k_step
                        probes.append(xc[:m])
                        started.append(k_step)
                        injected[k_step] = float(_rms(xc[:m], x_next[:m], m)[0])
            horizon = 2 * max_gap if extrapolating else max_gap
            if len(kept) > horizon:  # only the last max_gap (extrapolating: 2 max_gap) steps' tensors are needed
                kept[len(kept) - horizon - 1] = {}
            x = x_next
    finally:
        model.train(was_training)
    amp = np.ones((S, len(actions)))
    if propagate:
        for r, p in zip(started, probes):
            d = float(_rms(p, x[:m], m)[0])
            amp[r, :] = d / injected[r] if injected[r] > 0 else 1.0
    info = {"steps": S, "sampler": sampler, "seed": seed, "samples": n, "propagate_samples": m if propagate else 0,
            "labels": None if y is None else [int(v) for v in y.tolist()], "max_gap": max_gap,
            "actions": [str(a) for a in actions]}
    table = ErrorTable(err, actions, depth, timesteps, getattr(model, "cache_unit", "blocks"), info, amp)
    if time_steps:
        sec = measure_step_seconds(model, actions, batch=time_batch or n, labels=labels, steps=S,
                                   sampler=sampler, period=max_gap + 1)
        table.keep_seconds = sec.pop("keep", 0.0)
        table.seconds = sec
        info["step_seconds"] = dict(sec)
        info["keep_seconds"] = table.keep_seconds
        info["time_batch"] = time_batch or n
    return table


def run_clock(device: torch.device):
    """The clock speedups are measured in, step times and whole runs alike:
    synchronized wall time on a GPU, process CPU time on a CPU (wall time there is
    also the other jobs' on a shared machine, and the two are not proportional: a
    full step keeps every thread busy, a reuse step much less, so the kinds' relative
    costs differ between the clocks)."""
    if device.type == "cuda":
        def clock():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.process_time


def fastest_runs(run, scheds: dict, rounds: int, device: torch.device) -> dict:
    """Seconds of the fastest of `rounds` calls run(sched) for each value of
    `scheds` (None: uncached), in run_clock(device)'s time; the calls alternate, so
    the machine's slow spells fall on all of them alike."""
    clock = run_clock(device)
    best = dict.fromkeys(scheds, math.inf)
    for _ in range(max(1, rounds)):
        for key, sched in scheds.items():
            t0 = clock()
            run(sched)
            best[key] = min(best[key], clock() - t0)
    return best


@torch.no_grad()
def measure_step_seconds(model, actions: Sequence[Action], *, batch: int, labels=None, rounds: int = 5,
                         steps: int = 50, sampler: str = "ddpm", period: int = 13) -> dict[str, float]:
    """Seconds of one sampling step of each kind ("F": full, else the action's
    code), measured in whole sampling runs of `steps` steps on `batch` samples, in
    run_clock's time (CPU seconds on a CPU model): an uncached run and, per action,
    its fixed interval schedule of period `period` (full, then period - 1 steps of
    the action, ...) through SkipCache(schedule=...) alternate `rounds` times, the
    fastest of each counting. F = the uncached run / steps; an action = (its run -
    its full steps x F) / its other steps. The full steps of a hybrid or reuse
    action's run keep every block's attention / MLP output: for the cheapest such
    action (reuse before hybrid K=1, ...) its period-2 run is timed too, and its two
    runs, n (F + keep) + (steps - n) x action at the two periods, give "keep" (the
    extra time of a keeping full step, held >= 0; in the result when there is such an
    action and period > 2), which the other such actions' estimates then subtract
    with their full steps. A run's fixed costs are so spread over
    its steps, and a schedule's predicted time is the sum of its steps' times: what
    the speedup of a whole run, the target, measures (single steps timed in
    isolation put a reuse step 10-20% under and a full step 14% over their cost in
    a run). The long period makes the action most of its run, so the run's noise
    (a few % of a whole run on a shared CPU) is spread over many action steps: at
    N=2 half a run is full steps, and the same noise moved a cheap action's estimate
    by half its cost between calls (reuse 0.12 vs 0.24 of a full step)."""
    from ..cache import SkipCache
    from ..sampling.diffusion import sample

    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (a full step and one of each kind), got {steps}")
    if isinstance(period, bool) or int(period) != period or period < 2:
        raise ValueError(f"period must be an integer >= 2 (a full step, then the action), got {period}")
    period = min(int(period), steps)
    if getattr(model.config, "class_conditional", True):
        pool = list(labels) if labels is not None else list(range(model.config.num_classes))
        kw = dict(labels=[int(pool[j % len(pool)]) for j in range(batch)])
    else:
        kw = dict(num_samples=batch)

    def interval(code, n):
        return CacheSchedule.from_code(interval_code(code, steps, n), model.depth)

    n_full, n_short = -(-steps // period), -(-steps // 2)   # the full steps (i % period == 0) of a run
    runs = {"F": None, **{a.code: interval(a.code, period) for a in actions}}
    reusing = sorted((a for a in actions if a.reuses), key=lambda a: (a.kind != REUSE, a.extrapolate, a.branch or 0))
    probe = reusing[0] if reusing and period > 2 else None
    if probe is not None:   # its full steps keep, half the run at period 2
        runs["keep"] = interval(probe.code, 2)
    was_training = model.training
    model.eval()
    try:
        sample(model, steps=2, sampler=sampler, **kw)   # warm up
        best = fastest_runs(lambda sc: sample(model, steps=steps, sampler=sampler, **kw,
                                              cache=None if sc is None else SkipCache(schedule=sc)),
                            runs, rounds, next(model.parameters()).device)
    finally:
        model.train(was_training)
    full = best["F"] / steps
    keep = 0.0
    if probe is not None:
        # t = n keep + (steps - n) x probe at both periods (n = n_full, n_short): solved for keep
        t_long, t_short = best[probe.code] - n_full * full, best["keep"] - n_short * full
        keep = max(0.0, (t_long * (steps - n_short) - t_short * (steps - n_full)) / (steps * (n_full - n_short)))
    out = {"F": full}
    for a in actions:
        kept = n_full * (full + (keep if a.reuses else 0.0))
        out[a.code] = max(best[a.code] - kept, 0.0) / (steps - n_full)
    if probe is not None:
        out["keep"] = keep
    return out


def budget_for(speedup: float, steps: int, depth: int) -> int:
    """The block budget of an ideal (block-count) speedup: floor(steps * depth / speedup)."""
    if not speedup >= 1:
        raise ValueError(f"speedup must be >= 1, got {speedup}")
    return int(math.floor(steps * depth / speedup + 1e-9))


def _plan_costs(table: ErrorTable, cost: str) -> tuple[int, list[int], list[int], int]:
    """(full-step cost, per-action cost, eligible action indices, cost of keeping at a
    full step) in integer units."""
    D = table.depth
    if cost == "blocks":
        elig = [j for j, a in enumerate(table.actions) if a.blocks(D) > 0]
        if not elig:
            raise ValueError("cost='blocks' plans with plain cached steps only; the table has none "
                             "(hybrid and reuse steps run no blocks: plan them with cost='time')")
        return D, [a.blocks(D) for a in table.actions], elig, 0
    if cost != "time":
        raise ValueError(f"cost must be 'time' or 'blocks', got {cost!r}")
    if not table.seconds:
        raise ValueError("cost='time' needs measured step times (measure_errors(time_steps=True))")
    # units per full step: each step's cost is rounded up, by up to 1/Q of a full step
    # (at Q=60, up to 0.4 full steps over the 25 reuse steps of an N=2 schedule), and the
    # plan's tables are [steps, 2, gaps, budget] (about PLAN_UNITS / target budget units)
    Q = max(20, min(240, PLAN_UNITS // table.steps))
    full = table.seconds["F"]
    # rounded up: a schedule within the budget in units is within it in measured seconds
    costs = [max(1, math.ceil(Q * table.seconds[a.code] / full - 1e-9)) for a in table.actions]
    keep = math.ceil(Q * table.keep_seconds / full - 1e-9) if table.keep_seconds > 0 else 0
    return Q, costs, [j for j in range(len(table.actions)) if costs[j] < Q], keep


def _budget(table: ErrorTable, cost: str, speedup, budget) -> int:
    if (speedup is None) == (budget is None):
        raise ValueError("pass exactly one of speedup= and budget=")
    if budget is not None:
        if cost != "blocks":
            raise ValueError("budget= is a block count: use it with cost='blocks' (a time target is speedup=)")
        if isinstance(budget, bool) or int(budget) != budget or budget < 0:
            raise ValueError(f"budget must be an integer >= 0, got {budget}")
        return int(budget)
    full = _plan_costs(table, cost)[0]
    return budget_for(speedup, table.steps, full)


def _cost_of(table: ErrorTable, sched: CacheSchedule, cost: str) -> int:
    full, costs, _, keep = _plan_costs(table, cost)
    total = keep * len(sched.keeping_steps)
    for e in sched.entries:
        if e.kind == FULL:
            total += full
        else:
            j = table.index(action_of(e))
            total += costs[j] if j is not None else action_of(e).blocks(table.depth) if cost == "blocks" else 10 ** 9
    return total


def choose_schedule(table: ErrorTable, *, speedup: float | None = None, budget: int | None = None,
                    cost: str | None = None, weighted: bool = True, name: str | None = None) -> CacheSchedule:
    """The schedule with the least predicted error (ErrorTable.predicted_error) within
    the budget: cost="time" (default when the table has step times and no budget=
    is given): predicted time <= uncached time / speedup; cost="blocks": at most
    `budget` blocks (or steps * depth / speedup), plain cached steps only. Step 0 full."""
    cost = cost or ("time" if table.seconds and budget is None else "blocks")
    S, G = table.steps, table.max_gap
    B = _budget(table, cost, speedup, budget)
    full, costs, elig, keep = _plan_costs(table, cost)
    if full > B:
        raise ValueError(f"budget {B} ({'blocks' if cost == 'blocks' else 'time units'}) is below one full step "
                         f"({full}): no schedule fits")
    inf = math.inf
    W = table.weighted if weighted else table.err
    reuses = [a.reuses for a in table.actions]
    extrap = [a.extrapolate for a in table.actions]

    def units(j, z):   # action j's cost from state z (keeping paid where it is not yet)
        p, r = divmod(z // (G + 1), 2)
        return costs[j] + (keep if reuses[j] and not r else 0) + (keep if extrap[j] and not p else 0)

    # dp[z, b]: least error after the current step in state z = (2 p + r) (G + 1) + s, s =
    # steps since the last full step, r = 1 when a hybrid / reuse step of this gap made that
    # full step keep (its `keep` units paid once), p = 1 when the full step before it keeps
    # (paid; or there is none), which an extrapolated reuse step needs; b = cost used
    Z = 4 * (G + 1)
    dp = np.full((Z, B + 1), inf)
    dp[2 * (G + 1), full] = 0.0   # step 0: no full step before it
    back_z = np.zeros((S, Z, B + 1), dtype=np.int16)
    back_a = np.full((S, Z, B + 1), -1, dtype=np.int8 if len(table.actions) < 127 else np.int16)  # -1: full
    for i in range(1, S):
        new = np.full_like(dp, inf)
        for r in (0, 1):   # a full step, from any state whose gap kept (r) or not: then p = r
            zs = np.array([(2 * p + r) * (G + 1) + s for p in (0, 1) for s in range(G + 1)])
            prev = dp[zs, : B + 1 - full]
            best = prev.argmin(0)
            new[2 * r * (G + 1), full:] = prev[best, np.arange(prev.shape[1])]
            back_z[i, 2 * r * (G + 1), full:] = zs[best]
        for p in (0, 1):
            for r in (0, 1):
                for s in range(G):
                    z = (2 * p + r) * (G + 1) + s
                    if not np.isfinite(dp[z]).any():
                        continue
                    for j in elig:
                        c = units(j, z)
                        e = W[i, s + 1, j]
                        if c > B or not np.isfinite(e):
                            continue
                        z2 = (2 * (1 if extrap[j] else p) + (1 if reuses[j] else r)) * (G + 1) + s + 1
                        cand = dp[z, : B + 1 - c] + e
                        tgt = new[z2, c:]
                        better = cand < tgt
                        if better.any():
                            tgt[better] = cand[better]
                            back_z[i, z2, c:][better] = z
                            back_a[i, z2, c:][better] = j
        dp = new
    z_best, b_best = np.unravel_index(np.argmin(dp), dp.shape)
    if not np.isfinite(dp[z_best, b_best]):
        raise ValueError(f"no schedule of {S} steps fits in {B} {'blocks' if cost == 'blocks' else 'time units'} "
                         f"with gaps of at most {G} steps (measure with a larger max_gap, or ask for less speedup)")
    entries = [ScheduleEntry(FULL, None, table.timesteps[0])]
    picks = [-1] * S
    z, b = int(z_best), int(b_best)
    for i in range(S - 1, 0, -1):
        j = int(back_a[i, z, b])
        picks[i] = j
        prev_z = int(back_z[i, z, b])
        b -= full if j < 0 else units(j, prev_z)
        z = prev_z
    for i in range(1, S):
        j = picks[i]
        entries.append(ScheduleEntry(FULL, None, table.timesteps[i]) if j < 0 else
                       table.actions[j].entry(table.timesteps[i]))
    meta = {"made_by": "skipdit_fast.analysis.calibrate", "cost": cost, "budget": B, "target_speedup": speedup,
            "predicted_error": float(dp[z_best, b_best]), "error_model": "sum over non-full steps of the RMS "
            "change of the step's posterior mean, measured on the uncached run" +
            (", times the measured amplification of the step" if weighted else ""), "calibration": table.info}
    if name:
        meta["model"] = name
    sched = CacheSchedule(entries, table.depth, table.unit, meta)
    if cost == "time":
        meta["predicted_speedup"] = table.predicted_speedup(sched)
    assert _cost_of(table, sched, cost) <= B
    return sched


# ---- rollouts: the schedules on real sampling runs ----------------------------------------------

class Rollouts:
    """Samples the calibration run with a schedule and measures its error: RMS of
    the final latents against the uncached run (same labels, seeds, sampler, CFG),
    over every seed of `seed` (an int or a list of them). time_batch: speedup()
    times runs of this many samples (the labels repeated), the batch the step times
    were measured at (default: the calibration batch)."""

    def __init__(self, model, labels=None, *, num_samples=None, steps=50, seed=0, sampler="ddpm",
                 cfg_scale: float = 1.0, time_batch: int | None = None):
        from ..sampling.diffusion import sample

        if time_batch is not None and (isinstance(time_batch, bool) or int(time_batch) != time_batch
                                       or time_batch < 1):
            raise ValueError(f"time_batch must be an integer >= 1 (or None: the calibration batch), got {time_batch!r}")
        self._sample = sample
        self.model = model
        self.seeds = [int(seed)] if isinstance(seed, numbers.Integral) else [int(s) for s in seed]
        if not self.seeds:
            raise ValueError("seed must be an integer or a non-empty list of them")
        self.kw = dict(num_samples=num_samples, steps=steps, sampler=sampler, cfg_scale=cfg_scale)
        self.labels = None if labels is None else list(labels)
        self.time_kw = {"labels": self.labels, **self.kw}
        if time_batch is not None:
            if self.labels:
                self.time_kw["labels"] = [self.labels[j % len(self.labels)] for j in range(int(time_batch))]
            else:
                self.time_kw["num_samples"] = int(time_batch)
        self.ref = [self._run(None, s) for s in self.seeds]
        self.count = 0
        self.seen: dict[str, float] = {}

    def _run(self, sched, seed, kw=None):
        from ..cache import SkipCache

        cache = None if sched is None else SkipCache(schedule=sched)
        kw = kw or {"labels": self.labels, **self.kw}
        return self._sample(self.model, cache=cache, seed=seed, **kw).latents

    def error(self, sched: CacheSchedule) -> float:
        key = sched.code
        if key not in self.seen:
            sq = [(self._run(sched, s).double() - r.double()).pow(2).mean() for s, r in zip(self.seeds, self.ref)]
            self.seen[key] = float(torch.stack(sq).mean().sqrt())
            self.count += 1
        return self.seen[key]

    def speedup(self, sched: CacheSchedule, rounds: int = 3) -> float:
        """Measured speedup of `sched` on the first seed's run at the time batch:
        uncached and cached runs alternate `rounds` times, the fastest of each counts
        (process CPU time on a CPU model, synchronized wall time on a GPU one)."""
        best = fastest_runs(lambda sc: self._run(sc, self.seeds[0], self.time_kw), {None: None, "s": sched}, rounds,
                            next(self.model.parameters()).device)
        return best[None] / best["s"]


def interval_schedules(table: ErrorTable, cost: str, B: int) -> list[tuple[str, CacheSchedule]]:
    """Every fixed-interval schedule (period N = 2..max_gap+1, one action the cost
    can price) within the budget."""
    out = []
    for a in (table.actions[j] for j in _plan_costs(table, cost)[2]):
        for N in range(2, table.max_gap + 2):
            sched = CacheSchedule.from_code(interval_code(a.code, table.steps, N), table.depth, table.timesteps,
                                            unit=table.unit)
            if _cost_of(table, sched, cost) <= B:
                out.append((f"interval N={N} {a}", sched))
    return out


def _moves(table: ErrorTable, sched: CacheSchedule, cost: str, B: int, elig: list[int]):
    """Schedules one move away from sched within the budget, best predicted first."""
    ents = sched.entries
    ts = table.timesteps
    S = len(ents)
    cands = {}

    def add(new_entries, what):
        s2 = CacheSchedule(new_entries, table.depth, table.unit)
        if _cost_of(table, s2, cost) > B:
            return
        p = table.predicted_error(s2)
        if np.isfinite(p) and s2.code not in cands:
            cands[s2.code] = (p, what, s2)

    acts = [table.actions[j] for j in elig]
    for i in range(1, S):
        e = ents[i]
        if e.kind != FULL:
            for a in acts:  # another action at step i
                if a != action_of(e):
                    add(ents[:i] + [a.entry(ts[i])] + ents[i + 1:], f"step {i}: {a}")
            add(ents[:i] + [ScheduleEntry(FULL, None, ts[i])] + ents[i + 1:], f"step {i}: full")
        else:
            for d in (-1, 1):   # move the full step by one
                j = i + d
                if 1 <= j < S and ents[j].kind != FULL:
                    new = list(ents)
                    new[i] = replace(ents[j], t=ts[i])
                    new[j] = ScheduleEntry(FULL, None, ts[j])
                    add(new, f"full step {i} -> {j}")
            for a in acts:   # trade it for a cheaper step (frees budget for others)
                add(ents[:i] + [a.entry(ts[i])] + ents[i + 1:], f"step {i} full -> {a}")
    return sorted(cands.values(), key=lambda v: v[0])


def _search(table: ErrorTable, ro: Rollouts, cost: str, B: int, speedup, budget, rollouts: int, log):
    """One search (search_schedule's docstring) on `table`: (best error, best, start,
    moves kept, every start candidate scored, the weighted plan)."""
    elig = _plan_costs(table, cost)[2]
    planned = [("plan (weighted)", choose_schedule(table, speedup=speedup, budget=budget, cost=cost)),
               ("plan (unweighted)", choose_schedule(table, speedup=speedup, budget=budget, cost=cost,
                                                     weighted=False))]
    fixed = interval_schedules(table, cost, B)
    if fixed:  # the fixed intervals that use the budget best (cheaper ones lose to them)
        top = max(_cost_of(table, s, cost) for _, s in fixed)
        fixed = [(w, s) for w, s in fixed if _cost_of(table, s, cost) >= 0.75 * top]
    scored = [(ro.error(s), w, s) for w, s in planned + fixed]
    scored.sort(key=lambda v: v[0])
    best_err, best_what, best = scored[0]
    start = {"what": best_what, "error": best_err}
    moves_kept = []
    tried = 0
    while tried < rollouts:
        improved = False
        for _, what, cand in _moves(table, best, cost, B, elig):
            if tried >= rollouts:
                break
            if cand.code in ro.seen:
                continue
            tried += 1
            e = ro.error(cand)
            if e < best_err:
                best_err, best = e, cand
                moves_kept.append(what)
                improved = True
                if log:
                    log(f"  {what}: measured error {e:.4g}")
                break
        if not improved:
            break
    return best_err, best, start, moves_kept, scored, planned[0][1]


def _with_overhead(table: ErrorTable, sched: CacheSchedule, measured: float) -> tuple[ErrorTable, float]:
    """The table with the per-step overhead o (seconds, added to every kind of step;
    keep_seconds is left as measured) that makes its predicted speedup of `sched` equal the measured one: with C the
    predicted run time and S full steps' time S*F, S (F + o) / (C + S o) = measured.
    o < 0 when the run was faster than predicted (the isolated step timings saw
    costs a whole run does not pay); it is held above -half the cheapest step time,
    so every step keeps a positive cost."""
    S, F = table.steps, table.seconds["F"]
    C = table.step_seconds(sched)
    o = (measured * C - S * F) / (S * (1 - measured)) if measured != 1 else 0.0
    o = max(o, -0.5 * min(table.seconds.values()))
    return replace(table, seconds={k: v + o for k, v in table.seconds.items()}), o


def _near_intervals(tab: ErrorTable, B: int, speedup: float, count: int = 3) -> list[tuple[str, CacheSchedule]]:
    """The fixed-interval schedules over the time budget whose predicted speedup is
    within NEAR of the target, closest first (at most count): the time model is a
    sample, and a FORA-style interval it puts 1% short may run 5% over the target."""
    over = [(w, s) for w, s in interval_schedules(tab, "time", math.inf) if _cost_of(tab, s, "time") > B
            and tab.predicted_speedup(s) >= speedup * (1 - NEAR)]
    over.sort(key=lambda v: -tab.predicted_speedup(v[1]))
    return [(f"{w} (predicted {tab.predicted_speedup(s):.2f}x)", s) for w, s in over[:count]]


def _validate(model, labels, kw, seeds, ro: Rollouts, found, tab: ErrorTable, timed, retimed, speedup, log,
              near=()):
    """search_schedule's validation: the kept schedule, every other timed one that met
    the target, the kept search's 4 best start candidates and `near` (fixed intervals
    the time model puts just short of the target), sampled on `seeds`; the
    one with the least error there wins, but where the search was timed (retime) only
    a schedule that met the target on the calibration run may: an untimed candidate
    is timed when its turn comes, one short of the target is passed over (none left:
    the kept schedule). Returns the record for meta, with the winner's schedule and
    table under "sched" / "table"."""
    vro = Rollouts(model, labels, seed=seeds, **kw)
    speeds = {r["code"]: r["measured_speedup"] for r in retimed}
    cands = [("searched", found[1], tab)]
    cands += [(f"searched (timing {k + 1})", f[1], t) for k, ((f, t), r) in enumerate(zip(timed, retimed))
              if not r.get("picked") and r["measured_speedup"] >= speedup]
    cands += [(w, s, tab) for _, w, s in found[4][:4]] + [(w, s, tab) for w, s in near]
    seen, rows = set(), []
    for w, s, t in cands:
        if s.code not in seen:
            seen.add(s.code)
            rows.append({"what": w, "code": s.code, "error": vro.error(s), "sched": s, "table": t})
    win = rows[0]   # the kept schedule: the fallback when no other candidate met the target
    for d in sorted(rows, key=lambda d: d["error"]):
        if timed:
            if d["code"] not in speeds:
                speeds[d["code"]] = ro.speedup(d["sched"])
                if log:
                    log(f"  validation: {d['what']} measured {speeds[d['code']]:.3f}x for the target {speedup}x")
            if speeds[d["code"]] < speedup:
                d["passed_over"] = "below the target"
                continue
        win = d
        break
    for d in rows:   # what is known of the speed of those the loop did not reach
        if d["code"] in speeds:
            d["measured_speedup"] = speeds[d["code"]]
    out = {"seeds": list(seeds), "picked": win["what"], "picked_speedup": speeds.get(win["code"]),
           "sched": win["sched"], "table": win["table"]}
    out["candidates"] = [{k: v for k, v in d.items() if k not in ("sched", "table")} for d in rows]
    return out


def search_schedule(model, table: ErrorTable, *, speedup: float | None = None, budget: int | None = None,
                    cost: str | None = None, labels=None, num_samples: int | None = None, seed: int | None = None,
                    sampler: str | None = None, cfg_scale: float = 1.0, rollouts: int = 64,
                    retime: int = 2, overshoot: float = 0.05, validate_seeds: Sequence[int] | None = None,
                    time_batch: int | None = None, name: str | None = None, log=None) -> CacheSchedule:
    """choose_schedule, checked and improved on real runs (module docstring): the
    schedule with the least measured error on the calibration run among the planned
    ones, every fixed-interval one within the budget, and up to `rollouts` local-search
    moves from the best. labels / num_samples / seed / sampler default to the table's.

    retime (cost="time" with a speedup target): the chosen schedule's speedup is
    measured on the calibration run (uncached and cached runs alternating); when it
    misses the target, or exceeds it by more than the fraction `overshoot` (it then
    spends less time than the target allows, which costs error), the per-step
    overhead that explains the difference is added to every measured step time and
    the search runs again (its rollouts are remembered), at most `retime` times. Of
    the timed schedules that met the target the one with the least error is kept
    (none met: the fastest, with a RuntimeWarning). validate_seeds (default: the
    VALIDATE_SEEDS seeds after the calibration seed; [] for none): the kept schedule,
    the other timed ones that met the target, the best start candidates and (after a
    retime) the fixed intervals predicted up to NEAR short of the target are sampled
    on these seeds and the one with the least error there is returned, so the choice
    is not fitted to the calibration seed's noise alone; after a retime only one that
    measured at least the target on the calibration run (untimed ones are timed when
    their turn comes) — meta['validation'] lists them all. time_batch: the batch
    the speedups are measured at (default: the one the table's step times were,
    table.info['time_batch']; else the calibration batch): the costs of the kinds
    of step relative to a full one change with the batch (a cached K=1 step cost
    0.2 of a full one at 20 samples and 0.35 at 30 on the tiny Skip-DiT on a CPU)."""
    if isinstance(rollouts, bool) or int(rollouts) != rollouts or rollouts < 0:
        raise ValueError(f"rollouts must be an integer >= 0, got {rollouts}")
    if isinstance(retime, bool) or int(retime) != retime or retime < 0:
        raise ValueError(f"retime must be an integer >= 0, got {retime}")
    if isinstance(overshoot, bool) or not isinstance(overshoot, numbers.Real) or not overshoot >= 0 \
            or not math.isfinite(overshoot):
        raise ValueError(f"overshoot must be a finite number >= 0 (a fraction of the target), got {overshoot}")
    cost = cost or ("time" if table.seconds and budget is None else "blocks")
    B = _budget(table, cost, speedup, budget)
    info = table.info or {}
    if labels is None and num_samples is None:
        labels, num_samples = info.get("labels"), (None if info.get("labels") else info.get("samples"))
    seed = info.get("seed", 0) if seed is None else seed
    if validate_seeds is None:
        validate_seeds = [seed + k if seed + VALIDATE_SEEDS <= SEED_MAX else seed - k
                          for k in range(1, VALIDATE_SEEDS + 1)]
    validate_seeds = [int(s) for s in validate_seeds]
    if seed in validate_seeds:
        raise ValueError(f"validate_seeds must not hold the calibration seed {seed}, got {validate_seeds}")
    t0 = time.perf_counter()
    kw = dict(num_samples=num_samples, steps=table.steps, sampler=sampler or info.get("sampler", "ddpm"),
              cfg_scale=cfg_scale)
    ro = Rollouts(model, labels, seed=seed, time_batch=info.get("time_batch") if time_batch is None else time_batch,
                  **kw)
    tab, retimed, timed = table, [], []
    found = _search(tab, ro, cost, B, speedup, budget, rollouts, log)
    while cost == "time" and speedup is not None and retime:
        measured = ro.speedup(found[1])
        retimed.append({"code": found[1].code, "measured_speedup": measured, "error": found[0]})
        timed.append((found, tab))
        if speedup <= measured <= speedup * (1 + overshoot) or len(retimed) > retime:
            break
        tab2, o = _with_overhead(tab, found[1], measured)
        retimed[-1]["overhead_added_s"] = o
        if log:
            log(f"  measured {measured:.3f}x for the target {speedup}x: step times {o:+.3g} s, searching again")
        try:
            found = _search(tab2, ro, cost, B, speedup, budget, rollouts, log)
        except ValueError as e:   # with the overhead no schedule reaches the target
            retimed[-1]["target_missed"] = str(e)
            break
        tab = tab2
    if timed:   # of the timed schedules that met the target, the least error; else the fastest
        met = [k for k, r in enumerate(retimed) if r["measured_speedup"] >= speedup]
        k = min(met, key=lambda k: retimed[k]["error"]) if met else \
            max(range(len(retimed)), key=lambda k: retimed[k]["measured_speedup"])
        retimed[k]["picked"] = True
        found, tab = timed[k]
        if not met:
            warnings.warn(f"search_schedule: the fastest searched schedule measured "
                          f"{retimed[k]['measured_speedup']:.3f}x on the calibration run, below the target "
                          f"{speedup}x, and searching again with the measured per-step overhead did not reach it"
                          + (f" ({retimed[-1]['target_missed']})" if "target_missed" in retimed[-1] else "")
                          + "; returning it (meta['retimed'])", RuntimeWarning, stacklevel=2)
    best_err, best, start, moves_kept, scored, plan = found
    validation = None
    if validate_seeds:
        validation = _validate(model, labels, kw, validate_seeds, ro, found, tab, timed, retimed, speedup, log,
                               _near_intervals(tab, B, speedup) if timed else ())
        best, tab = validation.pop("sched"), validation.pop("table")
        best_err = ro.error(best)
    meta = dict(plan.meta)
    meta.update({"measured_error": best_err, "error_metric": "RMS of the final latents against the uncached run "
                 "on the calibration labels and seed", "start": start, "moves": moves_kept,
                 "rollouts": ro.count, "search_seconds": time.perf_counter() - t0, "cfg_scale": cfg_scale,
                 "predicted_error": tab.predicted_error(best), "retimed": retimed, "validation": validation,
                 "compared": sorted(({"what": w, "code": s.code, "error": e} for e, w, s in scored),
                                    key=lambda d: d["error"])[:12]})
    if cost == "time":
        meta["predicted_speedup"] = tab.predicted_speedup(best)
        meta["step_seconds"] = dict(tab.seconds)
        meta["keep_seconds"] = tab.keep_seconds
    if name:
        meta["model"] = name
    best = CacheSchedule([replace(e, t=t) for e, t in zip(best.entries, table.timesteps)], table.depth,
                         table.unit, meta)
    # within the budget, or (a near interval) measured at least the target
    assert _cost_of(tab, best, cost) <= B or (validation and (validation["picked_speedup"] or 0) >= speedup)
    return best


def calibrate(model, *, speedup: float | None = None, budget: int | None = None, labels=None,
              num_samples: int | None = None, steps: int = 50, seed: int = 0, sampler: str = "ddpm",
              max_gap: int = 12, branches=None, modes: Sequence[str] | None = None, cost: str | None = None,
              rollouts: int = 64, cfg_scale: float = 1.0, time_batch: int | None = None,
              retime: int = 2, overshoot: float = 0.05, validate_seeds: Sequence[int] | None = None,
              propagate_samples: int | None = None, name: str | None = None) -> CacheSchedule:
    """measure_errors, then search_schedule (rollouts > 0) or choose_schedule
    (rollouts=0). labels default: one per class, at most 10. modes default: every
    step kind (MODES). cost="blocks" (or budget=) plans in block counts with the
    plain cached steps only. retime, overshoot, validate_seeds: search_schedule's;
    propagate_samples: measure_errors'."""
    if labels is None and getattr(model.config, "class_conditional", True):
        labels = list(range(min(10, model.config.num_classes)))
    if budget is not None or cost == "blocks":
        if modes is not None and set(modes) != {"cached"}:
            raise ValueError(f"cost='blocks' (or budget=) plans plain cached steps only, got modes={list(modes)}: "
                             "hybrid and reuse steps run no blocks, plan them with cost='time'")
        cost, modes = "blocks", ["cached"]
    modes = MODES if modes is None else modes
    table = measure_errors(model, labels, num_samples=num_samples, steps=steps, seed=seed, sampler=sampler,
                           max_gap=max_gap, branches=branches, modes=modes, time_steps=cost != "blocks",
                           time_batch=time_batch, propagate_samples=propagate_samples)
    if rollouts:
        return search_schedule(model, table, speedup=speedup, budget=budget, cost=cost, labels=labels,
                               num_samples=num_samples, seed=seed, sampler=sampler, cfg_scale=cfg_scale,
                               rollouts=rollouts, retime=retime, overshoot=overshoot,
                               validate_seeds=validate_seeds, name=name)
    return choose_schedule(table, speedup=speedup, budget=budget, cost=cost, name=name)
