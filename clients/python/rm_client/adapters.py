"""What the trainer adapters (rm_client.trl, rm_client.verl) share: a client opened on first use
in the process that calls (so an adapter can be pickled to workers), and prompts as messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rm_client.client import RewardClient


class LazyClient:
    """Holds a RewardClient given to it, or opens one from `addresses` and the client settings
    on first use. A pickled copy (a trainer's worker processes) opens its own."""

    def __init__(self, client: RewardClient | None, addresses: str | Sequence[str] | None, client_kwargs: dict):
        if (client is None) == (addresses is None):
            raise ValueError("pass either a RewardClient (client=...) or the reward server addresses (addresses=...)")
        self._client, self._addresses, self._client_kwargs = client, addresses, client_kwargs
        self._owned = client is None

    @property
    def client(self) -> RewardClient:
        if self._client is None:
            assert self._addresses is not None  # __init__ took one of the two
            self._client = RewardClient(self._addresses, **self._client_kwargs)
        return self._client

    def close(self) -> None:
        if self._owned and self._client is not None:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict:
        if not self._owned:
            raise TypeError("an adapter built on a RewardClient cannot be pickled; build it with addresses=... instead")
        return {**self.__dict__, "_client": None}


def prompt_messages(prompt, where: str) -> list:
    """A prompt as messages: a string is one user turn; a list (or any sequence, a numpy array
    read from Parquet too) of messages is the conversation so far."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping) or prompt is None or not hasattr(prompt, "__iter__"):
        raise ValueError(f"{where}: expected a string or a list of messages, got {type(prompt).__name__}")
    return list(prompt)
