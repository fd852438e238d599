"""Domain errors and the one table that maps them to gRPC status codes.

Code raises these; `rm_service.server.rpc` turns them into statuses through STATUS_CODES.
Anything that is not an RMError becomes INTERNAL (never UNKNOWN).
"""

from __future__ import annotations

import grpc


class RMError(Exception):
    """Base of every error that has a defined status code."""


class InvalidArgument(RMError):
    """A request field is invalid. `field` is its path, e.g. `items[2].completion`."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class NotFound(RMError):
    """An unknown model version, job or task."""


class AlreadyExists(RMError):
    """The same idempotency key was used with another payload."""


class Overloaded(RMError):
    """An admission limit (queue, in-flight items) is reached; retry later."""


class DeadlineExceeded(RMError):
    """The call's deadline passed (or its caller left) before the work reached the model."""


class Unavailable(RMError):
    """Not ready yet, draining, or the store is locked by another process."""


class FailedPrecondition(RMError):
    """The request is valid but the system is not in a state to run it (e.g. no labels)."""


class Unauthenticated(RMError):
    """No or unknown credentials."""


class PermissionDenied(RMError):
    """Valid credentials without the role the method needs."""


STATUS_CODES: dict[type[RMError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: its RMError class's entry, else INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL
