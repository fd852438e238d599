"""Score throughput and latency of the real gRPC server against the naive loop, in one run.

A "pair" here is one scored (conversation, completion) item, on the HH-RLHF length
distribution (chosen and rejected sides of the shared file).

1. naive baseline: the same model, in process, one item at a time through plain
   transformers (tokenise, forward, read the score) — what a trainer does without a server;
2. closed loop: C clients each keep one Score request of `--items-per-call` items in
   flight; sweep C, report pairs/s and tokens/s; saturation = the best;
3. single-request latency: one client, one call at a time, the same items per call;
4. open loop at 50% and 150% of saturation: requests arrive on a Poisson clock whatever
   the answers; p50/p99 latency at 50%, rejection share and rejection latency at 150%;
5. model FLOPs utilisation: 2 x non-embedding params x tokens/s over an fp32 GEMM rate
   measured in this process.

    .venv/bin/python bench/score.py --model minilm-l6 [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from rm_service.api.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rm_service.models.runtime import load_backbone_runtime
from rm_service.store.hh import HHFormatError, read_pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import gemm_flops, non_embedding_params  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh_harmless_pairs.jsonl"


def hh_items(n: int) -> list[reward_pb2.ScoreItem]:
    items = []
    for _, _, p in read_pairs(DATA):
        if isinstance(p, HHFormatError) or not p.chosen.strip() or not p.rejected.strip():
            continue
        prompt = [common_pb2.Message(role=m.role, content=m.content) for m in p.prompt]
        items += [reward_pb2.ScoreItem(prompt=prompt, completion=p.chosen), reward_pb2.ScoreItem(prompt=prompt, completion=p.rejected)]
    random.Random(0).shuffle(items)
    return items[:n]


def naive_loop(model_name: str, items, seconds: float) -> tuple[float, float]:
    """pairs/s and tokens/s of one-at-a-time in-process scoring with plain transformers."""
    from rm_service.conversation import Message

    if (Path(model_name) / "version.json").exists():  # a registry version: the same trained head, in torch
        from rm_service.registry import load_artifact

        runtime = load_artifact(model_name)[0]
    else:
        runtime = load_backbone_runtime(model_name, max_tokens=512)
    model = runtime.model
    n = tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            item = items[n % len(items)]
            ids = runtime.format([Message(m.role, m.content) for m in item.prompt], item.completion)
            batch = {"input_ids": torch.tensor([ids.input_ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            if ids.token_type_ids is not None:
                batch["token_type_ids"] = torch.tensor([ids.token_type_ids])
            model(**batch)
            n, tokens = n + 1, tokens + len(ids)
    elapsed = time.perf_counter() - start
    return n / elapsed, tokens / elapsed


def closed_loop(address: str, items, clients: int, per_call: int, seconds: float) -> tuple[float, float, list[float], int]:
    """pairs/s, tokens/s, latencies and rejected calls with `clients` callers each keeping one
    call in flight (a rejected call backs off and retries)."""
    done, tokens, rejected, latencies, lock = [0], [0], [0], [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
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
                    time.sleep(0.01 * rng.random())  # back off, then retry, as a trainer would
                    continue
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
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def call() -> None:
            t0 = time.perf_counter()
            try:
                await stub.Score(reward_pb2.ScoreRequest(items=rng.sample(items, per_call)), timeout=60)
                ok.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as err:
                (rejected if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else errors).append(time.perf_counter() - t0)

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


def start_server(model: str, max_inflight: int):
    from rm_service.server.app import RewardServer
    from rm_service.settings import ServeSettings

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = RewardServer(ServeSettings(port=0, model=model, with_store=False, max_inflight_items=max_inflight))
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(600)
    return server, loop, f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--items-per-call", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-inflight", type=int, default=32, help="server admission limit (items): 4 calls of 8")
    args = parser.parse_args()
    os.environ.setdefault("RM_HOME", tempfile.mkdtemp(prefix="rm-bench-"))
    torch.set_num_threads(os.cpu_count() or 1)
    items = hh_items(2000)
    gemm = gemm_flops()
    naive_pairs, naive_tokens = naive_loop(args.model, items, args.seconds)
    server, loop, address = start_server(args.model, args.max_inflight)
    served = server.served.get()
    params = non_embedding_params(served.runtime.model)
    backend = type(served.backend).__name__

    _, _, single, _ = closed_loop(address, items, 1, args.items_per_call, args.seconds / 2)  # one call at a time, same size
    single_p50 = pct(single, 50)
    sweep = [(c, *closed_loop(address, items, c, args.items_per_call, args.seconds)) for c in args.concurrency]
    best = max(sweep, key=lambda row: row[1])
    sat_calls = best[1] / args.items_per_call
    half = asyncio.run(open_loop(address, items, 0.5 * sat_calls, args.items_per_call, args.seconds))
    over = asyncio.run(open_loop(address, items, 1.5 * sat_calls, args.items_per_call, args.seconds))
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)

    print(f"\nmodel {args.model} served by {backend}; {os.cpu_count()} cores; fp32 GEMM {gemm / 1e9:.0f} GFLOP/s (measured in this run); "
          f"{args.items_per_call} items per call; HH-RLHF lengths\n")
    print("| closed loop clients | pairs/s | tokens/s | p50 ms | p99 ms | rejected calls (retried) |\n|---:|---:|---:|---:|---:|---:|")
    for c, pairs, tokens, lat, rejected in sweep:
        print(f"| {c} | {pairs:.1f} | {tokens:.0f} | {pct(lat, 50):.0f} | {pct(lat, 99):.0f} | {rejected} |")
    mfu = 2 * params * best[2] / gemm
    print("\n| figure | value |\n|---|---|")
    print(f"| saturation (closed loop, {best[0]} clients) | {best[1]:.1f} pairs/s, {best[2]:.0f} tokens/s |")
    print(f"| naive loop (in process, one pair at a time) | {naive_pairs:.1f} pairs/s, {naive_tokens:.0f} tokens/s |")
    print(f"| ratio server / naive | {best[1] / naive_pairs:.2f}x |")
    print(f"| model FLOPs utilisation at saturation (fp32 GEMM) | {mfu:.0%} |")
    print(f"| single-request latency ({args.items_per_call} items, nothing else in flight) p50 | {single_p50:.0f} ms |")
    print(f"| open loop 50%: p50 / p99 latency ({len(half['ok'])} calls) | {pct(half['ok'], 50):.0f} / {pct(half['ok'], 99):.0f} ms |")
    print(f"| p99 at 50% over single-request p50 | {pct(half['ok'], 99) / single_p50:.1f}x |")
    over_total = len(over["ok"]) + len(over["rejected"]) + len(over["errors"])
    print(f"| open loop 150%: rejected | {len(over['rejected'])} of {over_total} calls |")
    print(f"| open loop 150%: rejection latency p50 / p99 | {pct(over['rejected'], 50):.1f} / {pct(over['rejected'], 99):.1f} ms |")
    print(f"| errors other than RESOURCE_EXHAUSTED | {len(half['errors']) + len(over['errors'])} |")


if __name__ == "__main__":
    main()
