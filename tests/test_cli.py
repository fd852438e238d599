"""The CLI: real subprocesses, clear one-line errors, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import HH_FILE


def _cli(*args, home):
    env = {**os.environ, "RM_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "rm_service.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_then_stats(home):
    result = _cli("import", "--format", "hh", str(HH_FILE), home=home)
    assert result.returncode == 0, result.stderr
    assert "inserted 1842" in result.stdout and "rejected 7" in result.stdout
    stats = _cli("stats", home=home)
    assert '"IMPORT": 1842' in stats.stdout


def test_missing_file_is_a_message_not_a_traceback(home):
    result = _cli("import", "--format", "hh", "/no/such/file.jsonl", home=home)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_version_is_a_message(home):
    result = _cli("models", "show", "v9", home=home)
    assert result.returncode == 2 and "v9" in result.stderr and "Traceback" not in result.stderr


def test_a_hub_id_as_serve_model_says_how_to_get_it(home):
    """vLLM and TEI users pass a hub id; rm-service downloads nothing at run time and says so."""
    result = _cli("serve", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--port", "0", home=home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "looks like a Hugging Face Hub id" in result.stderr
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR" in result.stderr


def test_bad_model_path_for_eval_is_a_message(home):
    result = _cli("eval", "--data", str(HH_FILE), "--model", "/no/such/model", home=home)
    assert result.returncode == 2 and "model:" in result.stderr and "Traceback" not in result.stderr


def test_train_on_empty_store_is_a_message(home):
    result = _cli("train", "--backbone", "minilm-l6", home=home)
    assert result.returncode == 2 and "no preference pairs" in result.stderr


def test_eval_prints_a_table_for_any_model_directory(home, tiny_rm_dir):
    result = _cli("eval", "--data", str(HH_FILE), "--model", str(tiny_rm_dir), "--limit", "12", home=home)
    assert result.returncode == 0, result.stderr
    assert "| all | 12 |" in result.stdout and "turn" in result.stdout and "tokens" in result.stdout


def test_eval_needs_data_or_snapshot(home):
    result = _cli("eval", home=home)
    assert result.returncode == 2 and "--data" in result.stderr
