"""`rm-service demo --multi-turn`: whole conversations, end to end on this machine.

1-3. import the HH pairs, train the gold (v1) and the proxy (v2), as `rm-service demo`;
4. train the user model on the imported conversations (`rm-service user-model train`, LoRA,
   `user_max_minutes`), or reuse the version directory `user_model` names;
5. start `rm-service serve` as its own process: the proxy served, the gold kept loaded, the
   user model behind SimulateUser;
6. multi-turn PPO (`policy-trainer sessions`): the policy plays sessions from real first user
   turns, the served user model writes every later user turn (or ends the session), ScoreTurns
   of the proxy rewards each assistant turn and the session; held-out openings are played by
   the reference and by the trained policy on the same random draws and scored by the gold:
   reward per turn, per turn index, and the session value. The outer loop as in `rm-service
   demo`: every `submit_every` steps a share of the played sessions goes to the labeling queue
   as session tasks, the gold labels them with per-turn thumbs and an outcome from its
   ScoreTurns (`judge --backend turns`), and at `retrain_min_labels` new labels the proxy
   retrains on that feedback and the trainer switches if the promotion rule promotes it;
7. SIGTERM drains the server; `report.md` (settings, stages, per-step table, the held-out
   sessions' proxy and gold before and after, one played conversation) is written.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rm_service.client import start_server_process
from rm_service.demo.evidence import decision_table, rule_text
from rm_service.demo.pipeline import (
    Stages,
    build_models,
    judge_following,
    settings_env,
    stop_server,
    train_settings,
    use_home,
)
from rm_service.demo.report import RunFacts
from rm_service.demo.settings import DemoSettings, composed
from rm_service.errors import RMError
from rm_service.settings import ModelSettings, StoreSettings

SESSION_ESTIMATOR = {"rloo": "turn_rloo", "gae": "turn_gae"}  # the demo's single-turn choice -> its multi-turn kin


@dataclass
class SessionFacts:
    """What the multi-turn report says."""

    reward: RunFacts
    user_version: str = ""
    user_details: str = ""
    user_metrics: dict = field(default_factory=dict)
    summary: Any = None  # policy_trainer.trainer.Summary
    judge_queue: Any = None  # judge.runner.JudgeCounts: the gold on the session tasks
    example: list = field(default_factory=list)  # one held-out session of the trained policy (Messages)
    server_exit_code: int | None = None
    total_seconds: float = 0.0


def run_multiturn_demo(s: DemoSettings) -> int:
    """Run the multi-turn loop; 0 when every stage ran (the report says what it achieved)."""
    if not s.data.exists():
        print(f"demo: no data file at {s.data}; pass --data", file=sys.stderr)
        return 2
    from rm_service.usermodel.version import is_user_version

    if s.user_model and not is_user_version(s.user_model):
        print(
            f"demo: --user-model {s.user_model} is not a user-model version directory (no user.json)", file=sys.stderr
        )
        return 2
    home = s.run_home
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    facts, stages, total = SessionFacts(RunFacts(settings=s, home=home)), Stages(), time.monotonic()
    try:
        with use_home(home):
            build_models(s, facts.reward, stages)
            user_dir = user_model(s, facts, stages)
            serve_and_play(s, facts, stages, user_dir)
    except RMError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    facts.reward.read_store(home / "rm.duckdb")  # the registry's decisions on the retrains
    facts.reward.stage_seconds, facts.total_seconds = stages.seconds, time.monotonic() - total
    report = write_session_report(s, facts)
    print(f"\n{report.read_text()}\nreport: {report}\nstore:  {home / 'rm.duckdb'}")
    return 0 if facts.server_exit_code == 0 else 1


def user_model(s: DemoSettings, facts: SessionFacts, stages: Stages) -> Path:
    """The user model's version directory: the one `s.user_model` names, or one trained now."""
    if s.user_model:
        t = stages.start(f"reuse the user model {s.user_model}")
        directory = Path(s.user_model).resolve()
        facts.user_version = directory.name
        stages.done("user model", t, f"({directory})")
        return directory
    from rm_service.store.db import Store
    from rm_service.usermodel.run import train_user_model
    from rm_service.usermodel.settings import UserModelSettings
    from rm_service.usermodel.version import versions_dir

    t = stages.start(
        f"train the user model on {s.user_backbone} (next user turn or the end; budget {s.user_max_minutes:g} min)"
    )
    store = Store(StoreSettings())
    try:
        result = train_user_model(
            store, UserModelSettings(backbone=s.user_backbone, max_minutes=s.user_max_minutes), show_progress=s.progress
        )
    finally:
        store.close()
    m = result.metrics
    facts.user_version, facts.user_details, facts.user_metrics = result.version, result.details, m
    stages.done(
        "user model",
        t,
        f"({result.version}: held-out NLL per user-turn token {m['nll']:.3f}, untuned {m['base_nll']:.3f}; "
        f"{result.details})",
    )
    return versions_dir(ModelSettings()) / result.version


