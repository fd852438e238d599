"""Data the project ships: real human preference pairs from Anthropic's HH-RLHF.

`HH_PAIRS` is the one place every reader (the demo's default, the tests, the benches, the
container's seed) takes the pairs from: 1,849 comparisons of the harmless-base test split
(MIT licence, `LICENSE-hh-rlhf.txt` beside it; source and format in `README.md`).
"""

from __future__ import annotations

from pathlib import Path

HH_PAIRS = Path(__file__).resolve().parent / "hh_harmless_pairs.jsonl"
"""HH-RLHF harmless-base pairs, one `{"chosen", "rejected"}` JSON object a line (HH text format)."""
