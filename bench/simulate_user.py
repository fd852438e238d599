"""SimulateUser sessions/s and tokens/s against a naive loop that calls `generate` per conversation.

    flock /tmp/rm-cpu.lock .venv/bin/python bench/simulate_user.py [--user-model smollm2-135m-instruct]
        [--conversations 64] [--max-new-tokens 32] [--runs 2]

The same user model, precision, contexts (HH conversations cut after an assistant turn, in
SimulateUser's formatting) and sampling (temperature 1, top-p 1, the same max_new_tokens):

- naive: transformers' `model.generate` on one conversation at a time, in this process;
- SimulateUser: one gRPC call carrying all the conversations to `rm-service serve` running as
  its own process (MiniLM as its reward model), i.e. what a PPO step that plays many sessions
  at once does: one batched prefill, then sampling with a KV cache, finished rows leaving the batch.

Sessions/s counts conversations carried one user turn on (ended ones included), tokens/s the
sampled tokens. The hardware and precision are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]

import torch  # noqa: E402

from rm_client import UserClient  # noqa: E402
from rm_service.conversation import parse_conversation  # noqa: E402
from rm_service.data import HH_PAIRS  # noqa: E402
from rm_service.models.precision import cpu_name, describe  # noqa: E402
from rm_service.usermodel.runtime import load_user_runtime  # noqa: E402
from rm_service.usermodel.version import open_user_model  # noqa: E402


def contexts(n: int) -> list:
    out = []
    for line in HH_PAIRS.read_text(encoding="utf-8").splitlines()[-n * 3 :]:
        messages = parse_conversation(json.loads(line)["chosen"])
        cut = max(i for i, m in enumerate(messages) if m.role == "assistant")
        if any(m.role == "user" for m in messages[:cut]):
            out.append(messages[: cut + 1])
    return out[:n]


def naive(runtime, convs, max_new: int) -> tuple[float, int]:
    model = runtime.inference_model()
    tokens, start = 0, time.perf_counter()
    torch.manual_seed(0)
    for c in convs:
        ids, _, _ = runtime.formatter.prompt(c, max_new)
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                pad_token_id=runtime.pad_id,
                eos_token_id=runtime.spec.stop_id,
            )
        tokens += out.shape[1] - len(ids)
    return time.perf_counter() - start, tokens


def serve(user_model: str, home: Path, precision: str) -> tuple[subprocess.Popen, str]:
    """`rm-service serve` in its own process, in the precision the naive loop runs (not a probe of its own)."""
    port_file = home / "port"
    env = {
        **os.environ,
        "RM_HOME": str(home),
        "RM_SERVE_PRECISION": precision,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'clients' / 'python'}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rm_service.cli",
            "serve",
            "--model",
            "minilm-l6",
            "--user-model",
            user_model,
            "--no-store",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--port-file",
            str(port_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--user-model", default="smollm2-135m-instruct")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    convs = contexts(args.conversations)
    runtime, meta = open_user_model(args.user_model)
    if meta is None:
        runtime = load_user_runtime(args.user_model, 512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = serve(args.user_model, Path(tmp), runtime.precision)
        try:
            with UserClient(address, timeout_s=600) as users:
                payload = [[m.as_dict() for m in c] for c in convs]
                users.simulate(payload[:4], max_new_tokens=4, seed=0)  # warm the call path
                for run in range(args.runs):
                    seconds, tokens = naive(runtime, convs, args.max_new_tokens)
                    rows.append(("naive generate, one conversation at a time", run, seconds, tokens))
                    start = time.perf_counter()
                    result = users.simulate(payload, max_new_tokens=args.max_new_tokens, seed=run)
                    rows.append(("SimulateUser, one call", run, time.perf_counter() - start, sum(result.num_tokens)))
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{describe(runtime.precision, runtime.device)}"
    )
    print(f"{len(convs)} HH conversations, max_new_tokens {args.max_new_tokens}, temperature 1, top-p 1\n")
    print("| path | run | seconds | sessions/s | sampled tokens | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run, seconds, tokens in rows:
        print(f"| {name} | {run} | {seconds:.1f} | {len(convs) / seconds:.2f} | {tokens} | {tokens / seconds:.0f} |")
    naive_rate = [len(convs) / s for n, _, s, _ in rows if n.startswith("naive")]
    fast_rate = [len(convs) / s for n, _, s, _ in rows if n.startswith("Simulate")]
    print(
        f"\nsessions/s ratio per run: {', '.join(f'{f / n:.2f}x' for f, n in zip(fast_rate, naive_rate, strict=True))}"
    )


if __name__ == "__main__":
    main()
