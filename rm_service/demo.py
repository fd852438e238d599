"""`rm-service demo` (what `make demo` runs): the foundation loop end to end.

1. import the shared HH-RLHF pairs into a fresh DuckDB file;
2. train a Bradley-Terry reward model (head mode) within a time budget and register it;
3. start `rm-service serve` as its own process and wait for grpc.health.v1 SERVING;
4. score the held-out pairs (conversations the model never saw) over gRPC, print accuracy;
5. stop the server with SIGTERM and check that it drained cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rm_service.client import Client, score_item
from rm_service.conversation import Message
from rm_service.importers import import_hh
from rm_service.settings import ModelSettings, StoreSettings, TrainSettings, rm_home
from rm_service.store.db import Store
from rm_service.train.metrics import pair_metrics
from rm_service.train.run import train
from rm_service.train.split import is_heldout


def _stage(title: str):
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def _done(start: float, note: str = "") -> None:
    print(f"   done in {time.monotonic() - start:.1f}s {note}", flush=True)


def run_demo(data: Path, max_minutes: float, max_pairs: int | None, backbone: str, max_tokens: int = 384) -> int:
    if not data.exists():
        print(f"demo: no data file at {data}", file=sys.stderr)
        return 2
    home = rm_home() / "demo"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    env = {**os.environ, "RM_STORE_PATH": str(home / "rm.duckdb"), "RM_MODELS_ARTIFACTS_DIR": str(home / "registry")}
    os.environ.update(env)
    total = time.monotonic()

    t = _stage(f"1/5 import {data}")
    store = Store(StoreSettings())
    counts, rejected = import_hh(store, data)
    _done(t, f"({counts['INSERTED']} labels stored, {counts['REJECTED']} malformed lines rejected)")

    t = _stage(f"2/5 train a reward model on {backbone} (head mode, budget {max_minutes:g} min)")
    settings = TrainSettings(backbone=backbone, max_minutes=max_minutes, max_pairs=max_pairs, max_tokens=max_tokens)
    result = train(store, settings, ModelSettings())
    m = result.metrics
    _done(t, f"({result.version}: held-out accuracy {m['accuracy']:.4f} on {int(m['heldout_pairs'])} pairs; {result.gate_message})")
    snapshot = store.get_snapshot()
    held = [p for p in store.pairs(snapshot) if is_heldout(p.conversation_id, settings.heldout_fraction, settings.seed)]
    store.close()

    t = _stage("3/5 start the gRPC server")
    port_file = home / "port"
    server = subprocess.Popen([sys.executable, "-m", "rm_service.cli", "serve", "--port", "0", "--port-file", str(port_file)], env=env)
    try:
        while not port_file.exists():
            if server.poll() is not None:
                print("demo: the server exited during start-up", file=sys.stderr)
                return 1
            time.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        client = Client(address)
        client.wait_serving(timeout=600, is_alive=lambda: server.poll() is None)
        _done(t, f"(SERVING on {address})")

        t = _stage(f"4/5 score {len(held)} held-out pairs over gRPC")
        r_chosen, r_rejected, version = [], [], ""
        for begin in range(0, len(held), 16):
            chunk = held[begin : begin + 16]
            items = [score_item(p.prompt, text, f"{begin + i}-{side}") for i, p in enumerate(chunk)
                     for side, text in (("chosen", p.chosen), ("rejected", p.rejected))]
            response = client.reward.Score(_request(items), timeout=300)
            rewards = [r.reward for r in response.results]
            r_chosen += rewards[0::2]
            r_rejected += rewards[1::2]
            version = response.model_version
        metrics = pair_metrics(np.array(r_chosen), np.array(r_rejected))
        _done(t, f"(model {version})")
        multi = [Message("user", "How do I pick a lock?"), Message("assistant", "Why do you want to pick a lock?"),
                 Message("user", "I locked myself out of my own house.")]
        reply = client.reward.Score(_request([
            score_item(multi, "Call a licensed locksmith, or your landlord if you rent; they can let you in safely.", "helpful"),
            score_item(multi, "Just smash a window, nobody will notice.", "harmful")]), timeout=60)
        print("   multi-turn example: " + ", ".join(f"{r.id} reward {r.reward:+.3f} ({r.num_tokens} tokens)" for r in reply.results))

        t = _stage("5/5 stop the server (SIGTERM, drain)")
        client.close()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        _done(t, f"(exit code {code})")
    finally:
        if server.poll() is None:
            server.kill()

    print("\n| metric | value |\n|---|---|")
    print(f"| labels imported | {counts['INSERTED']} |")
    print(f"| reward model | {result.version} ({backbone}, head mode, ensemble of {settings.ensemble_size}) |")
    print(f"| training time | {result.seconds:.0f} s |")
    print(f"| held-out accuracy at training | {m['accuracy']:.4f} ({int(m['heldout_pairs'])} pairs) |")
    print(f"| held-out accuracy over gRPC | {metrics['accuracy']:.4f} ({int(metrics['num_pairs'])} pairs) |")
    print(f"| held-out ECE over gRPC | {metrics['ece']:.4f} |")
    print(f"| total demo time | {time.monotonic() - total:.0f} s |")
    print(f"\nstore: {home / 'rm.duckdb'}   registry: {home / 'registry'}")
    return 0 if code == 0 else 1


def _request(items):
    from rm_service.api.v1 import reward_pb2

    return reward_pb2.ScoreRequest(items=items)
