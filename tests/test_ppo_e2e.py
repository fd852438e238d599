"""PPO end to end against real reward servers on port 0, with a tiny config-built policy.

The reward model is a TRL-style LlamaForSequenceClassification whose weights are set by hand
so that it prefers a property: its score grows with the share of tokens that are words
starting with "t" (" the", " to", " that", ... in the tiny BPE vocabulary). How: every
embedding is [0, 1, ..., 1] except those tokens', which have a 1 in dimension 0; queries and
keys are zero, so attention averages the values over the sequence; the value projection
reads dimension 0 and the output projection writes it back scaled by 10; the MLP is zero; the
score head reads dimension 0 of the final RMS-normed state. The score is therefore an
increasing function of that share. The policy starts near uniform over 600 tokens (about
2.8% of them are such words), so the reward has room to rise, and the KL to the reference
tells how far the policy moved.
"""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
import torch
from conftest import ServerThread, preferred_tokens, store_with_hh, tiny_settings

from policy_trainer import train_ppo
from policy_trainer.logs import read_jsonl
from rm_service import registry
from rm_service.api.v1 import preference_pb2, preference_pb2_grpc
from rm_service.settings import ModelSettings, ServeSettings, TrainSettings
from rm_service.train.run import train


@pytest.fixture
def property_server(home, property_rm_dir):
    srv = ServerThread(ServeSettings(port=0, model=str(property_rm_dir), with_store=False, metrics_port=-1))
    yield srv
    srv.stop()


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_ppo_raises_the_served_reward_while_kl_stays_bounded(
    property_server, tiny_lm_dir, prompts_file, tmp_path, estimator
):
    seen = []
    settings = tiny_settings(
        tiny_lm_dir, prompts_file, property_server.address, tmp_path / "run", advantage_estimator=estimator
    )
    summary = train_ppo(settings, on_step=seen.append)

    assert [m["step"] for m in seen] == list(range(1, 13))
    first, last = seen[:3], seen[-3:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    assert mean(last, "reward/served_mean") > mean(first, "reward/served_mean") + 0.3
    assert summary.eval_after["reward_mean"] > summary.eval_before["reward_mean"] + 0.3  # held-out prompts, same draws
    assert max(m["kl/ref_seq"] for m in seen) < 15.0  # nats per 12-token sequence; uniform-to-one-token would be ~77
    assert 0 < summary.eval_after["kl_seq"] < 15.0
    # what the run leaves behind
    run = tmp_path / "run"
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, 13))
    assert (run / "reward.png").stat().st_size > 0 and (run / "kl.png").stat().st_size > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "policy" / "config.json").exists() and (run / "policy" / "value_head.safetensors").exists()
    for key in (
        "reward/served_std",
        "policy/entropy",
        "policy/clipfrac",
        "loss/value",
        "policy/approx_kl",
        "response/length_mean",
        "time/generate_s",
        "time/score_s",
        "time/train_s",
    ):
        assert all(isinstance(m[key], float) for m in seen), key
    assert {m["rm/version"] for m in seen} == {property_server.server.served.default}


def test_resume_continues_exactly(property_server, tiny_lm_dir, prompts_file, tmp_path):
    common = dict(total_steps=4, checkpoint_every=2, plots=False, tensorboard=False, save_policy=False, eval_prompts=0)
    straight = train_ppo(tiny_settings(tiny_lm_dir, prompts_file, property_server.address, tmp_path / "a", **common))
    train_ppo(
        tiny_settings(
            tiny_lm_dir, prompts_file, property_server.address, tmp_path / "b", **{**common, "total_steps": 2}
        )
    )
    resumed = train_ppo(
        tiny_settings(tiny_lm_dir, prompts_file, property_server.address, tmp_path / "b", **common, resume=True)
    )

    assert [m["step"] for m in resumed.metrics] == [3, 4]
    drop = ("time/", "outer/")
    same = lambda m: {k: v for k, v in m.items() if not k.startswith(drop)}
    assert [same(m) for m in resumed.metrics] == [same(m) for m in straight.metrics[2:]]
    a = torch.load(tmp_path / "a" / "checkpoints" / "step-000004.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "step-000004.pt", weights_only=False)
    for name, tensor in a["policy"].items():
        assert torch.equal(tensor, b["policy"][name]), name
    assert a["kl_ctl"] == b["kl_ctl"] and a["moments"] == b["moments"]
    assert [m["step"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_resumed_run_drops_log_lines_written_after_its_checkpoint(tmp_path):
    from policy_trainer.logs import RunLogger

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 6)))
    (tmp_path / "events.jsonl").write_text(
        json.dumps({"event": "eval", "step": 0}) + "\n" + json.dumps({"event": "x", "step": 4}) + "\n"
    )
    RunLogger(
        tmp_path, total_steps=10, start_step=3, tensorboard=False, progress=False
    ).close()  # the crash came at step 5
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "events.jsonl")] == [0]
    RunLogger(tmp_path, total_steps=10, start_step=0, tensorboard=False, progress=False).close()  # a fresh run
    assert read_jsonl(tmp_path / "metrics.jsonl") == [] and read_jsonl(tmp_path / "events.jsonl") == []


# -- the outer loop ------------------------------------------------------------------------


