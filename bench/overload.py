"""Goodput under overload: what the server keeps serving, and how fast it refuses the rest.

1. the server runs as `rm-service serve` in its own process (scorer only, bench/score.py's
   helpers), with its default admission: the in-flight token limit is the model's measured
   rate x `max_queue_wait_s`;
2. calibration: one call of 256 items gives the mean tokens of an item, then 64 callers for 5 s
   saturate the server; its capacity, in calls, is then its token limit (read from /metrics:
   the measured rate x target wait) over the tokens of one call;
3. for each offered load (1x, 2x, 4x capacity), that many closed-loop callers each keep one
   call of `--items-per-call` items outstanding for `--seconds`, every call with a
   `--deadline`; a refused call (RESOURCE_EXHAUSTED) backs off as the PPO client does (0.2 s
   doubling to 5 s, jittered: rm_client.backoff_delays) and tries again.
   Every caller talks to 127.0.0.1 only.

Goodput is the items answered OK within the window, per second; "% of 1x" compares it with
the 1x level of the same run, where admission refuses (almost) nothing: the unloaded rate.
The items per batch and padded / real tokens columns come from the server's /metrics.

    .venv/bin/python bench/overload.py --model var/registry/v1 [--seconds 20] [--deadline 10]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from rm_client import backoff_delays
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.server.app import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import hh_items, pct, served_backend, start_server

BACKOFF_S, BACKOFF_MAX_S = 0.2, 5.0  # the PPO client's defaults (PPOSettings.score_backoff_s, score_backoff_max_s)


@dataclass
class Level:
    callers: int
    ok: list[float] = field(default_factory=list)  # latencies of answered calls, s
    rejected: list[float] = field(default_factory=list)  # latencies of RESOURCE_EXHAUSTED answers, s
    items: int = 0
    batches: float = 0.0  # model batches and the items, real and padded tokens in them (from /metrics)
    batch_items: float = 0.0
    padding: float = 0.0
    deadline_exceeded: int = 0
    other: dict[str, int] = field(default_factory=dict)


async def run_level(address: str, items, callers: int, per_call: int, seconds: float, deadline: float) -> Level:
    """`callers` closed-loop callers for `seconds`; what finished inside the window is counted."""
    level, end = Level(callers), time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def caller(seed: int) -> None:
            rng, retries = random.Random(seed), 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await stub.Score(reward_pb2.ScoreRequest(items=rng.sample(items, per_call)), timeout=deadline)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                t1 = time.perf_counter()
                if t1 > end:
                    return
                retries = _count(level, code, t1 - t0, per_call, retries)
                if retries:
                    await asyncio.sleep(backoff_delays(BACKOFF_S, BACKOFF_MAX_S, retries, rng)[-1])

        tasks = [asyncio.ensure_future(caller(i)) for i in range(callers)]
        await asyncio.sleep(seconds)
        await asyncio.wait(tasks, timeout=deadline + 5)
        for t in tasks:
            t.cancel()
    return level


def _count(level: Level, code: grpc.StatusCode, latency: float, per_call: int, retries: int) -> int:
    """Record one answer; returns the caller's consecutive refusals (0: no backoff)."""
    if code == grpc.StatusCode.OK:
        level.ok.append(latency)
        level.items += per_call
        return 0
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        level.rejected.append(latency)
        return retries + 1
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        level.deadline_exceeded += 1
    else:
        level.other[code.name] = level.other.get(code.name, 0) + 1
    return 0


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def batch_figures(port: int) -> tuple[float, float, float]:
    """Model batches so far, the items in them and the sum of their padded/real token ratios."""
    return (
        metric(port, "rm_batch_size_count"),
        metric(port, "rm_batch_size_sum"),
        metric(port, "rm_batch_padding_ratio_sum"),
    )


def measured_level(address: str, port: int, items, callers: int, args) -> Level:
    before = batch_figures(port)
    level = asyncio.run(run_level(address, items, callers, args.items_per_call, args.seconds, args.deadline))
    level.batches, level.batch_items, level.padding = (b - a for a, b in zip(before, batch_figures(port), strict=True))
    return level


