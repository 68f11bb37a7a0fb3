"""`auto`, measured (issue 12): the fastest correct candidate wins, wrong / failing /
slower-than-torch candidates never do, decisions persist in a cache file that survives
corruption, foreign keys and concurrent writers, nothing is timed under torch.compile,
the backend choice is per thread, and tune() / the report say what was chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast.ops import autotune, backends, decisions, defs, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


class FakeTimer:
    """Injected timer: fixed ms per backend (runs each step once, as the real one does)."""

    def __init__(self, ms: dict[str, float]):
        self.ms, self.calls = ms, 0

    def __call__(self, fns, device):
        self.calls += 1
        for f in fns.values():
            f()
        return {n: self.ms[n] for n in fns}


def _no_timing(fns, device):
    raise AssertionError("nothing may be timed here")


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A fresh tuner with its own cache dir, installed as the process's."""
    monkeypatch.setenv("SKIPDIT_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SKIPDIT_FAST_AUTOTUNE", raising=False)
    t = autotune.Tuner(timer=FakeTimer({"torch": 2.0, "cpu": 1.0}))
    monkeypatch.setattr(autotune, "TUNER", t)
    backends.forget()
    yield t
    backends.forget()


def _sf_args(M=6, D=8, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(M, D, generator=g), torch.randn(M, D, generator=g), 1 + 0.1 * torch.randn(2 * D, generator=g),
         0.1 * torch.randn(2 * D, generator=g), torch.randn(D, 2 * D, generator=g) * 0.2, torch.randn(D, generator=g)]
    if grad:
        for a in t:
            a.requires_grad_(True)
    return t


def _chosen(op="skip_fuse", **kw):
    """The decision the tuner holds for the only bucket used so far."""
    ds = [d for d in autotune.TUNER.decisions(CPU) if d.op == op]
    assert len(ds) == 1, ds
    return ds[0]


def _add_candidate(monkeypatch, name, fn, op="skip_fuse", first=True):
    impl = backends.Impl(op, name, fn, ("cpu",), (torch.float32, torch.float64))
    monkeypatch.setitem(backends.registry()[op], name, impl)
    order = defs.OPS[op].static_order["cpu"]
    monkeypatch.setitem(defs.OPS[op].static_order, "cpu", ((name,) + order) if first else (order + (name,)))
    return impl


# ---- choosing ----------------------------------------------------------------------------

@pytest.mark.parametrize("ms,want", [({"torch": 2.0, "cpu": 1.0}, "cpu"), ({"torch": 1.0, "cpu": 2.0}, "torch"),
                                     ({"torch": 1.0, "cpu": 1.0}, "torch")])
def test_fastest_correct_candidate_wins(tuner, ms, want):
    tuner.timer = FakeTimer(ms)
    x, s, nw, nb, w, b = _sf_args()
    out = sf.ops.skip_fuse(x, s, nw, nb, w, b)
    torch.testing.assert_close(out, reference.skip_fuse(x, s, nw, nb, w, b))
    d = _chosen()
    assert d.backend == want and d.source == "measured" and tuner.timer.calls == 1
    assert backends.pick("skip_fuse", CPU, torch.float32, False, (8, 8), sizes=(6,)).backend == want
    for _ in range(3):  # decided: no more measuring
        sf.ops.skip_fuse(x, s, nw, nb, w, b)
    assert tuner.timer.calls == 1
    loser = next(r for r in d.results if r.backend != want)
    assert "torch" in loser.verdict or "slower" in loser.verdict
    assert d.vs_torch() == pytest.approx(ms["torch"] / ms[want])


def test_wrong_candidate_is_never_chosen(tuner, monkeypatch):
    _add_candidate(monkeypatch, "wrong", lambda *a: reference.skip_fuse(*a) * 1.01)
    tuner.timer = FakeTimer({"wrong": 0.1, "torch": 2.0, "cpu": 1.0})
    sf.ops.skip_fuse(*_sf_args())
    d = _chosen()
    assert d.backend == "cpu"
    wrong = d.result("wrong")
    assert "out of the error budget" in wrong.verdict and wrong.budget > 1 and wrong.ms is None


