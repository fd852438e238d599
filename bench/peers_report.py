"""The markdown report of bench/peers.py: one table, then the acceptance figures.

.venv/bin/python bench/peers_report.py docs/bench/peers.json   # rewrite docs/bench/peers.md from a run's JSON
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def pct(values: list[float], q: int) -> float:
    """q-th percentile in ms (the one value when there is a single sample, nan when none)."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def non_embedding_params(model_dir: Path) -> int:
    """Parameters outside the token embedding, from the safetensors headers: 2 x this x tokens is a forward's FLOPs."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "embed_tokens" not in k)
    return total


def _point(system: dict, load: str) -> dict | None:
    """The point whose load is `load` ("closed 64"), or the open-loop one for "open"."""
    return next(
        (p for p in system["points"] if p["load"] == load or (load == "open" and p["load"].startswith("open"))), None
    )


def _ms(v: float) -> str:
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def report(run: dict) -> str:
    hw, args = run["hardware"], run["args"]
    lines = [
        "# Peers side by side: rm-service, OpenRLHF serve_rm, naive FastAPI",
        "",
        f"Run {run['date']} by `python bench/peers.py` (`make bench-peers`), {run['wall_s'] / 60:.1f} min in all. "
        f"Hardware: **{hw['cpu']}, {hw['cores']} cores**{', GPU ' + hw['gpu'] if hw.get('gpu') else ', no GPU'} "
        f"(shared by the servers and the load generator); torch {hw['torch']}.",
        "",
        f"Model: SmolLM2-135M-Instruct as a `LlamaForSequenceClassification` directory ({run['model']}, seeded score "
        f"head). Items: {run['items']} HH-RLHF harmless sides within the {args['max_tokens']}-token cap every system "
        f"is given ({run['items_over_cap']} longer ones left out, so none truncates), mean {run['mean_tokens']:.0f} "
        f"tokens; 1 item per call. Each point runs {args['duration']:.0f} s; a call unanswered after "
        f"{args['timeout']:.0f} s is a timeout.",
        "",
        "How the peers run: OpenRLHF 0.11.2 from PyPI (`--no-deps`, then only what `openrlhf.cli.serve_rm` imports: "
        "transformers 5.15.0 as it pins, deepspeed 0.19.6 built without ops, flash-attn 2.8.3's Python files without "
        "its CUDA build, imported with `FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE`, triton 3.4 for that import) and the "
        "CPU torch wheel, in a venv outside the repository (bench/peers/setup.sh); serve_rm with its defaults (bf16 "
        "weights) except `--ds.attn_implementation sdpa` (flash-attn kernels need a GPU) and `--data.max_len` set to "
        "the cap. The naive peer is bench/peers/naive_server.py in the same venv. Both answer `POST /get_reward "
        '{"query": [text]}` one request at a time (the handler runs the model on the event loop); rm-service is '
        "`rm-service serve` over gRPC with its defaults, in the precision it measured fastest on this machine.",
        "",
        "| system | precision, backend | load | items/s | tokens/s | model GFLOP/s | p50 | p99 | refused, retried | "
        "errors | timeouts |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flops = 2 * run["non_embedding_params"]
    for s in run["systems"]:
        for p in s["points"]:
            lines.append(
                f"| {s['name']} | {s['precision']}, {s['backend']} | {p['load']} | {p['items'] / p['duration']:.2f} "
                f"| {p['tokens'] / p['duration']:.0f} | {flops * p['tokens'] / p['duration'] / 1e9:.0f} | "
                f"{_ms(pct(p['latencies'], 50))} | {_ms(pct(p['latencies'], 99))} | {p['rejected']} | {p['errors']} "
                f"| {p['timeouts']} |"
            )
    lines += [
        "",
        "items/s and tokens/s: calls answered inside the window. p50/p99: every answered call, from its first "
        "attempt (rm-service refuses at once when its queue holds more than ~2 s of work; the client backs off as "
        'rm_client does and retries; the refusals are the "refused, retried" column). Open loop: Poisson arrivals '
        "at 50% of the system's best closed-loop items/s. Model GFLOP/s: 2 x the "
        f"{run['non_embedding_params'] / 1e6:.1f} M non-embedding parameters x tokens/s (attention's own FLOPs left "
        "out)"
        + (
            f"; this machine's GEMM rates as rm-service's precision probe measured and cached them: fp32 "
            f"{run['gemm']['fp32_gflops']:.0f}, bf16 {run['gemm']['bf16_gflops']:.0f} GFLOP/s"
            if run.get("gemm")
            else ""
        )
        + ".",
        "",
    ]
    lines += [
        "Each system runs alone, in turn; the machine is shared with other work, so the 1-minute load average before "
        "each system started is given: "
        + ", ".join(f"{s['name']} {s['loadavg_before']:.1f}" for s in run["systems"])
        + ".",
        "",
    ]
    lines += _acceptance(run)
    errors = {
        f"{s['name']} {p['load']}: {k}": v
        for s in run["systems"]
        for p in s["points"]
        for k, v in p["error_kinds"].items()
    }
    if errors:
        lines += ["", "Errors by kind:", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def _acceptance(run: dict) -> list[str]:
    by = {s["name"]: s for s in run["systems"]}
    out = ["## Acceptance figures (issue #16)", "", "| figure | value | target |", "|---|---|---|"]
    rm = by.get("rm-service")
    if rm and "openrlhf" in by:
        ratio = rm["saturation_items_per_s"] / by["openrlhf"]["saturation_items_per_s"]
        out.append(
            "| rm-service items/s over OpenRLHF serve_rm's (best closed loop each) | "
            f"{rm['saturation_items_per_s']:.2f} / {by['openrlhf']['saturation_items_per_s']:.2f} = **{ratio:.2f}x** "
            "| >= 2x |"
        )
        if run.get("gemm"):
            need = (
                2
                * 2
                * run["non_embedding_params"]
                * max(p["tokens"] / p["duration"] for p in by["openrlhf"]["points"])
                / 1e9
            )
            out.append(
                f"| what 2x OpenRLHF's best tokens/s would take | {need:.0f} model GFLOP/s = "
                f"{need / run['gemm']['bf16_gflops']:.0%} of the bf16 GEMM rate, "
                f"{need / run['gemm']['fp32_gflops']:.0%} of fp32's | (a bound, not a target) |"
            )
    if rm:
        single = pct(_point(rm, "closed 1")["latencies"], 50) if _point(rm, "closed 1") else float("nan")
        half = pct(_point(rm, "open")["latencies"], 99)
        out.append(
            f"| rm-service p99 at 50% load over its single-call p50 | {_ms(half)} / {_ms(single)} = "
            f"**{half / single:.1f}x** | <= 3x |"
        )
        for name, s in by.items():
            if name != "rm-service":
                out.append(
                    f"| rm-service p99 at 50% load vs {name}'s | {_ms(half)} vs "
                    f"{_ms(pct(_point(s, 'open')['latencies'], 99))} | no worse |"
                )
    for name, s in by.items():
        p64 = _point(s, "closed 64")
        if p64:
            refused = f"; {p64['rejected']} refusals for {len(p64['latencies'])} answers" if p64["rejected"] else ""
            out.append(
                f"| {name}: timeouts / errors at 64 clients | {p64['timeouts']} / {p64['errors']}{refused} | 0 |"
            )
    if rm:
        ref = rm["probe_rewards"]
        for name, s in by.items():
            if name != "rm-service":
                diff = max(abs(a - b) for a, b in zip(ref, s["probe_rewards"], strict=True))
                out.append(
                    f"| same model, same token: max reward difference vs rm-service on {len(ref)} items | {name}: "
                    f"{diff:.3f} (rewards span {min(ref):.2f} .. {max(ref):.2f}) | precision noise only |"
                )
    return out


def main() -> None:
    path = Path(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "bench" / "peers.json"
    )
    run = json.loads(path.read_text())
    if "non_embedding_params" not in run:  # a run recorded before the FLOP/s column
        run["non_embedding_params"] = non_embedding_params(path.resolve().parent.parent.parent / run["model"])
        path.write_text(json.dumps(run, indent=1))
    path.with_suffix(".md").write_text(report(run))


if __name__ == "__main__":
    main()
