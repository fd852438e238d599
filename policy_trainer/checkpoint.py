"""Checkpoints that resume exactly: weights, optimizer, every RNG, controller and statistics.

One file per checkpoint, `run_dir/checkpoints/step-000010.pt`, written to a temp name and
renamed so a crash never leaves half a checkpoint; the oldest beyond `keep` are deleted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

PATTERN = "step-*.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "rng": rng_state(), "step": step}, tmp)
    os.replace(tmp, path)
    for old in sorted(directory.glob(PATTERN))[:-keep]:
        old.unlink()
    return path


def latest(run_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir(run_dir).glob(PATTERN))
    return found[-1] if found else None


def load(path: Path) -> dict:
    """A checkpoint's state; restores the RNGs as a side effect (call it last)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
