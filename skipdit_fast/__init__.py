"""skipdit_fast: fast kernels, Skip-DiT models and Skip-Cache for Diffusion
Transformers with long-skip connections (Skip-DiT, arXiv 2411.17616)."""

from __future__ import annotations

__version__ = "0.1.0"

from . import _lib

_lib._load()
if _lib.available():
    from . import _fake, _triton_ops

    _fake.register()
    _triton_ops.register()

from . import ops, reference  # noqa: E402
from .backends import BackendError, get_backend, set_backend, use_backend  # noqa: E402
from . import models  # noqa: E402
from .cache import SkipCache  # noqa: E402
from .models import DiT, DiTConfig  # noqa: E402
from .patch import PatchReport, disable_skip_cache, enable_skip_cache, patch, unpatch  # noqa: E402

__all__ = [
    "BackendError",
    "DiT",
    "DiTConfig",
    "PatchReport",
    "SkipCache",
    "disable_skip_cache",
    "enable_skip_cache",
    "get_backend",
    "models",
    "ops",
    "patch",
    "reference",
    "set_backend",
    "unpatch",
    "use_backend",
]
