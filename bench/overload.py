"""Goodput under overload, with today's admission: calls queue while the work ahead of them is
within `max_queue_wait_s` (or the item cap), and are refused past it.

1. the server runs as `rm-service serve` in its own process (scorer only, bench/score.py's
   helpers), with `--max-inflight-items` as its item cap (0: the default, none) and
   `--model-nice` as its model thread's priority;
2. capacity, in closed-loop callers: with an item cap, cap // items per call; without, the
   callers whose calls all queue below the token limit (measured rate x max_queue_wait_s, read
   from /metrics after `--warmup` s of 2 callers): ceil(limit / tokens of one call);
3. for each offered load (`--alone` first: one caller), that many closed-loop callers each keep
   one call of `--items-per-call` items outstanding, every call with a `--deadline`; a refused
   call (RESOURCE_EXHAUSTED) is retried after `--retry-after-s` (clients that retry fast,
   whatever the server says) or, with `--retry ppo`, as the PPO client does (0.2 s doubling
   to 5 s, jittered, never less than the server's `grpc-retry-pushback-ms`). Each load runs
   `--warmup` s uncounted (the queue fills), then `--seconds` s counted.
   Every caller talks to 127.0.0.1 only.

Goodput is the items the model scored inside the counted window, per second (from /metrics:
exact, where counting answers would move by a whole 512-item call at the window's edges); with
no call failing in the whole load (DEADLINE_EXCEEDED, other: 0) and no item dropped, every one
went to a call answered OK. "answered items/s" counts the answers inside the window instead.
"% of 1x" compares goodput with the 1x level of the same run. Calls still in flight when a
window ends are cancelled, so the next load starts from an empty queue. The CPU columns are cores over the window: the
model thread with its OpenMP workers (threads named "model"), the rest of the server, and the
callers' process.

    .venv/bin/python bench/overload.py --max-inflight-items 64 --items-per-call 8 --retry-after-s 0.01
    .venv/bin/python bench/overload.py --items-per-call 512 --alone --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
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
from rm_client.retry import pushback_s
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.server.app import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import hh_items, pct, served_backend, start_server

BACKOFF_S, BACKOFF_MAX_S = 0.2, 5.0  # the PPO client's defaults (PPOSettings.score_backoff_s, score_backoff_max_s)


@dataclass
class Level:
    name: str
    callers: int
    ok: list[float] = field(default_factory=list)  # latencies of calls answered inside the window, s
    rejected: list[float] = field(default_factory=list)  # latencies of RESOURCE_EXHAUSTED answers inside it, s
    items: int = 0
    deadline_exceeded: int = 0
    other: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # cores over the window: model, server_rest, callers, other
    model_items: float = 0.0  # items the model scored in the window (from /metrics)
    dropped: float = 0.0  # items that left the queue unscored in the window (deadline passed, caller gone)
    batches: float = 0.0
    batch_items: float = 0.0


class Retry:
    """How a caller waits after a refusal: a fixed delay, or the PPO client's backoff."""

    def __init__(self, fixed_s: float | None, rng: random.Random):
        self.fixed_s, self.rng, self.refusals = fixed_s, rng, 0

    def delay(self, err: grpc.aio.AioRpcError) -> float:
        self.refusals += 1
        if self.fixed_s is not None:
            return self.fixed_s
        backoff = backoff_delays(BACKOFF_S, BACKOFF_MAX_S, self.refusals, self.rng)[-1]
        return max(backoff, pushback_s(err))


async def run_level(address: str, items, level: Level, args, on_window) -> None:
    """`level.callers` closed-loop callers: `args.warmup` s uncounted, then `args.seconds` s counted."""
    start = time.perf_counter()
    window = (start + args.warmup, start + args.warmup + args.seconds)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def caller(seed: int) -> None:
            rng = random.Random(seed)
            retry = Retry(args.retry_after_s if args.retry == "fixed" else None, rng)
            request = None
            while time.perf_counter() < window[1]:
                if request is None:  # a refused call is retried as it was, as a client's retry resends its message
                    request = reward_pb2.ScoreRequest(items=rng.sample(items, args.items_per_call))
                t0 = time.perf_counter()
                try:
                    await stub.Score(request, timeout=args.deadline)
                    code, err = grpc.StatusCode.OK, None
                except grpc.aio.AioRpcError as exc:
                    code, err = exc.code(), exc
                t1 = time.perf_counter()
                _count(level, code, t1 - t0, args.items_per_call, window[0] <= t1 <= window[1])
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(retry.delay(err))
                else:
                    request, retry.refusals = None, 0

        tasks = [asyncio.ensure_future(caller(i)) for i in range(level.callers)]
        await asyncio.sleep(args.warmup)
        marks = on_window()
        await asyncio.sleep(args.seconds)
        level.cpu, (level.model_items, level.dropped, level.batches, level.batch_items) = on_window(marks)
        for t in tasks:  # calls still in flight are cancelled (their items leave the queue): the next load starts
            t.cancel()  # from an empty queue without waiting up to a deadline for them
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(1.0)


