"""OpenRLHF's own reward client, driven as its rollouts drive it; run with the peers' Python.

OpenRLHF 0.11.2 (`openrlhf.utils.agent.SingleTurnAgentExecutor`) asks the remote reward model
for each sample as soon as that sample is generated: `_fetch_rewards_via_http([query], [prompt],
[label])` posts one query to `/get_reward` (aiohttp, 180 s total timeout), tries 5 times 1 s
apart, then raises, and `execute` keeps `reward=None` for the sample. This script runs that
released method unchanged: `--concurrency` samples in flight, each task taking the next sample as
soon as its reward came back (or was lost), `--samples` in all, and prints one JSON line:
samples requested, rewards returned, lost, tokens/s and latency percentiles.

The package's `openrlhf/utils/__init__.py` imports the trainer stack (deepspeed, torch, ...),
which a reward request never uses: `openrlhf` and `openrlhf.utils` are entered as bare packages
so that `openrlhf.utils.agent` and `openrlhf.utils.logging_utils` load from the installed files
without their parents' `__init__` (the code that runs is OpenRLHF's own).

    $PEERS_VENV/bin/python bench/peers/openrlhf_client.py --url http://127.0.0.1:8000/get_reward \\
        --items items.json --concurrency 64 --samples 256
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import sys
import time
import types


def openrlhf_executor(url: str):
    """OpenRLHF's SingleTurnAgentExecutor for `url`, imported from the installed package."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("openrlhf is not installed in this Python (bench/peers/setup.sh installs it)")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("openrlhf", root), ("openrlhf.utils", f"{root}/utils")):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    logging.getLogger("openrlhf").setLevel(logging.WARNING)
    return SingleTurnAgentExecutor(url)


async def run(url: str, items: list[dict], concurrency: int, samples: int) -> dict:
    executor = openrlhf_executor(url)
    queue = list(range(samples))
    latencies, returned, lost, tokens = [], 0, 0, 0
    start = time.perf_counter()

    async def sampler() -> None:
        nonlocal returned, lost, tokens
        while queue:
            i = queue.pop()
            item = items[i % len(items)]
            t0 = time.perf_counter()
            try:  # what SingleTurnAgentExecutor.execute does with the answer
                info = (await executor._fetch_rewards_via_http([item["text"]], [item["prompt"]], [None]))[0]
                reward = info.get("rewards") if info else None
            except Exception:  # noqa: BLE001 - execute logs it and keeps reward=None
                reward = None
            latencies.append(time.perf_counter() - t0)
            if reward is None:
                lost += 1
            else:
                returned, tokens = returned + 1, tokens + item["tokens"]

    await asyncio.gather(*(sampler() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "concurrency": concurrency,
        "requested": samples,
        "returned": returned,
        "lost": lost,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_s": round(pct(0.5), 3),
        "p99_s": round(pct(0.99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--items", required=True, help="JSON list of {text, prompt, tokens}")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    with open(args.items) as f:
        items = json.load(f)
    print(json.dumps(asyncio.run(run(args.url, items, args.concurrency, args.samples))), flush=True)


if __name__ == "__main__":
    main()
