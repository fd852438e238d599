"""Signal through the outer loop: a reward model as annotator, active selection, retrains that
fit fresh on-policy labels, and the gold reward tracked during PPO."""

from __future__ import annotations

import json
import random

import grpc
import numpy as np
import pytest
from conftest import ServerThread, store_with_hh, tiny_settings

from policy_trainer import train_ppo
from policy_trainer.logs import read_jsonl
from policy_trainer.outer_loop import candidates
from policy_trainer.selection import Group, acquisition, pair_doubt, select
from rm_service import registry
from rm_service.api.v1 import preference_pb2, preference_pb2_grpc
from rm_service.conversation import Message
from rm_service.judge.annotators import RewardAnnotator, reward_ranks
from rm_service.judge.items import JudgeItem
from rm_service.judge.runner import JudgeCounts, run_judge
from rm_service.judge.settings import JudgeSettings
from rm_service.settings import ModelSettings, ServeSettings, TrainSettings
from rm_service.store.labels import LabelIn
from rm_service.train.run import train

PROMPT = [Message("user", "Tell me about the river.")]
T_HEAVY = "the tide took the tree to the town"  # many words starting with "t"
T_LIGHT = "a boat moved slowly along a quiet bank"
T_SOME = "the boat moved along a quiet bank"


# -- the reward model as annotator -----------------------------------------------------------


def test_reward_ranks_are_dense_with_ties_under_the_margin():
    assert reward_ranks([0.1, 2.0, 1.0], 0.0) == [2, 0, 1]
    assert reward_ranks([1.0, 1.05, 0.0], 0.1) == [0, 0, 1]
    assert reward_ranks([3.0, 3.0], 0.0) == [0, 0]


def test_the_rm_annotator_labels_by_reward_with_bradley_terry_strength(property_rm_dir):
    settings = JudgeSettings(backend="rm", model=str(property_rm_dir), device="cpu")
    annotator = RewardAnnotator(str(property_rm_dir), settings)
    item = JudgeItem("k1", PROMPT, [T_LIGHT, T_HEAVY, T_SOME])
    rewards = annotator.rewards(item)
    assert rewards[1] > rewards[2] > rewards[0]  # the property model likes "t" words
    counts = JudgeCounts()
    label = annotator.annotate(item, counts)
    assert list(label.ranks) == [2, 0, 1] and label.source == preference_pb2.JUDGE
    assert label.strength == pytest.approx(rewards[1] - rewards[2], abs=1e-6)  # log-odds of the best over the next
    meta = dict(label.metadata)
    assert float(meta["rm_probability"]) == pytest.approx(1 / (1 + np.exp(-(rewards[1] - rewards[2]))), abs=1e-5)
    assert label.annotator.startswith(f"rm:{property_rm_dir.name}@") and counts.pair_judgments == 3
    assert annotator.annotate(item, JudgeCounts()).label_id == label.label_id  # the same item again: the same label id
    tie = RewardAnnotator(
        str(property_rm_dir), settings.model_copy(update={"rm_tie_margin": 1e6}), annotator.runtime, "x"
    )
    assert list(tie.annotate(item, JudgeCounts()).ranks) == [0, 0, 0]


def test_rm_judge_labels_a_file_into_the_store_with_provenance(home, tmp_path, property_rm_dir):
    srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1))
    try:
        path = tmp_path / "items.jsonl"
        path.write_text(
            "\n".join(
                json.dumps({"prompt": [m.as_dict() for m in PROMPT], "completions": pair})
                for pair in ([T_LIGHT, T_HEAVY], [T_HEAVY, T_SOME], [T_SOME, T_LIGHT])
            )
            + "\n"
        )
        settings = JudgeSettings(backend="rm", model=str(property_rm_dir), server=srv.address, device="cpu")
        counts = run_judge(settings, input_path=path, progress_file=tmp_path / "done")
        assert (counts.items, counts.labeled) == (3, 3)
        rows = srv.server.store.con.execute(
            "SELECT l.source, l.annotator, k.text FROM labels l JOIN label_rankings r USING (label_id) "
            "JOIN completions k ON k.id = r.completion_id WHERE r.rank = 0 ORDER BY l.seq"
        ).fetchall()
        assert sorted(r[2] for r in rows) == sorted([T_HEAVY, T_HEAVY, T_SOME])  # each pair's winner has more "t" words
        assert {r[0] for r in rows} == {"JUDGE"} and all(r[1].startswith("rm:") for r in rows)
    finally:
        srv.stop()


