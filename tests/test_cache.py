"""SkipCache: golden runs of the official DiT_cache, the official loop step by step,
blocks run per step, per-run state, shape checks, CFG, adaptive mode, static buffers
and CUDA graphs, the report, and a non-DiT model through the SkipModel protocol."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import rel_err

from skipdit_fast import SkipCache

from skipdit_fast.ops import reference
from skipdit_fast.cache import CACHED, FULL, SkipCacheRunError, SkipModel
from skipdit_fast.models import DiT, DiTConfig

DATA = Path(__file__).parent / "data" / "official_skipdit_small.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA, weights_only=True)


@pytest.fixture(scope="module")
def model(golden):
    c = golden["config"]
    cfg = DiTConfig(depth=c["depth"], hidden_size=c["hidden_size"], num_heads=c["num_heads"],
                    patch_size=c["patch_size"], input_size=c["input_size"], num_classes=c["num_classes"],
                    skip=True)
    m = DiT(cfg).eval()
    m.load_state_dict_strict(golden["skip_state_dict"])
    return m




class BlockLog:
    """Which blocks ran, per forward call (forward hooks on model.blocks); records
    the calls made inside `with log.step():`."""

    def __init__(self, model):
        self.calls: list[list[int]] = []
        self.on = False
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(model.blocks)]

    def _hook(self, i):
        def hook(mod, args, out):
            if self.on:
                self.calls[-1].append(i)
        return hook

    @contextlib.contextmanager
    def step(self):
        self.calls.append([])
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class OfficialCacheLoop:
    """The official DiT_cache forward (Skip-DiT class-to-image/models.py), its loop
    transcribed with the counter and the cached tensor on the object, running our
    model's embedding, blocks and head, with the merge in plain torch."""

    def __init__(self, model: DiT, N: int, K: int, start=1000, stop=20):
        self.m, self.N, self.K, self.start, self.stop = model, N, K, start, stop
        self.cache_cont, self.cache_val = 0, None

    def merge(self, j, x, skip):
        norm, lin = self.m.skip_norms[j], self.m.skip_linears[j].linear
        cat = torch.cat([x, skip], dim=-1)
        cat = F.layer_norm(cat.float(), (cat.shape[-1],), norm.weight.float(), norm.bias.float(), 1e-6).to(cat.dtype)
        return F.linear(cat, lin.weight, lin.bias)

    def __call__(self, x, t, y):
        cur_time = t[0].item()
        x, state = self.m.embed(x, t, y)
        c = state.c
        skips = []
        depth, K = self.m.depth, self.K
        for index in range(depth):
            if self.cache_cont % self.N == 0 or self.cache_val is None or cur_time >= self.start:
                if index == depth - K:
                    self.cache_val = x
            else:
                if not (index < K or index >= depth - K):
                    continue
                if index == depth - K:
                    x = self.cache_val
            if index >= depth // 2:
                if index == depth - K:
                    x = self.cache_val
                x = self.merge(index - depth // 2, x, skips.pop())
            x = self.m.blocks[index](x, c)
            if index < depth // 2:
                skips.append(x)
        self.cache_cont += 1
        if cur_time <= self.stop:
            self.cache_cont, self.cache_val = 0, None
        return self.m.head(x, state)


def expected_blocks(kind, depth, K):
    return list(range(depth)) if kind == FULL else list(range(K)) + list(range(depth - K, depth))


# ---- the official semantics -------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("N,kinds", [(2, "FCFCFCFCFFF"), (3, "FCCFCCFCCFF")])
def test_golden_official_cache_runs(golden, model, N, kinds, static):
    cache = SkipCache(interval=N, branch=4, static=static)
    with BlockLog(model) as log, torch.no_grad():
        for i in range(11):
            t = golden["cache_timesteps"][i].repeat(3)
            with log.step():
                out = model(golden["cache_inputs"][i], t, golden["y"], cache=cache)
            assert rel_err(out, golden[f"cache_N{N}_K4_out"][i]) <= 1e-5, f"call {i}"
    want = [FULL if k == "F" else CACHED for k in kinds]
    assert cache.report().kinds == want
    for kind, ran in zip(want, log.calls):
        assert ran == expected_blocks(kind, 12, 4)
        assert len(ran) == (12 if kind == FULL else 8)


@pytest.mark.parametrize("N,K,start,stop", [(2, 4, 1000, 20), (3, 2, 1000, 20), (4, 1, 850, 20),
                                            (2, 6, 1000, 300), (5, 3, 700, 150)])
def test_matches_official_loop_step_by_step(model, N, K, start, stop):
    timesteps = [999, 950, 900, 850, 800, 700, 600, 500, 400, 300, 200, 150, 100, 30, 20, 10, 5, 0]
    torch.manual_seed(N * 10 + K)
    xs = [torch.randn(2, 4, 16, 16) for _ in timesteps]
    y = torch.tensor([3, 10])
    cache = SkipCache(interval=N, branch=K, start=start, stop=stop)
    official = OfficialCacheLoop(model, N, K, start, stop)
    with BlockLog(model) as log, torch.no_grad():
        for x, tv in zip(xs, timesteps):
            t = torch.full((2,), tv)
            want = official(x, t, y)
            with log.step():
                got = model(x, t, y, cache=cache)
            assert rel_err(got, want) <= 1e-5, f"t={tv}"
    kinds = cache.report().kinds
    for kind, ran in zip(kinds, log.calls):
        assert ran == expected_blocks(kind, model.depth, K)
    # the schedule itself, derived from the rules
    cont, valid = 0, False
    for kind, tv in zip(kinds, timesteps):
        full = cont % N == 0 or not valid or tv >= start
        assert kind == (FULL if full else CACHED)
        valid, cont = True, cont + 1
        if tv <= stop:
            cont, valid = 0, False
    assert CACHED in kinds and FULL in kinds


def test_reset_per_run_and_independent_caches(model):
    timesteps = [999, 800, 600, 400, 200]
    xs = [torch.randn(1, 4, 16, 16) for _ in timesteps]
    y = torch.tensor([1])
    cache = SkipCache(interval=3, branch=2)

    def run(c):
        with torch.no_grad():
            return [model(x, torch.tensor([tv]), y, cache=c) for x, tv in zip(xs, timesteps)]

    first = run(cache)
    kinds1 = list(cache.report().kinds)
    # no reset while the last run's features are held (t=200 > stop): the official model
    # would reuse them in the next run; the engine refuses (issue 16.4, cache/runs.py)
    with pytest.raises(SkipCacheRunError, match="timestep 999 after 200 .* without cache.reset"):
        run(cache)
    cache.reset()
    again = run(cache)
    assert cache.report().kinds == kinds1 and cache.report().steps == 5
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = SkipCache(interval=3, branch=2)
    for a, b in zip(first, run(other)):
        assert torch.equal(a, b)


def test_shape_dtype_model_change_inside_a_run_raises(model):
    cache = SkipCache(interval=2, branch=2)
    with torch.no_grad():
        model(torch.randn(2, 4, 16, 16), torch.full((2,), 900), torch.tensor([1, 2]), cache=cache)
        with pytest.raises(ValueError, match=r"batch-size or resolution change.*reset"):
            model(torch.randn(3, 4, 16, 16), torch.full((3,), 800), torch.tensor([1, 2, 3]), cache=cache)
        with pytest.raises(ValueError, match="batch-size or resolution change"):
            model.double()(torch.randn(2, 4, 16, 16).double(), torch.full((2,), 800), torch.tensor([1, 2]), cache=cache)
        model.float()
        twin = DiT(model.config).eval()
        with pytest.raises(ValueError, match="another model"):
            twin(torch.randn(2, 4, 16, 16), torch.full((2,), 800), torch.tensor([1, 2]), cache=cache)
        cache.reset()  # a new run may have another shape
        model(torch.randn(3, 4, 16, 16), torch.full((3,), 800), torch.tensor([1, 2, 3]), cache=cache)


def test_argument_checks(model):
    for kw in (dict(interval=0), dict(branch=0), dict(interval=1.5), dict(threshold=-1.0)):
        with pytest.raises(ValueError):
            SkipCache(**kw)
    with pytest.raises(ValueError, match="branch 7 too large"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.tensor([1]), cache=SkipCache(branch=7))


def test_timestep_hint_and_first_element(model):
    x, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2])
    cache = SkipCache(interval=2, branch=2)
    with torch.no_grad():
        model(x, torch.tensor([500, 10]), y, cache=cache)  # official: t[0] decides (500 > stop)
        model(x, torch.tensor([400, 400]), y, cache=cache)
        assert cache.report().kinds == [FULL, CACHED]
        cache.reset()
        cache.next_timestep(10)  # the host value wins over the tensor (no device read)
        model(x, torch.tensor([500, 500]), y, cache=cache)
        model(x, torch.tensor([400, 400]), y, cache=cache)
        assert cache.report().kinds == [FULL, FULL]  # the cache was dropped after t <= 20


# ---- classifier-free guidance -------------------------------------------------------------------

def test_cfg_batches(model):
    timesteps = [999, 900, 800, 700, 600, 500, 15, 5]
    xs = [torch.randn(2, 4, 16, 16) for _ in timesteps]
    y = torch.tensor([3, 7, 10, 10])
    cache = SkipCache(interval=3, branch=4)
    official = OfficialCacheLoop(model, 3, 4)
    cond_cache, uncond_cache = SkipCache(interval=3, branch=4), SkipCache(interval=3, branch=4)
    with torch.no_grad():
        for x, tv in zip(xs, timesteps):
            t = torch.full((4,), tv)
            xx = torch.cat([x, torch.randn_like(x)])  # the second half is replaced by the first
            got = model.forward_with_cfg(xx, t, y, 4.0, cache=cache)
            raw = official(torch.cat([x, x]), t, y)  # one forward for both halves
            eps = raw[:2, :3] * 4.0 + raw[2:, :3] * (1 - 4.0)
            want = torch.cat([torch.cat([eps, eps]), raw[:, 3:]], dim=1)
            assert rel_err(got, want) <= 1e-5, f"t={tv}"
            # each half keeps its own cached features: the halves run alone agree
            cond = model(x, t[:2], y[:2], cache=cond_cache)
            uncond = model(x, t[2:], y[2:], cache=uncond_cache)
            assert rel_err(torch.cat([cond, uncond]), raw) <= 1e-5
    assert cache.report().steps == len(timesteps)  # one counter step per CFG forward
    assert cache.report().kinds == cond_cache.report().kinds