def _count(level: Level, code: grpc.StatusCode, latency: float, per_call: int, counted: bool) -> None:
    """Answers inside the window are counted; a failure (neither OK nor a refusal) at any time."""
    if code == grpc.StatusCode.OK:
        if counted:
            level.ok.append(latency)
            level.items += per_call
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if counted:
            level.rejected.append(latency)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        level.deadline_exceeded += 1
    else:
        level.other[code.name] = level.other.get(code.name, 0) + 1


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def model_figures(port: int) -> tuple[float, float, float, float]:
    """Items scored so far, items dropped unscored, model batches, and the items in them."""
    text = metrics_text(port)
    return (
        metric(text, "rm_scores_total"),
        metric(text, "rm_dropped_items_total"),
        metric(text, "rm_batch_size_count"),
        metric(text, "rm_batch_size_sum"),
    )


def thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the threads named "model": the model thread and the OpenMP workers it started, all of pid)."""
    tick = os.sysconf("SC_CLK_TCK")
    model = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        if comm == "model":
            model += (int(fields[11]) + int(fields[12])) / tick
    return model, cpu_seconds(pid)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by process `pid` (with its threads), or by the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])) / tick  # all but idle and iowait


def window_marks(server_pid: int, metrics_port: int):
    """A callable: called without arguments, the marks at the window's start; with them, the
    window's CPU in cores and the model's items, batches and batch items over it."""

    def mark():
        return (time.perf_counter(), cpu_seconds(), *thread_cpu(server_pid), cpu_seconds(os.getpid())), model_figures(
            metrics_port
        )

    def on_window(before=None):
        if before is None:
            return mark()
        (t0, all0, model0, server0, me0), figs0 = before
        (t1, all1, model1, server1, me1), figs1 = mark()
        wall = t1 - t0
        cores = {
            "model": (model1 - model0) / wall,
            "server_rest": ((server1 - server0) - (model1 - model0)) / wall,
            "callers": (me1 - me0) / wall,
        }
        cores["other"] = max(0.0, (all1 - all0) / wall - cores["model"] - cores["server_rest"] - cores["callers"])
        return cores, tuple(b - a for a, b in zip(figs0, figs1, strict=True))

    return on_window


def mean_tokens(address: str, items, n: int = 256) -> float:
    """Mean tokens of an item as the server counts them (one call of `n` items)."""
    with grpc.insecure_channel(address) as channel:
        response = reward_pb2_grpc.RewardServiceStub(channel).Score(
            reward_pb2.ScoreRequest(items=items[:n]), timeout=300
        )
    return sum(r.num_tokens for r in response.results) / n


def capacity(args, address: str, items, metrics_port: int, per_item: float, on_window) -> tuple[int, str]:
    """Closed-loop callers the admission takes without refusing, and how that was found."""
    if args.max_inflight_items:
        n = max(1, args.max_inflight_items // args.items_per_call)
        return n, f"item cap {args.max_inflight_items} // {args.items_per_call} items per call = {n} callers"
    probe = Level("probe", 2)
    asyncio.run(run_level(address, items, probe, argparse.Namespace(**{**vars(args), "seconds": 1.0}), on_window))
    text = metrics_text(metrics_port)
    limit, rate = metric(text, "rm_admission_token_limit"), metric(text, "rm_model_tokens_per_second")
    call = per_item * args.items_per_call
    n = max(1, math.ceil(limit / call))
    return n, (
        f"token limit {limit:.0f} (measured {rate:.0f} tokens/s x max_queue_wait_s) / ({per_item:.0f} tokens x "
        f"{args.items_per_call} items per call) -> {n} callers"
    )


def hardware(log_path: Path) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    threads = os.environ.get("RM_SERVE_TORCH_THREADS") or str(os.cpu_count())
    return (
        f"{cpu}, {os.cpu_count()} cores shared by server and callers; server torch threads {threads}; "
        f"{served_backend(log_path)}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="minilm-l6", help="a registry version directory, a bundled name or an HF directory"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="counted window per offered load")
    parser.add_argument("--warmup", type=float, default=5.0, help="uncounted seconds before each window")
    parser.add_argument("--deadline", type=float, default=60.0, help="deadline of every call, s (the PPO client's)")
    parser.add_argument(
        "--loads", type=float, nargs="+", default=[1, 2, 4], help="offered loads, in multiples of capacity"
    )
    parser.add_argument("--alone", action="store_true", help="measure one caller alone first")
    parser.add_argument("--items-per-call", type=int, default=8)
    parser.add_argument("--max-inflight-items", type=int, default=0, help="the server's item cap (0: none)")
    parser.add_argument("--model-nice", type=int, default=None, help="RM_SERVE_MODEL_NICE (unset: the default)")
    parser.add_argument("--retry", choices=["fixed", "ppo"], default="fixed")
    parser.add_argument("--retry-after-s", type=float, default=0.01, help="with --retry fixed")
    parser.add_argument("--server-env", nargs="*", default=[], help="more RM_* settings for the server, K=V")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    home = Path(os.environ.setdefault("RM_HOME", tempfile.mkdtemp(prefix="rm-bench-")))
    items = hh_items(2000)
    gc.freeze()  # the callers' own collector pauses are not the server's latency
    metrics_port = free_port()
    env = {"RM_SERVE_METRICS_PORT": str(metrics_port), **dict(kv.split("=", 1) for kv in args.server_env)}
    if args.model_nice is not None:
        env["RM_SERVE_MODEL_NICE"] = str(args.model_nice)
    server, address, log_path = start_server(args.model, args.max_inflight_items, False, home, env)
    try:
        on_window = window_marks(server.pid, metrics_port)
        per_item = mean_tokens(address, items, min(256, args.max_inflight_items or 256))
        n, how = capacity(args, address, items, metrics_port, per_item, on_window)
        plan = ([("alone", 1)] if args.alone else []) + [(f"{load:g}x", max(1, round(load * n))) for load in args.loads]
        levels = []
        for name, callers in plan:
            level = Level(name, callers)
            # one caller alone reaches its steady state after one call, not after the queue fills
            warm = argparse.Namespace(**{**vars(args), "warmup": min(args.warmup, 15.0)}) if callers == 1 else args
            asyncio.run(run_level(address, items, level, warm, on_window))
            levels.append(level)
            print(f"{name}: {level.items / args.seconds:.1f} items/s", file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    report(args, levels, per_item, how, hardware(log_path), log_path)


def report(args, levels: list[Level], per_item: float, how: str, hw: str, log_path: Path) -> None:
    nice = re.search(r"model thread at nice \+(\d+)", log_path.read_text())
    retry = f"{args.retry_after_s * 1000:g} ms after a refusal" if args.retry == "fixed" else "the PPO client's backoff"
    print(
        f"\n{hw}; model {args.model}, model thread at nice +{nice.group(1) if nice else '?'}; HH-RLHF items, "
        f"{per_item:.0f} tokens each on average, {args.items_per_call} per call; callers retry {retry}; deadline "
        f"{args.deadline:g} s; {args.warmup:g} s warm-up then {args.seconds:g} s counted per load\n\ncapacity: {how}\n"
    )
    base = next((lv for lv in levels if lv.name == "1x"), levels[0]).model_items / args.seconds
    print(
        "| load | callers | goodput items/s | % of 1x | answered items/s | admitted p50 / p99 ms | refusals/s | "
        "refusal p50 / p99 ms | DEADLINE_EXCEEDED | other | dropped items | items per batch | CPU cores: model / "
        "server rest / callers / other |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for lv in levels:
        goodput = lv.model_items / args.seconds
        other = ", ".join(f"{k} {v}" for k, v in lv.other.items()) or "0"
        c = lv.cpu
        print(
            f"| {lv.name} | {lv.callers} | {goodput:.1f} | {goodput / base:.0%} | {lv.items / args.seconds:.1f} | "
            f"{pct(lv.ok, 50):.0f} / {pct(lv.ok, 99):.0f} | {len(lv.rejected) / args.seconds:.0f} | "
            f"{pct(lv.rejected, 50):.1f} / {pct(lv.rejected, 99):.1f} | {lv.deadline_exceeded} | {other} | "
            f"{lv.dropped:.0f} | {lv.batch_items / max(lv.batches, 1):.1f} | {c['model']:.2f} / "
            f"{c['server_rest']:.2f} / {c['callers']:.2f} / {c['other']:.2f} |"
        )


if __name__ == "__main__":
    main()
