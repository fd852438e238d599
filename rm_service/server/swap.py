"""Hot-swap with bounded memory, failed loads retried with backoff, and the model metrics.

A swap to a newly promoted version, in order:
 1. a version whose last load failed waits out its backoff (load_retry_s, doubled per failure
    up to load_retry_max_s);
 2. the swapped-out versions beyond max_loaded are released (server.models.release_for_load);
 3. its weights are estimated from their files (models.memory.estimate_load) and the load is
    refused, with the figures, when the resident versions plus its loading peak would pass the
    cap (weight_memory_gb; on CUDA by default 90% of the device, and never more than is free);
 4. it loads on a worker thread (golden pairs checked), keeps one copy of its weights in the
    served precision and is measured; the default switches to it.
The bytes held after each step, and on CUDA the allocator's peak over the load, are kept in
`ServedModels.last_swap` and exported as metrics; failures go to /health and the metrics too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.memory import GB, LoadEstimate, device_memory, estimate_load, peak_tracker
from rm_service.models.precision import resolve_precision
from rm_service.models.resolver import resolve
from rm_service.models.runtime import pick_device
from rm_service.models.version import read_meta
from rm_service.server.models import Served, ServedModels, load_version_dir
from rm_service.settings import ModelSettings, ServeSettings

log = logging.getLogger(__name__)
DEFAULT_CUDA_SHARE = 0.9  # weight_memory_gb 0 on CUDA: this share of the device's memory


def weight_cap(settings: ServeSettings, device: torch.device) -> int | None:
    """The most bytes the loaded versions' weights may take: the setting, else on CUDA 90% of the
    device's memory, else no cap."""
    if settings.weight_memory_gb > 0:
        return int(settings.weight_memory_gb * GB)
    memory = device_memory(device)
    return int(DEFAULT_CUDA_SHARE * memory[1]) if memory else None


def version_estimate(directory: str | Path, settings: ServeSettings, models: ModelSettings) -> LoadEstimate | None:
    """A version's weights from its files (backbone and heads); None when they cannot be read so."""
    try:
        meta = read_meta(directory)
        backbone = resolve(meta.backbone_dir(Path(directory)), models)
        device = pick_device(settings.device)
        from transformers import AutoConfig

        precision = resolve_precision(settings.precision, device, config=AutoConfig.from_pretrained(backbone))
        return estimate_load([backbone, Path(directory)], precision, device.type)
    except Exception as exc:  # noqa: BLE001 - no estimate means no check before loading; the load reports what is wrong
        log.info("no memory estimate for %s (%s); it loads unchecked", directory, exc)
        return None


def check_fits(served: ServedModels, version: str, estimate: LoadEstimate | None, cap: int | None, device) -> None:
    """Refuse (FailedPrecondition) a load that would pass the cap or the device's free memory."""
    if estimate is None:
        return
    resident = served.held_bytes()
    held = ", ".join(f"{v} {s.weight_bytes / GB:.2f} GB" for v, s in served.versions.items()) or "nothing"
    need = resident + estimate.load_peak_bytes
    if cap is not None and need > cap:
        raise FailedPrecondition(
            f"version {version} would not fit: {estimate.parameters / 1e9:.2f}B parameters, "
            f"{estimate.load_peak_bytes / GB:.2f} GB while loading beside {held} ({resident / GB:.2f} GB) "
            f"passes the cap of {cap / GB:.2f} GB (weight_memory_gb)"
        )
    memory = device_memory(device)
    if memory is not None and estimate.load_peak_bytes > memory[0]:
        raise FailedPrecondition(
            f"version {version} would not fit: {estimate.load_peak_bytes / GB:.2f} GB while loading, "
            f"{memory[0] / GB:.2f} GB free on {device} beside {held}"
        )