def serve_and_play(s: DemoSettings, facts: SessionFacts, stages: Stages, user_dir: Path) -> None:
    trained: Any = facts.reward  # RunFacts: gold and v1 are train.run.TrainResults
    gold, proxy = trained.gold.version, trained.v1.version
    t = stages.start(f"start the gRPC server (serves the proxy {proxy}, keeps the gold {gold}, the user model)")
    env = {
        **os.environ,
        **settings_env(train_settings(s), "RM_TRAIN_"),
        "RM_SERVE_METRICS_PORT": "0",
        "RM_SERVE_ALSO_LOAD": gold,
    }
    server, address = start_server_process(env, s.run_home, s.server_start_timeout_s, ["--user-model", str(user_dir)])
    try:
        stages.done("start server", t, f"(SERVING on {address}; log {s.run_home / 'server.log'})")
        t = stages.start(
            f"multi-turn PPO: {s.policy}, {s.session_steps} steps of {s.prompts_per_step} openings x "
            f"{s.samples_per_prompt} sessions x <= {s.max_turns} turns against the served user model"
        )
        facts.summary, facts.example, facts.judge_queue = play(s, address, gold)
        stages.done("sessions", t, f"(seconds per step: {facts.summary.seconds_per_phase.get('step', 0):.1f})")
        facts.server_exit_code = stop_server(server, stages)
    finally:
        if server.poll() is None:
            server.kill()


def play(s: DemoSettings, address: str, gold: str):
    from policy_trainer.multiturn import SessionTrainer
    from policy_trainer.session_settings import SessionSettings
    from rm_service.judge.sessions import TurnsAnnotator
    from rm_service.judge.settings import JudgeSettings

    settings = composed(
        s,
        SessionSettings,
        run_dir=s.run_home / "sessions",
        prompts_file=s.data,
        total_steps=s.session_steps,
        submit_fraction=s.session_submit_fraction,
        retrain_min_labels=s.session_retrain_min_labels,
        user_simulator="served",
        advantage_estimator=SESSION_ESTIMATOR.get(s.advantage_estimator, "turn_gae"),
        eval_prompts=s.session_eval_openings,
        eval_every=0,
        reward_pessimism="none",  # ScoreTurns serves no members per turn
        reward_addresses=[address],
        gold_address=address,
        gold_version=gold,
        save_policy=False,
        progress=s.progress,
    )
    judge = JudgeSettings(backend="turns", model=gold, server=address, concurrency=1)
    annotator = TurnsAnnotator(gold, judge)
    trainer = SessionTrainer(settings)
    try:
        with judge_following(judge, address, annotator) as worker:
            summary = trainer.train()
        example = trainer.eval_rollout().sessions[0].messages  # the same draws as the evaluation's first session
    finally:
        trainer.close()
        annotator.close()
    return summary, example, worker.counts


# -- the report ------------------------------------------------------------------------------


def _turn_keys(e: dict, prefix: str) -> list[str]:
    return sorted((k for k in e if k.startswith(prefix) and k[len(prefix) :].isdigit()), key=lambda k: int(k[-1]))


def heldout_table(summary) -> list[str]:
    b, a = summary.eval_before, summary.eval_after
    rows = [
        ("gold reward per assistant turn", "gold_reward_mean"),
        *((f"gold reward, turn {k[-1]}", k) for k in _turn_keys(a, "gold_reward_turn")),
        ("gold session value", "gold_session_value_mean"),
        ("proxy reward per assistant turn", "reward_mean"),
        ("proxy session value", "session_value_mean"),
        ("assistant turns per session", "turns_mean"),
    ]
    lines = ["| held-out sessions | reference (before) | trained policy | change |", "|---|---:|---:|---:|"]
    for label, key in rows:
        before, after = b.get(key, float("nan")), a.get(key, float("nan"))
        lines.append(f"| {label} | {before:+.4f} | {after:+.4f} | {after - before:+.4f} |")
    lines.append(f"| KL to the reference per session (nats) | 0 | {a['kl_seq']:.3f} | |")
    return lines


