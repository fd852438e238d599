"""torchrun support: several processes (CPU on gloo, GPUs on NCCL) train one model, replicated
(DistributedDataParallel) or sharded (FSDP2, `TrainSettings.sharding`).

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

from rm_service.errors import FailedPrecondition

FULL_COPY_BYTES_PER_PARAM = 16  # fp32 weights 4 + gradients 4 + AdamW's two moments 8


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
    ("cuda:<local_rank>"); otherwise what was asked for ("cuda:N" in one process)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if world.size > 1 and device.startswith("cuda:"):
        raise FailedPrecondition(
            f"device {device} under torchrun: each rank trains on the GPU of its local rank; choose the GPUs with "
            "CUDA_VISIBLE_DEVICES and set device cuda (or auto)"
        )
    if device in ("auto", "cuda") and cuda:
        return f"cuda:{world.local_rank}" if world.size > 1 else "cuda"
    return "cpu" if device == "auto" else device


def use_fsdp(setting: str, world: World, parameters: int, device: torch.device) -> bool:
    """Shard with FSDP: when asked, or (auto) on CUDA when a rank's whole copy of the weights,
    gradients and AdamW state (16 bytes a parameter in fp32) would take over half its GPU."""
    if world.size == 1 or setting == "ddp":
        return False
    if setting == "fsdp":
        return True
    if device.type != "cuda":
        return False
    return FULL_COPY_BYTES_PER_PARAM * parameters > 0.5 * torch.cuda.get_device_properties(device).total_memory


def shard(model: torch.nn.Module, device: torch.device, world: World) -> torch.nn.Module:
    """PyTorch's FSDP2 (`fully_shard`) on each block the backbone says must not be split
    (`_no_split_modules`: its decoder or encoder layers), then on the whole model: weights,
    gradients and optimizer state are sharded across the ranks, each layer gathered for its
    forward and backward only. Done in place; parameter names are unchanged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    blocks = set(getattr(model.backbone, "_no_split_modules", None) or [])
    for module in model.backbone.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: torch.nn.Module, world: World, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU (rank 0's; other ranks get {} when sharded). Under FSDP
    every rank must call it: the shards are gathered one tensor at a time."""
    if not sharded:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_sum(values: list[float], world: World) -> list[float]:
    """The element-wise sum of `values` over the ranks."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


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