class Labeler:
    """Stands in for a judge: leases queued candidates and ranks them (more "t" words first)."""

    def __init__(self, address: str, tokenizer):
        self.channel = grpc.insecure_channel(address)
        self.stub = preference_pb2_grpc.PreferenceServiceStub(self.channel)
        self.preferred = set(preferred_tokens(tokenizer))
        self.tokenizer = tokenizer
        self.labeled = 0

    def key(self, text: str) -> int:
        return sum(i in self.preferred for i in self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label(self, task) -> preference_pb2.Label:
        keys = [self.key(c) for c in task.completions]
        levels = sorted(set(keys), reverse=True)
        ranks = [levels.index(k) for k in keys]  # dense: 0 is best, equal keys tie
        if len(levels) == 1:  # all tied: break by length so that the label gives pairs
            levels = sorted({len(c) for c in task.completions}, reverse=True)
            ranks = [levels.index(len(c)) for c in task.completions]
        return preference_pb2.Label(
            label_id=str(uuid.uuid4()),
            prompt=task.prompt,
            responses=task.completions,
            ranks=ranks,
            source=preference_pb2.JUDGE,
            annotator="test-labeler",
            task_id=task.task_id,
        )

    def drain(self) -> None:
        """Label every task queued now."""
        while True:
            tasks = self.stub.LeaseTasks(
                preference_pb2.LeaseTasksRequest(owner="test-labeler", max_tasks=16, lease_seconds=60), timeout=30
            ).tasks
            if not tasks:
                return
            out = self.stub.IngestLabels(
                preference_pb2.IngestLabelsRequest(labels=[self.label(t) for t in tasks]), timeout=30
            )
            self.labeled += sum(r.status == preference_pb2.INSERTED for r in out.results)


@pytest.fixture
def store_server(home, tmp_path, tiny_backbone_dir):
    """A server owning a store with 40 HH labels and v1 (head mode, tiny backbone) promoted;
    its TrainingService retrains with the same settings and decides by the promotion rule."""
    store = store_with_hh(tmp_path, 40)
    settings = TrainSettings(backbone=str(tiny_backbone_dir), ensemble_size=2, max_tokens=128, export_onnx="off")
    train(store, settings, ModelSettings(), show_progress=False)
    store.close()
    srv = ServerThread(ServeSettings(port=0, watch_interval_s=0.1, metrics_port=-1), train=settings)
    yield srv
    srv.stop()


def test_outer_loop_labels_retrains_and_switches_versions(
    store_server, tiny_lm_dir, prompts_file, tiny_tokenizer, tmp_path
):
    labeler = Labeler(store_server.address, tiny_tokenizer)
    store = store_server.server.store

    def settle(metrics):
        """Between steps, the slow side paths finish (on this CPU the policy would outrun
        them): every candidate submitted so far labeled, every retraining job decided, a
        promotion served. The run is then the same sequence every time."""
        labeler.drain()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with store._lock:
                busy = store.con.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
            if not busy[0] and store_server.server.served.default == registry.promoted(store).version:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # the WatchModels event reaches the trainer's watcher thread

    settings = tiny_settings(
        tiny_lm_dir,
        prompts_file,
        store_server.address,
        tmp_path / "run",
        total_steps=8,
        follow_models=True,
        submit_every=1,
        submit_fraction=0.5,
        retrain_min_labels=4,
        retrain_max_labels=8,
        retrain_check_every=1,
        eval_prompts=0,
        plots=False,
        tensorboard=False,
        save_policy=False,
    )
    try:
        summary = train_ppo(settings, on_step=settle)
    finally:
        labeler.channel.close()

    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert "candidates_submitted" in kinds and labeler.labeled >= 4
    requested = next(e for e in events if e["event"] == "retrain_requested")
    assert requested["labels_since_snapshot"] >= 4
    # Every decision is logged with its evidence: per group the pairs, the gain and its interval.
    decided = [e for e in events if e["event"] == "retrain_finished"]
    assert decided and all(e["decision"] in ("promote", "reject", "undecided") and e["reason"] for e in decided)
    assert all(e["evidence"]["onpolicy"]["pairs"] > 0 and "gain" in e["evidence"]["human"] for e in decided)
    assert all(e["next_retrain_labels"] >= 4 for e in decided)
    promoted = [e for e in decided if e["decision"] == "promote"]
    assert promoted, [(e["decision"], e["reason"]) for e in decided]  # the labeler's taste is learnable: it shows
    first = promoted[0]["model_version"]
    switch = next(e for e in events if e["event"] == "version_switch")
    assert switch["from_version"] == "v1" and switch["to_version"] == first and switch["step"] > requested["step"]
    assert summary.versions[:2] == ["v1", first]  # more labels may bring another version before the run ends
    m = registry.get_model(store, first).metrics
    assert m["gate_verdict"] == 2.0 and m["pairs_onpolicy"] > 0
    versions = [m["rm/version"] for m in summary.metrics]
    k = switch["step"] - 1
    assert set(versions[:k]) == {"v1"} and versions[k] == first  # switched between batches
    after = summary.metrics[k]
    # reward statistics started over with the new version: they hold its first batch alone
    assert after["reward/running_mean"] == pytest.approx(after["reward/served_mean"], abs=1e-5)
    with grpc.insecure_channel(store_server.address) as channel:
        stats = preference_pb2_grpc.PreferenceServiceStub(channel).GetStats(
            preference_pb2.GetStatsRequest(), timeout=30
        )
    assert stats.labels_by_source["JUDGE"] == labeler.labeled