def test_raising_candidate_is_never_chosen(tuner, monkeypatch):
    def broken(*a):
        raise RuntimeError("kernel launch failed")

    _add_candidate(monkeypatch, "broken", broken)
    tuner.timer = FakeTimer({"broken": 0.1, "torch": 2.0, "cpu": 1.0})
    out = sf.ops.skip_fuse(*_sf_args())  # the call itself still works
    assert torch.isfinite(out).all()
    d = _chosen()
    assert d.backend == "cpu" and "raised RuntimeError: kernel launch failed" in d.result("broken").verdict


def test_slower_than_torch_is_never_chosen(tuner):
    tuner.timer = FakeTimer({"torch": 1.0, "cpu": 1.0001})
    sf.ops.skip_fuse(*_sf_args())
    d = _chosen()
    assert d.backend == "torch" and d.result("cpu").verdict.startswith("not faster than torch")


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return 1.5 * g


def test_wrong_gradients_lose_when_the_call_needs_them(tuner, monkeypatch):
    _add_candidate(monkeypatch, "badgrad", lambda *a: _WrongGrad.apply(reference.skip_fuse(*a)))
    tuner.timer = FakeTimer({"badgrad": 0.1, "torch": 2.0, "cpu": 1.0})
    with torch.no_grad():
        sf.ops.skip_fuse(*_sf_args())
    args = _sf_args(grad=True)
    sf.ops.skip_fuse(*args).sum().backward()
    fwd, bwd = (next(d for d in autotune.TUNER.decisions(CPU) if d.grad == g) for g in (False, True))
    assert fwd.backend == "badgrad"  # its forward is right: inference may use it
    assert bwd.backend == "cpu" and "out of the error budget" in bwd.result("badgrad").verdict
    assert all(a.grad is not None for a in args)


def test_attention_and_cache_delta_are_measured(tuner):
    tuner.timer = FakeTimer({"torch": 1.0, "cpu": 2.0})
    qkv = torch.randn(2, 12, 3, 2, 16)
    out = sf.ops.attention(*qkv.unbind(2))
    torch.testing.assert_close(out, reference.attention(*qkv.unbind(2)), rtol=1e-5, atol=1e-5)
    a = torch.randn(3, 40)
    torch.testing.assert_close(sf.ops.cache_delta(a, a + 0.1), reference.cache_delta(a, a + 0.1))
    att, cd = _chosen("attention"), _chosen("cache_delta")
    assert att.backend == "torch" and att.sizes == (4, 16, 16) and att.features == (16,)
    assert cd.backend == "torch" and cd.sizes == (128,)
    assert all(r.budget is not None and r.budget <= 1 for r in att.results + cd.results)


def test_checks_use_a_slice_of_large_inputs():
    """The fp64 check of a big call runs on a bounded slice whose reference is the same
    slice of the full output (first and last rows; 2 batch entries and few heads)."""
    args = _sf_args(M=3000, D=8)
    sub, take = reference.skip_fuse_subproblem((*args, 1e-6))
    assert sub[0].shape == (1024, 8)
    torch.testing.assert_close(take(reference.skip_fuse(*args)), reference.skip_fuse(*sub))
    qkv = torch.randn(5, 300, 3, 8, 8)
    q, k, v = qkv.unbind(2)
    reference._CHECK_SCORES, old = 2 * 300 * 300 * 2, reference._CHECK_SCORES
    try:
        sub, take = reference.attention_subproblem((q, k, v, None))
    finally:
        reference._CHECK_SCORES = old
    assert sub[0].shape == (2, 300, 2, 8)
    torch.testing.assert_close(take(reference.attention(q, k, v)), reference.attention(*sub), rtol=1e-5,
                               atol=1e-6)


def test_measuring_leaves_the_global_rng_alone(tuner):
    state = torch.get_rng_state()
    sf.ops.skip_fuse(*_sf_args(grad=True)).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input_under_auto_raises_the_op_error_and_is_not_remembered(tuner):
    x, s, nw, nb, w, b = _sf_args()
    with pytest.raises(ValueError, match="skip must have the shape"):
        sf.ops.skip_fuse(x, torch.randn(6, 9), nw, nb, w, b)
    assert not autotune.TUNER.decisions(CPU) and tuner.timer.calls == 0


