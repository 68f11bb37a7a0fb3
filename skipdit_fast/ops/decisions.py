"""The decisions of `auto` (skipdit_fast.ops.autotune) and the JSON file that keeps them.

A Decision says which backend won one shape bucket (op, device, dtype, with or without
backward, the widths, the bucketed sizes, CPU threads) and what every candidate did:
its time, its error against the fp64 reference, and why it lost.

One file per device and software stack: `<cache dir>/autotune-<device>-<hash>.json`,
the hash over its key {device name, torch, triton, CUDA, skipdit_fast version, git
commit}; the key is also stored in the file. The cache dir is $SKIPDIT_FAST_CACHE_DIR,
else $XDG_CACHE_HOME/skipdit_fast, else ~/.cache/skipdit_fast. A file that is not
JSON, not ours, or whose key differs (another device, another version) is ignored with
one warning and replaced at the next write. Writes merge with what other processes
wrote (under a lock file where the OS has fcntl), go to a temporary file and are renamed
into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from ..files import write_atomic

FORMAT = 1
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # skipdit_fast/


# ---------------------------------------------------------------------------------------
# records

@dataclass
class Result:
    """What one candidate backend did on the tuning call."""

    backend: str
    ms: float | None = None          # median time per call (forward, or forward + backward)
    rel_err: float | None = None     # forward: max |out - truth| / max |truth|
    budget: float | None = None      # worst error / allowed error over the checked tensors (<= 1 passes)
    verdict: str = ""                # "chosen: ...", or why it lost


@dataclass
class Decision:
    op: str
    device: str                      # the device's name (the file's key has it too)
    dtype: str
    grad: bool
    features: tuple                  # the widths the limits look at (D, D_out / head dim)
    sizes: tuple                     # the bucketed sizes (powers of two; see backends.bucket)
    threads: int | None              # torch CPU threads (CPU decisions), else None
    backend: str
    results: list[Result] = field(default_factory=list)
    source: str = "measured"         # "measured" (this process), "cache file", "only candidate"
    tune_s: float = 0.0              # wall time of the tuning (checks and timing)
    created: str = ""

    @property
    def key(self) -> str:
        return record_key(self.op, self.dtype, self.grad, self.features, self.sizes, self.threads)

    def result(self, backend: str) -> Result | None:
        return next((r for r in self.results if r.backend == backend), None)

    def vs_torch(self) -> float | None:
        """Time of the torch backend / time of the chosen one (1.0 when torch won)."""
        t, c = self.result("torch"), self.result(self.backend)
        if self.backend == "torch":
            return 1.0
        if t is None or c is None or not t.ms or not c.ms:
            return None
        return t.ms / c.ms

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        d["features"], d["sizes"] = list(self.features), list(self.sizes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Decision":
        results = [Result(**r) for r in d["results"]]
        return cls(op=str(d["op"]), device=str(d["device"]), dtype=str(d["dtype"]), grad=bool(d["grad"]),
                   features=tuple(int(f) for f in d["features"]), sizes=tuple(int(s) for s in d["sizes"]),
                   threads=None if d["threads"] is None else int(d["threads"]), backend=str(d["backend"]),
                   results=results, source="cache file", tune_s=float(d.get("tune_s", 0.0)),
                   created=str(d.get("created", "")))


def record_key(op, dtype, grad, features, sizes, threads) -> str:
    """The key of a decision in memory and in its file: op|dtype|fwd or bwd|widths|sizes|threads."""
    return (f"{op}|{dtype}|{'bwd' if grad else 'fwd'}|{','.join(map(str, features))}|"
            f"{','.join(map(str, sizes))}|t{threads}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------
# what a file's key is made of

@lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


def run_git(*args: str) -> str | None:
    """`git <args>` in the checkout that holds this package; None outside one."""
    root = os.path.dirname(_PACKAGE_ROOT)
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@lru_cache(maxsize=None)
def source_commit() -> str | None:
    """The git commit of the package's checkout (+dirty with uncommitted changes to
    tracked files); None for an installed copy."""
    commit = run_git("rev-parse", "HEAD")
    if commit and run_git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit


@lru_cache(maxsize=None)
def _triton_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:  # not installed
        return None


def file_key(device: torch.device) -> dict:
    from .. import __version__

    return {"device": device_name(device), "torch": torch.__version__, "triton": _triton_version(),
            "cuda": torch.version.cuda, "skipdit_fast": __version__, "commit": source_commit()}


def cache_dir() -> str:
    d = os.environ.get("SKIPDIT_FAST_CACHE_DIR")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "skipdit_fast")


# ---------------------------------------------------------------------------------------
# the file

class DecisionFile:
    """The cache file of one device: load() once, save(decisions) after each tuning."""

    def __init__(self, device: torch.device):
        self.key = file_key(device)
        h = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^a-z0-9]+", "-", self.key["device"].lower()).strip("-")[:40]
        self.path = os.path.join(cache_dir(), f"autotune-{slug}-{h}.json")
        self.state = "not read"     # "absent", "ok", or "ignored: <why>"
        self.count = 0
        self._warned = False

    def _read(self) -> tuple[dict[str, Decision] | None, str]:
        """(decisions, state): None when there is no usable file."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return None, "absent"
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return None, f"ignored: unreadable or not JSON ({type(e).__name__}: {e})"
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("decisions"), list):
            return None, "ignored: not a skipdit_fast autotune file of this format"
        if data.get("key") != self.key:
            return None, f"ignored: made for {data.get('key')}, this is {self.key}"
        out = {}
        try:
            for rec in data["decisions"]:
                d = Decision.from_json(rec)
                out[d.key] = d
        except (KeyError, TypeError, ValueError) as e:
            return None, f"ignored: a malformed decision ({type(e).__name__}: {e})"
        return out, "ok"

    def load(self) -> dict[str, Decision]:
        found, self.state = self._read()
        if found is None and self.state.startswith("ignored") and not self._warned:
            self._warned = True
            warnings.warn(f"skipdit_fast autotune cache {self.path} {self.state}; decisions are measured "
                          "again and the file is rewritten", RuntimeWarning, stacklevel=2)
        self.count = len(found or {})
        return found or {}

    def save(self, decisions: dict[str, Decision]) -> None:
        """Merges `decisions` into the file (ours win), atomically; a cache dir that cannot
        be written is warned about once and the decisions stay in memory."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with _locked(self.path + ".lock"):
                found, _ = self._read()
                merged = {**(found or {}), **decisions}
                data = {"format": FORMAT, "key": self.key,
                        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "decisions": [d.to_json() for _, d in sorted(merged.items())]}
                write_atomic(self.path, json.dumps(data, indent=1), fsync=True)
            self.state, self.count = "ok", len(merged)
        except OSError as e:
            if not self._warned:
                self._warned = True
                warnings.warn(f"skipdit_fast autotune cannot write {self.path} ({e}); decisions stay in "
                              "memory for this process", RuntimeWarning, stacklevel=2)


class _locked:
    """An exclusive lock on a lock file (fcntl); a no-op where the OS has no fcntl."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: the atomic rename alone keeps the file valid
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


