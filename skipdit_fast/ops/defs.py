"""One declaration per op: everything the op layer needs to know about an op, in one
record. The registration of fakes and Triton kernels (fakes.py, triton_ops.py), the
backend registry (backends.py) and the tools that list ops (info, bench, tests) read
OPS; adding an op is one OpDef here plus its schema in csrc/ops.cpp, its kernels and
its public function in ops/__init__.py.

Names: the public op `name` is also the torch.ops.skipdit op the native backends call
(for attention a composite over `forward`, which returns (out, lse)); `forward` is the
op whose kernel does the forward work and carries the autograd, `backward` the op of
its gradient (None: an ATen formula in the autograd). Each forward/backward op has a
`<op>_triton` twin with the same schema, whose kernel is the launcher of the same name
in `triton_module`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import fakes, reference, triton_ops

# backend names, in the order `info` and error messages list them
BACKENDS = ("reference", "torch", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class OpDef:
    name: str
    forward: str
    backward: str | None
    reference: Callable
    torch: Callable                       # the `torch` backend: what users run without this package
    subproblem: Callable                  # args -> (args of a slice, full output -> that slice)
    fakes: dict[str, Callable]            # op -> fake kernel, forward and backward ops
    triton_module: str                    # launchers named like the ops
    triton_autograd: tuple[Callable, Callable]  # (backward, setup_context) of `forward`_triton
    feature_names: tuple[str, ...] = ()   # the widths the backends' limits look at
    size_names: tuple[str, ...] = ()      # the sizes `auto` measures per bucket of
    # the candidates of `auto` per device type, in their static order: the choice when
    # nothing is measured (SKIPDIT_FAST_AUTOTUNE=0, a trace or capture before tuning),
    # and the tie-break
    static_order: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dtype_arg: str = "x"                  # the argument whose dtype (and device) the backend choice reads

    def kernel_ops(self) -> tuple[str, ...]:
        """The torch.ops.skipdit ops with kernels: forward (and backward)."""
        return (self.forward,) + ((self.backward,) if self.backward else ())


# CPU: our C++ kernels first (the CPU results in bench/results); CUDA: torch first, until
# measurements on GPUs say otherwise (issue 12), then ours.
_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("torch", "cuda", "triton")}

OPS: dict[str, OpDef] = {
    d.name: d for d in (
        OpDef("skip_fuse", "skip_fuse", "skip_fuse_backward", reference.skip_fuse,
              reference.skip_fuse, reference.skip_fuse_subproblem,
              {"skip_fuse": fakes.skip_fuse_fake, "skip_fuse_backward": fakes.skip_fuse_backward_fake},
              "skipdit_fast.kernels.skip_fuse",
              (triton_ops.skip_fuse_backward, triton_ops.skip_fuse_setup),
              ("D", "D_out"), ("M",), dict(_ORDER)),
        OpDef("attention", "attention_forward", "attention_backward", reference.attention,
              reference.sdpa_attention, reference.attention_subproblem,
              {"attention_forward": fakes.attention_forward_fake,
               "attention_backward": fakes.attention_backward_fake},
              "skipdit_fast.kernels.attention",
              (triton_ops.attention_backward, triton_ops.attention_setup),
              ("head_dim",), ("B*H", "Nq", "Nk"), dict(_ORDER), dtype_arg="q"),
        OpDef("cache_delta", "cache_delta", None, reference.cache_delta,
              reference.cache_delta, reference.cache_delta_subproblem,
              {"cache_delta": fakes.cache_delta_fake},
              "skipdit_fast.kernels.cache_delta",
              (triton_ops.cache_delta_backward, triton_ops.cache_delta_setup),
              (), ("elements",), dict(_ORDER), dtype_arg="a"),
    )
}


def get(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; ops are {', '.join(OPS)}") from None