# -- active selection ------------------------------------------------------------------------


def _group(members: list[list[float]]) -> Group:
    return Group(PROMPT, [f"reply {i}" for i in range(len(members))], np.array(members, dtype=float))


def test_active_selection_picks_the_pairs_the_ensemble_doubts_most():
    sure = _group([[2.0, 2.1, 1.9, 2.0], [-2.0, -2.1, -1.9, -2.0]])  # members agree, rewards far apart
    split = _group([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])  # members disagree on the order
    close = _group([[0.02, 0.03, 0.02, 0.03], [0.0, 0.01, 0.0, 0.01]])  # members agree, rewards nearly equal
    assert acquisition(split) > acquisition(close) > acquisition(sure)
    assert acquisition(sure) < 1e-6 and 0.3 < acquisition(split) <= 0.5
    assert pair_doubt(np.array([1.0]), np.array([1.0])) == 0.5  # a single head: only closeness counts
    chosen = select([sure, split, close], 2, "uncertainty", random.Random(0))
    assert [g for g, _ in chosen] == [split, close]
    duplicate = Group(PROMPT, ["same", "same"], np.array([[1.0], [0.0]]))  # one distinct completion: no pair to label
    assert select([duplicate], 1, "uncertainty", random.Random(0)) == []
    drawn = {id(g) for _ in range(20) for g, _ in select([sure, split, close], 1, "random", random.Random(_))}
    assert len(drawn) == 3  # random draws every group sometimes


def test_the_most_doubted_candidate_is_leased_first(home):
    srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1))
    try:
        groups = [_group([[2.0, 2.1], [-2.0, -2.1]]), _group([[1.0, -1.0], [-1.0, 1.0]])]
        priorities = [int(round(1000 * acquisition(g))) for g in groups]
        batch = candidates(
            [[Message("user", f"Question {i}?")] for i in range(2)], [g.completions for g in groups], 3, {}, priorities
        )
        with grpc.insecure_channel(srv.address) as channel:
            stub = preference_pb2_grpc.PreferenceServiceStub(channel)
            stub.SubmitCandidates(preference_pb2.SubmitCandidatesRequest(candidates=batch), timeout=30)
            leased = stub.LeaseTasks(
                preference_pb2.LeaseTasksRequest(owner="t", max_tasks=1, lease_seconds=60), timeout=30
            ).tasks
        assert leased[0].prompt[0].content == "Question 1?" and priorities[1] > priorities[0]
        origin = srv.server.store.con.execute("SELECT DISTINCT origin FROM completions").fetchall()
        assert origin == [("policy@step-3",)]  # the policy's version, recorded once
    finally:
        srv.stop()


# -- retrains that move ----------------------------------------------------------------------


