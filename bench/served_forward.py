"""The served forward against a bare loop over the same model, precision and batch shapes, in one run.

1. GEMM rates of this process (bf16 and fp32, 1024^3): the MFU denominator;
2. the server (`rm-service serve`, its own process, scorer only, metrics on) under three loads on
   HH items: one client sending 64-item calls, 4 such clients, and 64 clients sending one item
   each (OpenRLHF's pattern). Per load: tokens/s seen by the clients, and from the server's own
   metrics (scraped before and after) the batches it ran, their mean size and padding, and the
   share of the wall time its model thread was running a batch;
3. the bare loop: the same model opened in this process in the precision the server chose, the
   same items in batches of the server's mean batch size for each load, consecutive items, so
   padded as arrivals pad them; and a throughput-versus-batch curve (batches of 1 to 32 items).

Where the served rate falls short of the bare loop, the three factors say why: padding (the
bare loop pads alike), the model thread's idle share (waiting for a batch: clients, gRPC,
tokenising on the same 2 cores), and the per-batch speed (thread contention with the RPC threads).

    .venv/bin/python bench/served_forward.py --model smollm2-135m-instruct --seconds 20
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import closed_loop, hh_items, start_server
from train import non_embedding_params

from rm_client.channel import open_channel
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message
from rm_service.models.batching import collate
from rm_service.models.precision import cpu_name


def gemm_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The server metrics this bench reads: model batches, their seconds, items, tokens, padding."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = {
        "batches": r'^rm_stage_seconds_count\{stage="inference"\} (\S+)',
        "model_s": r'^rm_stage_seconds_sum\{stage="inference"\} (\S+)',
        "items": r"^rm_batch_size_sum (\S+)",
        "padding_sum": r"^rm_batch_padding_ratio_sum (\S+)",
    }
    out = {k: sum(float(v) for v in re.findall(p, text, re.M)) for k, p in want.items()}
    out["tokens"] = sum(float(v) for v in re.findall(r"^rm_item_tokens_sum\{[^}]*\} (\S+)", text, re.M))
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads by kind: "model" (the model thread and the OpenMP workers it starts,
    named by server.threads) and "other" (gRPC, the event loop, the tokeniser)."""
    out = {"model": 0.0, "other": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        out["model" if name == "model" else "other"] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def bare_loop(runtime, formatted, batch_items: int, seconds: float) -> tuple[float, float]:
    """(real tokens/s, padded / real) over items in batches of `batch_items` of similar length (sorted: little
    padding), in the runtime's precision and inference weights, as the server's model thread runs them
    (run_collated)."""
    ordered = sorted(formatted, key=len)
    batches = [ordered[i : i + batch_items] for i in range(0, len(ordered) - batch_items + 1, batch_items)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(0))]
    runtime.run_collated(collate(batches[0], runtime.pad_id))  # warm-up
    real = padded = 0
    start, k = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        rows = batches[k % len(batches)]
        batch = collate(rows, runtime.pad_id)
        runtime.run_collated(batch)
        real += sum(len(x) for x in rows)
        padded += batch["input_ids"].numel()
        k += 1
    return real / (time.perf_counter() - start), padded / real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seconds", type=float, default=20.0, help="per load, and per bare-loop measurement")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--settings", nargs="*", default=[], help="more RM_SERVE_*=value for the server")
    parser.add_argument("--curve", type=int, nargs="*", default=[1, 4, 8, 16], help="bare-loop batch sizes")
    args = parser.parse_args()
    home = Path(os.environ.setdefault("RM_HOME", tempfile.mkdtemp(prefix="rm-bench-")))
    torch.set_num_threads(os.cpu_count() or 1)
    items = hh_items(2000)
    bf16_gemm, fp32_gemm = gemm_gflops(torch.bfloat16), gemm_gflops(torch.float32)
    port = free_port()
    extra = dict(s.split("=", 1) for s in args.settings)
    env = {"RM_SERVE_METRICS_PORT": str(port), "RM_SERVE_PRECISION": args.precision, **extra}
    server, address, log_path = start_server(args.model, 4096, False, home, env)
    loads = [("1 client x 64 items", 1, 64), ("4 clients x 16 items", 4, 16), ("64 clients x 1 item", 64, 1)]
    served = []
    try:
        with open_channel(address) as channel:
            info = reward_pb2_grpc.RewardServiceStub(channel).GetModel(reward_pb2.GetModelRequest(), timeout=30)
        precision = info.precision
        closed_loop(address, items, 1, 64, 2.0)  # warm-up
        for name, clients, per_call in loads:
            before, start = scrape(port), time.perf_counter()
            cpu_before, own_before = thread_cpu(server.pid), time.process_time()
            _, rate, _, _ = closed_loop(address, items, clients, per_call, args.seconds)
            wall, after = time.perf_counter() - start, scrape(port)
            cpu = {k: (v - cpu_before[k]) / wall for k, v in thread_cpu(server.pid).items()}
            cpu["clients"] = (time.process_time() - own_before) / wall
            served.append((name, rate, {k: after[k] - before[k] for k in after}, wall, cpu))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    said = ("precision probe", "batch budget measured", "warm-up:", "serving")
    chosen = [line for line in log_path.read_text().splitlines() if any(x in line for x in said)]

    from rm_service.models.version import open_model

    runtime, _ = open_model(args.model, precision=precision)
    runtime.serve_only()
    formatted = [runtime.format([Message(m.role, m.content) for m in x.prompt], x.completion) for x in items]
    params = non_embedding_params(runtime.model)

    def mfu(tokens_per_s: float) -> str:
        return f"{2 * params * tokens_per_s / 1e9 / bf16_gemm:.1%}"

    print(
        f"\n{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; model {args.model} "
        f"({params / 1e6:.0f}M non-embedding parameters) served in {precision}; bf16 GEMM {bf16_gemm:.0f} GFLOP/s, "
        f"fp32 GEMM {fp32_gemm:.0f} GFLOP/s (this run); {args.seconds:.0f} s per row; HH items"
    )
    for line in chosen[-4:]:
        print(f"server log: {line.split(' - ')[-1].strip()}")
    print(
        "\n| load | served tokens/s | batches | items/batch | padded/real | model thread busy | bare loop tokens/s "
        "(same batch size) | served / bare | MFU served | MFU bare | cores: model threads / other server / clients |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for name, rate, d, wall, cpu in served:
        size = max(1, round(d["items"] / max(d["batches"], 1)))
        bare, bare_pad = bare_loop(runtime, formatted, size, args.seconds / 2)
        print(
            f"| {name} | {rate:.0f} | {d['batches']:.0f} | {d['items'] / max(d['batches'], 1):.1f} | "
            f"{d['padding_sum'] / max(d['batches'], 1):.2f} (bare {bare_pad:.2f}) | {d['model_s'] / wall:.0%} | "
            f"{bare:.0f} | {rate / bare:.2f}x | {mfu(rate)} | {mfu(bare)} | "
            f"{cpu['model']:.2f} / {cpu['other']:.2f} / {cpu['clients']:.2f} |"
        )
    print("\n| bare loop batch (items) | tokens/s | padded/real | MFU |\n|---:|---:|---:|---:|")
    for size in args.curve:
        rate, pad = bare_loop(runtime, formatted, size, min(args.seconds / 2, 4.0))
        print(f"| {size} | {rate:.0f} | {pad:.2f} | {mfu(rate)} |")


if __name__ == "__main__":
    main()
