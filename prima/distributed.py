"""One process or one of many under ``torchrun``: the same command on a laptop, a GPU box or a cluster.

    with distributed("auto") as context:      # torchrun set WORLD_SIZE > 1: join its process group
        mine = context.shard(studies)         # every world_size-th item, starting at this rank
        ...
        context.barrier()

NCCL on GPUs (each process on ``cuda:<LOCAL_RANK>``), gloo on CPUs. Training stages, the token cache and
batch inference (``prima embed``, ``prima predict-batch``) all start their processes here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Ranks can reach a barrier far apart on a long run (their shards load at different speeds); the default
# (10 minutes with NCCL) would abort a healthy job. A crashed rank is caught by torchrun, which stops the
# others, so a long timeout leaves nothing hanging.
BARRIER_TIMEOUT = timedelta(hours=24)


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when visible, else the CPU; a CUDA device without an index -> ``cuda:<local_rank>``.

    Raises:
        ValueError: CUDA asked for but absent, or an unknown device type.
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda") from error
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is visible")
        if target.index is None:
            return torch.device("cuda", local_rank)
    return target


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: one process, or one of ``world_size`` launched by torchrun."""

    rank: int  # global rank, 0 on a single process
    world_size: int  # number of processes
    local_rank: int  # rank on this node (picks the GPU)
    device: torch.device  # the device this process computes on

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """Every ``world_size``-th item, starting at this rank."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (e.g. a time limit), so all stop together."""
        if self.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over all ranks (every rank gets the totals)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())


@contextlib.contextmanager
def distributed(device: str | torch.device = "auto") -> Iterator[DistributedContext]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else run as the only process; the group
    is torn down on exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if world_size == 1:
        yield DistributedContext(0, 1, 0, target)
        return
    if target.type == "cuda":
        torch.cuda.set_device(target)
        dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=target)
    else:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, target)
    finally:
        dist.destroy_process_group()
