"""The trainer in the shipped split topology (compose.yaml, deploy/k8s): a store-only process
(`serve --no-model`, which serves no RewardService) and two scorers (`serve --no-store`) that
follow the registry through promoted.json. The trainer watches the scorers, switches after each
promotion once both serve it, and recovers by asking the scorers when its pin was unloaded."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import HH_FILE, ServerThread, store_with_hh, tiny_settings, wait_until

from policy_trainer import train_ppo
from policy_trainer.trainer import PPOTrainer
from rm_service import registry
from rm_service.api.v1 import training_pb2, training_pb2_grpc
from rm_service.formats import import_file
from rm_service.settings import ModelSettings, ServeSettings, TrainSettings
from rm_service.train.run import train


@pytest.fixture
def split(home, tmp_path, tiny_backbone_dir):
    """(store, [scorer-1, scorer-2]): v1 (head mode, tiny backbone) promoted; the store retrains."""
    store = store_with_hh(tmp_path, 40)
    settings = TrainSettings(backbone=str(tiny_backbone_dir), ensemble_size=2, max_tokens=128, export_onnx="off")
    train(store, settings, ModelSettings(), show_progress=False)
    store.close()
    store_srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1), train=settings)
    scorers = [
        ServerThread(ServeSettings(port=0, with_store=False, metrics_port=-1, watch_interval_s=0.1, precision="fp32"))
        for _ in range(2)
    ]
    yield store_srv, scorers
    for srv in (*scorers, store_srv):
        srv.stop()


def promote_next(store_srv, scorers, tmp_path, lines: int) -> str:
    """New labels, a retrain through the store's TrainingService, promoted as an operator does
    (`models promote --force`: this test is about following versions, not the promotion rule),
    and both scorers serving it."""
    extra = tmp_path / f"more-{lines}.jsonl"
    extra.write_text("".join(HH_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]))
    import_file(store_srv.server.store, extra, "hh")
    with grpc.insecure_channel(store_srv.address) as channel:
        training = training_pb2_grpc.TrainingServiceStub(channel)
        job = training.RequestRetrain(training_pb2.RetrainRequest(promote=False, reason="test"), timeout=30)
        last = list(training.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=180))[-1]
    assert last.state == "succeeded", last
    promoted, why = registry.promote(store_srv.server.store, last.model_version, force=True)
    assert promoted, why
    wait_until(lambda: all(s.server.served.default == last.model_version for s in scorers), timeout=120)
    return last.model_version


def _split_settings(split, tiny_lm_dir, prompts_file, tmp_path, **kw):
    """A trainer that scores on both scorers and reads prompts and labels through the store process."""
    store_srv, scorers = split
    base = dict(prompts_per_step=4, samples_per_prompt=2, eval_prompts=0, plots=False, tensorboard=False)
    return tiny_settings(
        tiny_lm_dir,
        prompts_file,
        scorers[0].address,
        tmp_path / "run",
        reward_addresses=[s.address for s in scorers],
        store_address=store_srv.address,
        save_policy=False,
        **{**base, **kw},
    )


def test_the_trainer_follows_two_promotions_served_by_no_store_scorers(split, tiny_lm_dir, prompts_file, tmp_path):
    store_srv, scorers = split
    promoted = []

    def on_step(metrics):
        if metrics["step"] in (2, 4):
            promoted.append(promote_next(store_srv, scorers, tmp_path, 40 + 20 * len(promoted) + 20))
            time.sleep(0.5)  # the WatchModels events reach the trainer's watcher threads

    settings = _split_settings(split, tiny_lm_dir, prompts_file, tmp_path, follow_models=True, total_steps=6)
    summary = train_ppo(settings, on_step=on_step)

    v2, v3 = promoted
    assert summary.steps == 6 and summary.versions == ["v1", v2, v3]
    assert [m["rm/version"] for m in summary.metrics] == ["v1", "v1", v2, v2, v3, v3]  # switched between batches
    assert [sw["reason"] for sw in summary.switches] == ["promoted", "promoted"]
    assert all(set(s.server.served.versions) == {v2, v3} for s in scorers)  # v1 was unloaded by both


def test_a_trainer_pinned_to_an_unloaded_version_asks_the_scorers(split, tiny_lm_dir, prompts_file, tmp_path):
    """No watcher (follow_models off): after two promotions its v1 is gone from both scorers; the
    next batch scores with the scorers' default instead of failing."""
    store_srv, scorers = split
    settings = _split_settings(
        split, tiny_lm_dir, prompts_file, tmp_path, follow_models=False, total_steps=1, prompts_per_step=2,
        score_max_retries=1, score_backoff_s=0.01,
    )  # fmt: skip
    trainer = PPOTrainer(settings)
    try:
        assert trainer.version == "v1"
        promote_next(store_srv, scorers, tmp_path, 60)
        v3 = promote_next(store_srv, scorers, tmp_path, 80)
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary.metrics[0]["rm/version"] == v3
    assert summary.switches == [{"step": 1, "from_version": "v1", "to_version": v3, "reason": "v1 no longer loaded"}]
