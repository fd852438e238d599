"""The GPU check: training, serving and PPO on one accelerator in bf16, one table.

    bench/gpu_check.sh                      # on a GPU host: SmolLM2 full mode, serving, PPO (<= 8 min)
    .venv/bin/python bench/gpu_check.py --tiny --device cpu     # the same path with tiny models (a test runs it)

1. bf16 GEMM rate of the device, measured here (the MFU denominator);
2. reward model: SmolLM2-135M fine-tuned in full mode on the shared HH pairs (a few hundred
   optimiser steps), registered, held-out accuracy, training tokens/s and MFU (6N per token);
3. serving: the version served in bf16 by `rm-service serve` in its own process, scored through
   gRPC by 64 closed-loop clients on HH items: items/s, tokens/s, p50/p99, MFU (2N per token);
   then a ~1B-parameter reward model built from a config (random weights: speed only) the same way;
4. PPO: 2 steps of the SmolLM2 policy against the served version.

N = non-embedding parameters. Nothing here is a timing assertion: the table is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from rm_service.data import HH_PAIRS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from score import closed_loop, hh_items, pct  # noqa: E402  (bench/score.py, once bench/ is on the path)
from train import non_embedding_params  # noqa: E402  (bench/train.py)

DATA = HH_PAIRS
ONE_B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8
)


def bf16_gemm_flops(device: torch.device, n: int = 4096, repeats: int = 20) -> float:
    """FLOP/s of an n x n bf16 matmul on `device` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_reward_model(args, home: Path) -> dict:
    """Full-mode fine-tuning in bf16 on the device; the version's metrics and MFU inputs."""
    from rm_service.formats import import_file
    from rm_service.models.version import open_version
    from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.train.run import train

    store = Store(StoreSettings())
    try:
        import_file(store, args.data, "hh")
        settings = TrainSettings(
            backbone=args.backbone,
            mode="full",
            precision="bf16",
            max_tokens=args.max_tokens,
            max_pairs=args.max_pairs,
            micro_batch_pairs=args.micro_batch_pairs,
            grad_accum=1,
            epochs=args.epochs,
            ensemble_size=1,
            max_minutes=args.train_minutes,
            export_onnx="off",
            eval_every=50,
            patience=10_000,
        )
        start = time.monotonic()
        result = train(store, settings, ModelSettings(), show_progress=False)
        seconds = time.monotonic() - start
    finally:
        store.close()
    runtime, _ = open_version(
        Path(ModelSettings().artifacts_dir) / result.version, device=args.device, precision="bf16"
    )
    m = result.metrics
    return {
        "version": result.version,
        "accuracy": m["accuracy"],
        "heldout_pairs": int(m["heldout_pairs"]),
        "steps": int(m["full_steps"]),
        "tokens_per_s": m["tokens_per_s"],
        "params": non_embedding_params(runtime.model.backbone),
        "seconds": seconds,
    }


def serve_and_score(model: str, args, home: Path, clients: int) -> dict:
    """`rm-service serve --model MODEL` in bf16 on the device, `clients` closed-loop callers."""
    from rm_service.client import start_server_process

    run_dir = home / f"serve-{Path(model).name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "RM_SERVE_MODEL": model,
        "RM_SERVE_PRECISION": "bf16",
        "RM_SERVE_DEVICE": args.device,
        "RM_SERVE_WITH_STORE": "false",
        "RM_SERVE_METRICS_PORT": "-1",
        "RM_SERVE_MAX_BATCH_TOKENS": str(args.batch_tokens),
    }
    server, address = start_server_process(env, run_dir, timeout=600)
    try:
        items = hh_items(args.items)
        closed_loop(address, items, min(clients, 4), 1, 2.0)  # warm-up
        items_per_s, tokens_per_s, latencies, rejected = closed_loop(address, items, clients, 1, args.seconds)
    finally:
        server.terminate()
        server.wait(60)
    return {
        "items_per_s": items_per_s,
        "tokens_per_s": tokens_per_s,
        "p50_ms": 1000 * pct(latencies, 50),
        "p99_ms": 1000 * pct(latencies, 99),
        "rejected": rejected,
    }


