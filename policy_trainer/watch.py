"""Following the served reward-model versions: `ModelWatcher` streams
`RewardService.WatchModels` in a background thread and remembers the version most recently
announced as served; the trainer switches to it between batches."""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from rm_client.api.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
SWITCH_KINDS = ("current", "loaded", "promoted", "rolled_back")


class ModelWatcher:
    """Follows WatchModels; `latest` is the version most recently announced as served."""

    def __init__(self, channel: grpc.Channel, reconnect_s: float = 1.0):
        self.stub = reward_pb2_grpc.RewardServiceStub(channel)
        self.reconnect_s = reconnect_s
        self._latest: str | None = None
        self._info: reward_pb2.ModelInfo | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._call: Any = None  # the WatchModels stream: a grpc.Call that is also an iterator of events
        self._thread = threading.Thread(target=self._run, name="watch-models", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._call = self.stub.WatchModels(reward_pb2.WatchModelsRequest())
                for event in self._call:
                    if event.kind in SWITCH_KINDS and event.model.version:
                        with self._lock:
                            self._latest, self._info = event.model.version, event.model
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                log.warning("WatchModels stream ended (%s); reconnecting in %.1fs", err.code().name, self.reconnect_s)
            self._stop.wait(self.reconnect_s)

    def latest(self) -> str | None:
        with self._lock:
            return self._latest

    def info(self) -> reward_pb2.ModelInfo | None:
        with self._lock:
            return self._info

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(5)
