"""What is benchmarked: per op, its shapes (Case), how to make its inputs, its eager
(reference) and public (skipdit_fast.ops) calls, and its FLOP and byte counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops as _ops
from ..ops import reference as _reference

OPS = ("skip_fuse", "attention", "cache_delta")

# ---------------------------------------------------------------------------
# ops, shapes and costs

@dataclass
class Case:
    op: str
    label: str
    params: dict
    directions: tuple = ("fwd", "fwd+bwd")
    target: bool = False  # a DESIGN.md section 6 target shape (max-autotune runs here)


@dataclass
class InputSet:
    args: tuple
    leaves: list = field(default_factory=list)
    grad_out: torch.Tensor | None = None


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SkipFuse:
    op = "skip_fuse"

    @staticmethod
    def cases(device: torch.device, quick: bool) -> list[Case]:
        if device.type == "cuda":
            grid = ([(4096, 1152), (32768, 1152), (4096, 1408)] if quick else
                    [(m, d) for d in (1152, 1408) for m in (512, 4096, 16384, 32768)])
        else:
            grid = [(64, 1152)] if quick else [(512, 384), (4096, 384), (512, 1152), (4096, 1152),
                                                  (512, 1408)]
        return [Case("skip_fuse", f"M={m} D={d}", {"M": m, "D": d, "D_out": d},
                     target=(device.type == "cuda" and d == 1152 and m in (4096, 32768)))
                for m, d in grid]

    @staticmethod
    def query_features(p):
        return (p["D"], p["D_out"])

    @staticmethod
    def query_sizes(p):
        return (p["M"],)

    @staticmethod
    def make(p, device, dtype, grad) -> InputSet:
        M, D, Do = p["M"], p["D"], p["D_out"]
        x = torch.randn(M, D, device=device, dtype=dtype)
        skip = torch.randn(M, D, device=device, dtype=dtype) * 0.5 + 0.1
        nw = 1 + 0.1 * torch.randn(2 * D, device=device, dtype=torch.float32)
        nb = 0.1 * torch.randn(2 * D, device=device, dtype=torch.float32)
        w = torch.randn(Do, 2 * D, device=device, dtype=dtype) * (2 * D) ** -0.5
        b = 0.1 * torch.randn(Do, device=device, dtype=dtype)
        args = [x, skip, nw, nb, w, b]
        if not grad:
            return InputSet(tuple(args))
        for t in args:
            t.requires_grad_(True)
        g = torch.randn(M, Do, device=device, dtype=dtype)
        return InputSet(tuple(args), list(args), g)

    @staticmethod
    def eager(args):
        return _reference.skip_fuse(*args)

    @staticmethod
    def ours(args):
        return _ops.skip_fuse(*args)

    @staticmethod
    def cost(p, direction, e):
        M, D, Do = p["M"], p["D"], p["D_out"]
        gemm = 2 * M * (2 * D) * Do
        fwd_bytes = e * (2 * M * D + Do * 2 * D + Do + M * Do) + 4 * 4 * D
        if direction == "fwd":
            return gemm, fwd_bytes
        bwd_bytes = e * (M * Do + 2 * M * D + 2 * Do * D + 2 * M * D + 2 * Do * D + Do) + 4 * 8 * D
        return 3 * gemm, fwd_bytes + bwd_bytes


class Attention:
    op = "attention"

    @staticmethod
    def cases(device: torch.device, quick: bool) -> list[Case]:
        # (B, N, H, Dh): DiT-XL/2 (Dh 72, 16 heads), HunyuanDiT (Dh 88), and Latte's
        # temporal attention (issue 15): N = 16 frames, one sequence per token of each
        # frame, B = videos x 256 tokens (256 px) and videos x 1024 tokens (512 px), 4
        # videos on a GPU; on the CPU 1/16 of those sequences (64 and 256), like the
        # other CPU rows scaled down for 2 cores.
        gpu = device.type == "cuda"
        temporal = [(4 * 256, 16, 16, 72), (4 * 1024, 16, 16, 72)] if gpu else [(64, 16, 16, 72),
                                                                                (256, 16, 16, 72)]
        if gpu:
            grid = ([(4, 1024, 16, 72)] + temporal[:1] if quick else
                    [(16, 256, 16, 72), (4, 1024, 16, 72), (1, 4096, 16, 72),
                     (4, 1024, 16, 88), (1, 4096, 16, 88)] + temporal)
        else:
            grid = ([(1, 256, 8, 72)] + temporal[:1] if quick else
                    [(1, 256, 16, 72), (1, 1024, 4, 72), (1, 256, 16, 88)] + temporal)
        out = []
        for B, N, H, Dh in grid:
            tag = ""
            if (B, N, H, Dh) in temporal:
                tokens = B // 4 if gpu else B * 16 // 4
                tag = (f" (Latte temporal, 4 videos x {tokens} tokens)" if gpu else
                       f" (Latte temporal, 1/16 of 4 videos x {tokens} tokens)")
            out.append(Case("attention", f"B={B} N={N} H={H} Dh={Dh}{tag}",
                            {"B": B, "N": N, "H": H, "Dh": Dh},
                            target=(gpu and Dh == 72 and N == 1024)))
        return out

    @staticmethod
    def query_features(p):
        return (p["Dh"],)

    @staticmethod
    def query_sizes(p):
        return (p["B"] * p["H"], p["N"], p["N"])

    @staticmethod
    def make(p, device, dtype, grad) -> InputSet:
        B, N, H, Dh = p["B"], p["N"], p["H"], p["Dh"]
        # q, k, v as strided views of one fused qkv projection output, as in a DiT
        qkv = torch.randn(B, N, 3, H, Dh, device=device, dtype=dtype)
        if grad:
            qkv.requires_grad_(True)
        q, k, v = qkv.unbind(2)
        if not grad:
            return InputSet((q, k, v))
        g = torch.randn(B, N, H, Dh, device=device, dtype=dtype)
        return InputSet((q, k, v), [qkv], g)

    @staticmethod
    def eager(args):
        return _reference.attention(*args)

    @staticmethod
    def ours(args):
        return _ops.attention(*args)

    @staticmethod
    def cost(p, direction, e):
        B, N, H, Dh = p["B"], p["N"], p["H"], p["Dh"]
        flops = 4 * B * H * N * N * Dh
        io = B * N * H * Dh
        fwd_bytes = e * 4 * io
        if direction == "fwd":
            return flops, fwd_bytes
        # flash convention: backward = 2.5x forward FLOPs; reads q k v o do lse, writes dq dk dv
        return int(3.5 * flops), fwd_bytes + e * 8 * io + 4 * B * H * N


class CacheDelta:
    op = "cache_delta"

    @staticmethod
    def cases(device: torch.device, quick: bool) -> list[Case]:
        # DiT hidden states (batch incl. CFG, tokens, width)
        if device.type == "cuda":
            grid = [(16, 256, 1152)] if quick else [(16, 256, 1152), (16, 1024, 1152), (2, 4096, 1408)]
        else:
            grid = [(2, 256, 1152)] if quick else [(2, 256, 1152), (4, 1024, 1152)]
        return [Case("cache_delta", f"B={b} N={n} D={d}", {"B": b, "N": n, "D": d}, directions=("fwd",))
                for b, n, d in grid]

    @staticmethod
    def query_features(p):
        return ()

    @staticmethod
    def query_sizes(p):
        return (p["B"] * p["N"] * p["D"],)

    @staticmethod
    def make(p, device, dtype, grad) -> InputSet:
        shape = (p["B"], p["N"], p["D"])
        b = torch.randn(shape, device=device, dtype=dtype)
        a = b + 0.05 * torch.randn(shape, device=device, dtype=dtype)
        return InputSet((a, b))

    @staticmethod
    def eager(args):
        return _reference.cache_delta(*args)

    @staticmethod
    def ours(args):
        return _ops.cache_delta(*args)

    @staticmethod
    def cost(p, direction, e):
        n = p["B"] * p["N"] * p["D"]
        return 5 * n, 2 * n * e + 4


SPECS = {"skip_fuse": SkipFuse, "attention": Attention, "cache_delta": CacheDelta}


def set_bytes(s: InputSet) -> int:
    seen, total = set(), 0
    for t in list(s.args) + ([s.grad_out] if s.grad_out is not None else []):
        if isinstance(t, torch.Tensor):
            base = t._base if t._base is not None else t
            if id(base) not in seen:
                seen.add(id(base))
                total += base.numel() * base.element_size()
    return total
