"""Models for the GPU check built from the repository alone (an offline GPU machine has no
bundled SmolLM2): a byte-level BPE tokenizer trained on the shipped HH pairs, Llama backbones
from configs at real sizes (random weights: speed and memory, not quality), and the memory
through a hot-swap of two versions trained on one of them.

    SIZES["135m"], SIZES["1b"], SIZES["7b"]   # SmolLM2-135M, TinyLlama-1.1B, Llama-2-7B shapes
    plan(sizes, device)                        # --dry-run: parameters and predicted bytes, nothing built
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch

from rm_service.data import HH_PAIRS

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
}
GB = 1e9


def hh_tokenizer(vocab_size: int = 8192, lines: int = 2000):
    """A byte-level BPE tokenizer trained on the shipped HH pairs, with ChatML and its specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with open(HH_PAIRS, encoding="utf-8") as f:
        corpus = [json.loads(line)["chosen"] for _, line in zip(range(lines), f, strict=False)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def llama_config(size: str, vocab_size: int, pad_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, max_position_embeddings=2048, **SIZES[size])


def parameters(size: str, vocab_size: int = 32000) -> int:
    """A backbone's parameter count from its config alone (built on the meta device)."""
    from transformers import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(llama_config(size, vocab_size, 0))
    return sum(p.numel() for p in model.parameters())


def backbone_dir(size: str, tokenizer, home: Path, device: torch.device) -> Path:
    """A Llama backbone at `size` with random weights, saved in bf16 safetensors (built on the
    device: a 7B initialises in seconds there, minutes on a CPU)."""
    from transformers import LlamaModel

    path = home / f"llama-{size}"
    with torch.device(device):
        model = LlamaModel(llama_config(size, len(tokenizer), tokenizer.pad_token_id))
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path


def plan(sizes: list[str], device: torch.device, vocab_size: int = 8192) -> list[dict]:
    """What the swap step will hold, predicted from the configs (bf16 served: 2 bytes a
    parameter; a swap holds the old and the new version) against the device's memory."""
    from rm_service.models.memory import device_memory

    memory = device_memory(device)
    rows = []
    for size in sizes:
        n = parameters(size, vocab_size)
        row = {"size": size, "parameters": n, "served_bytes": 2 * n, "swap_peak_bytes": 4 * n}
        if memory is not None:
            row["device_bytes"] = memory[1]
            row["fits"] = row["swap_peak_bytes"] <= 0.9 * memory[1]
        rows.append(row)
    return rows


def swap_memory(size: str, tokenizer, home: Path, device: torch.device, pairs: int = 24) -> dict:
    """Two head-mode versions trained on a `size` backbone, v1 served, then a hot-swap to v2
    through the server's own path (server.swap.swap_to): the weights measured per version,
    the predicted load, and on CUDA the allocator's peak through the swap."""
    import asyncio

    from rm_service import registry
    from rm_service.formats import import_file
    from rm_service.models.memory import estimate_load
    from rm_service.server.models import ServedModels, load_version_dir
    from rm_service.server.swap import swap_to
    from rm_service.settings import ModelSettings, ServeSettings, StoreSettings, TrainSettings
    from rm_service.store.db import Store
    from rm_service.train.run import train

    backbone = backbone_dir(size, tokenizer, home, device)
    store = Store(StoreSettings())
    try:
        import_file(store, HH_PAIRS, "hh")  # labels already stored are counted as duplicates, not added again
        settings = TrainSettings(
            backbone=str(backbone), max_pairs=pairs, ensemble_size=1, max_tokens=256, precision="bf16",
            device=str(device), promote=False, export_onnx="off", feature_layers="last",
        )  # fmt: skip
        versions = [train(store, settings.model_copy(update={"seed": s}), ModelSettings(), show_progress=False).version
                    for s in (0, 1)]  # fmt: skip
        records = [registry.get_model(store, v) for v in versions]
    finally:
        store.close()
    serve = ServeSettings(precision="bf16", device=str(device), with_store=False, max_loaded=1)
    served = ServedModels(serve.max_loaded)
    start = time.monotonic()
    served.swap_in(load_version_dir(records[0].artifact_path, serve, ModelSettings(), records[0]), "current")
    load_s = time.monotonic() - start
    estimate = estimate_load([backbone, Path(records[1].artifact_path)], "bf16", device.type)
    load = partial(load_version_dir, records[1].artifact_path, serve, ModelSettings(), records[1])
    new = asyncio.run(swap_to(served, records[1].version, load, serve, estimate))
    if new is None:
        raise RuntimeError(f"the swap at {size} failed: {served.failed[records[1].version]}")
    swap = served.last_swap
    return {
        "size": size,
        "parameters": estimate.parameters,
        "predicted_bytes": estimate.served_bytes,
        "weight_bytes": swap["new_bytes"],
        "before_bytes": swap["before_bytes"],
        "peak_bytes": swap["peak_bytes"],
        "after_bytes": swap["after_bytes"],
        "load_s": load_s,
    }


def swap_rows(results: list[dict]) -> list[tuple[str, str]]:
    """Table rows of swap_memory's results."""
    return [
        (
            f"hot-swap memory, {r['size']} ({r['parameters'] / 1e9:.2f}B parameters, bf16)",
            f"weights {r['weight_bytes'] / GB:.2f} GB measured ({r['predicted_bytes'] / GB:.2f} GB predicted); "
            f"{r['before_bytes'] / GB:.2f} GB before, peak {r['peak_bytes'] / GB:.2f} GB, "
            f"{r['after_bytes'] / GB:.2f} GB after; first load {r['load_s']:.0f} s",
        )
        for r in results
    ]