def mean_tokens(address: str, items, n: int = 256) -> float:
    """Mean tokens of an item as the server counts them (one call of `n` items)."""
    with grpc.insecure_channel(address) as channel:
        response = reward_pb2_grpc.RewardServiceStub(channel).Score(
            reward_pb2.ScoreRequest(items=items[:n]), timeout=300
        )
    return sum(r.num_tokens for r in response.results) / n


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by process `pid` (with its threads), or by the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])) / tick  # all but idle and iowait


def hardware(log_path: Path) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    threads = os.environ.get("RM_SERVE_TORCH_THREADS") or str(os.cpu_count())
    return (
        f"{cpu}, {os.cpu_count()} cores shared by server and callers; server torch/ORT threads {threads}; "
        f"{served_backend(log_path)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="minilm-l6", help="a registry version directory, a bundled name or an HF directory"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="per offered load")
    parser.add_argument("--deadline", type=float, default=10.0, help="deadline of every call, s")
    parser.add_argument(
        "--loads", type=float, nargs="+", default=[1, 2, 4], help="offered loads, in multiples of capacity"
    )
    parser.add_argument("--items-per-call", type=int, default=8, help="as bench/score.py")
    args = parser.parse_args()
    home = Path(os.environ.setdefault("RM_HOME", tempfile.mkdtemp(prefix="rm-bench-")))
    items = hh_items(2000)
    gc.freeze()  # the callers' own collector pauses are not the server's latency
    metrics_port = free_port()
    server, address, log_path = start_server(args.model, 0, False, home, {"RM_SERVE_METRICS_PORT": str(metrics_port)})
    try:
        per_item = mean_tokens(address, items)
        asyncio.run(
            run_level(address, items, 64, args.items_per_call, 5.0, args.deadline)
        )  # saturate: the rate of full batches
        limit, rate = (
            metric(metrics_port, "rm_admission_token_limit"),
            metric(metrics_port, "rm_model_tokens_per_second"),
        )
        capacity = max(1, round(limit / per_item / args.items_per_call))
        before = cpu_seconds(), cpu_seconds(server.pid), cpu_seconds(os.getpid()), time.perf_counter()
        levels = [
            (load, measured_level(address, metrics_port, items, max(1, round(load * capacity)), args))
            for load in args.loads
        ]
        used = [
            b - a
            for a, b in zip(
                before,
                (cpu_seconds(), cpu_seconds(server.pid), cpu_seconds(os.getpid()), time.perf_counter()),
                strict=False,
            )
        ]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print(
        f"\n{hardware(log_path)}; model {args.model}; HH-RLHF items, {per_item:.0f} tokens each on average, "
        f"{args.items_per_call} per call; deadline {args.deadline:g} s; {args.seconds:g} s per load\n"
    )
    total, by_server, by_callers, wall = used
    print(
        f"CPU during the loads: server {by_server / wall:.2f} cores, callers {by_callers / wall:.2f}, other processes "
        f"{max(0.0, total - by_server - by_callers) / wall:.2f} (of {os.cpu_count()})\n"
    )
    print(
        f"capacity: token limit {limit:.0f} (measured {rate:.0f} tokens/s x target wait) / ({per_item:.0f} tokens x "
        f"{args.items_per_call} items per call) = {capacity} callers\n"
    )
    base = levels[0][1].items / args.seconds
    print(
        "| offered load | callers | goodput items/s | % of 1x (unloaded) | admitted p50 / p99 ms | rejection p50 / "
        "p99 ms | rejected | DEADLINE_EXCEEDED | other errors | items per batch | padded / real tokens "
        "|\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for load, lv in levels:
        goodput = lv.items / args.seconds
        other = ", ".join(f"{k} {v}" for k, v in lv.other.items()) or "0"
        print(
            f"| {load:g}x | {lv.callers} | {goodput:.1f} | {goodput / base:.0%} | {pct(lv.ok, 50):.0f} / "
            f"{pct(lv.ok, 99):.0f} | {pct(lv.rejected, 50):.1f} / {pct(lv.rejected, 99):.1f} | {len(lv.rejected)} | "
            f"{lv.deadline_exceeded} | {other} | {lv.batch_items / max(lv.batches, 1):.1f} | "
            f"{lv.padding / max(lv.batches, 1):.2f} |"
        )


if __name__ == "__main__":
    main()
