"""Peers side by side: rm-service, OpenRLHF's serve_rm and a naive FastAPI endpoint, same model, same items.

One command (`make bench-peers`, or this script once bench/peers/setup.sh has built the peers'
environment) measures every system the same way:

- the model: SmolLM2-135M-Instruct (the bundled GGUF, dequantised) as a TRL-style
  `LlamaForSequenceClassification` directory with a seeded score head, built once under
  var/bench-peers/ (speed is what is compared; the head's values do not matter, but every
  system reads the same head at the same token, which the score-agreement line checks);
- the items: HH-RLHF harmless pairs (chosen and rejected sides) rendered with SmolLM2's chat
  template, shuffled with seed 0, keeping those within the token cap so no system truncates
  (each truncates on a different side); every system gets the same cap;
- the systems, each in its own process: (a) `rm-service serve` over gRPC, in the precision it
  measures fastest on this machine; (b) OpenRLHF's `python -m openrlhf.cli.serve_rm` from PyPI
  with its defaults (bf16 weights) and sdpa attention (no flash-attn kernels on a CPU); (c)
  bench/peers/naive_server.py, transformers in fp32, one forward per item;
- the load, 1 item per call: closed loops at each --clients count (each client keeps one call
  in flight for --duration s), then an open loop with Poisson arrivals at 50% of the best
  closed-loop items/s. items/s and tokens/s count calls answered inside the window; p50/p99
  cover every answered call, its latency from the first attempt to the answer (rm-service
  refuses at once when its queue is full: the client backs off as rm_client does and tries
  again, and the refusals are counted); a call unanswered after --timeout s is a timeout.

    .venv/bin/python bench/peers.py [--systems rm-service,openrlhf,naive] [--duration 30] [--clients 1,8,64]

Writes docs/bench/peers.md and docs/bench/peers.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rm_service.data import HH_PAIRS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from peers_report import non_embedding_params, report  # noqa: E402  (bench/peers_report.py, once bench/ is on the path)

DATA = HH_PAIRS
SYSTEMS = ("rm-service", "openrlhf", "naive")
BACKOFF_S, BACKOFF_MAX_S = 0.2, 5.0  # rm_client's RetryPolicy defaults


@dataclass
class Item:
    prompt: list  # rm_service.conversation.Message
    completion: str
    text: str  # the chat template's rendering, what the HTTP peers receive
    tokens: int


@dataclass
class Point:
    load: str
    clients: int = 0
    rate: float = 0.0  # offered calls/s (open loop)
    duration: float = 0.0
    items: int = 0  # answered inside the window
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    rejected: int = 0
    errors: int = 0
    timeouts: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.items / self.duration

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            self.timeouts += 1
        else:
            self.errors += 1
            kind = type(exc).__name__ + (f": {exc}"[:120] if str(exc) else "")
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def reward_model_dir(root: Path) -> Path:
    """The bundled SmolLM2-135M as a LlamaForSequenceClassification checkpoint (seeded score head,
    fp32 weights, its own pad token so the score is read at the last real token)."""
    target = root / "smollm2-135m-rm"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    from rm_service.models.resolver import resolve

    source = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = "<|endoftext|>"  # not EOS (<|im_end|>), which ends every turn
    causal = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = causal.config
    config.num_labels, config.pad_token_id, config.architectures = (
        1,
        tokenizer.pad_token_id,
        ["LlamaForSequenceClassification"],
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    missing, _ = model.load_state_dict(
        {k: v for k, v in causal.state_dict().items() if not k.startswith("lm_head")}, strict=False
    )
    assert missing == ["score.weight"], missing
    tmp = root / ".smollm2-135m-rm-tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def load_items(model_dir: Path, cap: int, limit: int) -> tuple[list[Item], int]:
    """HH items within `cap` tokens (and how many were left out as longer), with the text and
    token count every system sees: the TRL-style formatting rm-service applies to a checkpoint."""
    from transformers import AutoTokenizer

    from rm_service.conversation import Message
    from rm_service.formats.hh import HHFormatError, read_pairs
    from rm_service.models.formatting import format_item, spec_for

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = spec_for(tokenizer, "llama", 100_000, style="trl")
    sides = []
    for _, _, p in read_pairs(DATA):
        if not isinstance(p, HHFormatError) and p.chosen.strip() and p.rejected.strip():
            sides += [(p.prompt, p.chosen), (p.prompt, p.rejected)]
    random.Random(0).shuffle(sides)
    items, longer = [], 0
    for prompt, completion in sides[:limit]:
        messages = [Message(m.role, m.content) for m in prompt]
        ids = format_item(tokenizer, spec, messages, completion).input_ids
        text = tokenizer.apply_chat_template(
            [m.as_dict() for m in messages] + [{"role": "assistant", "content": completion}], tokenize=False
        )
        if len(ids) > cap:
            longer += 1
            continue
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            raise SystemExit("the HTTP peers' tokens would differ from rm-service's for the same item")
        items.append(Item(messages, completion, text, len(ids)))
    return items, longer


# ---- the systems: start, call, stop --------------------------------------------------------------


def http_server(name: str, argv: list[str], log: Path, env: dict) -> tuple[subprocess.Popen, str]:
    from rm_service.server.app import free_port

    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*argv, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    url = f"http://127.0.0.1:{port}/get_reward"
    import httpx

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited during start-up (code {proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.post(url, json={"query": ["hello"]}, timeout=60).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{name} did not answer within 900 s; see {log}")


class System:
    def __init__(self, name: str, args, model_dir: Path, home: Path):
        self.name, self.args, self.model_dir, self.home = name, args, model_dir, home
        self.precision = self.backend = ""
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        py, cap, log = (
            str(Path(self.args.peers_venv) / "bin" / "python"),
            str(self.args.max_tokens),
            self.home / f"{self.name}.log",
        )
        if self.name == "rm-service":
            from rm_service.client import start_server_process

            # RM_HOME as the user has it (default ./var): its cache holds this machine's precision measurement.
            env = {
                **os.environ,
                "RM_SERVE_MODEL": str(self.model_dir),
                "RM_SERVE_PRECISION": self.args.rm_precision,
                "RM_SERVE_WITH_STORE": "false",
                "RM_SERVE_METRICS_PORT": "-1",
                "RM_SERVE_FOLLOW_REGISTRY": "false",
            }
            (self.home / "rm-service").mkdir(parents=True, exist_ok=True)  # its port file and log
            self.proc, self.address = start_server_process(env, self.home / "rm-service", timeout=900)
        elif self.name == "openrlhf":
            self.proc, self.url = http_server(
                self.name,
                [
                    py,
                    "-m",
                    "openrlhf.cli.serve_rm",
                    "--reward.model_name_or_path",
                    str(self.model_dir),
                    "--data.max_len",
                    cap,
                    "--ds.attn_implementation",
                    "sdpa",
                    "--host",
                    "127.0.0.1",
                ],
                log,
                {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"},
            )
            self.precision, self.backend = "bf16", "torch (serve_rm defaults: bf16 weights; sdpa attention)"
        else:
            self.proc, self.url = http_server(
                self.name,
                [
                    py,
                    str(REPO / "bench" / "peers" / "naive_server.py"),
                    "--model",
                    str(self.model_dir),
                    "--max-len",
                    cap,
                ],
                log,
                {},
            )
            self.precision, self.backend = "fp32", "torch (transformers defaults), one forward per item"

    async def open_client(self) -> None:
        if self.name == "rm-service":
            from rm_client.api.v1 import reward_pb2, reward_pb2_grpc
            from rm_client.channel import open_channel

            self.channel = open_channel(self.address, aio=True)
            self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
            info = await self.stub.GetModel(reward_pb2.GetModelRequest(), timeout=60)
            self.precision, self.backend = info.precision, info.backend
        else:
            import httpx

            self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))

    async def close_client(self) -> None:
        await (self.channel.close() if self.name == "rm-service" else self.http.aclose())

    async def call(self, item: Item, deadline: float, rng: random.Random) -> tuple[float, int]:
        """One item scored: (reward, refusals before the answer). TimeoutError past `deadline`."""
        if self.name != "rm-service":
            import httpx

            try:
                r = await self.http.post(
                    self.url, json={"query": [item.text]}, timeout=max(0.001, deadline - time.perf_counter())
                )
            except httpx.TimeoutException as exc:
                raise TimeoutError from exc
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            return float(r.json()["rewards"][0]), 0
        import grpc

        from rm_client.api.v1 import reward_pb2
        from rm_client.messages import to_proto
        from rm_client.retry import backoff_delays

        request = reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt=to_proto(item.prompt), completion=item.completion)]
        )
        for refused, delay in enumerate(backoff_delays(BACKOFF_S, BACKOFF_MAX_S, 1000, rng)):
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            try:
                answer = (await self.stub.Score(request, timeout=left)).results[0]
                if (
                    answer.num_tokens != item.tokens
                ):  # the peers are sent the same tokens: the table would compare unlike work
                    raise RuntimeError(f"rm-service scored {answer.num_tokens} tokens, the peers {item.tokens}")
                return answer.raw_score, refused
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError from err
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise RuntimeError(err.code().name) from err
                await asyncio.sleep(min(delay, max(0.0, deadline - time.perf_counter())))
        raise TimeoutError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the load --------------------------------------------------------------------------------------


async def one(system: System, point: Point, item: Item, end: float, timeout: float, rng: random.Random) -> None:
    t0 = time.perf_counter()
    try:
        _, refused = await system.call(item, t0 + timeout, rng)
    except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
        point.failed(exc)
        return
    t1 = time.perf_counter()
    point.latencies.append(t1 - t0)
    point.rejected += refused
    if t1 <= end:
        point.items, point.tokens = point.items + 1, point.tokens + item.tokens


async def closed_loop(system: System, items: list[Item], clients: int, duration: float, timeout: float) -> Point:
    point, end = Point(f"closed {clients}", clients=clients, duration=duration), time.perf_counter() + duration

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < end:
            await one(system, point, rng.choice(items), end, timeout, rng)

    await asyncio.gather(*(client(1000 + c) for c in range(clients)))
    return point


async def open_loop(system: System, items: list[Item], rate: float, duration: float, timeout: float) -> Point:
    point, rng = Point(f"open {rate:.2f}/s (50%)", rate=rate, duration=duration), random.Random(7)
    end, tasks = time.perf_counter() + duration, []
    while time.perf_counter() < end:
        tasks.append(
            asyncio.ensure_future(one(system, point, rng.choice(items), end, timeout, random.Random(rng.random())))
        )
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return point


async def measure(system: System, items: list[Item], args, probe: list[Item]) -> dict:
    await system.open_client()
    try:
        rng = random.Random(0)
        t0 = time.perf_counter()
        rewards = [
            (await system.call(item, time.perf_counter() + args.timeout, rng))[0] for item in probe
        ]  # also the warm-up
        print(
            f"  {system.name}: {system.precision}, {system.backend}; probe of {len(probe)} items took "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        points = []
        for clients in args.clients:
            points.append(await closed_loop(system, items, clients, args.duration, args.timeout))
            print(f"  {system.name} {points[-1].load}: {points[-1].items_per_s:.2f} items/s", flush=True)
        saturation = max(p.items_per_s for p in points)
        points.append(await open_loop(system, items, 0.5 * saturation, args.duration, args.timeout))
        print(f"  {system.name} {points[-1].load}: {len(points[-1].latencies)} answered", flush=True)
    finally:
        await system.close_client()
    return {
        "name": system.name,
        "precision": system.precision,
        "backend": system.backend,
        "probe_rewards": rewards,
        "saturation_items_per_s": saturation,
        "points": [asdict(p) for p in points],
    }


def cached_gemm_rates() -> dict | None:
    """This machine's fp32 and bf16 GEMM rates as rm-service's precision probe measured and cached them (None if
    never)."""
    from rm_service.models.precision import cpu_measurement

    try:
        m = cpu_measurement()
    except Exception:  # noqa: BLE001 - the figure is optional in the report
        return None
    return {"fp32_gflops": m.fp32_gflops, "bf16_gflops": m.bf16_gflops, "chosen": m.chosen}


def hardware() -> dict:
    import torch

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load point")
    parser.add_argument("--clients", default="1,8,64", help="closed-loop client counts")
    parser.add_argument(
        "--max-tokens", type=int, default=1024, help="token cap of every system (rm-service's for an HF checkpoint)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="a call unanswered after this many seconds is a timeout"
    )
    parser.add_argument("--items", type=int, default=2000, help="HH items drawn from (before the cap)")
    parser.add_argument(
        "--rm-precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="rm-service's RM_SERVE_PRECISION (auto: the faster of the two as measured once per machine and cached)",
    )
    parser.add_argument(
        "--peers-venv", default=os.environ.get("PEERS_VENV", "/work/peers-venv"), help="bench/peers/setup.sh's venv"
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "bench" / "peers"), help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    if any(s != "rm-service" for s in systems) and not (Path(args.peers_venv) / ".peers-installed").exists():
        parser.error(f"--peers-venv {args.peers_venv} is not set up: run bench/peers/setup.sh (make bench-peers does)")
    home = REPO / "var" / "bench-peers"
    home.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = reward_model_dir(home)
    items, longer = load_items(model_dir, args.max_tokens, args.items)
    print(
        f"{len(items)} HH items within {args.max_tokens} tokens ({longer} longer left out); model {model_dir}",
        flush=True,
    )
    results = []
    for name in systems:
        system = System(name, args, model_dir, home)
        t0, load = time.perf_counter(), os.getloadavg()[0]
        system.start()
        print(f"{name} serving after {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            results.append(
                {
                    **asyncio.run(measure(system, items, args, items[:8])),
                    "startup_s": time.perf_counter() - t0,
                    "loadavg_before": load,
                }
            )
        finally:
            system.stop()
    mean_tokens = sum(i.tokens for i in items) / len(items)
    run = {
        "hardware": hardware(),
        "args": {k: v for k, v in vars(args).items()},
        "items": len(items),
        "items_over_cap": longer,
        "mean_tokens": mean_tokens,
        "model": str(model_dir.relative_to(REPO)),
        "non_embedding_params": non_embedding_params(model_dir),
        "gemm": cached_gemm_rates(),
        "wall_s": time.time() - started,
        "systems": results,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(run, indent=1))
    text = report(run)
    out.with_suffix(".md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
