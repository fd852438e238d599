"""Memory of model weights: what a loaded model holds (measured) and what a version will take
(estimated from its weight files before it is loaded), and the device's own figures.

`held_bytes` counts the distinct tensor storages (parameters and buffers) of every module an
object holds, each storage once however many tensors view it: a runtime that kept an fp32 copy
beside its bf16 one counts both, one that shares a module with another version counts it once.
This is a measurement of what is alive, not a formula. `estimate_load` reads the shapes in the
safetensors headers of the weight files (no tensor is read) and gives the parameter count, the
bytes once loaded in the served precision (an upper bound: the files may hold what a reward
model drops, layers past its pooling layer or an LM head), and the peak while loading: the loaders read the
weights in fp32 on the host (`HOST_LOAD_BYTES_PER_PARAM`) and a server casts them to the served
precision there, before they move to a GPU (runtime.load_backbone_runtime(serving=True)), so
a GPU holds only the served copy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

HOST_LOAD_BYTES_PER_PARAM = 4  # the loaders (models.reward_model) read fp32 weights, then serving casts them
SERVED_BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
GB = 1e9


def modules_of(obj) -> list[torch.nn.Module]:
    """The modules `obj` holds: itself if it is one, else its attributes that are modules
    (a runtime's model and any copy of it), and those of a backend object it wraps."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]
    return found


def held_bytes(objects: Iterable, device: torch.device | None = None) -> int:
    """Bytes of the distinct storages of the parameters and buffers of `objects`' modules
    (on `device` only, when given)."""
    seen: dict[tuple[str, int], int] = {}
    for obj in objects:
        for module in modules_of(obj):
            for tensor in [*module.parameters(), *module.buffers()]:
                if device is not None and tensor.device.type != device.type:
                    continue
                storage = tensor.untyped_storage()
                seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def parameter_count(objects: Iterable) -> int:
    """Distinct parameters (elements) of `objects`' modules."""
    seen: dict[int, int] = {}
    for obj in objects:
        for module in modules_of(obj):
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass(frozen=True)
class LoadEstimate:
    """A version's weights before it is loaded, from its files' headers."""

    parameters: int
    served_bytes: int  # once loaded, in the served precision
    load_peak_bytes: int  # while loading, where it runs: on a GPU the served bytes; on a CPU fp32, then cast

    def describe(self, precision: str) -> str:
        return f"{self.parameters / 1e9:.2f}B parameters: {self.served_bytes / GB:.2f} GB in {precision}"


def safetensors_parameters(files: Iterable[Path]) -> int:
    """Elements of every tensor in the safetensors files, from their JSON headers alone."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in entry["shape"]:
                n *= int(dim)
            total += n
    return total


def estimate_load(weight_dirs: Iterable[Path], precision: str, device_type: str = "cpu") -> LoadEstimate | None:
    """The estimate for the safetensors weights in `weight_dirs` (a backbone and a version's
    head) served in `precision` on a `device_type` ("cpu", "cuda"); None when a directory holds
    no safetensors file (e.g. .bin weights)."""
    files: list[Path] = []
    for directory in weight_dirs:
        found = sorted(Path(directory).glob("*.safetensors"))
        if not found:
            return None
        files += found
    n = safetensors_parameters(files)
    served = n * SERVED_BYTES_PER_PARAM.get(precision, 4)
    return LoadEstimate(n, served, served if device_type == "cuda" else n * HOST_LOAD_BYTES_PER_PARAM)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device as the driver reports them; None on a CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def peak_tracker(device: torch.device):
    """A function that returns the device allocator's peak since this call (CUDA), else None."""
    if device.type != "cuda":
        return lambda: None
    torch.cuda.reset_peak_memory_stats(device)
    return lambda: int(torch.cuda.max_memory_allocated(device))
