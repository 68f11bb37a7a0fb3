"""skipdit_fast: fast kernels, Skip-DiT models and Skip-Cache for Diffusion
Transformers with long-skip connections (Skip-DiT, arXiv 2411.17616).

The package is built in layers; each imports only the layers below it:

    apps/          the `skipdit-fast` command line: info, demo, sample, train (top)
    benchmark/     kernel and end-to-end benchmarks (`skipdit-fast bench`)
    evaluation/    metrics and the digit classifier that score samples
    pretrained     the shipped tiny models
    data/          data the package reads without a download
    integrations/  patch() / enable_skip_cache() for DiTs people already have
    sampling/      diffusion math, samplers, the training loss
    cache/         the Skip-Cache engine and caching baselines
    models/        DiT / Skip-DiT, Latte / Latte-skip on the ops
    ops/           the ops, their backends and the backend choice (bottom)
    kernels/       the Triton kernels, called by ops (they import only ops.checks)

Importing skipdit_fast is cheap: the names below load their layer on first use.
`skipdit_fast.ops` (which any op, model or patch call imports) loads the native
library and registers the torch.ops.skipdit.* ops.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute; None: the module itself)
_EXPORTS = {
    "BackendError": ("skipdit_fast.ops.backends", "BackendError"),
    "get_backend": ("skipdit_fast.ops.backends", "get_backend"),
    "set_backend": ("skipdit_fast.ops.backends", "set_backend"),
    "use_backend": ("skipdit_fast.ops.backends", "use_backend"),
    "tune": ("skipdit_fast.ops.tuning", "tune"),
    "reference": ("skipdit_fast.ops.reference", None),
    "DiT": ("skipdit_fast.models", "DiT"),
    "DiTConfig": ("skipdit_fast.models", "DiTConfig"),
    "Latte": ("skipdit_fast.models", "Latte"),
    "LatteConfig": ("skipdit_fast.models", "LatteConfig"),
    "SkipCache": ("skipdit_fast.cache", "SkipCache"),
    "SkipCacheRunError": ("skipdit_fast.cache", "SkipCacheRunError"),
    "CheckpointError": ("skipdit_fast.models.checkpoint", "CheckpointError"),
    "diffusion": ("skipdit_fast.sampling.diffusion", None),
    "PatchReport": ("skipdit_fast.integrations", "PatchReport"),
    "patch": ("skipdit_fast.integrations", "patch"),
    "unpatch": ("skipdit_fast.integrations", "unpatch"),
    "enable_skip_cache": ("skipdit_fast.integrations", "enable_skip_cache"),
    "disable_skip_cache": ("skipdit_fast.integrations", "disable_skip_cache"),
}
_SUBPACKAGES = ("analysis", "apps", "benchmark", "cache", "data", "evaluation", "files", "integrations", "kernels",
                "models", "ops", "pretrained", "sampling")

__all__ = sorted([*_EXPORTS, "models", "ops"])


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