def test_a_retrain_on_labels_that_contradict_the_parent_changes_it_and_the_rule_sees_it(
    home, tmp_path, tiny_backbone_dir
):
    store = store_with_hh(tmp_path, 60)
    settings = TrainSettings(
        backbone=str(tiny_backbone_dir), ensemble_size=2, max_tokens=128, export_onnx="off", onpolicy_weight=8.0
    )
    v1 = train(store, settings, ModelSettings(), show_progress=False)
    from rm_service.models.version import open_version

    runtime, _ = open_version(registry.get_model(store, v1.version).artifact_path, precision="fp32")
    # Policy samples (origin policy@...), labeled against v1: the completion v1 scores lower wins.
    rng = random.Random(0)
    labels = []
    for i in range(120):
        prompt = [Message("user", f"Topic {i}: tell me something {rng.choice(['kind', 'odd', 'true', 'new'])}.")]
        a, b = f"Here is one answer number {i}.", f"Another reply, {rng.random():.4f}, that differs."
        r = runtime.run([runtime.format(prompt, a), runtime.format(prompt, b)], 4096).mean(axis=1)
        ranks = [1, 0] if r[0] > r[1] else [0, 1]
        labels.append(
            LabelIn(
                label_id=f"onpolicy-{i}", prompt=prompt, responses=[a, b], ranks=ranks, source="JUDGE", annotator="gold"
            )
        )
    assert all(o.status == "INSERTED" for o in store.ingest(labels, origin="policy@step-1"))
    v2 = train(store, settings, ModelSettings(), show_progress=False)
    m = v2.metrics
    # Cross-fitted: the version trains on every on-policy label, and every one is evidence once.
    assert m["onpolicy_train_pairs"] == 120 and m["pairs_onpolicy"] == 120 and m["gate_onpolicy_labels"] == 120
    assert m["baseline_accuracy_onpolicy"] < 0.2  # the parent gets the fresh labels wrong, by construction
    assert m["accuracy_onpolicy"] > m["baseline_accuracy_onpolicy"] + 0.3  # refits that never saw a pair fit it
    assert m["gate_onpolicy_low"] > 0 and v2.decision["verdict"] == "promote"
    assert "better than its parent on the policy's samples" in v2.decision["reason"]
    assert "unchanged_from_parent" not in m and v2.promoted and registry.promoted(store).version == v2.version
    # The same labels again: the heads come out the same; reported, and not promoted.
    v3 = train(store, settings, ModelSettings(), show_progress=False)
    assert (
        v3.metrics["unchanged_from_parent"] == 1.0
        and not v3.promoted
        and registry.promoted(store).version == v2.version
    )
    assert "gate_onpolicy_pairs" not in v3.metrics  # nothing labeled since v2's snapshot: no on-policy evidence
    store.close()


# -- the gold reward during PPO --------------------------------------------------------------


def test_gold_and_proxy_rewards_land_in_the_run_logs(
    home, tmp_path, tiny_lm_dir, prompts_file, property_rm_dir, antiproperty_rm_dir
):
    """The served proxy prefers "t" words, the pinned gold the opposite: as PPO raises the proxy
    the gold falls, and both land in events.jsonl and beside the steps' metrics, with KL."""
    srv = ServerThread(
        ServeSettings(
            port=0,
            model=str(property_rm_dir),
            also_load=[str(antiproperty_rm_dir)],
            with_store=False,
            metrics_port=-1,
            precision="fp32",
        )
    )
    try:
        settings = tiny_settings(
            tiny_lm_dir,
            prompts_file,
            srv.address,
            tmp_path / "run",
            eval_every=4,
            gold_address=srv.address,
            gold_version=antiproperty_rm_dir.name,
            plots=False,
            tensorboard=False,
            save_policy=False,
        )
        summary = train_ppo(settings)
    finally:
        srv.stop()
    evals = [
        e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "eval" and e["model"] == "policy"
    ]
    assert [e["step"] for e in evals] == [0, 4, 8, 12]
    first, last = evals[0], evals[-1]
    assert (
        last["reward_mean"] > first["reward_mean"] + 0.3 and last["gold_reward_mean"] < first["gold_reward_mean"] - 0.3
    )
    assert first["kl_seq"] == 0.0 and last["kl_seq"] > 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    logged = {m["step"]: m for m in metrics if "eval/gold_reward" in m}
    assert sorted(logged) == [4, 8]
    assert logged[8]["eval/sqrt_kl"] == pytest.approx(np.sqrt(logged[8]["eval/kl"]))
    assert summary.eval_after["gold_reward_mean"] == pytest.approx(last["gold_reward_mean"])