def step_table(summary) -> list[str]:
    lines = [
        "| step | proxy reward/turn | turn 1 | turn 2 | session value | turns/session | ended by user | KL/session "
        "| step s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in summary.metrics:
        lines.append(
            f"| {m['step']} | {m['reward/served_mean']:+.3f} | {m.get('reward/turn1_mean', float('nan')):+.3f} | "
            f"{m.get('reward/turn2_mean', float('nan')):+.3f} | {m['session/value_mean']:+.3f} | "
            f"{m['session/turns_mean']:.2f} | {m['session/ended_by_user_fraction']:.2f} | {m['kl/ref_seq']:.2f} | "
            f"{m['time/step_s']:.1f} |"
        )
    return lines


def outer_loop_lines(s: DemoSettings, facts: SessionFacts) -> list[str]:
    summary, gold = facts.summary, facts.reward.gold.version if facts.reward.gold else "?"
    if not s.submit_every:
        return ["Off (submit_every 0): the proxy stayed fixed."]
    switches = ", ".join(f"{w['from_version']} -> {w['to_version']} at step {w['step']}" for w in summary.switches)
    judged = facts.judge_queue.summary() if facts.judge_queue is not None else "no judge counts"
    return [
        f"Sessions sent for labeling: {summary.candidates_submitted} ({s.session_submit_fraction:.0%} of each "
        f"step's, every {s.submit_every} step(s)); the gold {gold} gave each per-turn thumbs and an outcome "
        f"from its ScoreTurns: {judged}.",
        "",
        f"Retrains requested (at {s.session_retrain_min_labels} new labels): {summary.retrains_requested}; "
        f"reward-model switches: {switches or 'none'}.",
        "",
        *(decision_table(facts.reward.models) or ["No retrain was decided during the run."]),
        "",
        rule_text(),
    ]


def write_session_report(s: DemoSettings, facts: SessionFacts) -> Path:
    r: Any = facts.reward
    summary = facts.summary
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in r.stage_seconds.items())
    a = summary.eval_after
    lines = [
        "# rm-service demo report: whole conversations",
        "",
        f"Reward models on `{s.rm_backbone}`: the gold {r.gold.version} (every human training pair; held-out "
        f"accuracy {r.gold.metrics['accuracy']:.4f}) scores the held-out sessions; the proxy {r.v1.version} "
        f"({s.proxy_dataset_fraction:.0%} of them; {r.v1.metrics['accuracy']:.4f}) is the reward PPO optimises. "
        f"User model {facts.user_version} ({facts.user_details or 'reused'}). Policy `{s.policy}`: "
        f"{s.session_steps} steps of {s.prompts_per_step} openings x {s.samples_per_prompt} sessions x <= "
        f"{s.max_turns} assistant turns of <= {s.max_new_tokens} tokens; user turns of <= {s.user_max_new_tokens} "
        f"tokens written by the served user model; credit across turns by "
        f"{SESSION_ESTIMATOR.get(s.advantage_estimator, 'turn_gae')}; learning rate {s.learning_rate}, KL penalty "
        f"{s.kl_coef}; seed {s.seed}.",
        "",
        f"Total {facts.total_seconds / 60:.1f} min ({seconds}). Server exit code {facts.server_exit_code}.",
        "",
        f"## Held-out sessions ({a['n']}: {s.session_eval_openings} held-out first user turns x "
        f"{s.samples_per_prompt}, the same random draws for the reference and the trained policy)",
        "",
        *heldout_table(summary),
        "",
        "## Training steps (proxy rewards of the sessions played)",
        "",
        *step_table(summary),
        "",
        "## The outer loop on sessions",
        "",
        *outer_loop_lines(s, facts),
        "",
        "## One held-out session of the trained policy",
        "",
        *(f"- **{m.role}**: {m.content.strip()[:300]}" for m in facts.example),
        "",
        "One seed and a few steps: a demonstration of the loop, not a measurement; bench/multiturn.py compares "
        "bandit, static-context and interactive PPO over paired seeds.",
    ]
    path = s.run_home / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
