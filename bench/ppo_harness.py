"""The frame both SmolLM2 PPO benches share: serve the reward model as its own process, train
against it while printing one line per step, stop the server, print and write the table.

`bench/ppo_smollm2.py` (one reply per prompt) and `bench/sessions_smollm2.py` (whole sessions)
differ only in their settings, their trainer, their progress line and their table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from rm_service.data import HH_PAIRS


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    """`rm-service serve` on a free port (the promoted version, or `model`), and its address."""
    from rm_service.client import start_server_process
    from rm_service.errors import RMError

    run_dir = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    args = ["--metrics-port", "-1", *(["--model", model] if model else [])]
    try:
        return start_server_process(dict(os.environ), run_dir, timeout=600, args=args)
    except RMError as exc:
        raise SystemExit(f"the reward server did not start: {exc}") from None


def base_overrides(address: str, steps: int, run_dir: str | None) -> dict:
    """Settings every bench run sets: its steps, the served reward, HH prompts unless the
    environment names others, no progress bars."""
    overrides: dict = {"total_steps": steps, "reward_addresses": [address], "progress": False}
    if "PPO_PROMPTS_FILE" not in os.environ and "PPO_PROMPTS_STORE" not in os.environ:
        overrides["prompts_file"] = HH_PAIRS
    if run_dir:
        overrides["run_dir"] = run_dir
    return overrides


def phase_line(summary) -> str:
    p = summary.seconds_per_phase
    return (
        f"mean seconds per step: generate {p['generate']:.1f}, score {p['score']:.1f}, train {p['train']:.1f}, "
        f"total {p['step']:.1f}"
    )


def run(
    model: str | None,
    settings_for: Callable[[str], object],
    describe: Callable[[object, str], str],
    train: Callable[..., object],
    progress: Callable[[dict], str],
    table: Callable[[object, object, list[dict]], str],
) -> int:
    """Serve, build the settings for the server's address, train with one printed line per
    step, stop the server (also on failure), then print the table and write <run_dir>/bench.md."""
    proc, address = start_server(model)
    try:
        settings = settings_for(address)
        print(describe(settings, address), flush=True)
        metrics: list[dict] = []

        def on_step(m: dict) -> None:
            metrics.append(m)
            print(progress(m), flush=True)

        summary = train(settings, on_step=on_step)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = table(settings, summary, metrics)
    print(text)
    (Path(summary.run_dir) / "bench.md").write_text(text + "\n")  # type: ignore[attr-defined]
    return 0
