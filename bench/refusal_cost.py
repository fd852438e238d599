"""CPU that one refused Score call costs the server and the caller, by the way it is refused.

A gRPC server in its own process answers every Score with RESOURCE_EXHAUSTED, one of three ways:

    handler  no interceptors; the servicer aborts (the request is received and parsed first)
    gate     the serving chain of interceptors (metrics, server.gate.RoomGate, DecodeGuard) with a
             queue that is always full: refused before the request is read, after `--hold-ms`
             (the server's `room_wait_ms`)
    limit    grpc.aio's `maximum_concurrent_rpcs` = 1 with one call parked in the handler: every
             other call is refused by grpc before any interceptor or handler runs (no hold)

`--callers` closed-loop callers on one channel, in this process, each retrying `--retry-after-s`
after a refusal, for `--seconds`; CPU seconds of both processes over the window, per refusal.
No model runs: this is the cost a crowd of fast-retrying callers adds beside it (bench/overload.py).

    .venv/bin/python bench/refusal_cost.py --ways handler gate limit --hold-ms 0
    .venv/bin/python bench/refusal_cost.py --ways gate --hold-ms 20 35
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from rm_service.api.v1 import reward_pb2, reward_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import hh_items

PUSHBACK = (("grpc-retry-pushback-ms", "50"),)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Refuser(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, park: bool):
        self.park = park

    async def Score(self, request, context):
        if self.park:  # `limit`: the first call holds the one slot
            await asyncio.sleep(3600)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full", trailing_metadata=PUSHBACK)


async def serve(way: str, hold_ms: float, port_file: Path) -> None:
    from rm_service.errors import Overloaded
    from rm_service.server.gate import RoomGate
    from rm_service.server.handlers import DecodeGuard
    from rm_service.server.metrics import Metrics

    async def no_room() -> None:  # Admission.wait_for_room with a queue that never has room
        if hold_ms:
            await asyncio.sleep(hold_ms / 1000)
        raise Overloaded("the queue is full", 0.05)

    interceptors = [Metrics().interceptor(), RoomGate(no_room), DecodeGuard()] if way == "gate" else []
    server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=1 if way == "limit" else None)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(Refuser(park=way == "limit"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


async def refuse_crowd(address: str, request, args, seconds: float, park: bool) -> dict[str, int]:
    """Codes of the answers the callers got in `seconds`."""
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        if park:
            parked = asyncio.ensure_future(stub.Score(request, timeout=seconds + 30))
            await asyncio.sleep(0.3)
        end = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < end:
                try:
                    await stub.Score(request, timeout=60)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                codes[code] = codes.get(code, 0) + 1
                await asyncio.sleep(args.retry_after_s)

        await asyncio.gather(*(caller() for _ in range(args.callers)))
        if park:
            parked.cancel()
    return codes


def measure(way: str, hold_ms: float, request, args) -> str:
    port_file = Path(tempfile.mkdtemp(prefix="rm-refusal-")) / "port"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", way, "--hold-ms", str(hold_ms), "--port-file", str(port_file)]
    )
    try:
        while not port_file.exists():
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        asyncio.run(refuse_crowd(address, request, args, 1.0, way == "limit"))  # warm both sides
        s0, c0, t0 = cpu_seconds(server.pid), cpu_seconds(os.getpid()), time.perf_counter()
        codes = asyncio.run(refuse_crowd(address, request, args, args.seconds, way == "limit"))
        s1, c1, t1 = cpu_seconds(server.pid), cpu_seconds(os.getpid()), time.perf_counter()
    finally:
        server.kill()
        server.wait()
    n = max(1, codes.get("RESOURCE_EXHAUSTED", 0))
    wall = t1 - t0
    others = {k: v for k, v in codes.items() if k != "RESOURCE_EXHAUSTED"} or "none"
    return (
        f"| {way} | {hold_ms:g} | {args.items_per_call} | {n / wall:.0f} | {1000 * (s1 - s0) / n:.3f} | "
        f"{(s1 - s0) / wall:.2f} | {1000 * (c1 - c0) / n:.3f} | {(c1 - c0) / wall:.2f} | {others} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", nargs="+", choices=["handler", "gate", "limit"], default=["handler", "gate", "limit"])
    parser.add_argument("--hold-ms", type=float, nargs="+", default=[0.0], help="the gate's hold (room_wait_ms)")
    parser.add_argument("--items-per-call", type=int, default=8)
    parser.add_argument("--callers", type=int, default=24, help="the callers past capacity at 4x in bench/overload.py")
    parser.add_argument("--retry-after-s", type=float, default=0.01)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.hold_ms[0], Path(args.port_file)))
        return
    request = reward_pb2.ScoreRequest(items=hh_items(args.items_per_call))
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        "unknown CPU",
    )
    print(
        f"{cpu}, {os.cpu_count()} cores shared by server and callers; {args.callers} callers retrying "
        f"{args.retry_after_s * 1000:g} ms after a refusal, {args.seconds:g} s per way\n\n"
        "| way | hold ms | items per call | refusals/s | server CPU ms per refusal | server cores | "
        "caller CPU ms per refusal | caller cores | other answers |\n|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for way in args.ways:
        for hold_ms in args.hold_ms if way == "gate" else [0.0]:
            print(measure(way, hold_ms, request, args), flush=True)


if __name__ == "__main__":
    main()