# ---- adaptive mode --------------------------------------------------------------------------

def adaptive_reference(model, xs, timesteps, y, K, N, threshold, stop=20):
    """The adaptive rule spelled out: full if nothing cached, N-1 cached steps in a
    row, or cache_delta(shallow now, shallow at the last full step) > threshold."""
    outs, kinds, deltas = [], [], []
    ref = kept = None
    in_row = 0
    depth = model.depth
    for x, tv in zip(xs, timesteps):
        t = torch.full((x.shape[0],), tv)
        h, st = model.embed(x, t, y)
        s = model.run_blocks(h, 0, K, st)
        full = kept is None or in_row >= N - 1
        if not full:
            d = reference.cache_delta(s, ref).item()
            deltas.append(d)
            full = d > threshold
        if full:
            ref = s
            kept = model.run_blocks(s, K, depth - K, st)
            in_row = 0
        else:
            in_row += 1
        out = model.run_blocks(kept, depth - K, depth, st)
        outs.append(model.head(out, st))
        kinds.append(FULL if full else CACHED)
        if tv <= stop:
            ref = kept = None
            in_row = 0
    return outs, kinds, deltas


@pytest.mark.parametrize("threshold", [0.0, 0.12, 0.15, math.inf])
def test_adaptive_decisions(model, threshold):
    timesteps = [999, 950, 900, 850, 800, 750, 700, 650, 600, 550, 500, 30, 10]
    base = torch.randn(2, 4, 16, 16)
    xs = [base + 0.02 * i * torch.randn(2, 4, 16, 16) for i in range(len(timesteps))]  # a slow drift
    y = torch.tensor([2, 10])
    N, K = 4, 3
    cache = SkipCache(interval=N, branch=K, threshold=threshold)
    with BlockLog(model) as log, torch.no_grad():
        want, kinds, deltas = adaptive_reference(model, xs, timesteps, y, K, N, threshold)
        outs = []
        for x, tv in zip(xs, timesteps):
            with log.step():
                outs.append(model(x, torch.full((2,), tv), y, cache=cache))
    r = cache.report()
    assert r.kinds == kinds
    assert r.checks == len(deltas) == len(r.deltas)
    for a, b in zip(r.deltas, deltas):
        assert a == pytest.approx(b, rel=1e-5)
    for got, exp in zip(outs, want):
        assert rel_err(got, exp) <= 1e-5
    for kind, ran in zip(kinds, log.calls):  # a check that turns full runs no block twice
        assert ran == expected_blocks(kind, model.depth, K)
    if threshold == 0.0:
        assert CACHED not in kinds and r.checks > 0
    if threshold == math.inf:  # the cap alone: N-1 cached steps in a row
        assert "".join(k[0] for k in kinds) == "fcccfcccfcccf"
    if 0 < threshold < math.inf:  # both decisions occur
        assert any(d > threshold for d in r.deltas) and any(d <= threshold for d in r.deltas)


# ---- static buffers and CUDA graphs ---------------------------------------------------------

