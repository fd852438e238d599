"""`rm-service demo` (what `make demo` runs): the whole RLHF loop on this machine.

1. import the HH-RLHF pairs into a fresh DuckDB file (human labels);
2. train reward model v1 (Bradley-Terry) and print its held-out accuracy;
3. start `rm-service serve` as its own process: it serves v1, owns the store and runs retraining jobs;
4. PPO trains the policy against the served reward. Meanwhile the trainer sends fresh samples to
   the labeling queue, the local LLM judge labels them, the trainer requests retraining once
   enough new labels exist, v2 is trained, gated and promoted, and the trainer switches to it;
5. the judge labels held-out pairs that people labeled too (its agreement with them);
6. SIGTERM drains the server; the report (`report.md` + PNG plots) is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rm_service.client import Client, start_server_process
from rm_service.demo.report import RunFacts, write_report
from rm_service.demo.settings import DemoSettings
from rm_service.errors import RMError
from rm_service.importers import import_hh
from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.train.run import train
from rm_service.train.split import is_heldout

STAGES = 6


@dataclass
class Stages:
    """Prints each stage with its time and keeps the times for the report."""

    seconds: dict[str, float] = field(default_factory=dict)
    _n: int = 0

    def start(self, title: str) -> float:
        self._n += 1
        print(f"\n== [{self._n}/{STAGES}] {title}", flush=True)
        return time.monotonic()

    def done(self, name: str, start: float, note: str = "") -> None:
        self.seconds[name] = time.monotonic() - start
        print(f"   done in {self.seconds[name]:.1f}s {note}".rstrip(), flush=True)


def train_settings(s: DemoSettings) -> TrainSettings:
    """v1's settings; the server's retraining jobs get the same ones (so features are reused)."""
    return TrainSettings(backbone=s.rm_backbone, mode=s.rm_mode, max_minutes=s.rm_max_minutes, max_pairs=s.rm_max_pairs,
                         max_tokens=s.rm_max_tokens, ensemble_size=s.rm_ensemble_size)


def settings_env(settings, prefix: str) -> dict[str, str]:
    """A settings object as the environment variables that reproduce it in another process."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"{prefix}{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


def run_demo(s: DemoSettings) -> int:
    """Run the loop; 0 when every stage ran (the report says what the loop achieved)."""
    if not s.data.exists():
        print(f"demo: no data file at {s.data}; pass --data", file=sys.stderr)
        return 2
    home = s.run_home
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    os.environ.update({"RM_STORE_PATH": str(home / "rm.duckdb"), "RM_MODELS_ARTIFACTS_DIR": str(home / "registry")})
    facts, stages, total = RunFacts(settings=s, home=home), Stages(), time.monotonic()
    try:
        _build_v1(s, facts, stages)
        _serve_and_loop(s, facts, stages)
    except RMError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    facts.stage_seconds, facts.total_seconds = stages.seconds, time.monotonic() - total
    facts.read_store(home / "rm.duckdb")
    report = write_report(facts)
    print("\n" + facts.summary_table())
    print(f"\nreport: {report}\nplots:  {', '.join(str(p) for p in facts.plots)}\nstore:  {home / 'rm.duckdb'}   registry: {home / 'registry'}")
    return 0 if facts.server_exit_code == 0 else 1


def _build_v1(s: DemoSettings, facts: RunFacts, stages: Stages) -> None:
    t = stages.start(f"import {s.data}")
    store = Store(StoreSettings())
    try:
        counts, _ = import_hh(store, s.data)
        facts.labels_imported, facts.lines_rejected = counts["INSERTED"], counts["REJECTED"]
        stages.done("import", t, f"({counts['INSERTED']} human labels stored, {counts['REJECTED']} malformed lines rejected)")

        settings = train_settings(s)
        t = stages.start(f"train reward model v1 on {s.rm_backbone} ({s.rm_mode} mode, budget {s.rm_max_minutes:g} min)")
        result = train(store, settings, ModelSettings(), show_progress=s.progress)
        facts.v1 = result
        m = result.metrics
        stages.done("train v1", t, f"({result.version}: held-out accuracy {m['accuracy']:.4f} on {int(m['heldout_pairs'])} pairs)")
        facts.calibration_file = _calibration_items(store, settings, s.judge_calibration_pairs, s.run_home / "judge-calibration.jsonl")
    finally:
        store.close()


def _calibration_items(store: Store, settings: TrainSettings, n: int, path: Path) -> Path | None:
    """Held-out pairs people labeled, as judge items (chosen first; the judge sees both orders)."""
    if n == 0:
        return None
    held = [p for p in store.pairs(store.get_snapshot()) if is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed)]
    with path.open("w", encoding="utf-8") as f:
        for p in held[:n]:
            f.write(json.dumps({"prompt": [m.as_dict() for m in p.prompt], "completions": [p.chosen, p.rejected]}) + "\n")
    return path


