"""The torchrun process group: joining it, leaving it, and the few CPU exchanges a harvest needs.

`join()` joins the process group when torchrun's WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU);
otherwise it returns None and everything runs single-process, unchanged. Training's collectives
(crossdiff/coder/distributed.py) extend the context this returns; harvesting
(crossdiff/harvest/blocks.py) needs no tensor collectives, only a few integers per round of
documents (`gather_ints`), rank 0's verdicts (`broadcast_object`) and barriers (`wait_all`). Those
travel on CPU through a gloo group of their own, also when the default group is nccl, with a long
timeout: a rank waits there for the slowest block of documents of its round, which can take longer
than torch.distributed's default 30 minutes (a block of books beside a block of short web pages).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

EXCHANGE_TIMEOUT = timedelta(hours=24)


@dataclass
class Group:
    """This process's place in the torchrun group, and the CPU exchanges."""

    rank: int
    world: int
    local_rank: int
    _cpu_group: object = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (the same length on every rank), in rank order, exchanged on CPU."""
        mine = torch.tensor(values, dtype=torch.long)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self._cpu())
        return [o.tolist() for o in out]

    def broadcast_object(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._cpu())
        return box[0]

    def wait_all(self) -> None:
        """A barrier on the CPU exchange group (long timeout; `barrier` uses the default group)."""
        dist.barrier(group=self._cpu())

    def _cpu(self):
        """The gloo group of the CPU exchanges, created collectively at the first one."""
        if self._cpu_group is None:
            self._cpu_group = dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)
        return self._cpu_group


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device_type: str | None = None, cls: type[Group] = Group) -> Group | None:
    """Join (or reuse) the torchrun process group, as a `cls`; None when not launched with WORLD_SIZE > 1."""
    world = world_size_from_env()
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if not dist.is_initialized():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def local_device(name: str) -> str:
    """--device for this rank: auto/cuda become cuda:LOCAL_RANK under torchrun."""
    if world_size_from_env() > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return name


def leave(ctx: Group | None) -> None:
    """Leave the group at once after an error on this rank; the others' pending exchanges then fail
    (gloo: connection closed) instead of waiting for a barrier this rank will never reach."""
    if ctx is not None and dist.is_initialized():
        _destroy()


def shutdown(ctx: Group | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.barrier()
        _destroy()


def _destroy() -> None:
    """destroy_process_group, then free what reference cycles still hold of it now.

    Otherwise the last gloo objects can die in interpreter finalization, where a non-main rank
    sometimes aborted ("terminate called without an active exception", SIGABRT, so torchrun
    failed a finished run): 3 and 5 of 40 two-rank `crossdiff train` runs on a loaded machine,
    0 of 40 twice with this collect (`python bench/ddp_exit.py --runs 40 --load`).
    """
    dist.destroy_process_group()
    gc.collect()