def test_static_buffers_are_reused(model):
    timesteps = [999, 900, 800, 700, 600, 500, 400]
    xs = [torch.randn(2, 4, 16, 16) for _ in timesteps]
    y = torch.tensor([1, 10])
    static = SkipCache(interval=2, branch=4, static=True, threshold=math.inf)
    dynamic = SkipCache(interval=2, branch=4, threshold=math.inf)
    ptrs = set()
    with torch.no_grad():
        for run in range(2):
            static.reset()
            dynamic.reset()
            for x, tv in zip(xs, timesteps):
                t = torch.full((2,), tv)
                a = model(x, t, y, cache=static)
                b = model(x, t, y, cache=dynamic)
                assert torch.equal(a, b)
                ptrs.add(tuple(v.data_ptr() for v in static.buffers().values()))
    assert len(ptrs) == 1 and len(next(iter(ptrs))) == 2  # cached tensor + adaptive reference


def test_capture_and_step_protocol_on_cpu(model):
    """The CUDA-graph protocol, with eager calls standing in for graph replays: a
    forward under capture(kind) runs that path on the static buffers and leaves the
    run's state alone; step(t) makes the decisions."""
    timesteps = [999, 900, 800, 700, 600, 500, 400, 30, 20, 10]
    xs = [torch.randn(2, 4, 16, 16) for _ in timesteps]
    y = torch.tensor([4, 10])
    eager = SkipCache(interval=3, branch=4)
    with torch.no_grad():
        want = [model(x, torch.full((2,), tv), y, cache=eager) for x, tv in zip(xs, timesteps)]
    cache = SkipCache(interval=3, branch=4, static=True)
    with pytest.raises(RuntimeError, match="static=True"):
        with SkipCache(interval=3).capture(FULL):
            pass
    x_s, t_s = torch.zeros(2, 4, 16, 16), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="eager step"):
            with cache.capture(FULL):
                model(x_s, t_s, y, cache=cache)
        model(x_s, torch.full((2,), 500), y, cache=cache)  # warm-up: allocates the buffers
        buf = cache.buffers()["cached"].data_ptr()
        cache.reset()
        for x, tv, w in zip(xs, timesteps, want):
            kind = cache.step(tv, model)
            x_s.copy_(x)
            t_s.fill_(tv)
            with cache.capture(kind):
                out = model(x_s, t_s, y, cache=cache)
            assert rel_err(out, w) <= 1e-5
    assert cache.report().kinds == eager.report().kinds
    assert cache.report().flops_run == pytest.approx(eager.report().flops_run)
    assert cache.buffers()["cached"].data_ptr() == buf
    with pytest.raises(RuntimeError, match="adaptive"):
        SkipCache(threshold=0.1, static=True).step(500, model)


