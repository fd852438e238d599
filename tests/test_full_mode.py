"""Full mode: fine-tuning the backbone (or LoRA), resume, TRL checkpoints, torchrun DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, store_with_hh

from rm_service import registry
from rm_service.models.runtime import load_backbone_runtime
from rm_service.models.version import open_version
from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.train import full_mode
from rm_service.train.data import prepare_split
from rm_service.train.run import train


def _store_with_labels(tmp_path, n=40) -> Store:
    return store_with_hh(tmp_path, n)


def _fit_only_split(store, settings):
    """Every pair for fitting: no validation (no early stopping), no held-out measurement."""
    split = prepare_split(store, settings)
    split.validation, split.heldout = [], []
    return split


def _settings(backbone, **kw) -> TrainSettings:
    base = dict(
        backbone=str(backbone),
        mode="full",
        max_tokens=128,
        micro_batch_pairs=4,
        grad_accum=1,
        epochs=1.0,
        ensemble_size=2,
        heldout_fraction=0.2,
        max_minutes=5,
        eval_every=2,
        checkpoint_every=1,
        full_learning_rate=1e-3,
    )
    base.update(kw)
    return TrainSettings(**base)


def test_one_step_changes_every_trainable_parameter(home, tmp_path, tiny_backbone_dir):
    store = _store_with_labels(tmp_path, 8)
    settings = _settings(tiny_backbone_dir, max_pairs=4, heldout_fraction=0.01, epochs=1.0)
    split = _fit_only_split(store, settings)
    runtime = load_backbone_runtime(settings.backbone, 128, ensemble_size=2)
    before = {k: v.detach().clone() for k, v in runtime.model.named_parameters()}
    full_mode.fit_full_mode(
        runtime, split, settings, deadline=float("inf"), run_dir=tmp_path / "run", show_progress=False
    )
    unchanged = [k for k, v in runtime.model.named_parameters() if torch.equal(v, before[k])]
    assert unchanged == []
    store.close()


def test_full_mode_registers_a_version_that_serves_its_own_backbone(home, tmp_path, tiny_backbone_dir):
    store = _store_with_labels(tmp_path)
    result = train(store, _settings(tiny_backbone_dir), ModelSettings(), show_progress=False)
    rec = registry.get_model(store, result.version)
    runtime, meta = open_version(rec.artifact_path)  # golden pairs re-scored: must match training
    assert meta.mode == "full" and meta.backbone == "./backbone" and runtime.model.ensemble_size == 2
    assert result.metrics["full_steps"] >= 1 and result.metrics["tokens_per_s"] > 0
    base = load_backbone_runtime(str(tiny_backbone_dir), 128)
    moved = [
        k
        for k, v in runtime.model.backbone.state_dict().items()
        if not torch.equal(v, base.model.backbone.state_dict()[k])
    ]
    assert moved  # the served backbone is the fine-tuned one
    store.close()


def test_lora_trains_only_adapters_and_heads(home, tmp_path, tiny_backbone_dir):
    store = _store_with_labels(tmp_path, 8)
    settings = _settings(tiny_backbone_dir, lora_rank=4, max_pairs=4, heldout_fraction=0.01)
    split = _fit_only_split(store, settings)
    runtime = load_backbone_runtime(settings.backbone, 128, ensemble_size=2)
    base = {k: v.detach().clone() for k, v in runtime.model.backbone.state_dict().items()}
    full_mode.fit_full_mode(
        runtime, split, settings, deadline=float("inf"), run_dir=tmp_path / "run", show_progress=False
    )
    merged = runtime.model.backbone.state_dict()
    assert set(merged) == set(base)  # adapters merged back into plain weights
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith("weight") and "proj" in k for k in changed)  # only LoRA-targeted linears moved
    assert not any("norm" in k or "embed" in k for k in changed)
    store.close()


def test_a_trl_reward_checkpoint_trains_further(home, tmp_path, tiny_rm_dir):
    store = _store_with_labels(tmp_path, 8)
    settings = _settings(tiny_rm_dir, ensemble_size=1, max_pairs=4, heldout_fraction=0.01)
    split = _fit_only_split(store, settings)
    runtime = load_backbone_runtime(settings.backbone, 128)
    head_before = runtime.model.score.weight.detach().clone()
    from transformers import AutoModelForSequenceClassification

    trl_head = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).score.weight
    assert torch.equal(head_before, trl_head)  # starts from the checkpoint's trained head
    full_mode.fit_full_mode(
        runtime, split, settings, deadline=float("inf"), run_dir=tmp_path / "run", show_progress=False
    )
    assert not torch.equal(runtime.model.score.weight, head_before)
    store.close()


def test_an_interrupted_run_resumes_from_its_checkpoint(home, tmp_path, tiny_backbone_dir, monkeypatch):
    store = _store_with_labels(tmp_path, 24)
    settings = _settings(tiny_backbone_dir, heldout_fraction=0.01, epochs=2.0, ensemble_size=1)
    split = _fit_only_split(store, settings)
    total = -(-2 * len(split.fit) // 4)
    run = tmp_path / "run"
    calls = {"n": 0}
    real_decide = full_mode.decide

    def crash_after_three(flag, world):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the machine went away after step 3's checkpoint
        return real_decide(flag, world)

    monkeypatch.setattr(full_mode, "decide", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        full_mode.fit_full_mode(
            load_backbone_runtime(settings.backbone, 128), split, settings, float("inf"), run, show_progress=False
        )
    assert torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"] == 3
    monkeypatch.setattr(full_mode, "decide", real_decide)
    steps_run = []
    monkeypatch.setattr(full_mode.torch.optim.AdamW, "step", lambda self, *a, **k: steps_run.append(1) or None)
    scores = full_mode.fit_full_mode(
        load_backbone_runtime(settings.backbone, 128), split, settings, float("inf"), run, show_progress=False
    )
    assert scores.steps == total and len(steps_run) == total - 3  # continued, did not start over
    store.close()


def _torchrun_train(home, tiny_backbone_dir, *flags: str) -> subprocess.CompletedProcess:
    """`rm-service train --mode full` on two CPU processes under torchrun (gloo); it must succeed."""
    from rm_service.server.app import free_port

    env = {**os.environ, "RM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "rm_service.cli", "train", "--mode", "full", "--backbone", str(tiny_backbone_dir)]
    cmd += ["--max-tokens", "128", "--ensemble-size", "2", "--epochs", "1", *flags]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained v1 (full mode)" in result.stdout
    return result


@pytest.mark.slow
def test_torchrun_two_cpu_processes_on_gloo(home, tmp_path, tiny_backbone_dir):
    """End to end by nature (two torchrun ranks, each its own interpreter, torch and gloo): the slow
    tier. The default tier keeps the in-process checks of full mode above."""
    store = _store_with_labels(tmp_path, 24)
    store.close()
    _torchrun_train(home, tiny_backbone_dir)
    store = Store(StoreSettings())
    try:
        assert registry.get_model(store, "v1").status == "promoted"
        runtime, _ = open_version(registry.get_model(store, "v1").artifact_path)
        assert runtime.model.ensemble_size == 2
    finally:
        store.close()


def test_the_best_weights_wait_on_disk_and_come_back_at_the_end(home, tmp_path, tiny_backbone_dir):
    """Early stopping keeps no clone of the weights beside the model: the best trainable weights
    go to best.pt (host tensors) and are what the run ends with."""
    store = _store_with_labels(tmp_path, 40)
    settings = _settings(tiny_backbone_dir, ensemble_size=1, epochs=2.0, eval_every=1, full_learning_rate=1e-2)
    split = prepare_split(store, settings)
    assert split.validation
    runtime = load_backbone_runtime(settings.backbone, 128, ensemble_size=1)
    run = tmp_path / "run"
    scores = full_mode.fit_full_mode(runtime, split, settings, float("inf"), run, show_progress=False)
    best = torch.load(run / "best.pt")
    trainable = {k: v for k, v in runtime.model.named_parameters() if v.requires_grad}
    assert set(best) == set(trainable) and {v.device.type for v in best.values()} == {"cpu"}
    assert all(torch.equal(best[k], v.detach()) for k, v in trainable.items())
    assert "best" not in torch.load(run / "checkpoint.pt", weights_only=False)  # checkpoints hold no second copy
    assert scores.extra["best_validation_loss"] < float("inf")
    store.close()


def test_a_gpu_feature_never_reads_a_cpu_cached_one(tiny_backbone_dir):
    from rm_service.train.features import Candidate, feature_key

    runtime = load_backbone_runtime(str(tiny_backbone_dir), 128, device="cpu", precision="bf16")
    cpu = feature_key(runtime, Candidate(1, "last"))
    runtime.device = torch.device("cuda", 0)  # only the key is computed: no GPU needed
    gpu = feature_key(runtime, Candidate(1, "last"))
    assert cpu != gpu and ":cuda:" in gpu and ":cpu" not in cpu  # CPU keys are those caches already hold


def test_devices_are_checked_before_any_work():
    from rm_service.errors import FailedPrecondition
    from rm_service.models.runtime import pick_device
    from rm_service.train.ddp import World, device_for

    assert device_for(World(), "cuda:1", cuda_available=True) == "cuda:1"
    assert device_for(World(1, 2, 1), "auto", cuda_available=True) == "cuda:1"
    with pytest.raises(FailedPrecondition, match="CUDA_VISIBLE_DEVICES"):
        device_for(World(0, 2, 0), "cuda:1", cuda_available=True)
    if torch.cuda.device_count() < 8:
        with pytest.raises(FailedPrecondition, match="cuda:7"):
            pick_device("cuda:7")
    with pytest.raises(ValueError, match="device"):
        TrainSettings(device="gpu0")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_sharded_with_fsdp(home, tmp_path, tiny_backbone_dir):
    """FSDP2 over two gloo ranks: sharded training, validation on both ranks, a sharded
    checkpoint, and rank 0's unsharded model registered and served."""
    store = _store_with_labels(tmp_path, 40)
    store.close()
    flags = ["--sharding", "fsdp", "--eval-every", "1", "--heldout-fraction", "0.2", "--checkpoint-every", "1"]
    result = _torchrun_train(home, tiny_backbone_dir, *flags)
    assert "sharded with FSDP2 over 2 ranks" in result.stderr
    runs = list((home / "registry" / ".runs").iterdir())
    assert (runs[0] / "checkpoint.dcp" / ".metadata").exists() and (runs[0] / "best.pt").exists()
    store = Store(StoreSettings())
    try:
        runtime, _ = open_version(registry.get_model(store, "v1").artifact_path)  # golden pairs re-scored
        assert runtime.model.ensemble_size == 2
    finally:
        store.close()
