"""Runs every CUDA and Triton op of skipdit_fast once (forward, and backward where the
backend has one) on small odd-sized CUDA tensors, strided views included, with NaN-
poisoned outputs, and checks each result loosely against the reference. Made to run
under `compute-sanitizer --tool memcheck` (tools/gpu_check.sh): small and quick.

Which backends run comes from skipdit_fast.ops.backends, so new kernels are exercised
without edits here. Exit status 1 when an op raises or returns something wrong;
backends that cannot run are listed with their reason."""

from __future__ import annotations

import sys

import torch

import skipdit_fast
from skipdit_fast import ops
from skipdit_fast.ops import backends, reference
from skipdit_fast.ops.testing import poison_outputs

GPU_BACKENDS = ("cuda", "triton")
TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _strided(t: torch.Tensor, pad: int = 8) -> torch.Tensor:
    big = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


def cases(dev, dtype):
    """(op, label, make() -> (args, leaves))."""
    def skip_fuse(M, D, Do, strided):
        def make():
            x = torch.randn(M, D, device=dev, dtype=dtype)
            s = torch.randn(M, D, device=dev, dtype=dtype) + 3.0
            if strided:
                x, s = _strided(x), _strided(s)
            nw = 1 + 0.1 * torch.randn(2 * D, device=dev)
            nb = 0.1 * torch.randn(2 * D, device=dev)
            w = torch.randn(Do, 2 * D, device=dev, dtype=dtype) * (2 * D) ** -0.5
            b = torch.randn(Do, device=dev, dtype=dtype)
            return (x, s, nw, nb, w, b), [x, s, nw, nb, w, b]
        return make

    def attention(B, N, H, Dh):
        def make():
            qkv = torch.randn(B, N, 3, H, Dh, device=dev, dtype=dtype)
            q, k, v = qkv.unbind(2)
            return (q, k, v), [qkv]
        return make

    def cache_delta(shape, strided):
        def make():
            b = torch.randn(shape, device=dev, dtype=dtype)
            a = b + 0.1 * torch.randn(shape, device=dev, dtype=dtype)
            if strided:
                a, b = _strided(a), _strided(b)
            return (a, b), []
        return make

    return [
        ("skip_fuse", "M=37 D=72", skip_fuse(37, 72, 72, False)),
        ("skip_fuse", "M=130 D=1152 strided", skip_fuse(130, 1152, 1152, True)),
        ("attention", "B=2 N=77 H=3 Dh=72", attention(2, 77, 3, 72)),
        ("attention", "B=1 N=130 H=2 Dh=88", attention(1, 130, 2, 88)),
        ("attention", "B=40 N=16 H=2 Dh=72", attention(40, 16, 2, 72)),
        ("cache_delta", "3x37x72", cache_delta((3, 37, 72), False)),
        ("cache_delta", "1031x1152 strided", cache_delta((1031, 1152), True)),
    ]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _features(op, args):
    if op == "skip_fuse":
        return (args[0].shape[-1], args[4].shape[0])
    if op == "attention":
        return (args[0].shape[-1],)
    return ()


def _leaf(t):
    t = t._base if t._base is not None else t
    return t.detach().requires_grad_(True)


def run_one(op, label, make, backend, dtype, dev) -> tuple[str, str]:
    fn, ref = getattr(ops, op), getattr(reference, op)
    torch.manual_seed(0)
    args, leaves = make()
    out = []
    for grad in (False, True):
        if grad and not leaves:
            continue
        q = backends.Query(op, dev, dtype, grad, _features(op, args))
        why = backends.explain(q)[backend]
        if why:
            out.append(f"{'fwd+bwd' if grad else 'fwd'}: not available ({'; '.join(why)})")
            continue
        if not grad:
            with torch.no_grad(), poison_outputs(), backends.use_backend(**{op: backend}):
                y = fn(*args)
            _sync(dev)
            y_ref = ref(*[a.float() if a.dtype == dtype else a for a in args])
            err = (y.float() - y_ref.float()).abs().max().item() / max(y_ref.float().abs().max().item(), 1e-6)
            if not err <= TOL[dtype]:
                return "FAIL", f"fwd: max rel error {err:.3e} vs fp32 reference (NaN: unwritten output?)"
            out.append(f"fwd ok (rel err {err:.1e})")
        else:
            # fresh leaves (views of one base for attention's fused qkv)
            if op == "attention":
                base = _leaf(args[0])
                a2 = tuple(base.unbind(2))
                lv = [base]
            else:
                lv = [a.detach().requires_grad_(True) for a in args]  # keeps the strides
                a2 = tuple(lv)
            with poison_outputs(), backends.use_backend(**{op: backend}):
                y = fn(*a2)
                g = torch.randn_like(y)
                grads = torch.autograd.grad(y, lv, g)
            _sync(dev)
            lr = [t.detach().float().requires_grad_(True) for t in lv]
            if op == "attention":
                yr = ref(*lr[0].unbind(2))
            else:
                yr = ref(*lr)
            grads_ref = torch.autograd.grad(yr, lr, g.float())
            for i, (gg, gr) in enumerate(zip(grads, grads_ref)):
                e = (gg.float() - gr).abs().max().item() / max(gr.abs().max().item(), 1e-6)
                if not e <= 2 * TOL[dtype]:
                    return "FAIL", f"bwd: grad {i} max rel error {e:.3e}"
            out.append("fwd+bwd ok")
    return "ok", "; ".join(out)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default); cpu to try this script without a GPU")
    p.add_argument("--backends", default=",".join(GPU_BACKENDS), help="comma-separated backends to run")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("exercise_ops: no CUDA device")
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"exercise_ops on {name}, skipdit_fast {skipdit_fast.__version__}")
    failed = ran = 0
    for dtype in (torch.bfloat16, torch.float16):
        for op, label, make in cases(dev, dtype):
            for backend in args.backends.split(","):
                name = f"{op:<11} {backend:<6} {str(dtype).replace('torch.', ''):<8} {label:<22}"
                try:
                    status, msg = run_one(op, label, make, backend, dtype, dev)
                except Exception as e:  # report and go on: every op gets its run
                    status, msg = "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                if status == "ok" and "ok" not in msg:
                    status = "n/a"  # the backend cannot run this here; msg says why
                if "ok" in msg:
                    ran += 1
                failed += status == "FAIL"
                print(f"{status:<4} {name} {msg}", flush=True)
    print(f"exercise_ops: {ran} op/backend/dtype combinations ran, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
