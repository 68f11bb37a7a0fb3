"""torch.distributed for sampling at scale: the process group from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the backend
(NCCL for CUDA devices, gloo for the CPU), and failures that end the whole job.

    group = init("auto", timeout_s=1800)   # world size 1 without torchrun: no process group
    value = group.agree(fn)                # fn on every rank; if it raised anywhere, every rank raises
    total, errors = group.status(failed, count)   # one all_reduce: a job-wide count and any failures
    group.close()

A rank that fails does not leave the others waiting at a barrier: every phase of a
job ends with a status exchange (agree / status, one small all_reduce), where a
failure on any rank becomes a RankFailed on every rank, with every failed rank's
message; a rank that dies without reaching it (killed, out of memory) makes the
others' collective time out after init's timeout_s (torchrun also stops the other
workers as soon as one exits non-zero). Layer: sampling; imports torch only."""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Raised on every rank when some rank failed; errors: [(rank, message)]."""

    def __init__(self, errors: list[tuple[int, str]]):
        self.errors = errors
        super().__init__("; ".join(f"rank {r}: {m}" for r, m in errors))


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} / WORLD_SIZE {world} from the environment are not a valid rank")
    return rank, world, local


def pick_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def pick_device(name: str, local_rank: int) -> torch.device:
    """--device: 'auto' (this process's GPU, cuda:LOCAL_RANK, when there is one, else
    the CPU), 'cpu', 'cuda' (cuda:LOCAL_RANK) or 'cuda:N' (as given)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK {local_rank} but only {count} CUDA devices on this node")
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass
class Group:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None          # the process group's backend; None at world size 1

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def status(self, failed: bool, count: int = 0, message: str = "") -> tuple[int, list[tuple[int, str]]]:
        """One all_reduce: (sum of count over ranks, [(rank, message)] of the ranks
        that failed; empty when none did)."""
        if not self.distributed:
            return count, ([(0, message)] if failed else [])
        t = torch.tensor([int(bool(failed)), int(count)], dtype=torch.int64, device=self._comm_device())
        with self._collective("status"):
            dist.all_reduce(t)
        n_failed, total = (int(v) for v in t.tolist())
        if not n_failed:
            return total, []
        msgs: list[Any] = [None] * self.world_size
        with self._collective("error exchange"):
            dist.all_gather_object(msgs, message if failed else None)
        return total, [(r, m) for r, m in enumerate(msgs) if m is not None]

    @contextlib.contextmanager
    def _collective(self, what: str):
        """A collective that fails (a rank died, or did not arrive within the
        timeout) raises RankFailed here too, naming this rank."""
        try:
            yield
        except RankFailed:
            raise
        except Exception as e:  # noqa: BLE001 - gloo / NCCL raise RuntimeError and their own types
            raise RankFailed([(self.rank, f"{what} with the other ranks failed (did a rank die or hang?): "
                                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]) from e

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on this rank; returns its value when it succeeded on every rank,
        else raises RankFailed on every rank (the failed ranks' messages)."""
        try:
            value, failed, message = fn(), False, ""
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            value, failed, message = None, True, describe(e)
        _, errors = self.status(failed, 0, message)
        if errors:
            raise RankFailed(errors)
        return value

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("gather"):
            dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None


def describe(e: BaseException) -> str:
    """One line for an exception: its type, message and where it was raised."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def init(device: str = "auto", timeout_s: float = 1800.0) -> Group:
    """This process's place in the job: a process group (NCCL on CUDA, gloo on the
    CPU, env:// from torchrun's variables, collectives timing out after timeout_s)
    when WORLD_SIZE > 1, none at world size 1."""
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")
    rank, world, local = env_world()
    dev = pick_device(device, local)
    if world == 1:
        return Group(rank, world, local, dev, None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = pick_backend(dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return Group(rank, world, local, dev, backend)
