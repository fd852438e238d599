"""The model thread's place among the server's threads: its OS name and its priority."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_priority(nice: int) -> None:
    """Run the calling thread `nice` steps below the rest of the process; threads it starts
    later (its OpenMP workers: libgomp keeps one pool per thread that opens a parallel region)
    inherit that. Linux scopes priority to the thread id; elsewhere this is a no-op."""
    if not sys.platform.startswith("linux"):
        return
    _name_os_thread(b"model")  # `top -H` and bench/overload.py tell its CPU (and its OpenMP workers') apart
    if not nice:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        log.warning("could not lower the model thread's priority by %d: %s", nice, exc)


def _name_os_thread(name: bytes) -> None:
    """Name the calling thread for the OS (threads it starts later inherit the name)."""
    try:
        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
