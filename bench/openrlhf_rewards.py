"""Rewards lost under OpenRLHF's own client: how many of the samples an OpenRLHF rollout asks a
remote reward model for come back with a reward, at 64 and 128 samples in flight.

The client is OpenRLHF 0.11.2's released `SingleTurnAgentExecutor._fetch_rewards_via_http`, run
from the peers' environment (bench/peers/setup.sh) by bench/peers/openrlhf_client.py: one query
per sample posted to `/get_reward` as soon as the sample exists, 5 tries 1 s apart, then the
sample keeps `reward=None`. The servers, each in its own process, serve the same model (the
bundled SmolLM2-135M as a sequence-classification checkpoint, bench/peers.py) on the same HH
items (chosen and rejected sides within --max-tokens tokens):

- `rm-service`: `rm-service serve` with its HTTP routes, at its defaults;
- `rm-service-2s`: the same with `RM_SERVE_MAX_QUEUE_WAIT_S=2`, the queue bound before issue 26
  (refuse what is past 2 s of work), to show what that rule lost;
- `openrlhf`: OpenRLHF's own `python -m openrlhf.cli.serve_rm`, as bench/peers.py starts it.

    .venv/bin/python bench/openrlhf_rewards.py [--systems rm-service,rm-service-2s,openrlhf] \\
        [--concurrency 64,128] [--rounds 2]

Writes docs/bench/openrlhf_rewards.md and .json (--out). Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from peers import System, hardware, load_items, reward_model_dir  # noqa: E402  (bench/peers.py)

SYSTEMS = ("rm-service", "rm-service-2s", "openrlhf")


def start_rm_service(name: str, model_dir: Path, home: Path):
    """`rm-service serve` with HTTP on a free port: (process, /get_reward URL)."""
    from rm_service.client import start_server_process
    from rm_service.server.app import free_port

    http_port = free_port()
    env = {
        **os.environ,
        "RM_SERVE_MODEL": str(model_dir),
        "RM_SERVE_WITH_STORE": "false",
        "RM_SERVE_METRICS_PORT": "-1",
        "RM_SERVE_FOLLOW_REGISTRY": "false",
        "RM_SERVE_HTTP_PORT": str(http_port),
    }
    if name == "rm-service-2s":
        env["RM_SERVE_MAX_QUEUE_WAIT_S"] = "2"
    (home / name).mkdir(parents=True, exist_ok=True)
    proc, _ = start_server_process(env, home / name, timeout=900)
    return proc, f"http://127.0.0.1:{http_port}/get_reward"


def client(args, url: str, items_file: Path, concurrency: int, samples: int) -> dict:
    out = subprocess.run(
        [
            str(Path(args.peers_venv) / "bin" / "python"),
            str(REPO / "bench" / "peers" / "openrlhf_client.py"),
            "--url",
            url,
            "--items",
            str(items_file),
            "--concurrency",
            str(concurrency),
            "--samples",
            str(samples),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise SystemExit(f"the OpenRLHF client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def report(run: dict) -> str:
    hw = run["hardware"]
    lines = [
        "# Rewards lost under OpenRLHF's own client (bench/openrlhf_rewards.py)",
        "",
        f"{run['date']}; {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}; model {run['model']}; "
        f"{run['items']} HH items within {run['args']['max_tokens']} tokens (mean {run['mean_tokens']:.0f}). "
        "Client: OpenRLHF 0.11.2's `SingleTurnAgentExecutor._fetch_rewards_via_http`, one query per sample, "
        "5 tries 1 s apart; each of `concurrency` samplers takes the next sample when its reward is back or lost.",
        "",
        "| system | samples in flight | rewards returned / requested | lost | tokens/s | p50 s | p99 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['returned']} / {r['requested']} | {r['lost']} | "
            f"{r['tokens_per_s']:,.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="rm-service,rm-service-2s,openrlhf", help=f"of {', '.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="64,128", help="samples in flight, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="samples per sampler: requested = rounds x concurrency")
    parser.add_argument("--max-tokens", type=int, default=512, help="items longer than this are left out")
    parser.add_argument("--items", type=int, default=2000, help="HH sides drawn from (before the cap)")
    parser.add_argument("--peers-venv", default=os.environ.get("PEERS_VENV", "/work/peers-venv"))
    parser.add_argument("--out", default=str(REPO / "docs" / "bench" / "openrlhf_rewards"))
    args = parser.parse_args()
    args.rm_precision = "auto"  # what System (bench/peers.py) reads
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if not (Path(args.peers_venv) / ".peers-installed").exists():
        parser.error(f"--peers-venv {args.peers_venv} is not set up: run bench/peers/setup.sh")
    home = REPO / "var" / "bench-peers"
    home.mkdir(parents=True, exist_ok=True)
    model_dir = reward_model_dir(home)
    items, _ = load_items(model_dir, args.max_tokens, args.items)
    items_file = home / "openrlhf_items.json"
    items_file.write_text(
        json.dumps(
            [
                {"text": i.text, "prompt": i.text[: i.text.rfind("<|im_start|>assistant")], "tokens": i.tokens}
                for i in items
            ]
        )
    )
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None
    results = [r for r in (previous or {}).get("results", []) if r["system"] not in systems]
    for name in systems:
        t0 = time.perf_counter()
        if name == "openrlhf":
            system = System(name, args, model_dir, home)
            system.start()
            proc, url = system.proc, system.url
        else:
            proc, url = start_rm_service(name, model_dir, home)
        print(f"{name} serving after {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            client(args, url, items_file, 4, 8)  # warm-up
            for c in (int(x) for x in args.concurrency.split(",")):
                r = {"system": name, **client(args, url, items_file, c, args.rounds * c)}
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            stop(proc)
    run = {
        "hardware": hardware(),
        "args": vars(args),
        "model": str(model_dir.relative_to(REPO)),
        "items": len(items),
        "mean_tokens": sum(i.tokens for i in items) / len(items),
        "results": sorted(results, key=lambda r: (SYSTEMS.index(r["system"]), r["concurrency"])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(run, indent=1))
    out.with_suffix(".md").write_text(report(run))
    print("\n" + report(run))


if __name__ == "__main__":
    main()
