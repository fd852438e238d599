"""torchrun support: several processes (CPU on gloo, GPUs on NCCL) train one model.

Launched as `torchrun --nproc_per_node N -m rm_service.cli train --mode full`, every process
runs the same code; rank 0 alone reads the store, writes artifacts and registers the
version, and hands the pairs to the others with a broadcast. On GPUs each rank owns the
device of its local rank (`device_for`), set before the process group starts, and every
tensor NCCL moves lives on it.
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
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The rank, world size and local rank torchrun set, without initialising anything."""
    return World(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def backend_for(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def device_for(world: World, device: str = "auto", cuda_available: bool | None = None) -> str:
    """The device this rank trains on: with CUDA, the GPU of its local rank under torchrun
    ("cuda:<local_rank>"); otherwise what was asked for."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device in ("auto", "cuda") and cuda:
        return f"cuda:{world.local_rank}" if world.size > 1 else "cuda"
    return "cpu" if device == "auto" else device


def init(world: World) -> None:
    """Join the process group when launched by torchrun with more than one process; on CUDA
    first make the local rank's GPU this process's current device (NCCL needs it)."""
    if world.size > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend_for(cuda))


def _collective_device() -> torch.device:
    """Where tensors of collectives live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def decide(flag: bool, world: World) -> bool:
    """Rank 0's decision (stop, early-stop) on every rank, so all ranks take the same path."""
    if world.size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
