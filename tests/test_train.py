"""Bradley-Terry loss, metrics, head mode on a tiny backbone, registry gate, golden pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import store_with_hh
from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.train.heads import fit_heads
from rm_service.train.loss import bradley_terry_loss
from rm_service.train.metrics import expected_calibration_error, pair_metrics
from rm_service.train.run import train


def test_loss_matches_hand_computed_values():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326; -log sigmoid(-1) = 1.31326
    assert bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)
    with_margin = bradley_terry_loss(r_chosen, r_rejected, margin=torch.tensor([1.0, 0.0]))
    assert with_margin.item() == pytest.approx((math.log(2) + 1.3132617) / 2, abs=1e-6)
    centred = bradley_terry_loss(r_chosen, r_rejected, center_coef=0.1)
    assert centred.item() == pytest.approx((0.3132617 + 0.1 * 9 + 1.3132617 + 0.1 * 1) / 2, abs=1e-6)


def test_metrics_accuracy_loss_and_ece():
    m = pair_metrics(np.array([1.0, 2.0, 0.0, 0.5]), np.array([0.0, 1.0, 1.0, 0.5]))
    assert m["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert m["num_pairs"] == 4
    # Perfectly calibrated: confidence sigmoid(0) = 0.5 everywhere gives ECE 0.
    assert expected_calibration_error(np.zeros(10)) == pytest.approx(0.0)
    # Always confident and always wrong: ECE ~ confidence.
    assert expected_calibration_error(np.full(10, -10.0)) == pytest.approx(1 / (1 + math.exp(-10)), abs=1e-6)


def test_heads_learn_a_separable_preference():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    x = rng.normal(size=(400, 2, 8)).astype(np.float32)
    better = (x @ direction)[:, 0] > (x @ direction)[:, 1]
    h_w = np.where(better[:, None], x[:, 0], x[:, 1])
    h_l = np.where(better[:, None], x[:, 1], x[:, 0])
    fit = fit_heads(h_w[:300], h_l[:300], (h_w[300:], h_l[300:]), ensemble_size=3, learning_rate=0.05, weight_decay=0.0,
                    batch_size=64, max_steps=300, patience=300)
    held = pair_metrics((h_w[300:] @ fit.weight.T + fit.bias).mean(1), (h_l[300:] @ fit.weight.T + fit.bias).mean(1))
    assert held["accuracy"] > 0.9
    assert fit.weight.shape == (3, 8) and not np.allclose(fit.weight[0], fit.weight[1])  # bootstrap: members differ


def test_a_warm_start_begins_from_the_given_heads_and_keeps_them_when_nothing_beats_them():
    rng = np.random.default_rng(1)
    h_w, h_l = (rng.normal(3.0, 2.0, size=(200, 8)).astype(np.float32) for _ in range(2))  # features far from standard
    parent = (rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=2).astype(np.float32))
    # A learning rate too small to move them: the heads come back as they went in (the
    # standardisation is undone exactly), so a retrain that learns nothing serves its parent.
    fit = fit_heads(h_w[:150], h_l[:150], (h_w[150:], h_l[150:]), ensemble_size=2, learning_rate=1e-12, weight_decay=0.0,
                    batch_size=32, max_steps=20, patience=10, init=parent)
    np.testing.assert_allclose(fit.weight, parent[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fit.bias, parent[1], rtol=1e-4, atol=1e-4)
    cold = fit_heads(h_w[:150], h_l[:150], (h_w[150:], h_l[150:]), ensemble_size=2, learning_rate=1e-12, weight_decay=0.0,
                     batch_size=32, max_steps=20, patience=10)
    assert not np.allclose(cold.weight, parent[0], atol=1e-2)


@pytest.fixture
def trained(home, tiny_backbone_dir, tmp_path):
    """60 HH labels in a store and a head-mode model v1 trained on the tiny backbone."""
    store = store_with_hh(tmp_path, 60)
    settings = TrainSettings(backbone=str(tiny_backbone_dir), max_minutes=2, max_steps=50, ensemble_size=2, max_tokens=256,
                             heldout_fraction=0.2)
    result = train(store, settings, ModelSettings(), show_progress=False)
    yield store, result, settings
    store.close()


def test_train_registers_and_promotes_a_version(trained):
    store, result, _ = trained
    assert result.version == "v1" and result.promoted
    rec = registry.get_model(store, "v1")
    assert rec.status == "promoted" and rec.ensemble_size == 2 and rec.snapshot_id == "snap-000001"
    assert 0 <= rec.metrics["accuracy"] <= 1 and rec.metrics["train_pairs"] + rec.metrics["heldout_pairs"] == 60
    cached = store.con.execute("SELECT count(*) FROM features").fetchone()[0]
    assert cached == 120  # every completion's features cached once


def test_artifact_loads_and_scores_like_training(trained):
    store, _, _ = trained
    rec = registry.get_model(store, "v1")
    runtime, meta = registry.load_artifact(rec.artifact_path)
    assert runtime.spec.hash == rec.format_hash == meta["format_hash"]
    assert runtime.model.ensemble_size == 2 and len(meta["golden"]) == 4


def test_tampered_golden_pair_refuses_the_version(trained):
    store, _, _ = trained
    rec = registry.get_model(store, "v1")
    meta_path = f"{rec.artifact_path}/version.json"
    meta = json.loads(open(meta_path).read())
    meta["golden"][0]["raw_score"] += 1.0
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(FailedPrecondition, match="golden pair check failed"):
        registry.load_artifact(rec.artifact_path)


def test_retrain_reuses_cached_features_and_gate_refuses_worse(trained, monkeypatch):
    store, _, settings = trained
    computed = []
    import rm_service.train.head_mode as run

    original = run.put_features
    monkeypatch.setattr(run, "put_features", lambda s, b, f, ids, *a: (computed.extend(ids), original(s, b, f, ids, *a)))
    second = train(store, settings.model_copy(update={"promote": False}), ModelSettings(), show_progress=False, parent="v1")
    assert computed == []  # nothing new to compute
    assert registry.get_model(store, second.version).status == "candidate"
    # Same snapshot contents, same split: v1 scored on v2's held-out pairs is v1's own accuracy.
    assert second.metrics["baseline_accuracy"] == pytest.approx(registry.get_model(store, "v1").metrics["accuracy"])
    # Pretend v2 is much worse than v1 on v2's held-out pairs (though v1 scored low on its own):
    # the gate compares like with like, refuses v2 and keeps v1 promoted.
    store.con.execute("UPDATE models SET metrics = json_object('accuracy', 0.1, 'baseline_accuracy', 0.9) WHERE version = ?", [second.version])
    store.con.execute("UPDATE models SET metrics = json_object('accuracy', 0.05) WHERE version = 'v1'")
    ok, message = registry.promote(store, second.version, tolerance=0.02)
    assert not ok and "below v1" in message and "candidate's held-out pairs" in message
    assert registry.promoted(store).version == "v1" and registry.get_model(store, second.version).status == "rejected"


def test_a_retrain_warm_starts_from_the_promoted_heads(trained):
    store, _, settings = trained
    frozen = settings.model_copy(update={"promote": False, "learning_rate": 1e-12, "export_onnx": False})
    heads = lambda version: load_file(str(Path(registry.get_model(store, version).artifact_path) / "head.safetensors"))  # noqa: E731
    warm = train(store, frozen, ModelSettings(), show_progress=False)
    np.testing.assert_allclose(heads(warm.version)["weight"], heads("v1")["weight"], rtol=1e-4, atol=1e-6)
    assert warm.metrics["accuracy"] == pytest.approx(registry.get_model(store, "v1").metrics["accuracy"])
    cold = train(store, frozen.model_copy(update={"warm_start": False}), ModelSettings(), show_progress=False)
    assert not np.allclose(heads(cold.version)["weight"], heads("v1")["weight"], atol=1e-3)


def test_rollback_returns_to_the_previous_version(trained):
    store, _, settings = trained
    second = train(store, settings, ModelSettings(), show_progress=False, parent="v1")
    store.con.execute("UPDATE models SET metrics = json_object('accuracy', 0.5)")  # make the gate indifferent
    ok, _ = registry.promote(store, second.version, tolerance=0.02, force=True)
    assert ok and registry.promoted(store).version == second.version
    assert registry.rollback(store) == f"rolled back from {second.version} to v1"
    assert registry.promoted(store).version == "v1" and registry.get_model(store, second.version).status == "retired"


def test_eval_reports_overall_by_turns_and_by_length(trained):
    from rm_service.evaluate import evaluate_pairs, format_report, load_for_eval, snapshot_pairs

    store, _, settings = trained
    runtime, version = load_for_eval(None, store=store)
    pairs = snapshot_pairs(store, None, heldout_only=False)
    report = evaluate_pairs(runtime, pairs, show_progress=False)
    assert version == "v1" and report.overall["num_pairs"] == 60
    assert sum(m["num_pairs"] for m in report.by_turns.values()) == 60
    assert sum(m["num_pairs"] for m in report.by_length.values()) == 60
    assert set(report.by_turns) <= {"1 turn", "2 turns", "3 turns", "4+ turns"}
    table = format_report(version, report)
    assert table.splitlines()[2].startswith("| all | 60 |")
