"""Reward-specific metrics: a real server serving a trained version, known traffic, the values
scraped from its metrics port; the Grafana dashboard's queries name only scraped metrics."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import REPO, ServerThread, store_with_hh
from test_metrics import SCORE_METHOD, sample, scrape

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.models.version import read_meta
from rm_service.server.metrics import Metrics, Reference, pearson
from rm_service.settings import ModelSettings, ServeSettings, TrainSettings

DASHBOARD = REPO / "deploy" / "grafana" / "rm-service.json"
BUDGET = 2048


def declared(port: int) -> set[str]:
    """The sample names of every family the scrape declares, with or without samples yet (a
    labelled counter such as rm_dropped_items_total has none until its first drop)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    suffixes = {
        "counter": ("", "_total"),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
    }  # counters: TYPE names _total
    return {
        name + suffix
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
        for suffix in suffixes.get(kind, ("",))
    }


def _item(i: int, completion: str) -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(
        id=str(i),
        prompt=[common_pb2.Message(role="user", content=f"Tell me about bread, part {i}.")],
        completion=completion,
    )


def test_reward_metrics_after_known_traffic(home, tiny_backbone_dir, tmp_path):
    from rm_service.train.run import train

    store = store_with_hh(tmp_path, 60)
    result = train(
        store,
        TrainSettings(
            backbone=str(tiny_backbone_dir),
            max_minutes=2,
            ensemble_size=2,
            max_tokens=256,
            heldout_fraction=0.2,
            export_onnx="off",
        ),
        ModelSettings(),
        show_progress=False,
    )
    store.close()
    directory = ModelSettings().artifacts_dir / result.version
    meta = read_meta(directory)
    # Training records the reference statistics serving compares with.
    assert meta.metrics["reference_items"] == 2 * meta.metrics["train_pairs"]
    assert -1 <= meta.metrics["reference_length_correlation"] <= 1

    srv = ServerThread(
        ServeSettings(
            port=0,
            model=str(directory),
            with_store=False,
            metrics_port=0,
            max_inflight_items=8,
            max_batch_tokens=BUDGET,
            precision="fp32",
        )
    )
    try:
        completions = ["Knead it. " * k + "Bake it." * (k % 3) for k in range(1, 16)] + [
            "Flour and water and time. " * 120
        ]
        results = []
        with grpc.insecure_channel(srv.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            for i, c in enumerate(completions):  # one item per call, one after another: one item per batch
                results += stub.Score(reward_pb2.ScoreRequest(items=[_item(i, c)]), timeout=30).results
            with pytest.raises(grpc.RpcError) as err:  # 9 items > max_inflight_items: refused at admission
                stub.Score(reward_pb2.ScoreRequest(items=[_item(i, "x") for i in range(9)]), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        deadline = time.monotonic() + 10
        m = scrape(srv.server.metrics_port)
        while (
            sample(m, "rm_rpc_seconds_count", method=SCORE_METHOD) != len(completions) + 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
            m = scrape(srv.server.metrics_port)
        v = meta.version
        raw = np.array([r.raw_score for r in results])
        reward = np.array([r.reward for r in results])
        tokens = np.array([r.num_tokens for r in results])
        lengths = np.array([len(c) for c in completions], dtype=float)
        n = len(completions)

        # The served reward's distribution, per version.
        assert sample(m, "rm_reward_count", version=v) == n
        for le in ("-1.0", "0.0", "1.0", "+Inf"):
            assert sample(m, "rm_reward_bucket", version=v, le=le) == int((reward <= float(le)).sum()), le
        assert 0 < (reward <= 0).sum() < n  # the traffic straddles the bucket: the assertion above can fail
        # Tokens per item and truncation.
        assert sample(m, "rm_item_tokens_sum", version=v) == tokens.sum()
        assert sample(m, "rm_item_tokens_count", version=v) == n
        truncated = sum(r.truncated for r in results)
        assert truncated == 1 and tokens.max() == 256
        assert sample(m, "rm_truncated_items_total", version=v) == truncated
        # Batches of one item each: fill = that item's tokens / the budget.
        assert sample(m, "rm_batch_fill_ratio_count") == n
        assert sample(m, "rm_batch_fill_ratio_sum") == pytest.approx(tokens.sum() / BUDGET, rel=1e-9)
        assert sample(m, "rm_stage_seconds_count", stage="queue_wait") == n
        # Drift from the version's reference statistics, over the window.
        assert sample(m, "rm_reward_window_items", version=v) == n
        assert sample(m, "rm_raw_score_window_mean", version=v) == pytest.approx(raw.mean(), abs=1e-5)
        assert sample(m, "rm_raw_score_window_std", version=v) == pytest.approx(raw.std(), rel=1e-4)
        assert sample(m, "rm_raw_score_reference_mean", version=v) == pytest.approx(meta.reward_mean)
        assert sample(m, "rm_raw_score_reference_std", version=v) == pytest.approx(meta.reward_std)
        assert sample(m, "rm_raw_score_drift_mean", version=v) == pytest.approx(
            (raw.mean() - meta.reward_mean) / meta.reward_std, abs=1e-4
        )
        assert sample(m, "rm_raw_score_drift_std_ratio", version=v) == pytest.approx(
            raw.std() / meta.reward_std, rel=1e-4
        )
        # The served reward is the raw score normalised with the same statistics.
        np.testing.assert_allclose(reward, (raw - meta.reward_mean) / meta.reward_std, atol=1e-4)
        # Length vs reward.
        assert sample(m, "rm_reward_length_correlation", version=v) == pytest.approx(
            np.corrcoef(lengths, raw)[0, 1], abs=1e-4
        )
        assert sample(m, "rm_reward_length_correlation_reference", version=v) == pytest.approx(
            meta.metrics["reference_length_correlation"]
        )

        # Every metric the dashboard queries is in this scrape.
        exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
        names = {name for e in exprs for name in re.findall(r"\brm_[a-z0-9_]+", e)}
        scraped = {name for name, _ in m} | declared(srv.server.metrics_port)
        assert len(names) >= 15 and not names - scraped, sorted(names - scraped)
    finally:
        srv.stop()


def test_dashboard_is_grafana_json_with_a_query_per_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"]), panel[
            "title"
        ]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "version"}


def test_windows_drift_and_correlation_by_hand():
    metrics = Metrics()
    raw = np.array([1.0, 2.0, 3.0, 4.0])
    metrics.observe_scores(
        "v7",
        raw,
        (raw - 2.0) / 0.5,
        [10, 20, 30, 40],
        [False, True, False, True],
        [5, 10, 15, 21],
        Reference(2.0, 0.5, 0.25),
    )
    metrics.observe_scores("ext", [0.5, 0.5], [0.5, 0.5], [8, 8], [False, False], [3, 4], None)
    get = metrics.registry.get_sample_value
    assert get("rm_raw_score_drift_mean", {"version": "v7"}) == pytest.approx((2.5 - 2.0) / 0.5)
    assert get("rm_raw_score_drift_std_ratio", {"version": "v7"}) == pytest.approx(np.std(raw) / 0.5)
    assert get("rm_reward_length_correlation", {"version": "v7"}) == pytest.approx(
        np.corrcoef([5, 10, 15, 21], raw)[0, 1]
    )
    assert get("rm_reward_length_correlation_reference", {"version": "v7"}) == 0.25
    assert get("rm_truncated_items_total", {"version": "v7"}) == 2
    assert get("rm_reward_bucket", {"version": "v7", "le": "0.0"}) == 2  # rewards -2, 0, 2, 4
    # No reference (an external checkpoint): no drift; a constant score: no correlation.
    assert get("rm_raw_score_drift_mean", {"version": "ext"}) is None
    assert get("rm_reward_length_correlation", {"version": "ext"}) is None
    assert get("rm_reward_window_items", {"version": "ext"}) == 2
    assert pearson(np.array([1.0, 2.0]), np.array([3.0, 4.0])) is None  # fewer than 3 points
