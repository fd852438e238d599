"""What a training mode hands back: rewards on the fit and held-out pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scores:
    fit: tuple[np.ndarray, np.ndarray]  # (r_chosen, r_rejected), [N] each, ensemble mean
    heldout: tuple[np.ndarray, np.ndarray]  # [M] each
    steps: int
    num_pairs: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
