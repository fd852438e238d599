"""Precision by measurement, and the device/dtype decisions of the GPU path that a CPU can check."""

from __future__ import annotations

import json

import pytest
import torch

from rm_service.models import precision
from rm_service.models.precision import GOLDEN_TOLERANCE, Measurement, cpu_measurement, resolve_precision
from rm_service.train.ddp import World, backend_for, device_for


def test_explicit_precisions_are_taken_as_given():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("fp16", torch.device("cpu"))


def measurement(key: str, threads: int, chosen: str, settled: bool = True) -> Measurement:
    """A measurement as the probe returns it (for the tests of what is cached and served)."""
    fp32, bf16 = (100.0, 260.0) if chosen == "bf16" else (100.0, 40.0)
    return Measurement("test cpu", key, threads, "llama", fp32, bf16 * 0.8, bf16, bf16 / fp32, chosen, 6, 6, settled, 0)


def test_auto_on_a_cpu_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def probe(threads, key="", **_):
        calls.append(threads)
        return measurement(key, threads, "bf16")

    monkeypatch.setattr(precision, "probe_cpu", probe)
    monkeypatch.setattr(precision, "_MEASURED", {})
    assert resolve_precision("auto", torch.device("cpu"), cache_dir=tmp_path) == "bf16"
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert [m["chosen"] for m in cached.values()] == ["bf16"]
    monkeypatch.setattr(precision, "_MEASURED", {})  # a new process: the file answers, no probe
    assert cpu_measurement(tmp_path).bf16_gflops == 260.0 and len(calls) == 1


def test_a_choice_the_rounds_did_not_settle_is_not_cached(tmp_path, monkeypatch):
    """Measured on a busy machine without a clear answer: this process uses it, the next start measures again."""
    calls = []

    def probe(threads, key="", **_):
        calls.append(threads)
        return measurement(key, threads, "fp32", settled=False)

    monkeypatch.setattr(precision, "probe_cpu", probe)
    monkeypatch.setattr(precision, "_MEASURED", {})
    assert resolve_precision("auto", torch.device("cpu"), cache_dir=tmp_path) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), cache_dir=tmp_path) == "fp32" and len(calls) == 1
    assert not (tmp_path / "precision.json").exists()
    monkeypatch.setattr(precision, "_MEASURED", {})
    resolve_precision("auto", torch.device("cpu"), cache_dir=tmp_path)
    assert len(calls) == 2


def rounds(*per_round: tuple[float, float]) -> list[dict]:
    """Timed rounds from (bf16 speedup, CPU share) pairs: fp32 takes 0.1 s, autocast 0.06 s."""
    return [
        {"fp32": (0.1, share), "autocast": (0.06, share), "bf16": (0.1 / speedup, share)}
        for speedup, share in per_round
    ]


def test_a_quiet_machine_chooses_bf16_weights_where_they_beat_fp32():
    chosen, speedup, counted, settled = precision.choose(rounds(*[(2.0, 0.97)] * 5, (1.8, 0.95)))
    assert (chosen, speedup, len(counted), settled) == ("bf16", 2.0, 6, True)


def test_rounds_without_the_cores_do_not_decide():
    """Two rounds under load measured bf16 slower; the four quiet ones decide, and settle it."""
    chosen, speedup, counted, settled = precision.choose(rounds(*[(2.0, 0.95)] * 4, (0.84, 0.55), (0.7, 0.6)))
    assert (chosen, speedup, len(counted), settled) == ("bf16", 2.0, 4, True)


def test_a_busy_machine_compares_within_rounds():
    """Every round under load: fp32 and bf16 are compared within each round (load hits both alike)
    and the median decides; a verdict the rounds disagree on is not settled."""
    chosen, speedup, _, settled = precision.choose(rounds((2.4, 0.6), (0.9, 0.5), (1.9, 0.6), (1.7, 0.55)))
    assert (chosen, round(speedup, 2), settled) == ("bf16", 1.8, False)
    chosen, _, _, settled = precision.choose(rounds((1.6, 0.5), (1.9, 0.6), (1.7, 0.55)))
    assert (chosen, settled) == ("bf16", True)  # loaded, but every round agrees


def test_without_bf16_hardware_fp32_is_chosen_and_settled():
    chosen, speedup, _, settled = precision.choose(rounds((0.04, 0.97), (0.05, 0.6)))
    assert (chosen, settled) == ("fp32", True) and speedup < 0.1


def test_the_probe_times_three_ways_on_a_layer_of_the_model(tiny_backbone_dir):
    """Real timings on this CPU, of one layer built from the model's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_backbone_dir)
    m = precision.probe_cpu(torch.get_num_threads(), rounds=2, runs=1, config=config)
    assert m.fp32_gflops > 0 and m.autocast_gflops > 0 and m.bf16_gflops > 0 and m.rounds == 2
    assert m.layer == precision.layer_shape(config) and m.layer.startswith("llama ")
    assert m.chosen == ("bf16" if m.speedup >= precision.BF16_MIN_SPEEDUP else "fp32")
    assert m.key != precision.machine_key(m.threads)  # keyed by the layer's shape, not the default's


def test_every_precision_has_one_golden_tolerance_and_bf16_is_looser():
    assert set(GOLDEN_TOLERANCE) == set(precision.PRECISIONS) and GOLDEN_TOLERANCE["bf16"] > GOLDEN_TOLERANCE["fp32"]


@pytest.mark.parametrize(
    ("world", "cuda", "expected"),
    [
        (World(0, 1, 0), False, "cpu"),
        (World(1, 2, 1), False, "cpu"),  # gloo on CPUs
        (World(0, 1, 0), True, "cuda"),
        (World(3, 4, 1), True, "cuda:1"),  # each rank on the GPU of its local rank, not all on cuda:0
    ],
)
def test_each_torchrun_rank_trains_on_its_own_device(world, cuda, expected):
    assert device_for(world, "auto", cuda_available=cuda) == expected
    assert backend_for(cuda) == ("nccl" if cuda else "gloo")


def test_heads_and_inputs_follow_the_backbone_device(tiny_backbone_dir):
    """Head mode installs its fitted heads on the runtime's device (they were fitted on the
    CPU), in fp32 whatever the autocast precision."""
    import numpy as np

    from rm_service.models.pooling import Pooling
    from rm_service.models.runtime import load_backbone_runtime
    from rm_service.train.head_mode import install

    runtime = load_backbone_runtime(str(tiny_backbone_dir), 64, precision="bf16")
    install(runtime, Pooling(layers=(1,), method="mean"), np.ones((2, 32), np.float32), np.zeros(2, np.float32))
    assert runtime.model.score.weight.device == runtime.device and runtime.model.score.weight.dtype == torch.float32
    from rm_service.conversation import Message

    out = runtime.run([runtime.format([Message("user", "Hi?")], "Hello.")], 64)
    assert out.dtype == np.float32 and out.shape == (1, 2)
