"""`rm-service demo` (what `make demo` runs): the whole RLHF loop on this machine.

1. import the HH-RLHF pairs into a fresh DuckDB file (human labels);
2. train the gold reward model (v1, SmolLM2 head mode, on every human training pair; kept as
   a candidate, never served by default) and the proxy (v2, on a quarter of them; promoted):
   Gao et al.'s setup, where the gold stands in for people;
3. start `rm-service serve` as its own process: it serves the proxy, keeps the gold loaded for
   callers that pin it, owns the store and runs retraining jobs;
4. PPO trains the policy against the served proxy. Every few steps the trainer sends the fresh
   samples the proxy's ensemble doubts most to the labeling queue; the gold annotator labels
   them; the trainer requests a retrain once enough new labels exist; the retrain is gated on
   held-out on-policy pairs and promoted; the trainer switches to it. Proxy and gold reward of
   held-out samples are measured along the way against KL;
5. the gold annotator labels held-out pairs people labeled (its agreement with them);
6. SIGTERM drains the server; the report (`report.md` + PNG plots) is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rm_service.client import Client, start_server_process
from rm_service.demo.report import RunFacts, write_report
from rm_service.demo.settings import DemoSettings, composed
from rm_service.errors import RMError
from rm_service.formats import import_file
from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.train.data import is_heldout_pair
from rm_service.train.run import TrainResult, train

if TYPE_CHECKING:
    from rm_service.judge.runner import JudgeCounts

STAGES = 7


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
    """The proxy's settings (v2); the server's retraining jobs get the same ones, so features are reused."""
    return composed(s, TrainSettings)


def gold_settings(s: DemoSettings) -> TrainSettings:
    """The gold's: head mode on every human training pair, never promoted."""
    return train_settings(s).model_copy(update={"mode": "head", "dataset_fraction": 1.0, "promote": False})


