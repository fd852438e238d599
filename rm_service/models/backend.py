"""What runs a served version's batches: one interface for the two backends.

- `models.runtime.ModelRuntime`: the PyTorch module in the precision measured fastest;
- `models.onnx_backend.OnnxRuntimeModel`: an ONNX Runtime session over the version's export.

Both take the batches `models.batching.collate` builds (right padding with `pad_id`) and give
each ensemble member's reward per row, so the batcher, the warm-up and the parity checks run
either one the same way.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from rm_service.models.formatting import Formatted


@runtime_checkable
class RewardBackend(Protocol):
    @property
    def pad_id(self) -> int:
        """The token id rows are padded with (the checkpoint reads its score before it)."""
        ...

    def run_collated(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Member rewards [b, K] of one padded batch (input_ids, attention_mask [b, T], ...)."""
        ...

    def run(self, items: list[Formatted], max_batch_tokens: int) -> np.ndarray:
        """Member rewards [N, K] of formatted items, batched within `max_batch_tokens` padded tokens."""
        ...
