"""`skipdit-fast tune`: measure `auto` for a model's shapes now and keep the decisions.

    skipdit-fast tune --model DiT-XL/2-skip --batch 8 --cfg --dtype bf16
    skipdit-fast tune --shapes hunyuandit --batch 1 --cfg --dtype bf16 --markdown tune.md

--model runs one forward of a skipdit_fast model (random weights: only the shapes
matter) on a batch of latents (doubled with --cfg, as classifier-free guidance runs
it); --shapes runs the ops alone at the shapes of a model this package patches but
does not build (HunyuanDiT-v1.2 at 1024 px: 4096 image tokens, hidden 1408, 16 heads of
88, 40 layers, 77 + 256 text tokens for cross-attention). Every op call's shape bucket
is measured (skipdit_fast.ops.autotune: every candidate backend timed and checked
against the fp64 reference) unless decided before (--force measures again), the
decisions go to the cache file (`skipdit-fast info` shows it), and the table says per
op and shape each candidate's time and error, the winner and why the others lost.
For a diffusers model, call skipdit_fast.tune(pipe.transformer, example_inputs) in Python.
"""

from __future__ import annotations

import json

import torch

from ..files import write_atomic
from .common import (DTYPES, UsageError, check_output_file, default_dtype, device_arg, device_from_arg,
                     positive_int)

# HunyuanDiT-v1.2, 1024 px (diffusers HunyuanDiT2DModel defaults): 128x128 latents, patch 2
HUNYUANDIT = {"tokens": 4096, "hidden": 1408, "heads": 16, "head_dim": 88, "text_tokens": 77 + 256}
SHAPES = ("hunyuandit",)


def add_arguments(p) -> None:
    from ..models import model_names

    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", choices=model_names(), metavar="NAME",
                      help="a skipdit_fast model (DiT-{S,B,L,XL}/{2,4,8}[-skip]; default DiT-XL/2-skip)")
    what.add_argument("--shapes", choices=SHAPES, help="the op shapes of a model run elsewhere (diffusers)")
    p.add_argument("--image-size", type=positive_int, default=256, help="--model: image size in pixels (default 256)")
    p.add_argument("--batch", type=positive_int, default=8, help="images per forward (default 8)")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance: the forward runs 2 x batch")
    p.add_argument("--grad", action="store_true", help="also the training shapes (forward + backward)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--force", action="store_true", help="measure again shapes decided before")
    p.add_argument("--json", metavar="PATH", help="write the decisions as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the decision table as markdown")


class _HunyuanDiTOps(torch.nn.Module):
    """The op calls of one HunyuanDiT forward, once per distinct shape: a long-skip merge,
    self-attention over the image tokens, cross-attention to the text tokens, and the
    cache_delta a Skip-Cache in adaptive mode computes."""

    def __init__(self, s: dict):
        super().__init__()
        D = s["hidden"]
        self.s = s
        self.norm_weight = torch.nn.Parameter(torch.ones(2 * D))
        self.norm_bias = torch.nn.Parameter(torch.zeros(2 * D))
        self.linear = torch.nn.Linear(2 * D, D)

    def forward(self, x, text):
        from .. import ops

        B, N, D = x.shape
        H, Dh = self.s["heads"], self.s["head_dim"]
        nw, nb = self.norm_weight.to(x.dtype), self.norm_bias.to(x.dtype)
        h = ops.skip_fuse(x, x.roll(1, 1), nw, nb, self.linear.weight, self.linear.bias)
        q, k, v = (h @ torch.randn(D, 3 * D, device=x.device, dtype=x.dtype)).view(B, N, 3, H, Dh).unbind(2)
        o = ops.attention(q, k, v)
        kv = text.view(B, -1, 2, H, Dh).unbind(2)
        o2 = ops.attention(o, *kv)
        return ops.cache_delta(o2.reshape(B, N, D), x)


def _workload(args, device, dtype):
    """(name, module, example inputs)."""
    n = args.batch * (2 if args.cfg else 1)
    if args.shapes == "hunyuandit":
        s = HUNYUANDIT
        mod = _HunyuanDiTOps(s).to(device=device, dtype=dtype)
        x = torch.randn(n, s["tokens"], s["hidden"], device=device, dtype=dtype)
        text = torch.randn(n, s["text_tokens"], 2 * s["hidden"], device=device, dtype=dtype)
        return f"HunyuanDiT shapes, 1024 px, {n} per forward", mod, (x, text)
    from ..models import DiT

    from ..models import DiTConfig

    name = args.model or "DiT-XL/2-skip"
    try:
        DiTConfig.from_name(name, image_size=args.image_size)
    except ValueError as e:
        raise UsageError(f"--image-size {args.image_size}: {e}") from None
    with torch.device(device):  # random weights made where they run (DiT-XL/2: 675M of them)
        model = DiT.from_name(name, image_size=args.image_size).to(dtype=dtype).eval()
    c = model.config
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, c.num_classes, (n,), device=device)
    return f"{name} at {args.image_size} px, {n} per forward", model, (x, t, y)


def main(args) -> int:
    from ..ops import autotune
    from ..ops.tuning import tune

    if not autotune.enabled():
        raise UsageError("SKIPDIT_FAST_AUTOTUNE=0 turns measuring off; unset it to tune")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            check_output_file(path, flag)   # before the measuring, not after it
    device = device_from_arg(args.device)
    dtype = default_dtype(device, args.dtype)
    label, module, inputs = _workload(args, device, dtype)
    report = tune(module, inputs, force=args.force, grad=args.grad)
    report.model = f"{label}, {str(dtype).replace('torch.', '')} on {device}"
    print(report)
    f = autotune.TUNER.file(device)
    print(f"\ndecisions in {f.path} ({f.count} in all)")
    if args.json:
        write_atomic(args.json, json.dumps(report.to_dict(), indent=1, default=str).encode())
    if args.markdown:
        write_atomic(args.markdown, report.to_markdown().encode())
    return 0
