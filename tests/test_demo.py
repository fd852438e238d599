"""`rm-service demo` end to end with tiny models: import, v1, server, judge, PPO with the
outer loop (retrain requested, v2 promoted, trainer switches), report."""

from __future__ import annotations

import json
import os

import pytest
from conftest import HH_FILE

from rm_service.demo import run_demo
from rm_service.demo.report import trailing_mean
from rm_service.demo.settings import DemoSettings, demo_settings
from rm_service.settings import StoreSettings
from rm_service.store.db import Store


@pytest.mark.slow
def test_the_demo_loop_with_tiny_models(home, tmp_path, monkeypatch, tiny_backbone_dir, tiny_lm_dir, capsys):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(HH_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:80]), encoding="utf-8")
    settings = DemoSettings(
        data=data,
        home=tmp_path / "demo",
        rm_backbone=str(tiny_backbone_dir),
        rm_max_minutes=1.0,
        rm_max_tokens=128,
        rm_ensemble_size=2,
        calibration_pairs=4,
        proxy_dataset_fraction=0.5,
        policy=str(tiny_lm_dir),
        ppo_steps=60,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=4,
        eval_prompts=2,
        eval_every=20,
        submit_every=5,
        retrain_min_labels=4,
        progress=False,
    )
    # Tiny models on a handful of labels give the promotion rule little to go on: at its 95% default the
    # first retrain is undecided and the run never switches. This test is about the loop's mechanics
    # (retrain, decision, promotion, switch), so it decides at 60%; tests/test_promotion_rule.py tests the rule.
    monkeypatch.setenv("RM_TRAIN_GATE_CONFIDENCE", "0.6")
    before = {k: v for k, v in os.environ.items() if k.startswith("RM_")}
    assert run_demo(settings) == 0
    assert {
        k: v for k, v in os.environ.items() if k.startswith("RM_")
    } == before  # a run in-process leaves no store or registry behind
    out = capsys.readouterr().out
    demo = tmp_path / "demo"
    report = (demo / "report.md").read_text()
    assert (
        "reward model v1 (gold" in report and "reward model v2 (proxy" in report and "agreement with people" in report
    )
    # the calibration's resume file lives (and dies) with the run: one under $RM_HOME once made a rerun label nothing
    assert (demo / "calibration.done").read_text().strip() and not (home / "judge").exists()
    assert all((demo / name).stat().st_size > 0 for name in ("reward_kl.png", "accuracy.png", "proxy_gold.png"))

    steps = [json.loads(line) for line in (demo / "ppo" / "metrics.jsonl").read_text().splitlines()]
    versions = [m["rm/version"] for m in steps]
    assert versions[0] == "v2" and versions[-1] != "v2", (
        versions
    )  # trained against the proxy, then switched during the run
    assert "at step" in out and "reward-model switches during PPO" in out
    evaluations = [json.loads(line) for line in (demo / "ppo" / "events.jsonl").read_text().splitlines()]
    evaluations = [e for e in evaluations if e["event"] == "eval" and e["model"] == "policy"]
    assert [e["step"] for e in evaluations] == [0, 20, 40, 60] and all("gold_reward_mean" in e for e in evaluations)
    assert [m["step"] for m in steps if "eval/gold_reward" in m] == [20, 40]  # beside the step's metrics too

    store = Store(StoreSettings(path=demo / "rm.duckdb"), read_only=True)
    try:
        by_source = store.stats()["labels_by_source"]
        promoted = store.con.execute("SELECT version FROM models WHERE status = 'promoted'").fetchone()[0]
        jobs = store.con.execute("SELECT state, model_version, promoted FROM jobs ORDER BY created_at").fetchall()
    finally:
        store.close()
    assert by_source.get("IMPORT", 0) > 0 and by_source.get("JUDGE", 0) > 0
    assert jobs and jobs[0] == ("succeeded", "v3", True) and promoted not in ("v1", "v2")


def test_profiles_apply_under_the_environment_and_explicit_values(monkeypatch):
    monkeypatch.setenv("RM_DEMO_PPO_STEPS", "7")
    full = demo_settings("full", policy="some/dir")
    assert (full.rm_mode, full.ppo_steps, full.policy) == ("full", 7, "some/dir")  # env beats the profile
    assert demo_settings("cpu").rm_backbone == "smollm2-135m-instruct"


def test_full_profile_runs_gae_on_long_prompts_and_cpu_runs_rloo_on_short_ones():
    full, cpu = demo_settings("full"), demo_settings("cpu")
    assert (full.advantage_estimator, full.max_prompt_tokens, full.learning_rate) == ("gae", 512, 1e-5)
    assert (cpu.advantage_estimator, cpu.max_prompt_tokens) == ("rloo", 96)


def test_trailing_mean_averages_the_last_window_steps():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([2.0, 4.0], 5) == [2.0, 3.0]
    assert trailing_mean([], 5) == []


def test_the_demo_composes_the_ppo_and_training_settings_it_names():
    from policy_trainer.settings import PPOSettings
    from rm_service.demo.settings import Of, composed
    from rm_service.settings import TrainSettings

    s = demo_settings("full", ppo_steps=3, rm_backbone="b", seed=5)
    ppo, train = composed(s, PPOSettings, prompts_file=s.data), composed(s, TrainSettings)
    assert (ppo.total_steps, ppo.retrain_mode, ppo.seed, ppo.prompts_file) == (3, "full", 5, s.data)
    assert (ppo.advantage_estimator, ppo.learning_rate, ppo.samples_per_prompt) == ("gae", 1e-5, 4)  # the profile's
    assert (train.backbone, train.mode, train.max_tokens, train.dataset_fraction) == ("b", "full", 1024, 0.1)
    marks = [(name, m) for name, f in DemoSettings.model_fields.items() for m in f.metadata if isinstance(m, Of)]
    assert len(marks) == 31  # every PPO, session and training knob of the demo, none declared twice
    for name, mark in marks:  # the demo's type is the source's (retrain_mode also takes "": the server's default)
        source = mark.model.model_fields[mark.name].annotation
        assert DemoSettings.model_fields[name].annotation == source or mark.name == "retrain_mode", name
        assert DemoSettings.model_fields[name].description.startswith(
            mark.model.model_fields[mark.name].description
        ) or (mark.name == "retrain_mode")
