"""The CLI: clear one-line errors, no tracebacks. The commands run in-process through
`rm_service.cli.main` (what the console script calls); one test starts the real module as a
subprocess, for the exit status and stderr a shell sees."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import HH_FILE
from conftest import run_cli as _cli  # RM_HOME is the `home` fixture's


def test_missing_file_is_a_message_not_a_traceback_from_the_real_process(home):
    env = {**os.environ, "RM_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "rm_service.cli", "import", "--format", "hh", "/no/such/file.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_import_then_stats(home, capsys):
    code, out, err = _cli("import", "--format", "hh", str(HH_FILE), capsys=capsys)
    assert code == 0, err
    assert "inserted 1842" in out and "rejected 7" in out
    code, out, _ = _cli("stats", capsys=capsys)
    assert code == 0 and '"IMPORT": 1842' in out


def test_unknown_model_version_is_a_message(home, capsys):
    code, _, err = _cli("models", "show", "v9", capsys=capsys)
    assert code == 2 and "v9" in err and "Traceback" not in err


def test_a_hub_id_as_serve_model_says_how_to_get_it(home, capsys):
    """vLLM and TEI users pass a hub id; rm-service downloads nothing at run time and says so."""
    code, _, err = _cli("serve", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--port", "0", capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert "looks like a Hugging Face Hub id" in err
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR" in err


def test_bad_model_path_for_eval_is_a_message(home, capsys):
    code, _, err = _cli("eval", "--data", str(HH_FILE), "--model", "/no/such/model", capsys=capsys)
    assert code == 2 and "model:" in err and "Traceback" not in err


def test_train_on_empty_store_is_a_message(home, capsys):
    code, _, err = _cli("train", "--backbone", "minilm-l6", capsys=capsys)
    assert code == 2 and "no preference pairs" in err


def test_eval_prints_a_table_for_any_model_directory(home, tiny_rm_dir, capsys):
    code, out, err = _cli("eval", "--data", str(HH_FILE), "--model", str(tiny_rm_dir), "--limit", "12", capsys=capsys)
    assert code == 0, err
    assert "| all | 12 |" in out and "turn" in out and "tokens" in out


def test_eval_needs_data_or_snapshot(home, capsys):
    code, _, err = _cli("eval", capsys=capsys)
    assert code == 2 and "--data" in err