def one_b_checkpoint(home: Path, tokenizer_from: str, tiny: bool) -> Path:
    """A ~1B-parameter Llama reward checkpoint from a config (random weights: speed only)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rm_service.models.resolver import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer_from))
    sizes = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny
        else ONE_B
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        num_labels=1,
        max_position_embeddings=2048,
        **sizes,
    )
    path = home / "llama-1b-rm"
    LlamaForSequenceClassification(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ppo_steps(args, home: Path, version_dir: Path) -> dict:
    """Two PPO steps of the policy against the served version."""
    from policy_trainer import PPOSettings, train_ppo
    from rm_service.client import start_server_process

    run_dir = home / "serve-ppo"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "RM_SERVE_MODEL": str(version_dir),
        "RM_SERVE_PRECISION": "bf16",
        "RM_SERVE_DEVICE": args.device,
        "RM_SERVE_WITH_STORE": "false",
        "RM_SERVE_METRICS_PORT": "-1",
    }
    server, address = start_server_process(env, run_dir, timeout=600)
    try:
        settings = PPOSettings(
            run_dir=home / "ppo",
            policy=args.policy,
            prompts_file=args.data,
            total_steps=2,
            prompts_per_step=args.ppo_prompts,
            samples_per_prompt=2,
            max_new_tokens=args.ppo_new_tokens,
            max_prompt_tokens=256,
            eval_prompts=0,
            device=args.device,
            precision="bf16",
            reward_addresses=[address],
            follow_models=False,
            progress=False,
            plots=False,
            tensorboard=False,
            save_policy=False,
        )
        start = time.monotonic()
        summary = train_ppo(settings)
        seconds = time.monotonic() - start
    finally:
        server.terminate()
        server.wait(60)
    last = summary.metrics[-1]
    return {
        "steps": summary.steps,
        "seconds_per_step": seconds / max(summary.steps, 1),
        "reward": last["reward/served_mean"],
        "kl": last["kl/ref_seq"],
    }


def table(
    device_name: str, peak: float, rm: dict, served: dict, big: dict, big_params: int, ppo: dict, clients: int
) -> str:
    mfu = lambda flops_per_token, tokens: 100 * flops_per_token * tokens / peak
    rows = [
        ("device", device_name),
        ("bf16 GEMM (measured here)", f"{peak / 1e12:.1f} TFLOP/s"),
        (
            "reward model: full-mode fine-tune",
            f"{rm['steps']} steps in {rm['seconds']:.0f} s, {rm['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {mfu(6 * rm['params'], rm['tokens_per_s']):.1f}% (6N, N={rm['params'] / 1e6:.0f}M)",
        ),
        ("held-out accuracy", f"{rm['accuracy']:.4f} on {rm['heldout_pairs']} pairs"),
        (
            f"served (bf16, {clients} clients), the version ({rm['params'] / 1e6:.0f}M)",
            f"{served['items_per_s']:,.1f} items/s, {served['tokens_per_s']:,.0f} tokens/s, p50 "
            f"{served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms, MFU "
            f"{mfu(2 * rm['params'], served['tokens_per_s']):.1f}%",
        ),
        (
            f"served (bf16, {clients} clients), a {big_params / 1e9:.2f}B checkpoint",
            f"{big['items_per_s']:,.1f} items/s, {big['tokens_per_s']:,.0f} tokens/s, p50 "
            f"{big['p50_ms']:.0f} ms, p99 {big['p99_ms']:.0f} ms, MFU {mfu(2 * big_params, big['tokens_per_s']):.1f}%",
        ),
        (
            "PPO against the served version",
            f"{ppo['steps']} steps, {ppo['seconds_per_step']:.1f} s/step, reward {ppo['reward']:+.3f}, KL "
            f"{ppo['kl']:.3f}",
        ),
    ]
    return "\n".join(["| check | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


GPU_SIZES = dict(
    backbone="smollm2-135m-instruct",
    policy="smollm2-135m-instruct",
    max_tokens=512,
    max_pairs=None,
    micro_batch_pairs=8,
    epochs=1.0,
    train_minutes=4.0,
    batch_tokens=32768,
    items=2048,
    seconds=30.0,
    clients=64,
    ppo_prompts=16,
    ppo_new_tokens=64,
)
TINY_SIZES = dict(
    max_tokens=128,
    max_pairs=40,
    micro_batch_pairs=2,
    train_minutes=1.0,
    batch_tokens=2048,
    items=64,
    seconds=2.0,
    clients=4,
    ppo_prompts=2,
    ppo_new_tokens=4,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="small sizes and a small 'large' model: the same path on a CPU in about a minute "
        "(give --backbone and --policy tiny HF directories)",
    )
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=None, help="also write the table (and the raw figures as JSON) here")
    for key, value in GPU_SIZES.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int, default=None)
    args = p.parse_args(argv)
    for key, value in {**GPU_SIZES, **(TINY_SIZES if args.tiny else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    home = Path(tempfile.mkdtemp(prefix="rm-gpu-check-"))
    for name in [n for n in os.environ if n.startswith("RM_") and n != "RM_MODELS_CACHE_DIR"]:
        del os.environ[name]  # everything under the fresh home, whatever the caller's environment points at
    os.environ["RM_HOME"] = str(home)
    os.environ.setdefault("RM_MODELS_CACHE_DIR", str(REPO / "var" / "cache" / "models"))
    device = torch.device(args.device)
    peak = bf16_gemm_flops(device, n=512 if args.tiny else 8192)
    rm = train_reward_model(args, home)
    version_dir = home / "registry" / rm["version"]
    served = serve_and_score(str(version_dir), args, home, args.clients)
    big_dir = one_b_checkpoint(home, args.policy, args.tiny)
    from transformers import AutoModelForSequenceClassification

    big_params = non_embedding_params(AutoModelForSequenceClassification.from_pretrained(big_dir).base_model)
    big = serve_and_score(str(big_dir), args, home, args.clients)
    ppo = ppo_steps(args, home, version_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = table(name, peak, rm, served, big, big_params, ppo, args.clients)
    print(text)
    if args.out:
        args.out.write_text(
            text
            + "\n\n"
            + json.dumps({"rm": rm, "served": served, "big": big, "big_params": big_params, "ppo": ppo})
            + "\n"
        )
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
