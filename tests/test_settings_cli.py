"""Both CLIs build their flags from the settings models (rm_service/settings_cli.py): help with
[env: ...] [default: ...], flags over the environment, --version, and a bad flag or environment
value as one line and exit 2 (real subprocesses where the exit status and stderr matter)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import REPO

from rm_service.cli import build_parser, serve_settings
from rm_service.judge.settings import JudgeSettings
from rm_service.settings import SecuritySettings, ServeSettings, TrainSettings
from rm_service.settings_cli import flag, flag_values

BATCHING = [
    "max_items_per_request",
    "max_batch_tokens",
    "max_padding",
    "fair_wait_s",
    "max_queue_wait_s",
    "max_inflight_items",
    "max_queued_tokens",
    "max_wait_ms",
]


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RM_SERVE_", "RM_JUDGE_", "PPO_"))}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


def _one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_serve_help_lists_the_batching_and_admission_flags_with_env_and_default():
    result = _run("rm_service.cli", "serve", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "[env: RM_SERVE_MAX_BATCH_TOKENS] [default: 2048]" in text
    for name in BATCHING:
        default = ServeSettings.model_fields[name].default
        after = text[
            text.index(f"  {flag(name)} <") :
        ]  # the flag's entry: description, then env and default on one line
        entry = after[: after.index("\n  --", 1)]
        assert f"[env: RM_SERVE_{name.upper()}] [default: {default}]" in entry, entry
        assert ServeSettings.model_fields[name].description.split()[0] in entry
    assert "[env: RM_AUTH_TLS_CERT]" in text and "--tokens " not in text  # the tokens themselves stay environment-only


def test_every_setting_of_serve_train_and_judge_is_a_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command, models, secret in [
        ("serve", [ServeSettings, SecuritySettings], {"tokens"}),
        ("train", [TrainSettings], set()),
        ("judge", [JudgeSettings], {"api_key", "server_token"}),
    ]:
        commands[command].format_help()  # a command's settings flags are added when it is used
        options = commands[command]._option_string_actions
        for model in models:
            for name in model.model_fields:
                assert (flag(name) in options) != (name in secret), (command, name)


def test_flags_override_the_environment_and_old_names_still_work(monkeypatch):
    monkeypatch.setenv("RM_SERVE_MAX_BATCH_TOKENS", "999")
    monkeypatch.setenv("RM_SERVE_MAX_QUEUED_TOKENS", "77")
    args = build_parser().parse_args(
        [
            "serve",
            "--max-batch-tokens",
            "4096",
            "--no-store",
            "--no-follow-registry",
            "--also-load",
            "v1, v2",
            "--model",
            "none",
            "--tls-cert",
            "c.pem",
        ]
    )
    serve, security = serve_settings(args)
    assert (serve.max_batch_tokens, serve.max_queued_tokens) == (
        4096,
        77,
    )  # the flag wins; the environment fills the rest
    assert serve.with_store is False and serve.with_model is True and serve.follow_registry is False
    assert serve.also_load == ["v1", "v2"] and serve.model is None and str(security.tls_cert) == "c.pem"
    assert serve_settings(build_parser().parse_args(["serve", "--no-model"]))[0].with_model is False

    judge = build_parser().parse_args(
        ["judge", "--address", "h:1", "--template", "t.toml", "--concurrency", "2", "--input", "x.jsonl"]
    )
    assert flag_values(judge, JudgeSettings) == {"server": "h:1", "template_file": "t.toml", "concurrency": "2"}
    train = build_parser().parse_args(["train", "--no-promote", "--mode", "full", "--gate-confidence", "0.9"])
    assert TrainSettings(**flag_values(train, TrainSettings)).model_dump(
        include={"promote", "mode", "gate_confidence"}
    ) == {
        "promote": False,
        "mode": "full",
        "gate_confidence": 0.9,
    }

    from rm_service.demo.settings import DemoSettings, demo_settings

    demo = build_parser().parse_args(
        ["demo", "--profile", "full", "--backbone", "b", "--steps", "3", "--max-minutes", "2"]
    )
    values = flag_values(demo, DemoSettings)
    settings = demo_settings(values.pop("profile"), **values)
    assert (settings.profile, settings.rm_backbone, settings.ppo_steps, settings.rm_max_minutes, settings.rm_mode) == (
        "full",
        "b",
        3,
        2.0,
        "full",
    )


@pytest.mark.parametrize("module", ["rm_service.cli", "policy_trainer.cli"])
def test_version(module):
    result = _run(module, "--version")
    assert result.returncode == 0 and result.stdout.split()[-1] == metadata.version("rm-service"), result


@pytest.mark.parametrize(
    "args, env, needles",
    [
        (
            ["serve", "--max-batch-tokens", "-1"],
            {},
            [
                "max_batch_tokens: Input should be greater than or equal to 0",
                "--max-batch-tokens",
                "RM_SERVE_MAX_BATCH_TOKENS",
            ],
        ),
        (
            ["serve", "--no-model", "--port", "0"],
            {"RM_SERVE_MAX_PADDING": "lots"},
            ["max_padding:", "'lots'", "RM_SERVE_MAX_PADDING"],
        ),
        (["train", "--ensemble-size", "0"], {}, ["rm-service train: invalid settings: ensemble_size:"]),
        (["stats"], {"RM_STORE_MAX_RESPONSES": "1"}, ["max_responses:", "RM_STORE_MAX_RESPONSES"]),
        (["judge", "--concurrency", "0"], {}, ["concurrency:", "--concurrency", "RM_JUDGE_CONCURRENCY"]),
        (["judge"], {"RM_JUDGE_TIMEOUT_S": "-1"}, ["timeout_s:", "RM_JUDGE_TIMEOUT_S"]),
        (["demo", "--steps", "0"], {}, ["ppo_steps:", "--ppo-steps/--steps"]),
        (["demo"], {"RM_DEMO_PROFILE": "huge"}, ["profile: Input should be 'cpu' or 'full'"]),
    ],
)
def test_rm_service_bad_flag_or_env_value_is_one_line_and_exit_2(args, env, needles, tmp_path):
    _one_line_exit_2(_run("rm_service.cli", *args, RM_HOME=str(tmp_path), **env), *needles)
    assert not (tmp_path / "rm.duckdb").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    "args, env, needles",
    [
        (
            ["ppo", "--total-steps", "many"],
            {},
            ["total_steps: Input should be a valid integer", "'many'", "--total-steps", "PPO_TOTAL_STEPS"],
        ),
        (["ppo"], {"PPO_TOP_P": "2"}, ["top_p: Input should be less than or equal to 1", "PPO_TOP_P"]),
    ],
)
def test_policy_trainer_bad_flag_or_env_value_is_one_line_and_exit_2(args, env, needles, tmp_path):
    _one_line_exit_2(_run("policy_trainer.cli", *args, RM_HOME=str(tmp_path), **env), *needles)


def test_the_container_entrypoint_leaves_a_bad_serve_setting_to_rm_service(tmp_path, monkeypatch):
    """The image's entrypoint reads the serve settings to prepare the home; a bad value must not
    be a traceback there: it prepares nothing and lets `rm-service serve` print the one line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("entrypoint", REPO / "deploy" / "container" / "entrypoint.py")
    entrypoint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entrypoint)
    monkeypatch.setenv("RM_HOME", str(tmp_path / "home"))
    assert entrypoint.prepare(["--max-batch-tokens", "-1"]) is None
    assert not (tmp_path / "home").exists()
