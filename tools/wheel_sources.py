"""Unpack the Python sources of a downloaded wheel (its .py files and its .dist-info) into a folder.

For a peer whose wheel is mostly compiled kernels that the tests never load (vLLM 0.33.0: 336 MB
compressed, 837 MB unpacked, 50 MB of it Python): `make peers-vllm` puts only its released Python
code under .venv/peers/vllm, where the tests import its protocol modules.

    python tools/wheel_sources.py WHEEL DEST
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def unpack(wheel: Path, dest: Path) -> int:
    """Extract WHEEL's Python files and metadata into DEST; the number of files written."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".py") or ".dist-info/" in n]
        archive.extractall(dest, names)
    return len(names)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tools/wheel_sources.py WHEEL DEST")
    count = unpack(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{count} files of {Path(sys.argv[1]).name} unpacked into {sys.argv[2]}")
