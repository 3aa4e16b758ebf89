"""Several processes, one job: what slimformer adds to the engines when it runs on more than one process.

Training under ``torchrun`` / ``accelerate launch`` is the Hugging Face Trainer's work: it reads the launcher's
environment, starts the process group through accelerate (gloo on CPU, NCCL on GPUs), wraps the model in DDP,
shards the training batches and gathers the tuning-split predictions before computing metrics. What is left
here is who writes: only the main process saves artifacts (:func:`main_only`), the others wait and receive
the same result.

A search scales out differently: independent worker processes share one Optuna storage. For them this module
names the machine that measured a candidate (:func:`host`), since latency only compares on the same
hardware, and serialises the building of shared cache entries (:func:`file_lock`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slimformer.errors import SlimformerError

T = TypeVar("T")

# Evaluating and saving on the main process may take longer than the training group's timeout (30 minutes
# by default), so the other processes wait for it on a group of their own with a generous one.
MAIN_ONLY_TIMEOUT_S = 6 * 3600


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in this job: 1 unless started by torchrun, accelerate launch or another launcher."""
    if _initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when alone)."""
    if _initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the one process that writes artifacts and prints results."""
    return rank() == 0


def _group() -> bool:
    """True when several processes run this job. The process group is normally started by the Trainer; a job
    that reaches a collective step without training starts it the same way (accelerate, from the launcher's
    environment)."""
    if world_size() <= 1:
        return False
    if not _initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return True


def _device() -> torch.device:
    # NCCL only reduces tensors on the GPU.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if _group():
        dist.barrier()


def mean(value: float) -> float:
    """The mean of ``value`` over all processes (the value itself in a single process)."""
    if not _group():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.item() / world_size()


def main_only(fn: Callable[[], T], *, timeout_s: float = MAIN_ONLY_TIMEOUT_S) -> T:
    """Run ``fn`` on the main process only; the other processes wait for it and return its result (which
    must pickle). An error on the main process is raised on every process, so no rank reports success for a
    job whose artifact was not written. Every process must call this at the same point."""
    if not _group():
        return fn()
    # gloo works whichever backend trained (CPU or NCCL) and takes an explicit timeout.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    box: list[Any] = [None]
    try:
        if is_main():
            try:
                box[0] = ("ok", fn())
            except BaseException as e:
                box[0] = ("user-error" if isinstance(e, SlimformerError) else "error", str(e).splitlines()[0][:300]
                          if str(e) else type(e).__name__)
                dist.broadcast_object_list(box, src=0, group=group)
                raise
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    status, payload = box[0]
    if status == "ok":
        return payload
    if status == "user-error":
        raise SlimformerError(payload)
    raise RuntimeError(f"the main process failed: {payload}")


def finish() -> None:
    """Leave the process group at the end of a command (torch warns about a group left open)."""
    if _initialized():
        dist.destroy_process_group()


@cache
def host() -> dict[str, str]:
    """The machine that measures: its host name (``SLIMFORMER_HOST`` overrides it, e.g. for containers that
    share one) and its CPU model. Latency and memory only compare between candidates measured on the same."""
    from slimformer.measure import hardware

    return {"host": os.environ.get("SLIMFORMER_HOST") or socket.gethostname(), "cpu": hardware()["cpu"]}


def same_host(measured_on: dict[str, Any] | None) -> bool:
    """Whether a measurement was taken here. Records without a host predate shared searches: one machine."""
    return measured_on is None or (measured_on.get("host"), measured_on.get("cpu")) == (host()["host"], host()["cpu"])


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, so concurrent workers (processes or machines sharing
    the folder) wait for each other instead of building the same thing twice. filelock takes an fcntl lock,
    which the kernel drops when its holder dies: a killed worker never blocks the others."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


__all__ = ["barrier", "file_lock", "finish", "host", "is_main", "main_only", "mean", "rank", "same_host",
           "world_size"]
