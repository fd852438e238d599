"""Bradley-Terry loss, metrics, head mode on a tiny backbone, registry gate, golden pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import store_with_hh

from rm_service import registry
from rm_service.errors import FailedPrecondition
from rm_service.models.version import open_version
from rm_service.settings import ModelSettings, TrainSettings
from rm_service.train.heads import L2_GRID, PairData, fit_heads, select_head
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


def _separable(n: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs whose preference follows a hidden direction: (chosen [n, dim], rejected [n, dim], direction)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    x = rng.normal(size=(n, 2, dim)).astype(np.float32)
    better = (x @ direction)[:, 0] > (x @ direction)[:, 1]
    return np.where(better[:, None], x[:, 0], x[:, 1]), np.where(better[:, None], x[:, 1], x[:, 0]), direction


def _data(h_w, h_l, weight=None) -> PairData:
    return PairData(h_w, h_l, np.ones(len(h_w)) if weight is None else weight, None, [f"c{i}" for i in range(len(h_w))])


def test_heads_learn_a_separable_preference():
    h_w, h_l, _ = _separable(400)
    fit = fit_heads(_data(h_w[:300], h_l[:300]), ensemble_size=3, l2=0.01)
    held = pair_metrics((h_w[300:] @ fit.weight.T + fit.bias).mean(1), (h_l[300:] @ fit.weight.T + fit.bias).mean(1))
    assert held["accuracy"] > 0.9
    assert fit.weight.shape == (3, 8) and not np.allclose(fit.weight[0], fit.weight[1])  # bootstrap: members differ
    items = np.concatenate([h_w[:300], h_l[:300]])
    np.testing.assert_allclose(
        (items @ fit.weight.T + fit.bias).mean(0), 0.0, atol=1e-4
    )  # each member centred on its items


def test_the_fit_is_exact_so_the_same_labels_give_the_same_heads_from_any_start():
    h_w, h_l, _ = _separable(300, seed=1)
    a = fit_heads(_data(h_w, h_l), ensemble_size=2, l2=0.3)
    b = fit_heads(_data(h_w, h_l), ensemble_size=2, l2=0.3, init=(np.ones((2, 8), np.float32), np.zeros(2, np.float32)))
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-3, atol=1e-4)


def test_the_penalty_regularises_and_weights_count():
    h_w, h_l, _ = _separable(60, dim=40, seed=2)  # few pairs, many features: unregularised it would overfit
    loose, tight = fit_heads(_data(h_w, h_l), 1, l2=1e-4), fit_heads(_data(h_w, h_l), 1, l2=3.0)
    assert np.linalg.norm(tight.weight) < 0.2 * np.linalg.norm(loose.weight)
    # Pairs given weight 0 do not move the heads: the fit equals the fit without them.
    weight = np.r_[np.ones(40), np.zeros(20)]
    np.testing.assert_allclose(
        fit_heads(_data(h_w, h_l, weight), 1, 0.3).weight,
        fit_heads(_data(h_w[:40], h_l[:40]), 1, 0.3).weight,
        rtol=1e-3,
        atol=1e-4,
    )


def test_selection_prefers_the_features_that_carry_the_preference():
    h_w, h_l, _ = _separable(300, seed=3)
    rng = np.random.default_rng(4)
    noise = _data(rng.normal(size=h_w.shape).astype(np.float32), rng.normal(size=h_l.shape).astype(np.float32))
    chosen = select_head({"noise": noise, "signal": _data(h_w, h_l)}, default_l2=0.3)
    assert chosen.name == "signal" and chosen.cv_loss < 0.5 and len(chosen.table) == 2 * len(L2_GRID)
    few = select_head({"signal": _data(h_w[:20], h_l[:20])}, default_l2=0.7)  # too few pairs to cross-validate
    assert (few.name, few.l2) == ("signal", 0.7)


@pytest.fixture
def trained(home, tiny_backbone_dir, tmp_path):
    """60 HH labels in a store and a head-mode model v1 trained on the tiny backbone."""
    store = store_with_hh(tmp_path, 60)
    settings = TrainSettings(
        backbone=str(tiny_backbone_dir), max_minutes=2, ensemble_size=2, max_tokens=256, heldout_fraction=0.2
    )
    result = train(store, settings, ModelSettings(), show_progress=False)
    yield store, result, settings
    store.close()


def test_train_registers_and_promotes_a_version(trained):
    store, result, _ = trained
    assert result.version == "v1" and result.promoted
    rec = registry.get_model(store, "v1")
    assert rec.status == "promoted" and rec.ensemble_size == 2 and rec.snapshot_id == "snap-000001"
    assert 0 <= rec.metrics["accuracy"] <= 1 and rec.metrics["train_pairs"] + rec.metrics["heldout_pairs"] == 60
    cached = store.con.execute(
        "SELECT count(DISTINCT completion_id), count(DISTINCT feature_key), count(*) FROM features"
    ).fetchone()
    assert cached == (120, 2, 240)  # every completion's features cached once per candidate (layer 1: last, mean)
    precision = open_version(rec.artifact_path)[1].precision  # the features' precision is part of their key
    assert all(
        f":{precision}:" in key for (key,) in store.con.execute("SELECT DISTINCT feature_key FROM features").fetchall()
    )


def test_artifact_loads_and_scores_like_training(trained):
    store, _, _ = trained
    rec = registry.get_model(store, "v1")
    runtime, meta = open_version(rec.artifact_path)
    assert runtime.spec.hash == rec.format_hash == meta.format_hash
    assert runtime.model.ensemble_size == 2 and len(meta.golden) == 4
    assert set(meta.golden[0].raw_scores) == {"fp32", "bf16"} and meta.info["features"] == meta.pooling.name


def tamper_golden(store, precision: str) -> str:
    """Move v1's first golden score recorded in `precision`; returns v1's directory."""
    rec = registry.get_model(store, "v1")
    meta_path = f"{rec.artifact_path}/version.json"
    meta = json.loads(open(meta_path).read())
    meta["golden"][0]["raw_scores"][precision] += 1.0
    open(meta_path, "w").write(json.dumps(meta))
    return rec.artifact_path


def test_tampered_golden_pair_refuses_the_version(trained):
    path = tamper_golden(trained[0], "fp32")
    with pytest.raises(FailedPrecondition, match="golden pair check failed"):
        open_version(path, precision="fp32")
    # The check runs in the precision served, against the score recorded for it: bf16 still loads.
    assert open_version(path, precision="bf16")[0].precision == "bf16"


def test_auto_serves_the_fastest_precision_whose_golden_items_pass(trained, tiny_backbone_dir, monkeypatch):
    """Where bf16 measures faster but a version's golden items fail in bf16, precision auto serves it
    in fp32 (where they pass); an explicit bf16 still refuses it."""
    from transformers import AutoConfig

    from rm_service.models import precision

    path = tamper_golden(trained[0], "bf16")
    with pytest.raises(FailedPrecondition, match="golden pair check failed"):
        open_version(path, precision="bf16")
    config = AutoConfig.from_pretrained(tiny_backbone_dir)
    threads = torch.get_num_threads()
    key = precision.machine_key(threads, precision.layer_shape(config))
    bf16_faster = precision.Measurement("cpu", key, threads, "llama", 100, 180, 200, 2.0, "bf16", 6, 6, True, 0)
    monkeypatch.setitem(precision._MEASURED, key, bf16_faster)
    assert precision.resolve_precision("auto", torch.device("cpu"), config=config) == "bf16"
    assert open_version(path, device="cpu")[0].precision == "fp32"


def test_retrain_reuses_cached_features_and_an_identical_retrain_is_undecided(trained, monkeypatch):
    store, _, settings = trained
    computed = []
    import rm_service.train.features as features

    original = features.put_features
    monkeypatch.setattr(
        features, "put_features", lambda s, b, f, ids, *a: (computed.extend(ids), original(s, b, f, ids, *a))
    )
    second = train(
        store, settings.model_copy(update={"promote": False}), ModelSettings(), show_progress=False, parent="v1"
    )
    assert computed == []  # nothing new to compute
    assert registry.get_model(store, second.version).status == "candidate"
    assert second.metrics["unchanged_from_parent"] == 1.0  # the same labels: the same heads, reported as such
    # Same snapshot contents, same split: v1 scored on v2's held-out pairs is v1's own accuracy.
    assert second.metrics["baseline_accuracy"] == pytest.approx(registry.get_model(store, "v1").metrics["accuracy"])
    # The same heads score every held-out pair alike: a zero gain, which the rule cannot call
    # better or worse. Recorded on the version, and what `models promote` decides on.
    decision = registry.get_model(store, second.version).decision
    assert decision["verdict"] == "undecided" and decision["parent"] == "v1"
    assert decision["human"]["gain"] == pytest.approx(0.0, abs=1e-6) and decision["human"]["pairs"] > 0
    ok, message = registry.promote(store, second.version, registry.stored_decision(store, second.version))
    assert not ok and message.startswith(f"{second.version} undecided: not distinguishable from its parent")
    assert registry.promoted(store).version == "v1" and registry.get_model(store, second.version).status == "candidate"


def test_rollback_returns_to_the_previous_version(trained):
    store, _, settings = trained
    second = train(store, settings, ModelSettings(), show_progress=False, parent="v1")
    ok, _ = registry.promote(store, second.version, force=True)
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


def test_a_corrupted_version_is_never_announced_as_promoted(trained, capsys):
    """Promotion loads the version and re-scores its golden items first: a broken artifact is
    rejected, the promoted version and promoted.json stay as they were."""
    from rm_service.cli import main

    store, _, settings = trained
    second = train(
        store, settings.model_copy(update={"promote": False, "seed": 3}), ModelSettings(), show_progress=False
    )
    directory = Path(registry.get_model(store, second.version).artifact_path)
    meta = json.loads((directory / "version.json").read_text())
    for g in meta["golden"]:
        g["raw_scores"] = {k: v + 5.0 for k, v in g["raw_scores"].items()}  # the files no longer match what was trained
    (directory / "version.json").write_text(json.dumps(meta))
    pointer = (directory.parent / "promoted.json").read_text()
    ok, why = registry.promote(store, second.version, force=True, verify=registry.load_check())
    assert not ok and "failed its load check" in why and "golden pair check failed" in why
    assert registry.get_model(store, second.version).status == "rejected" and registry.promoted(store).version == "v1"
    assert (directory.parent / "promoted.json").read_text() == pointer  # scorers were never told
    store.close()
    assert main(["models", "promote", second.version, "--force"]) == 1  # the CLI says so too, in one line
    assert "failed its load check" in capsys.readouterr().out