def settings_env(settings, prefix: str) -> dict[str, str]:
    """A settings object as the environment variables that reproduce it in another process."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"{prefix}{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


def run_demo(s: DemoSettings) -> int:
    """Run the loop; 0 when every stage ran (the report says what the loop achieved)."""
    if s.multi_turn:
        from rm_service.demo.multiturn import run_multiturn_demo

        return run_multiturn_demo(s)
    if not s.data.exists():
        print(f"demo: no data file at {s.data}; pass --data", file=sys.stderr)
        return 2
    home = s.run_home
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    facts, stages, total = RunFacts(settings=s, home=home), Stages(), time.monotonic()
    try:
        with use_home(home):
            gold, proxy = build_models(s, facts, stages)
            serve_and_loop(s, facts, stages, gold, proxy)
    except RMError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    facts.stage_seconds, facts.total_seconds = stages.seconds, time.monotonic() - total
    facts.read_store(home / "rm.duckdb")
    report = write_report(facts)
    print("\n" + facts.summary_table())
    print(
        f"\nreport: {report}\nplots:  {', '.join(str(p) for p in facts.plots)}\nstore:  {home / 'rm.duckdb'}   "
        f"registry: {home / 'registry'}"
    )
    return 0 if facts.server_exit_code == 0 else 1


@contextmanager
def use_home(home: Path) -> Iterator[None]:
    """Point this process (and the servers it starts) at the run's store and registry; the
    environment is restored on exit, so a demo run in-process (tests) leaves no trace."""
    home_env = {"RM_STORE_PATH": str(home / "rm.duckdb"), "RM_MODELS_ARTIFACTS_DIR": str(home / "registry")}
    before = {name: os.environ.get(name) for name in home_env}
    os.environ.update(home_env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_models(s: DemoSettings, facts: RunFacts, stages: Stages) -> tuple[TrainResult, TrainResult]:
    """The gold and the proxy (v1 and v2)."""
    t = stages.start(f"import {s.data}")
    store = Store(StoreSettings())
    try:
        counts, _ = import_file(store, s.data, "hh")
        facts.labels_imported, facts.lines_rejected = counts["INSERTED"], counts["REJECTED"]
        stages.done(
            "import", t, f"({counts['INSERTED']} human labels stored, {counts['REJECTED']} malformed lines rejected)"
        )

        t = stages.start(
            f"train the gold reward model on {s.rm_backbone} (head mode, every human training pair; budget "
            f"{s.rm_max_minutes:g} min)"
        )
        gold = facts.gold = _train(store, gold_settings(s), s.progress)
        stages.done(
            "train gold", t, f"({gold.version}: held-out accuracy {gold.metrics['accuracy']:.4f}; {gold.details})"
        )
        t = stages.start(
            f"train the proxy on {s.proxy_dataset_fraction:.0%} of the human-labeled conversations ({s.rm_mode} mode)"
        )
        proxy = facts.v1 = _train(store, train_settings(s), s.progress)
        m = proxy.metrics
        stages.done(
            "train proxy",
            t,
            f"({proxy.version}: held-out accuracy {m['accuracy']:.4f} on {int(m['heldout_pairs'])} pairs; "
            f"{proxy.gate_message})",
        )
        facts.calibration_file = _calibration_items(
            store, train_settings(s), s.calibration_pairs, s.run_home / "calibration.jsonl"
        )
    finally:
        store.close()
    return gold, proxy


def _train(store: Store, settings: TrainSettings, progress: bool) -> TrainResult:
    result = train(store, settings, ModelSettings(), show_progress=progress)
    assert result is not None  # None only on the other ranks of a torchrun run; the demo is one process
    return result


def _calibration_items(store: Store, settings: TrainSettings, n: int | None, path: Path) -> Path | None:
    """Held-out pairs people labeled, as judge items."""
    snapshot = store.get_snapshot()  # the one the proxy trained on
    if n == 0 or snapshot is None:
        return None
    held = [p for p in store.pairs(snapshot) if is_heldout_pair(p, settings)][:n]
    with path.open("w", encoding="utf-8") as f:
        for p in held:
            f.write(
                json.dumps({"prompt": [m.as_dict() for m in p.prompt], "completions": [p.chosen, p.rejected]}) + "\n"
            )
    return path


def serve_and_loop(s: DemoSettings, facts: RunFacts, stages: Stages, gold: TrainResult, proxy: TrainResult) -> None:
    t = stages.start(
        f"start the gRPC server (serves the proxy {proxy.version}, keeps the gold {gold.version} loaded, "
        "owns the store, runs retraining jobs)"
    )
    env = {
        **os.environ,
        **settings_env(train_settings(s), "RM_TRAIN_"),
        "RM_SERVE_METRICS_PORT": "0",
        "RM_SERVE_ALSO_LOAD": gold.version,
    }
    server, address = start_server_process(env, s.run_home, s.server_start_timeout_s)
    try:
        client = Client(address)
        stages.done("start server", t, f"(SERVING on {address}; log {s.run_home / 'server.log'})")
        _judge_and_ppo(s, facts, stages, address, gold)
        client.close()
        facts.server_exit_code = stop_server(server, stages)
    finally:
        if server.poll() is None:
            server.kill()


def stop_server(server: subprocess.Popen, stages: Stages) -> int:
    """The last stage of both demos: SIGTERM, the server drains and checkpoints the store; its exit code."""
    t = stages.start("stop the server (SIGTERM: drain, checkpoint the store)")
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=600)
    stages.done("stop", t, f"(exit code {code})")
    return code


def _judge_and_ppo(s: DemoSettings, facts: RunFacts, stages: Stages, address: str, gold_model: TrainResult) -> None:
    from policy_trainer.settings import PPOSettings
    from policy_trainer.trainer import train_ppo
    from rm_service.judge.annotators import RewardAnnotator
    from rm_service.judge.runner import run_judge
    from rm_service.judge.settings import JudgeSettings

    gold_dir = str(Path(ModelSettings().artifacts_dir) / gold_model.version)
    judge_settings = JudgeSettings(backend="rm", model=gold_dir, server=address, concurrency=1)
    gold = RewardAnnotator(gold_dir, judge_settings)
    which = "the samples the proxy doubts most" if s.selection == "uncertainty" else "random samples"
    loop = (
        f"the gold labels {which}; retrain at {s.retrain_min_labels} new labels"
        if s.submit_every and s.retrain_min_labels
        else "the proxy stays fixed"
    )
    t = stages.start(f"PPO: {s.policy}, {s.ppo_steps} steps against the proxy; {loop}")
    ppo = composed(
        s,
        PPOSettings,
        run_dir=s.run_home / "ppo",
        prompts_file=s.data,
        reward_addresses=[address],
        gold_address=address,
        gold_version=gold_model.version,
        progress=s.progress,
    )
    with judge_following(judge_settings, address, gold) as worker:
        facts.ppo = train_ppo(ppo)
    facts.judge_queue = worker.counts
    switches = (
        ", ".join(f"{w['from_version']} -> {w['to_version']} at step {w['step']}" for w in facts.ppo.switches) or "none"
    )
    stages.done("ppo", t, f"(reward-model switches: {switches})")

    # After PPO, so that these labels do not count towards the retrains of the outer loop.
    t = stages.start(f"the gold annotator labels held-out pairs people labeled ({facts.calibration_file})")
    if facts.calibration_file is not None:
        # its resume file lives in the run home, emptied with it (under $RM_HOME/judge an earlier run's
        # file marked every item done, and the next run labeled none)
        facts.calibration = run_judge(
            judge_settings,
            address=address,
            input_path=facts.calibration_file,
            annotator=gold,
            progress=s.progress,
            progress_file=s.run_home / "calibration.done",
        )
    stages.done("calibration", t, f"({facts.calibration.summary() if facts.calibration else 'skipped'})")


@contextmanager
def judge_following(settings, address: str, annotator) -> Iterator[JudgeWorker]:
    """A judge following the labeling queue on a thread while the body runs (both demos' PPO),
    then labeling what is still queued; its counts on the worker afterwards, its error raised here."""
    from rm_service.judge.runner import run_judge

    stop, worker = threading.Event(), JudgeWorker()
    thread = threading.Thread(target=worker.run, args=(run_judge, settings, address, stop, annotator), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=600)
    if worker.error is not None:
        raise worker.error


class JudgeWorker:
    """The judge following the labeling queue on a thread until told to stop."""

    def __init__(self) -> None:
        self.counts: JudgeCounts | None = None
        self.error: Exception | None = None

    def run(self, run_judge, settings, address, stop, annotator) -> None:
        try:
            self.counts = run_judge(
                settings, address=address, stop_event=stop, follow=True, annotator=annotator, drain=True
            )
        except Exception as exc:  # noqa: BLE001 - re-raised on the main thread
            self.error = exc
