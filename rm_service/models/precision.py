"""Precision by measurement: fp32 or bf16 weights, whichever this machine runs the model faster.

CPUs differ. With AVX-512 BF16 or AMX, torch's bf16 matmuls run 2-6x fp32; without them,
bf16 can run at under 1 GFLOP/s. So on a CPU the choice is measured, once per machine (CPU
model, its flags, torch version, thread count) and model shape, by timing one layer of the
model itself (built from its config, random weights) in three ways: fp32; bf16 autocast over
fp32 weights (how training runs, the weights re-cast at every op); and bf16 weights (how
inference runs bf16: `ModelRuntime.inference_model`, `serve_only`). The result is cached in
`$RM_HOME/cache/precision.json`. On CUDA, bf16 whenever the device supports it (Ampere and
later), fp32 otherwise.

A busy machine must not decide: the three are timed in rounds, each round running every
candidate back to back (in a rotating order), and the choice reads the ratio of the times
within each round, so that load hits the candidates alike; rounds in which this process did
not get its cores (CPU time under `QUIET_SHARE` of wall time x threads) are left out when
enough others were quiet. A choice that the rounds do not settle (too few quiet rounds, and
rounds on both sides of the threshold) serves this process but is not cached: the next start
measures again.

Every precision has one golden-pair tolerance (`GOLDEN_TOLERANCE`): the relative difference a
re-scored golden item may show against the score recorded at training, in that precision,
before a version is refused (with precision auto, a version whose items fail in bf16 is served
in fp32 instead: models.version.open_version).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
# What the probe times: the two precisions, and bf16 applied by autocast over fp32 weights.
CANDIDATES = ("fp32", "autocast", "bf16")
# |re-scored - recorded| <= tolerance * max(1, |recorded|), per precision.
GOLDEN_TOLERANCE: dict[str, float] = {"fp32": 1e-3, "bf16": 0.05}
# bf16 must beat fp32 by this factor: a tie is not worth bf16's rounding.
BF16_MIN_SPEEDUP = 1.15
# A round counts as quiet when this process got this share of its threads' wall time as CPU time.
QUIET_SHARE = 0.8
PROBE_TOKENS = (4, 256)  # batch x sequence of the timed layer
# SmolLM2-135M's layer: the shape timed when no model config is given (benches, memory estimates).
DEFAULT_LAYER = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}


@dataclass(frozen=True)
class Measurement:
    """What the probe measured on this machine, and what it chose."""

    machine: str  # CPU model (or CUDA device name)
    key: str  # hash of machine, flags, torch version, threads and layer shape: the cache key
    threads: int
    layer: str  # the timed layer's shape
    fp32_gflops: float
    autocast_gflops: float  # bf16 autocast over fp32 weights
    bf16_gflops: float  # bf16 weights
    speedup: float  # bf16 weights over fp32: the median of the ratios within the rounds counted
    chosen: Precision
    rounds: int
    quiet_rounds: int
    settled: bool  # cached: the rounds agree, or enough of them had the cores
    measured_at: float

    def summary(self) -> str:
        load = "" if self.quiet_rounds == self.rounds else f", {self.quiet_rounds} of {self.rounds} rounds quiet"
        note = "" if self.settled else "; unsettled under load, not cached"
        return (
            f"measured on a {self.layer} layer ({self.threads} threads{load}): fp32 {self.fp32_gflops:.0f} GFLOP/s, "
            f"bf16 autocast {self.autocast_gflops:.0f}, bf16 weights {self.bf16_gflops:.0f} "
            f"({self.speedup:.2f}x fp32){note}"
        )


def autocast(precision: str, device: torch.device):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(setting: str, device: torch.device, cache_dir: Path | None = None, config=None) -> Precision:
    """ "fp32" or "bf16" for `setting` ("auto", "fp32" or "bf16") on `device`; `config`: the
    model's transformers config, whose layer "auto" times (default: SmolLM2-135M's shape)."""
    if setting in PRECISIONS:
        return setting
    if setting != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {setting!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return cpu_measurement(cache_dir, config=config).chosen


_MEASURED: dict[str, Measurement] = {}  # this process's measurements, by key


def cpu_measurement(cache_dir: Path | None = None, threads: int | None = None, config=None) -> Measurement:
    """This CPU's measurement for `config`'s layer: from the cache when it was settled before,
    else probed now (a second or two) and cached if settled."""
    threads = threads or torch.get_num_threads()
    shape = layer_shape(config)
    key = machine_key(threads, shape)
    if key in _MEASURED:
        return _MEASURED[key]
    path = (cache_dir or _default_cache_dir()) / "precision.json"
    cached = _read_cache(path)
    try:
        m = Measurement(**cached[key])
    except (KeyError, TypeError):  # never measured, or by an older probe
        m = probe_cpu(threads, key, config=config)
        log.info("precision probe on %s: %s -> %s", m.machine, m.summary(), m.chosen)
        if m.settled:
            _write_cache(path, {**cached, key: asdict(m)})
    _MEASURED[key] = m
    return m


def probe_cpu(threads: int, key: str = "", rounds: int = 6, runs: int = 2, config=None) -> Measurement:
    """Time one layer of `config`'s model in the three CANDIDATES over `rounds` rounds and
    choose (`choose`)."""
    layer, tokens = _probe_layer(config)
    shape = layer_shape(config)
    flops = 2 * tokens * sum(p.numel() for n, p in layer["fp32"].named_parameters() if "embed" not in n)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timed = time_rounds(layer["run"], rounds, runs, threads)
    finally:
        torch.set_num_threads(previous)
    chosen, speedup, counted, settled = choose(timed)
    best = {c: min(r[c][0] for r in counted) for c in CANDIDATES}
    gflops = {c: flops / best[c] / 1e9 for c in CANDIDATES}
    return Measurement(
        machine=cpu_name(),
        key=key or machine_key(threads, shape),
        threads=threads,
        layer=shape,
        fp32_gflops=gflops["fp32"],
        autocast_gflops=gflops["autocast"],
        bf16_gflops=gflops["bf16"],
        speedup=speedup,
        chosen=chosen,
        rounds=len(timed),
        quiet_rounds=sum(_quiet(r) for r in timed),
        settled=settled,
        measured_at=time.time(),
    )


Round = dict[str, tuple[float, float]]  # candidate -> (best seconds, CPU share of that run)


def time_rounds(run, rounds: int, runs: int, threads: int) -> list[Round]:
    """`rounds` rounds, each timing every candidate `runs` times back to back (the order rotated
    every round): per candidate its best time and the share of `threads` cores it had meanwhile."""
    with torch.inference_mode():
        for c in CANDIDATES:
            run(c)  # warm-up: oneDNN's kernels for these shapes, the allocator
        out: list[Round] = []
        for r in range(rounds):
            row: Round = {}
            for c in CANDIDATES[r % 3 :] + CANDIDATES[: r % 3]:
                for _ in range(runs):
                    wall, cpu = time.perf_counter(), time.process_time()
                    run(c)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if c not in row or wall < row[c][0]:
                        row[c] = (wall, cpu / max(wall * threads, 1e-9))
            out.append(row)
            if row["bf16"][0] > 20 * row["fp32"][0] + 0.05:  # no bf16 hardware: no need for more rounds
                break
    return out


def _quiet(row: Round) -> bool:
    return all(share >= QUIET_SHARE for _, share in row.values())


def choose(timed: list[Round]) -> tuple[Precision, float, list[Round], bool]:
    """(chosen, bf16's speedup, the rounds counted, settled) from timed rounds. The speedup is the
    median over rounds of fp32's time over bf16 weights' time within the round; the rounds counted
    are the quiet ones where at least half were quiet, else all. Settled: at least half the rounds
    were quiet, or every round's ratio falls on the side of BF16_MIN_SPEEDUP the median does."""
    quiet = [r for r in timed if _quiet(r)]
    counted = quiet if 2 * len(quiet) >= len(timed) else timed
    ratios = [r["fp32"][0] / r["bf16"][0] for r in counted]
    speedup = statistics.median(ratios)
    chosen: Precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    agree = all((x >= BF16_MIN_SPEEDUP) == (chosen == "bf16") for x in (r["fp32"][0] / r["bf16"][0] for r in timed))
    return chosen, speedup, counted, counted is quiet or agree


def _probe_layer(config) -> tuple[dict[str, Any], int]:
    """One layer of `config`'s base model in fp32 and a bf16-weights copy, and `run(candidate)`
    over [B, T] random embeddings; and the tokens per run."""
    from transformers import AutoConfig, AutoModel

    if config is None:
        params = dict(DEFAULT_LAYER)
        config = AutoConfig.for_model(params.pop("model_type"), **params)
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    config.vocab_size = max(64, int(getattr(config, "pad_token_id", None) or 0) + 1)  # the embedding is not timed
    torch.manual_seed(0)
    fp32 = AutoModel.from_config(config).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    batch, seq = PROBE_TOKENS
    seq = min(seq, int(getattr(config, "max_position_embeddings", seq) or seq))
    x = torch.randn(batch, seq, config.hidden_size)  # [B, T, H]
    mask = torch.ones(batch, seq, dtype=torch.long)  # [B, T]
    cpu = torch.device("cpu")

    def run(candidate: str) -> None:
        if candidate == "fp32":
            fp32(inputs_embeds=x, attention_mask=mask)
        elif candidate == "autocast":
            with autocast("bf16", cpu):
                fp32(inputs_embeds=x, attention_mask=mask)
        else:
            with autocast("bf16", cpu):
                bf16(inputs_embeds=x.to(torch.bfloat16), attention_mask=mask)

    return {"fp32": fp32, "run": run}, batch * seq


def layer_shape(config) -> str:
    """The timed layer's shape, e.g. "llama 576x1536, 9/3 heads" (DEFAULT_LAYER's without a config)."""
    c = DEFAULT_LAYER if config is None else vars(config)
    heads = c.get("num_attention_heads")
    kv = c.get("num_key_value_heads") or heads
    return f"{c.get('model_type')} {c.get('hidden_size')}x{c.get('intermediate_size')}, {heads}/{kv} heads"


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


def machine_key(threads: int, shape: str = "") -> str:
    """What the measurement depends on: CPU model and flags, torch version, threads, layer shape."""
    blob = f"{cpu_name()}|{_cpu_flags()}|{torch.__version__}|{threads}|{shape or layer_shape(None)}"
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


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    except OSError as exc:  # a read-only home still gets the measurement, just not cached
        log.warning("could not cache the precision measurement in %s: %s", path, exc)


def describe(precision: str, device: torch.device, config=None) -> str:
    """One line for logs and benchmark tables: the precision and why it was chosen."""
    if device.type == "cuda":
        return f"{precision} on {torch.cuda.get_device_name(device)}"
    m = cpu_measurement(config=config)
    return f"{precision} on {m.machine} ({m.summary()})"