def test_autotune_off_is_the_static_order(tuner, monkeypatch, tmp_path):
    monkeypatch.setenv("SKIPDIT_FAST_AUTOTUNE", "0")
    tuner.timer = _no_timing
    sf.ops.skip_fuse(*_sf_args())
    assert backends.pick("skip_fuse", CPU, torch.float32, False, (8, 8), sizes=(6,)).backend == "cpu"
    assert not autotune.TUNER.decisions(CPU) and not list(tmp_path.iterdir())


def test_static_order_puts_torch_first_on_cuda():
    for d in defs.OPS.values():
        assert d.static_order["cuda"][0] == "torch", d.name
        assert "torch" in d.static_order["cpu"], d.name


def test_no_measuring_during_capture_or_on_fake_inputs(tuner, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert "CUDA-graph capture" in autotune.unmeasurable(torch.device("cuda"), (torch.ones(1),))
    assert "not plain tensors" in autotune.unmeasurable(CPU, (torch.ones(1, device="meta"),))
    assert autotune.unmeasurable(CPU, (torch.ones(1),)) is None


# ---- the cache file ------------------------------------------------------------------------

def test_cache_file_round_trip(tuner, monkeypatch):
    sf.ops.skip_fuse(*_sf_args())
    first = _chosen()
    f = tuner.file(CPU)
    data = json.loads(open(f.path).read())
    assert data["key"] == decisions.file_key(CPU) and len(data["decisions"]) == 1
    assert data["key"]["torch"] == torch.__version__ and "commit" in data["key"]
    fresh = autotune.Tuner(timer=_no_timing)
    monkeypatch.setattr(autotune, "TUNER", fresh)
    backends.forget()
    sf.ops.skip_fuse(*_sf_args(seed=1))  # same bucket: read from the file, not measured
    again = _chosen()
    assert again.source == "cache file" and again.backend == first.backend
    assert [r.ms for r in again.results] == [r.ms for r in first.results]


@pytest.mark.parametrize("content,why", [("{not json", "not JSON"), ("[1, 2]", "not a skipdit_fast autotune"),
                                         ("foreign", "made for")])
def test_corrupt_or_foreign_file_is_ignored_with_one_warning(tuner, content, why):
    f = decisions.DecisionFile(CPU)
    os.makedirs(os.path.dirname(f.path), exist_ok=True)
    if content == "foreign":
        content = json.dumps({"format": decisions.FORMAT, "key": {**f.key, "device": "another GPU"},
                              "decisions": []})
    with open(f.path, "w") as fh:
        fh.write(content)
    with pytest.warns(RuntimeWarning, match=why):
        sf.ops.skip_fuse(*_sf_args())
    assert _chosen().source == "measured"
    data = json.loads(open(f.path).read())  # rewritten with our key
    assert data["key"] == f.key and len(data["decisions"]) == 1


def test_unwritable_cache_dir_warns_once_and_keeps_deciding(tuner, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SKIPDIT_FAST_CACHE_DIR", str(blocker / "sub"))
    with pytest.warns(RuntimeWarning, match="cannot write"):
        sf.ops.skip_fuse(*_sf_args())
    assert _chosen().backend == "cpu"


_WRITER = """
import sys, torch
from skipdit_fast.ops.decisions import Decision, DecisionFile, Result
f = DecisionFile(torch.device("cpu"))
tag = int(sys.argv[1])
for i in range(40):
    d = Decision("skip_fuse", "cpu", "float32", False, (8, 8), (1 << (i % 20),), tag * 100 + i, "cpu",
                 [Result("cpu", 1.0)])
    f.save({d.key: d})
"""


def test_concurrent_writers_leave_a_valid_complete_file(tmp_path):
    env = {**os.environ, "SKIPDIT_FAST_CACHE_DIR": str(tmp_path), "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tag)], env=env, stderr=subprocess.PIPE)
             for tag in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    files = list(tmp_path.glob("autotune-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert len(data["decisions"]) == 80
    assert not list(tmp_path.glob("*.tmp-*"))


# ---- torch.compile -------------------------------------------------------------------------

def _counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("winner", ["torch", "cpu"])
def test_compiled_patched_model_runs_the_tuned_backend(tuner, winner):
    """fullgraph torch.compile of a patched tiny DiT after tuning: no graph break, no
    recompile on the second call, and the backend in the cache is the one that runs
    (read off the graph: our kernels are torch.ops.skipdit calls, the torch backend
    is SDPA / layer_norm + linear)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import official_layouts as OL

    tuner.timer = FakeTimer({"torch": 1.0, "cpu": 2.0} if winner == "torch" else {"torch": 2.0, "cpu": 1.0})
    model = OL.OfficialDiT(depth=4).eval()
    x, t, y = OL.dit_inputs()
    with torch.no_grad():
        want = model(x, t, y)
    report = sf.patch(model)
    tuned = sf.tune(model, (x, t, y))
    assert {d.op: d.backend for d in tuned.decisions} == {"attention": winner, "skip_fuse": winner}
    ratio = 1.0 if winner == "torch" else 2.0
    assert all(c["backend"] == winner and c["vs_torch"] == ratio for cs in report.auto_choices().values()
               for c in cs)
    assert f"auto measured: {winner} {ratio:.2f}x torch" in str(report)
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(model, backend=_counting_backend(graphs), fullgraph=True)
    calls = tuner.timer.calls
    with torch.no_grad():
        got = compiled(x, t, y)
        got2 = compiled(x, t, y)
    assert len(graphs) == 1, "recompiled on the second call"
    assert tuner.timer.calls == calls, "timed inside the trace"
    code = graphs[0].code
    if winner == "cpu":
        assert "ops.skipdit.attention" in code and "ops.skipdit.skip_fuse" in code
    else:
        assert "ops.skipdit" not in code and "scaled_dot_product_attention" in code and "layer_norm" in code
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-5)
    sf.unpatch(model)


def _block(x, s, nw, nb, w, qkv_w, heads: int):
    h = sf.ops.skip_fuse(x, s, nw, nb, w)
    B, N, D = h.shape
    q, k, v = (h @ qkv_w).view(B, N, 3, heads, D // heads).unbind(2)
    return sf.ops.attention(q, k, v) + sf.ops.cache_delta(h, x)


def _block_args(B, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), torch.ones(2 * D),
            torch.zeros(2 * D), torch.randn(D, 2 * D, generator=g) * 0.1, torch.randn(D, 3 * D, generator=g) * 0.1)


@pytest.mark.parametrize("mode", ["dynamic=True", "automatic", "mark_dynamic", "second width", "second head dim"])
def test_compile_with_a_second_shape(tuner, mode):
    """Issue 16 item 2: a compiled function calling the ops works with a second batch
    size / token count / width / head dim, dynamic=True and mark_dynamic, fullgraph."""
    torch._dynamo.reset()
    shapes = {"dynamic=True": [(2, 8, 16, 2), (3, 12, 16, 2)], "automatic": [(2, 8, 16, 2), (3, 8, 16, 2),
                                                                                (5, 8, 16, 2)],
              "mark_dynamic": [(2, 8, 16, 2), (4, 8, 16, 2)], "second width": [(2, 8, 16, 2), (2, 8, 32, 2),
                                                                                  (2, 8, 48, 2)],
              "second head dim": [(2, 8, 32, 2), (2, 8, 32, 4), (2, 8, 32, 1)]}[mode]
    graphs = []
    compiled = torch.compile(_block, fullgraph=True, backend=_counting_backend(graphs),
                             dynamic=True if mode == "dynamic=True" else None)
    for B, N, D, H in shapes:
        args = _block_args(B, N, D)
        if mode == "mark_dynamic":
            torch._dynamo.mark_dynamic(args[0], 0)
            torch._dynamo.mark_dynamic(args[1], 0)
        with torch.no_grad():
            got = compiled(*args, H)
            with sf.use_backend("reference"):
                want = _block(*args, H)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a new head dim is a new graph: the native attention op derives its softmax scale
    # (a float) from it, and dynamo specializes floats
    assert len(graphs) <= (len(shapes) if mode in ("second width", "second head dim") else 2)
    assert tuner.timer.calls == 0, "timed inside a trace"


def test_compiled_dit_at_two_batch_sizes():
    from skipdit_fast.models import DiT, DiTConfig

    torch._dynamo.reset()
    model = DiT(DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10,
                          skip=True)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for B in (2, 3, 5):
        x, t, y = torch.randn(B, 4, 8, 8), torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


def test_dynamic_graph_takes_the_majority_decision(tuner):
    tuner.timer = FakeTimer({"torch": 1.0, "cpu": 2.0})
    for B in (2, 4):  # two buckets measured eagerly: torch wins both
        sf.ops.skip_fuse(*_block_args(B, 8, 16)[:5])
    torch._dynamo.reset()
    graphs = []
    f = torch.compile(lambda *a: sf.ops.skip_fuse(*a), fullgraph=True, backend=_counting_backend(graphs))
    args = _block_args(7, 8, 16)[:5]
    torch._dynamo.mark_dynamic(args[0], 0)
    torch._dynamo.mark_dynamic(args[1], 0)
    with torch.no_grad():
        f(*args)
    assert "ops.skipdit.skip_fuse" not in graphs[0].code and "layer_norm" in graphs[0].code, \
        "the dynamic-size graph did not run the measured majority (torch)"


# ---- threads, report, CLI ------------------------------------------------------------------

def test_backend_choice_is_per_thread():
    q = backends.Query("attention", CPU, torch.float32, False, (16,))
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def inside():
        try:
            with sf.use_backend("reference"):
                barrier.wait()
                barrier.wait()  # the other thread looks now
                seen["inside"] = backends.select(q).backend
            sf.set_backend(attention="torch")  # stays in this thread
            seen["set"] = sf.get_backend("attention")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def outside():
        try:
            barrier.wait()
            seen["outside"] = (sf.get_backend(), backends.select(q).backend)
            barrier.wait()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=inside), threading.Thread(target=outside)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert seen == {"inside": "reference", "set": "torch", "outside": ("auto", "cpu")}
    assert sf.get_backend("attention") == "auto"  # nothing leaked into this thread
    with sf.use_backend("reference"):
        out = []
        th = threading.Thread(target=lambda: out.append(sf.get_backend()))
        th.start()
        th.join()
        assert out == ["auto"]  # a new thread starts from SKIPDIT_FAST_BACKEND


def test_tune_report_lists_every_candidate(tuner):
    from skipdit_fast.models import DiT, DiTConfig

    model = DiT(DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10,
                          skip=True)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    rep = sf.tune(model, (x, t, y))
    assert {d.op for d in rep.decisions} == {"attention", "skip_fuse"}
    text = str(rep)
    assert "chosen: fastest correct" in text and "not faster than torch" not in text
    assert "cpu" in text and "torch" in text and "rel. error" in text
    md = rep.to_markdown()
    assert md.count("| attention |") == 1 and "| **cpu** |" in md
    again = sf.tune(model, (x, t, y))  # decided: reused, nothing measured
    assert [d.source for d in again.decisions] == ["measured", "measured"] and tuner.timer.calls == 2
    forced = sf.tune(model, (x, t, y), force=True)
    assert len(forced.decisions) == 2 and tuner.timer.calls == 4
    json.dumps(rep.to_dict())


def test_tune_cli_and_info(tmp_path):
    env = {**os.environ, "SKIPDIT_FAST_CACHE_DIR": str(tmp_path), "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "skipdit_fast", "tune", "--model", "DiT-S/8-skip", "--image-size",
                        "64", "--batch", "1", "--cfg", "--json", str(tmp_path / "t.json"), "--markdown",
                        str(tmp_path / "t.md")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skip_fuse fwd float32 D=384 D_out=384 M<=2" in r.stdout and "chosen" in r.stdout
    data = json.loads((tmp_path / "t.json").read_text())
    assert {d["op"] for d in data["decisions"]} == {"attention", "skip_fuse"}
    assert "autotune decisions" in (tmp_path / "t.md").read_text()
    info = subprocess.run([sys.executable, "-m", "skipdit_fast", "info", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    at = json.loads(info.stdout)["autotune"]
    cpu = next(f for f in at["files"] if f["device"] == "cpu")
    assert cpu["decisions"] == 2 and cpu["state"] == "ok" and cpu["path"].startswith(str(tmp_path))
    assert cpu["key"]["torch"] == torch.__version__


def test_hunyuandit_op_shapes_run():
    from skipdit_fast.apps.tune import _HunyuanDiTOps

    s = {"tokens": 16, "hidden": 176, "heads": 2, "head_dim": 88, "text_tokens": 5}
    out = _HunyuanDiTOps(s)(torch.randn(2, 16, 176), torch.randn(2, 5, 352))
    assert out.shape == () and torch.isfinite(out)
