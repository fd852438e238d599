"""torchrun support: several processes (CPU on gloo, GPUs on NCCL) train one model.

Launched as `torchrun --nproc_per_node N -m rm_service.cli train --mode full`, every process
runs the same code; rank 0 alone reads the store, writes artifacts and registers the
version, and hands the pairs to the others with a broadcast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The rank and world size torchrun set, without initialising anything."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def init(world: World) -> None:
    """Join the process group when launched by torchrun with more than one process."""
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide(flag: bool, world: World) -> bool:
    """Rank 0's decision (stop, early-stop) on every rank, so all ranks take the same path."""
    if world.size == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
