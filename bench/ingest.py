"""Ingestion benchmark: group commit against one commit per request.

Starts the store-only server (`rm-service serve --no-model`) twice as a subprocess, each on a
fresh DuckDB file in a temp dir: once with the default group commit and once with
RM_STORE_GROUP_COMMIT_MAX_LABELS=1 (every request its own transaction). Both get the same
closed-loop load: N client threads, each sending single-label IngestLabels requests (real
HH-RLHF pairs, unique label ids) back to back for a fixed time. Every label is acknowledged
only after its COMMIT, so labels/s is durable labels per second.

Commits are counted from the file afterwards: `labels.created_at` defaults to DuckDB's
`current_timestamp`, the start time of the transaction, so distinct values = transactions.

    .venv/bin/python bench/ingest.py --seconds 10
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import grpc

from rm_client.channel import open_channel
from rm_client.messages import pair_label
from rm_service.api.v1 import preference_pb2, preference_pb2_grpc
from rm_service.client import start_server_process
from rm_service.data import HH_PAIRS
from rm_service.formats.hh import HHPair, read_pairs

REPO = Path(__file__).resolve().parent.parent
DATA = HH_PAIRS
MODES = {"group commit (default)": {}, "per-label commit": {"RM_STORE_GROUP_COMMIT_MAX_LABELS": "1"}}


def load_templates(path: Path) -> list[preference_pb2.Label]:
    """One label template per usable HH pair: prompt turns, chosen ranked over rejected."""
    out = []
    for _, _, pair in read_pairs(path):
        if isinstance(pair, HHPair) and pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected:
            out.append(pair_label(pair.prompt, pair.chosen, pair.rejected, annotator="bench"))
    return out


def start_server(workdir: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "RM_HOME": str(workdir), "RM_STORE_PATH": str(workdir / "rm.duckdb"), **extra_env}
    return start_server_process(env, workdir, timeout=60, args=["--no-model"])


def drive(
    address: str, templates: list[preference_pb2.Label], threads: int, seconds: float
) -> tuple[int, list[float], list[str]]:
    """Closed loop: each thread sends one label per request until the time is up.
    Returns (labels acknowledged INSERTED, latencies in s, problems)."""
    end = [0.0]  # set by the barrier's action, before any client is released
    barrier = threading.Barrier(
        threads + 1, action=lambda: end.__setitem__(0, time.perf_counter() + seconds), timeout=60
    )
    results: list[tuple[int, list[float], list[str]]] = [(0, [], [])] * threads

    def client(t: int) -> None:
        acked, latencies, problems = 0, [], []
        with open_channel(address) as channel:
            stub = preference_pb2_grpc.PreferenceServiceStub(channel)

            def send(label_id: str, n: int) -> tuple[int, float]:
                label = preference_pb2.Label()
                label.CopyFrom(templates[(t * 7919 + n) % len(templates)])
                label.label_id = label_id
                started = time.perf_counter()
                status = (
                    stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[label]), timeout=30).results[0].status
                )
                return status, time.perf_counter() - started

            send(f"warm-{t}", 0)  # connect before the clock starts
            barrier.wait()
            n = 0
            while time.perf_counter() < end[0]:
                n += 1
                try:
                    status, latency = send(f"t{t}-{n}", n)
                except grpc.RpcError as exc:
                    problems.append(exc.code().name)
                    continue
                latencies.append(latency)
                if status == preference_pb2.INSERTED:
                    acked += 1
                else:
                    problems.append(preference_pb2.IngestStatus.Name(status))
        results[t] = (acked, latencies, problems)

    workers = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    for w in workers:
        w.join(seconds + 90)
    return (sum(r[0] for r in results), [x for r in results for x in r[1]], [p for r in results for p in r[2]])


def count_commits(store: Path) -> tuple[int, int]:
    """(labels, transactions that stored them) of the timed run, from the closed file."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(
            "SELECT count(*), count(DISTINCT created_at) FROM labels WHERE label_id NOT LIKE 'warm-%'"
        ).fetchone()
    finally:
        con.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_mode(extra_env: dict[str, str], templates, threads: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="rm-bench-") as tmp:
        workdir = Path(tmp)
        proc, address = start_server(workdir, extra_env)
        try:
            acked, latencies, problems = drive(address, templates, threads, seconds)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if code != 0:
            raise RuntimeError(f"server exited with {code}:\n{(workdir / 'server.log').read_text()[-2000:]}")
        stored, commits = count_commits(workdir / "rm.duckdb")
    return {
        "acked": acked,
        "per_s": acked / seconds,
        "p50": percentile(latencies, 0.5) * 1e3,
        "p99": percentile(latencies, 0.99) * 1e3,
        "stored": stored,
        "commits": commits,
        "problems": problems,
    }


def cpu_model() -> str:
    from rm_service.models.precision import cpu_name

    return cpu_name()


def main() -> int:
    p = argparse.ArgumentParser(description="IngestLabels throughput: group commit vs per-label commit")
    p.add_argument("--seconds", type=float, default=10.0, help="timed load per mode (default 10)")
    p.add_argument("--threads", type=int, default=16, help="closed-loop client threads (default 16)")
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()
    templates = load_templates(args.data)
    print(
        f"machine: nproc={os.cpu_count()}, {cpu_model()}; Python {platform.python_version()}, duckdb "
        f"{duckdb.__version__}"
    )
    print(
        f"load: {args.threads} client threads in one process, 1 label per IngestLabels request, {args.seconds:g} s "
        f"per mode, {len(templates)} HH-RLHF pairs from {args.data.name}\n"
    )
    rows = {name: run_mode(env, templates, args.threads, args.seconds) for name, env in MODES.items()}
    print("| mode | labels acknowledged | labels/s | p50 ms | p99 ms | commits | labels/commit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['acked']} | {r['per_s']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['commits']} | "
            f"{r['stored'] / max(r['commits'], 1):.1f} |"
        )
    group, single = rows.values()
    print(f"\ngroup commit / per-label: {group['per_s'] / max(single['per_s'], 1e-9):.2f}x labels/s")
    for name, r in rows.items():
        if r["problems"]:
            print(f"{name}: {len(r['problems'])} requests not INSERTED: {sorted(set(r['problems']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