def _serve_and_loop(s: DemoSettings, facts: RunFacts, stages: Stages) -> None:
    t = stages.start("start the gRPC server (serves v1, owns the store, runs retraining jobs)")
    env = {**os.environ, **settings_env(train_settings(s), "RM_TRAIN_"), "RM_SERVE_METRICS_PORT": "0"}
    server, address = start_server_process(env, s.run_home, s.server_start_timeout_s)
    try:
        client = Client(address)
        stages.done("start server", t, f"(SERVING on {address}; log {s.run_home / 'server.log'})")
        _judge_and_ppo(s, facts, stages, address, client)
        t = stages.start("stop the server (SIGTERM: drain, checkpoint the store)")
        client.close()
        server.send_signal(signal.SIGTERM)
        facts.server_exit_code = server.wait(timeout=600)
        stages.done("stop", t, f"(exit code {facts.server_exit_code})")
    finally:
        if server.poll() is None:
            server.kill()


def _judge_and_ppo(s: DemoSettings, facts: RunFacts, stages: Stages, address: str, client: Client) -> None:
    from policy_trainer.settings import PPOSettings
    from policy_trainer.trainer import train_ppo
    from rm_service.judge.backend import load_judges
    from rm_service.judge.runner import run_judge
    from rm_service.judge.settings import JudgeSettings

    judge_settings = JudgeSettings(model=s.judge_model, server=address, concurrency=1)
    backends = load_judges(judge_settings)
    try:
        t = stages.start(f"PPO: {s.policy}, {s.ppo_steps} steps; the judge labels fresh samples; retrain at {s.retrain_min_labels} new labels")
        stop, worker = threading.Event(), _JudgeWorker()
        thread = threading.Thread(target=worker.run, args=(run_judge, judge_settings, address, stop, backends), daemon=True)
        thread.start()
        ppo = PPOSettings(run_dir=s.run_home / "ppo", policy=s.policy, prompts_file=s.data, total_steps=s.ppo_steps,
                          prompts_per_step=s.prompts_per_step, samples_per_prompt=s.samples_per_prompt,
                          max_new_tokens=s.max_new_tokens, max_prompt_tokens=s.max_prompt_tokens,
                          advantage_estimator=s.advantage_estimator, learning_rate=s.learning_rate, kl_coef=s.kl_coef,
                          eval_prompts=s.eval_prompts, update_epochs=s.update_epochs,
                          num_minibatches=s.num_minibatches, reward_addresses=[address], submit_every=s.submit_every,
                          submit_fraction=s.submit_fraction, retrain_min_labels=s.retrain_min_labels, retrain_mode=s.rm_mode,
                          progress=s.progress)
        try:
            facts.ppo = train_ppo(ppo)
        finally:
            stop.set()
            thread.join(timeout=600)
        facts.judge_queue = worker.counts
        if worker.error is not None:
            raise worker.error
        switches = ", ".join(f"{w['from_version']} -> {w['to_version']} at step {w['step']}" for w in facts.ppo.switches) or "none"
        stages.done("ppo", t, f"(reward-model switches: {switches})")

        # After PPO, so that these labels do not count towards the retrain of the outer loop.
        t = stages.start(f"the judge ({s.judge_model}, both orders) labels {s.judge_calibration_pairs} held-out pairs people labeled")
        if facts.calibration_file is not None:
            facts.calibration = run_judge(judge_settings, address=address, input_path=facts.calibration_file, backends=backends,
                                          progress=s.progress)
        stages.done("judge calibration", t, f"({facts.calibration.summary() if facts.calibration else 'skipped'})")
    finally:
        for backend in backends:
            backend.close()


class _JudgeWorker:
    """The judge following the labeling queue on a thread until told to stop."""

    def __init__(self):
        self.counts = None
        self.error: Exception | None = None

    def run(self, run_judge, settings, address, stop, backends) -> None:
        try:
            self.counts = run_judge(settings, address=address, stop_event=stop, follow=True, backends=backends)
        except Exception as exc:  # noqa: BLE001 - re-raised on the main thread
            self.error = exc