async def swap_to(
    served: ServedModels,
    version: str,
    load: Callable[[], Served],
    settings: ServeSettings,
    estimate: LoadEstimate | None = None,
    kind: str = "promoted",
) -> Served | None:
    """Load `version` with `load()` (bounded memory, see the module) and make it the default;
    None when it is waiting out a backoff or failed (recorded in served.failed)."""
    if served.waiting(version):
        return None
    device = pick_device(settings.device)
    released = served.release_for_load()
    before = served.held_bytes()
    try:
        check_fits(served, version, estimate, weight_cap(settings, device), device)
        peak = peak_tracker(device)
        log.info(
            "loading %s beside %s%s", version, served.default, f" (released {', '.join(released)})" if released else ""
        )
        new = await asyncio.get_running_loop().run_in_executor(None, load)
    except Exception as exc:  # noqa: BLE001 - a bad candidate must never take the server down
        failure = served.record_failure(version, str(exc), settings.load_retry_s, settings.load_retry_max_s)
        log.error(
            "could not load %s (attempt %d; next try in %.0fs); %s keeps serving: %s",
            version,
            failure.attempts,
            failure.next_try - time.monotonic(),
            served.default,
            exc,
        )
        return None
    during = served.held_bytes() + new.weight_bytes  # the old versions and the new one, all alive now
    device_peak = peak()
    served.swap_in(new, kind)
    peak_bytes = max(before, during) if device_peak is None else device_peak
    after = served.held_bytes()
    served.last_swap = {
        "version": version,
        "before_bytes": before,
        "new_bytes": new.weight_bytes,
        "peak_bytes": peak_bytes,
        "after_bytes": after,
    }
    log.info(
        "swapped to %s: weights %.3f GB before, %.3f GB at the peak, %.3f GB after",
        version,
        before / GB,
        peak_bytes / GB,
        after / GB,
    )
    return new


async def follow_registry(
    served: ServedModels, settings: ServeSettings, models: ModelSettings, interval: float
) -> None:
    """Poll promoted.json; hot-swap to each newly promoted version (forever, until cancelled)."""
    while True:
        await asyncio.sleep(interval)
        pointer = registry.read_promoted_pointer(models.artifacts_dir)
        if pointer is None or pointer["version"] == served.default:
            continue
        version, directory = pointer["version"], pointer["artifact_path"]
        if version in served.versions:  # a rollback to a version still loaded
            served.swap_in(served.versions[version], "rolled_back")
            continue
        if served.waiting(version):
            continue
        if version not in served.failed:
            log.info("promotion of %s seen", version)
        estimate = version_estimate(directory, settings, models)
        await swap_to(served, version, partial(load_version_dir, directory, settings, models), settings, estimate)


class ModelsCollector:
    """Prometheus families of the loaded versions, the last swap and the failed loads."""

    def __init__(self, served: ServedModels):
        self.served = served

    def collect(self):
        s = self.served
        weights = GaugeMetricFamily(
            "rm_model_weight_bytes", "Bytes of a loaded version's weights (measured storages).", labels=["version"]
        )
        for version, one in list(s.versions.items()):
            weights.add_metric([version], one.weight_bytes)
        yield weights
        yield GaugeMetricFamily(
            "rm_model_weight_bytes_held", "Bytes of weights all loaded versions hold together.", value=s.held_bytes()
        )
        if s.last_swap:
            yield GaugeMetricFamily(
                "rm_model_swap_peak_bytes",
                "The last hot-swap's peak: on CUDA the allocator's, else the weights held with both versions alive.",
                value=s.last_swap["peak_bytes"],
            )
        failures = CounterMetricFamily(
            "rm_model_load_failures", "Failed loads of a promoted version, by version.", labels=["version"]
        )
        for version, count in list(s.load_failures.items()):
            failures.add_metric([version], count)
        yield failures
        yield GaugeMetricFamily(
            "rm_model_load_failing", "Promoted versions that failed to load and are being retried.", value=len(s.failed)
        )
