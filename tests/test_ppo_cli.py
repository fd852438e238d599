"""`policy-trainer ppo`: settings from file, environment and flags; bad input is one line and
exit 2; prompts from files and the store; the documented settings table matches the code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, store_with_hh

from policy_trainer.cli import build_parser, main, settings_from_args
from policy_trainer.prompts import (
    PromptError,
    build_prompts,
    encode,
    read_prompts_file,
    read_prompts_store,
    split_heldout,
)
from policy_trainer.settings import PPOSettings, load_settings
from rm_service.conversation import Message


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "policy_trainer.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_flags_override_the_environment_which_overrides_the_file(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("kl_coef: 0.3\nlearning_rate: 0.001\ntotal_steps: 7\nreward_addresses: [a:1, b:2]\n")
    monkeypatch.setenv("PPO_LEARNING_RATE", "0.002")
    monkeypatch.setenv("PPO_TOTAL_STEPS", "9")
    s = load_settings(config, total_steps="11")
    assert (s.kl_coef, s.learning_rate, s.total_steps) == (0.3, 0.002, 11)
    assert s.reward_addresses == ["a:1", "b:2"]
    monkeypatch.setenv("PPO_REWARD_ADDRESSES", "x:1,y:2")
    assert load_settings(config).reward_addresses == ["x:1", "y:2"]


@pytest.mark.parametrize(
    "suffix, text", [(".json", json.dumps({"kl_coef": 0.25, "clip_vf": None})), (".toml", "kl_coef = 0.25\n")]
)
def test_json_and_toml_config_files(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert load_settings(path).kl_coef == 0.25


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kl-coef", "-1"], "kl_coef: Input should be greater than or equal to 0"),
        (["--advantage-estimator", "rloo", "--samples-per-prompt", "1"], "rloo needs samples_per_prompt >= 2"),
        (
            ["--prompts-file", "missing.jsonl", "--reward-addresses", "127.0.0.1:1"],
            "prompts file missing.jsonl does not exist",
        ),
        (["--config", "nope.yaml"], "config file nope.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert main(["ppo", *args, "--run-dir", str(tmp_path / "run"), "--policy", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_an_unknown_key_in_the_config_file_is_refused_without_a_traceback(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("kl_coeff: 0.1\n")  # a typo must not silently fall back to the default
    out = run_cli("ppo", "--config", str(config))
    assert out.returncode == 2 and "kl_coeff: Extra inputs are not permitted" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_none_turns_off_an_optional_setting_and_booleans_have_no_flags():
    args = build_parser().parse_args(
        ["ppo", "--clip-vf", "none", "--reward-clip", "None", "--no-normalize-reward", "--resume"]
    )
    s = settings_from_args(args)
    assert s.clip_vf is None and s.reward_clip is None and s.normalize_reward is False and s.resume is True
    assert settings_from_args(build_parser().parse_args(["ppo"])) == PPOSettings()


def test_an_unreachable_reward_server_is_one_line_and_exit_1(tmp_path, tiny_lm_dir, capsys):
    """In this process (`main`, what the console script calls): the policy is loaded, then the reward
    server's absence is the last line on stderr and exit 1, not an exception out of main."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Question {i}?"}) for i in range(12)) + "\n")
    from rm_service.server.app import free_port

    code = main(
        [
            "ppo",
            "--policy",
            str(tiny_lm_dir),
            "--prompts-file",
            str(prompts),
            "--reward-addresses",
            f"127.0.0.1:{free_port()}",
            "--score-max-retries",
            "1",
            "--score-backoff-s",
            "0.01",
            "--run-dir",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "UNAVAILABLE" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_prompt_files_in_every_accepted_shape(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "A river?"},
            ]
        },
        {"prompt": "Plain text prompt"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Because."},
            ]
        },
        {
            "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And yeast?\n\nAssistant: "
            "Yes.",
            "rejected": "x",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = read_prompts_file(path)
    assert [len(p) for p in prompts] == [3, 1, 2, 3]
    assert prompts[2][-1] == Message("user", "Why?")  # the trailing assistant turn is the completion, not the prompt
    assert prompts[3] == [
        Message("user", "How do I bake bread?"),
        Message("assistant", "With flour."),
        Message("user", "And yeast?"),
    ]


def test_malformed_prompt_lines_are_skipped_and_a_file_without_any_is_an_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\nnot json\n{"other": 1}\n{"prompt": [{"role": "robot", "content": "x"}]}\n')
    assert read_prompts_file(path) == [[Message("user", "fine")]]
    path.write_text('{"other": 1}\n')
    with pytest.raises(PromptError, match=r"prompts.jsonl:1: has none of the keys"):
        read_prompts_file(path)


def test_multi_turn_prompts_keep_every_prior_turn_under_the_chat_template(tiny_tokenizer):
    turns = [
        Message("user", "Tell me about rivers."),
        Message("assistant", "Which river?"),
        Message("user", "The longest one."),
    ]
    text = tiny_tokenizer.decode(encode(tiny_tokenizer, turns))
    assert text.index("Tell me about rivers.") < text.index("Which river?") < text.index("The longest one.")
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt: the policy writes the next assistant turn
    prompts = build_prompts([turns, turns], tiny_tokenizer, max_prompt_tokens=64)
    assert [p.messages for p in prompts] == [turns]  # deduplicated; long ones are cut (tests/test_prompts.py)


def test_heldout_prompts_are_fixed_by_conversation_id(tiny_tokenizer):
    conversations = [[Message("user", f"Question number {i}?")] for i in range(20)]
    train, heldout = split_heldout(build_prompts(conversations, tiny_tokenizer, 64), 5)
    train2, heldout2 = split_heldout(build_prompts(list(reversed(conversations)), tiny_tokenizer, 64), 5)
    assert [p.messages for p in heldout] == [p.messages for p in heldout2] and len(train) == 15
    assert not {p.conversation_id for p in heldout} & {p.conversation_id for p in train}


def test_prompts_from_the_preference_store(home, tmp_path):
    store = store_with_hh(tmp_path, 30)
    path = store.settings.path
    expected = {r[0] for r in store.con.execute("SELECT id FROM conversations").fetchall()}
    store.close()
    from rm_service.conversation import conversation_id

    prompts = read_prompts_store(path)
    assert {conversation_id(p) for p in prompts} == expected and len(prompts) >= 25


def test_the_documented_settings_table_matches_the_code():
    spec = importlib.util.spec_from_file_location("settings_table", REPO / "tools" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = (REPO / "docs" / "policy-trainer.md").read_text()
    begin, end = "<!-- PPO-SETTINGS:BEGIN -->\n", "<!-- PPO-SETTINGS:END -->"
    documented = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert documented == module.table(PPOSettings) + "\n", (
        "paste `.venv/bin/python -m policy_trainer.settings` between the markers"
    )


def test_every_setting_is_documented():
    for name, field in PPOSettings.model_fields.items():
        assert field.description and len(field.description) > 10, name


def test_version_and_help_do_not_import_torch():
    """`policy-trainer --version` answers without loading torch (it took 1.5-1.8 s when it did):
    the settings, the parser and the estimators' registry import it only when training runs."""
    done = run_cli("--version", env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0 and done.stdout.startswith("policy-trainer ")
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "policy_trainer.settings" in imported  # the probe sees the imports
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers")]
