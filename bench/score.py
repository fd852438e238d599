"""Score throughput and latency of the real gRPC server against the naive loop, in one run.

A "pair" here is one scored (conversation, completion) item, on the HH-RLHF length
distribution (chosen and rejected sides of the shared file).

1. naive baseline: the same model, in process, one item at a time through plain
   transformers (tokenise, forward, read the score) — what a trainer does without a server;
2. the server runs as `rm-service serve` in its own process (scorer only), as deployed;
   the clients below run in this process and share the machine's cores with it;
3. closed loop: C clients each keep one Score request of `--items-per-call` items in
   flight; sweep C, report pairs/s and tokens/s; saturation = the best;
4. single-request latency: one client, one call at a time, the same items per call;
5. open loop at 50% and 150% of saturation: requests arrive on a Poisson clock whatever
   the answers; p50/p99 latency at 50%, rejection share and rejection latency at 150%;
6. model FLOPs utilisation: 2 x non-embedding params x tokens/s over an fp32 GEMM rate
   measured in this process, and the ceiling it puts on the server / naive ratio: the
   pairs/s the server would reach at 100% of that rate, over the naive loop's.

    .venv/bin/python bench/score.py --model var/registry/v1 [--seconds 8] [--open-seconds 30] [--int8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from rm_client.channel import open_channel
from rm_client.messages import to_proto
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.data import HH_PAIRS
from rm_service.formats.hh import HHFormatError, read_pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import gemm_flops, non_embedding_params

DATA = HH_PAIRS


def hh_items(n: int) -> list[reward_pb2.ScoreItem]:
    items = []
    for _, _, p in read_pairs(DATA):
        if isinstance(p, HHFormatError) or not p.chosen.strip() or not p.rejected.strip():
            continue
        prompt = to_proto(p.prompt)
        items += [
            reward_pb2.ScoreItem(prompt=prompt, completion=p.chosen),
            reward_pb2.ScoreItem(prompt=prompt, completion=p.rejected),
        ]
    random.Random(0).shuffle(items)
    return items[:n]


def naive_loop(model_name: str, items, seconds: float) -> tuple[float, float, int]:
    """pairs/s, tokens/s and non-embedding parameters of one-at-a-time in-process scoring with plain transformers."""
    from rm_service.conversation import Message
    from rm_service.models.version import open_model

    runtime, _ = open_model(model_name, max_tokens=512)  # a registry version: the same trained head, in torch
    model = runtime.model
    n = tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            item = items[n % len(items)]
            ids = runtime.format([Message(m.role, m.content) for m in item.prompt], item.completion)
            batch = {
                "input_ids": torch.tensor([ids.input_ids]),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            }
            if ids.token_type_ids is not None:
                batch["token_type_ids"] = torch.tensor([ids.token_type_ids])
            model(**batch)
            n, tokens = n + 1, tokens + len(ids)
    elapsed = time.perf_counter() - start
    return n / elapsed, tokens / elapsed, non_embedding_params(model)


def closed_loop(
    address: str, items, clients: int, per_call: int, seconds: float
) -> tuple[float, float, list[float], int]:
    """pairs/s, tokens/s, latencies and rejected calls with `clients` callers each keeping one
    call in flight (a rejected call backs off and retries)."""
    done, tokens, rejected, latencies, lock = [0], [0], [0], [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with open_channel(address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            retries = 0
            while time.perf_counter() < stop:
                batch = rng.sample(items, per_call)
                t0 = time.perf_counter()
                try:
                    response = stub.Score(reward_pb2.ScoreRequest(items=batch), timeout=60)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    with lock:
                        rejected[0] += 1
                    # Back off exponentially with jitter, then retry, as the policy trainer does;
                    # a tight retry loop would take the cores the server needs.
                    time.sleep(min(1.0, 0.05 * 2**retries) * (0.5 + rng.random()))
                    retries += 1
                    continue
                retries = 0
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    done[0] += len(batch)
                    tokens[0] += sum(r.num_tokens for r in response.results)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return done[0] / elapsed, tokens[0] / elapsed, latencies, rejected[0]


async def open_loop(address: str, items, rate_calls: float, per_call: int, seconds: float) -> dict:
    """Poisson arrivals at `rate_calls` calls/s; latency of answers and of rejections."""
    ok, rejected, errors = [], [], []
    rng = random.Random(1)
    async with open_channel(address, aio=True) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def call() -> None:
            t0 = time.perf_counter()
            try:
                await stub.Score(reward_pb2.ScoreRequest(items=rng.sample(items, per_call)), timeout=60)
                ok.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as err:
                (rejected if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else errors).append(
                    time.perf_counter() - t0
                )

        tasks, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks.append(asyncio.ensure_future(call()))
            await asyncio.sleep(rng.expovariate(rate_calls))
        await asyncio.gather(*tasks)
    return {"ok": ok, "rejected": rejected, "errors": errors}


def pct(values: list[float], q: float) -> float:
    """q-th percentile in ms (the one value when there is a single sample)."""
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if values else float("nan")


def start_server(
    model: str, max_inflight: int, int8: bool, home: Path, settings: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, Path]:
    """`rm-service serve` in its own process (its own GIL, as in production), scorer only;
    `settings` are more RM_* variables for it.

    Returns the process, its address once health says SERVING, and its log file.
    """
    from rm_service.client import start_server_process
    from rm_service.errors import RMError

    env = {
        **os.environ,
        "RM_SERVE_MODEL": model,
        "RM_SERVE_WITH_STORE": "false",
        "RM_SERVE_METRICS_PORT": "-1",
        "RM_SERVE_MAX_INFLIGHT_ITEMS": str(max_inflight),
        "RM_SERVE_ONNX_INT8": str(int8).lower(),
        **(settings or {}),
    }
    try:
        server, address = start_server_process(env, home, timeout=600)
    except RMError as exc:
        sys.exit(f"{exc}:\n{(home / 'server.log').read_text()[-2000:]}")
    return server, address, home / "server.log"


def served_backend(log_path: Path) -> str:
    """What runs the batches, from the server's start-up log."""
    text = log_path.read_text()
    return (
        "ONNX Runtime" + (" int8" if "model.int8.onnx" in text else " fp32")
        if "with ONNX Runtime" in text
        else "PyTorch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="minilm-l6", help="a registry version directory, a bundled name or an HF directory"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per closed-loop measurement and for the naive loop")
    parser.add_argument(
        "--open-seconds", type=float, default=30.0, help="per open-loop measurement (50%% and 150%% load)"
    )
    parser.add_argument("--items-per-call", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-inflight", type=int, default=32, help="server admission limit (items): 4 calls of 8")
    parser.add_argument("--int8", action="store_true", help="serve the version's int8 ONNX model (when it kept one)")
    args = parser.parse_args()
    home = Path(os.environ.setdefault("RM_HOME", tempfile.mkdtemp(prefix="rm-bench-")))
    torch.set_num_threads(os.cpu_count() or 1)
    items = hh_items(2000)
    gemm = gemm_flops()
    naive_pairs, naive_tokens, params = naive_loop(args.model, items, args.seconds)
    server, address, log_path = start_server(args.model, args.max_inflight, args.int8, home)
    try:
        _, _, single, _ = closed_loop(
            address, items, 1, args.items_per_call, args.seconds
        )  # one call at a time, same size
        sweep = [(c, *closed_loop(address, items, c, args.items_per_call, args.seconds)) for c in args.concurrency]
        best = max(sweep, key=lambda row: row[1])
        sat_calls = best[1] / args.items_per_call
        half = asyncio.run(open_loop(address, items, 0.5 * sat_calls, args.items_per_call, args.open_seconds))
        over = asyncio.run(open_loop(address, items, 1.5 * sat_calls, args.items_per_call, args.open_seconds))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    single_p50 = pct(single, 50)

    print(
        f"\nmodel {args.model} served by {served_backend(log_path)} in its own process; {os.cpu_count()} cores "
        f"shared with the clients; fp32 GEMM {gemm / 1e9:.0f} GFLOP/s (measured in this run); {args.items_per_call} "
        "items per call; HH-RLHF lengths\n"
    )
    print(
        "| closed loop clients | pairs/s | tokens/s | p50 ms | p99 ms | rejected calls (retried) "
        "|\n|---:|---:|---:|---:|---:|---:|"
    )
    for c, pairs, tokens, lat, rejected in sweep:
        print(f"| {c} | {pairs:.1f} | {tokens:.0f} | {pct(lat, 50):.0f} | {pct(lat, 99):.0f} | {rejected} |")
    mfu = 2 * params * best[2] / gemm
    # At 100% of the fp32 GEMM rate, the server could score at most this many times the naive loop's pairs/s.
    ceiling = (gemm / (2 * params * naive_tokens / naive_pairs)) / naive_pairs
    print("\n| figure | value |\n|---|---|")
    print(f"| saturation (closed loop, {best[0]} clients) | {best[1]:.1f} pairs/s, {best[2]:.0f} tokens/s |")
    print(
        f"| naive loop (in process, torch, one pair at a time) | {naive_pairs:.1f} pairs/s, {naive_tokens:.0f} "
        f"tokens/s, {2 * params * naive_tokens / gemm:.0%} MFU |"
    )
    print(f"| ratio server / naive | {best[1] / naive_pairs:.2f}x |")
    print(f"| ceiling: server / naive at 100% MFU | {ceiling:.2f}x |")
    print(f"| model FLOPs utilisation at saturation (fp32 GEMM) | {mfu:.0%} |")
    print(f"| single-request latency ({args.items_per_call} items, nothing else in flight) p50 | {single_p50:.0f} ms |")
    print(
        f"| open loop 50%: p50 / p99 latency ({len(half['ok'])} calls) | {pct(half['ok'], 50):.0f} / "
        f"{pct(half['ok'], 99):.0f} ms |"
    )
    print(f"| p99 at 50% over single-request p50 | {pct(half['ok'], 99) / single_p50:.1f}x |")
    over_total = len(over["ok"]) + len(over["rejected"]) + len(over["errors"])
    print(f"| open loop 150%: rejected | {len(over['rejected'])} of {over_total} calls |")
    print(
        f"| open loop 150%: rejection latency p50 / p99 | {pct(over['rejected'], 50):.1f} / "
        f"{pct(over['rejected'], 99):.1f} ms |"
    )
    print(f"| errors other than RESOURCE_EXHAUSTED | {len(half['errors']) + len(over['errors'])} |")


if __name__ == "__main__":
    main()
