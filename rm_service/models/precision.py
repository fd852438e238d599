"""Precision by measurement: bf16 autocast or fp32, whichever this machine runs faster.

CPUs differ. With AVX-512 BF16 or AMX, torch's bf16 matmuls run 2-3x fp32; without them, bf16
can run at under 1 GFLOP/s. So on a CPU the choice is measured, once per machine (CPU model,
its flags, torch version, thread count), by timing a transformer-sized MLP block in both
precisions, and the result is cached in `$RM_HOME/cache/precision.json`. On CUDA, bf16
whenever the device supports it (Ampere and later), fp32 otherwise.

Weights stay fp32 in every case; bf16 means `torch.autocast(dtype=bfloat16)` around forward
passes. Every precision has one golden-pair tolerance (`GOLDEN_TOLERANCE`): the relative
difference a re-scored golden item may show against the score recorded at training, in that
precision, before a version is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
# |re-scored - recorded| <= tolerance * max(1, |recorded|), per precision.
GOLDEN_TOLERANCE: dict[str, float] = {"fp32": 1e-3, "bf16": 0.05}
# bf16 must beat fp32 by this factor on the probe: autocast adds casts that the block's
# matmuls must pay for, and a tie is not worth bf16's rounding.
BF16_MIN_SPEEDUP = 1.15
_PROBE_SHAPE = (512, 576, 1536)  # tokens x hidden x intermediate: a SmolLM2-135M MLP block


@dataclass(frozen=True)
class Measurement:
    """What the probe measured on this machine, and what it chose."""

    machine: str  # CPU model (or CUDA device name)
    key: str  # hash of machine, flags, torch version and threads: the cache key
    threads: int
    fp32_gflops: float
    bf16_gflops: float
    chosen: Precision
    measured_at: float

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / max(self.fp32_gflops, 1e-9)


def autocast(precision: str, device: torch.device):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(setting: str, device: torch.device, cache_dir: Path | None = None) -> Precision:
    """ "fp32" or "bf16" for `setting` ("auto", "fp32" or "bf16") on `device`."""
    if setting in PRECISIONS:
        return setting
    if setting != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {setting!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return cpu_measurement(cache_dir).chosen


_MEASURED: dict[str, Measurement] = {}  # this process's measurements, by machine key


def cpu_measurement(cache_dir: Path | None = None, threads: int | None = None) -> Measurement:
    """This CPU's measurement: from the cache when this machine was measured before, else
    probed now (one to two seconds) and cached."""
    threads = threads or torch.get_num_threads()
    key = machine_key(threads)
    path = (cache_dir or _default_cache_dir()) / "precision.json"
    cached = _read_cache(path)
    if key in cached:
        return Measurement(**cached[key])
    m = _MEASURED.get(key) or probe_cpu(threads, key)
    _MEASURED[key] = m
    log.info(
        "precision probe on %s (%d threads): fp32 %.0f GFLOP/s, bf16 autocast %.0f GFLOP/s (%.2fx) -> %s",
        m.machine,
        threads,
        m.fp32_gflops,
        m.bf16_gflops,
        m.speedup,
        m.chosen,
    )
    cached[key] = asdict(m)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    except OSError as exc:  # a read-only home still gets the measurement, just not cached
        log.warning("could not cache the precision measurement in %s: %s", path, exc)
    return m


def probe_cpu(threads: int, key: str = "", rounds: int = 8, runs: int = 3) -> Measurement:
    """Time an MLP block (up-projection, GELU, down-projection) in fp32 and under bf16
    autocast, interleaved over `rounds` so that a burst of other work on the machine hits
    both alike; each precision's best time counts. bf16 wins only by BF16_MIN_SPEEDUP."""
    tokens, hidden, inner = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)  # [T, H]
    up, down = torch.nn.Linear(hidden, inner), torch.nn.Linear(inner, hidden)
    flops = 2 * tokens * hidden * inner * 2  # two matmuls

    def block() -> torch.Tensor:
        return down(torch.nn.functional.gelu(up(x)))  # [T, H] -> [T, I] -> [T, H]

    best = {p: float("inf") for p in PRECISIONS}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for precision in PRECISIONS:
                    with autocast(precision, torch.device("cpu")):
                        for _ in range(runs):
                            t = time.perf_counter()
                            block()
                            best[precision] = min(best[precision], time.perf_counter() - t)
                if best["bf16"] > 20 * best["fp32"] + 0.05:  # no bf16 hardware: no need to wait for more rounds
                    break
    finally:
        torch.set_num_threads(previous)
    rates = {p: flops / best[p] / 1e9 for p in PRECISIONS}
    chosen: Precision = "bf16" if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"] else "fp32"
    return Measurement(
        cpu_name(), key or machine_key(threads), threads, rates["fp32"], rates["bf16"], chosen, time.time()
    )


def _cpuinfo(key: str) -> str:
    """The first `key: value` of /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else the platform's processor string)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> str:
    return _cpuinfo("flags")


def machine_key(threads: int) -> str:
    """What the measurement depends on: CPU model and flags, torch version, threads."""
    blob = f"{cpu_name()}|{_cpu_flags()}|{torch.__version__}|{threads}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _default_cache_dir() -> Path:
    from rm_service.settings import rm_home

    return rm_home() / "cache"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(precision: str, device: torch.device) -> str:
    """One line for logs and benchmark tables: the precision and why it was chosen."""
    if device.type == "cuda":
        return f"{precision} on {torch.cuda.get_device_name(device)}"
    m = cpu_measurement()
    return (
        f"{precision} on {m.machine} ({m.threads} threads; measured fp32 {m.fp32_gflops:.0f} GFLOP/s, "
        f"bf16 autocast {m.bf16_gflops:.0f} GFLOP/s, {m.speedup:.2f}x)"
    )
