"""Following the served reward-model versions where they are served: the scorers.

`ModelWatcher` streams `RewardService.WatchModels` from every scorer the trainer scores on (one
background thread per channel) and remembers each one's default version. `latest()` is the
version that every connected scorer serves by default: a trainer that switches to it never pins
a version some replica has not loaded yet, and while the replicas disagree (one has swapped,
another is still loading) it keeps the version they all still hold. The store process is not
watched: in a split deployment (`serve --no-model` beside `serve --no-store` scorers) it serves
no RewardService, and the versions that matter are the ones the scorers have loaded.

`recover_version` is what a trainer asks when its pinned version was unloaded (two promotions
while it was pinned): the watchers' agreement if there is a newer one, else the scorers
themselves (GetModel of the default, round-robin over the scorers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from rm_client import RewardClient, ScoreError
from rm_client.api.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
SWITCH_KINDS = ("current", "loaded", "promoted", "rolled_back")


class ModelWatcher:
    """Follows WatchModels on each scorer's channel; `latest` is the default version all connected
    scorers agree on (the last agreed one while they disagree or none is connected)."""

    def __init__(self, channels: grpc.Channel | Sequence[grpc.Channel], reconnect_s: float = 1.0):
        channels = [channels] if isinstance(channels, grpc.Channel) else list(channels)
        self.reconnect_s = reconnect_s
        self._defaults: list[reward_pb2.ModelInfo | None] = [None] * len(channels)  # per scorer; None: not connected
        self._agreed: reward_pb2.ModelInfo | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._calls: list[Any] = [None] * len(channels)
        self._threads = [
            threading.Thread(target=self._run, args=(i, channel), name=f"watch-models-{i}", daemon=True)
            for i, channel in enumerate(channels)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int, channel: grpc.Channel) -> None:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        while not self._stop.is_set():
            try:
                self._calls[index] = stub.WatchModels(reward_pb2.WatchModelsRequest())
                for event in self._calls[index]:
                    if event.kind in SWITCH_KINDS and event.model.version:
                        self._set(index, event.model)
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                log.warning(
                    "WatchModels stream of scorer %d ended (%s); reconnecting in %.1fs",
                    index,
                    err.code().name,
                    self.reconnect_s,
                )
            self._set(index, None)  # a scorer that is not connected does not hold back the others
            self._stop.wait(self.reconnect_s)

    def _set(self, index: int, model: reward_pb2.ModelInfo | None) -> None:
        with self._lock:
            self._defaults[index] = model
            known = [m for m in self._defaults if m is not None]
            if known and len({m.version for m in known}) == 1:
                self._agreed = known[0]

    def latest(self) -> str | None:
        with self._lock:
            return self._agreed.version if self._agreed is not None else None

    def info(self) -> reward_pb2.ModelInfo | None:
        with self._lock:
            return self._agreed

    def defaults(self) -> list[str | None]:
        """Each scorer's default version as last announced (None: not connected)."""
        with self._lock:
            return [m.version if m is not None else None for m in self._defaults]

    def stop(self) -> None:
        self._stop.set()
        for call in self._calls:
            if call is not None:
                call.cancel()
        for thread in self._threads:
            thread.join(5)


def recover_version(pinned: str, watcher: ModelWatcher | None, client: RewardClient) -> str | None:
    """The version to score with once `pinned` is no longer loaded: the scorers' agreed default
    when it differs, else the default of a scorer asked now; None when neither has another."""
    latest = watcher.latest() if watcher is not None else None
    if latest and latest != pinned:
        return latest
    try:
        current = client.current_version()
    except ScoreError as exc:
        log.warning("could not ask the scorers for their default version: %s", exc)
        return None
    return current if current and current != pinned else None