@pytest.mark.gpu
def test_cuda_graphs_full_and_cached_steps():
    dev = torch.device("cuda")
    cfg = DiTConfig(depth=8, hidden_size=128, num_heads=2, patch_size=2, input_size=16, num_classes=10, skip=True)
    torch.manual_seed(0)
    model = DiT(cfg).to(dev).eval()
    timesteps = [999, 900, 800, 700, 600, 500, 400, 30, 20, 10]
    xs = [torch.randn(4, 4, 16, 16, device=dev) for _ in timesteps]
    y = torch.tensor([1, 2, 10, 10], device=dev)
    eager = SkipCache(interval=2, branch=2)
    with torch.no_grad():
        want = [model(x, torch.full((4,), tv, device=dev), y, cache=eager).clone() for x, tv in zip(xs, timesteps)]
    cache = SkipCache(interval=2, branch=2, static=True)
    x_s = torch.zeros(4, 4, 16, 16, device=dev)
    t_s = torch.full((4,), 500, dtype=torch.long, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up: full and cached eager steps allocate the buffers
            model(x_s, t_s, y, cache=cache)
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs = {}, {}
    with torch.no_grad():
        for kind in (FULL, CACHED):
            g = torch.cuda.CUDAGraph()
            with cache.capture(kind), torch.cuda.graph(g):
                outs[kind] = model(x_s, t_s, y, cache=cache)
            graphs[kind] = g
    cache.reset()
    for x, tv, w in zip(xs, timesteps, want):
        x_s.copy_(x)
        t_s.fill_(tv)
        kind = cache.step(tv, model)
        graphs[kind].replay()
        torch.testing.assert_close(outs[kind], w, rtol=1e-4, atol=1e-4)
    assert cache.report().kinds == eager.report().kinds
    assert CACHED in cache.report().kinds


# ---- report -----------------------------------------------------------------------------------------

def test_report_numbers(golden, model):
    cache = SkipCache(interval=2, branch=4)
    with torch.no_grad():
        for i in range(11):
            model(golden["cache_inputs"][i], golden["cache_timesteps"][i].repeat(3), golden["y"], cache=cache)
    r = cache.report()
    assert (r.steps, r.full_steps, r.cached_steps) == (11, 7, 4)
    assert (r.blocks_run, r.blocks_total) == (7 * 12 + 4 * 8, 11 * 12)
    assert r.ideal_speedup == pytest.approx(132 / 116)
    # FLOPs of one block at B=3, T=64, D=64 (mlp 256), counted by hand
    B, T, D = 3, 64, 64
    block = 2 * B * T * (3 * D * D + D * D + 2 * D * 4 * D) + 2 * 2 * B * T * T * D + 2 * B * D * 6 * D
    merge = 2 * B * T * 2 * D * D
    per_block = model.block_flops(torch.empty(B, T, D))
    assert per_block == [block] * 6 + [block + merge] * 6
    full = 12 * block + 6 * merge
    cached = 8 * block + 4 * merge
    assert r.flops_total == pytest.approx(11 * full)
    assert r.flops_run == pytest.approx(7 * full + 4 * cached)
    assert r.flops_saved == pytest.approx(4 * (full - cached))
    s = str(r)
    assert "11 steps: 7 full, 4 cached" in s and "blocks 116/132" in s and "saved (" in s


# ---- another model through the protocol -------------------------------------------------------------

class ToyU(nn.Module):
    """Not a DiT: HunyuanDiT's skip layout in miniature. Blocks 0..3 push, 4 and 5
    neither push nor pop, 6..9 merge-pop (block 9-i pairs with block i)."""

    depth = 10
    max_branch = 4

    def __init__(self, D=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(10))
        self.merges = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(4))

    def run_blocks(self, h, start, stop, state):
        for i in range(start, stop):
            if i >= 6:
                h = self.merges[i - 6](torch.cat([h, state.pop()], dim=-1))
            h = h + torch.tanh(self.blocks[i](h))
            if i < 4:
                state.append(h)
        return h

    def forward(self, h, t, cache=None):
        return self.run_blocks(h, 0, 10, []) if cache is None else cache.run(self, h, [], t)


def test_protocol_with_a_non_dit_model():
    toy = ToyU()
    assert isinstance(toy, SkipModel)
    N, K = 2, 3
    timesteps = [999, 900, 800, 700, 600, 15, 5]
    hs = [torch.randn(2, 9, 16) for _ in timesteps]
    cache = SkipCache(interval=N, branch=K)
    kept, cont = None, 0
    with torch.no_grad():
        for h, tv in zip(hs, timesteps):
            got = toy(h, torch.tensor([tv, tv]), cache=cache)
            stack: list = []
            if cont % N == 0 or kept is None:
                mid = toy.run_blocks(h, 0, toy.depth - K, stack)
                kept = mid
            else:
                toy.run_blocks(h, 0, K, stack)
            want = toy.run_blocks(kept, toy.depth - K, toy.depth, stack)
            assert not stack
            cont += 1
            if tv <= 20:
                kept, cont = None, 0
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert cache.report().kinds == [FULL, CACHED, FULL, CACHED, FULL, CACHED, FULL]
    assert cache.report().flops_total == 0  # no block_flops: blocks counted only
    with torch.no_grad():
        toy(torch.randn(2, 9, 16), torch.tensor([900, 900]), cache=cache)
        with pytest.raises(ValueError, match="resolution change"):  # tokens 9 -> 16
            toy(torch.randn(2, 16, 16), torch.tensor([800, 800]), cache=cache)
        with pytest.raises(ValueError, match="branch 5 too large"):
            toy(torch.randn(2, 9, 16), torch.tensor([900, 900]), cache=SkipCache(branch=5))


def test_torch_compile_with_cache(model):
    from torch._dynamo.utils import counters

    timesteps = [999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 10]
    xs = [torch.randn(2, 4, 16, 16) for _ in timesteps]
    y = torch.tensor([1, 10])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    a, b = SkipCache(interval=3, branch=4), SkipCache(interval=3, branch=4)
    graphs = []
    with torch.no_grad():
        for x, tv in zip(xs, timesteps):
            t = torch.full((2,), tv)
            want = model(x, t, y, cache=a)
            b.next_timestep(tv)
            torch.testing.assert_close(compiled(x, t, y, cache=b), want, rtol=0, atol=0)
            graphs.append(counters["stats"]["unique_graphs"])
    assert a.report().kinds == b.report().kinds
    # the step bookkeeping stays outside the graphs: once a full and a cached step
    # have been compiled, later steps compile nothing new
    assert graphs[3] > 0 and graphs[-1] == graphs[3]
