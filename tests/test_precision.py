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


def test_auto_on_a_cpu_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_probe(threads, key="", **_):
        calls.append(threads)
        return Measurement("test cpu", key, threads, 100.0, 260.0, "bf16", 0.0)

    monkeypatch.setattr(precision, "probe_cpu", fake_probe)
    monkeypatch.setattr(precision, "_MEASURED", {})
    assert resolve_precision("auto", torch.device("cpu"), cache_dir=tmp_path) == "bf16"
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert [m["chosen"] for m in cached.values()] == ["bf16"]
    monkeypatch.setattr(precision, "_MEASURED", {})  # a new process: the file answers, no probe
    assert cpu_measurement(tmp_path).bf16_gflops == 260.0 and len(calls) == 1


def test_the_probe_measures_both_precisions_on_this_cpu():
    m = precision.probe_cpu(torch.get_num_threads(), rounds=2, runs=1)
    assert m.fp32_gflops > 0 and m.bf16_gflops > 0
    assert m.chosen == ("bf16" if m.bf16_gflops >= precision.BF16_MIN_SPEEDUP * m.fp32_gflops else "fp32")


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
