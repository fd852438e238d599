"""Domain errors and the tables that map them to gRPC status codes and HTTP statuses.

Code raises these; `rm_service.server.rpc` turns them into gRPC statuses through STATUS_CODES,
the HTTP app (`rm_service.server.http`) into HTTP statuses through HTTP_STATUS (Google's
gRPC-to-HTTP mapping). Anything that is not an RMError becomes INTERNAL / 500 (never UNKNOWN).
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
    """An admission limit (queue, in-flight items) is reached; retry after `retry_after_s`
    seconds (gRPC's `grpc-retry-pushback-ms` trailer, HTTP's Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class DeadlineExceeded(RMError):
    """The call's deadline passed (or its caller left) before the work reached the model."""


class Unavailable(RMError):
    """Not ready yet, draining, or the store is locked by another process."""


class FailedPrecondition(RMError):
    """The request is valid but the system is not in a state to run it (e.g. no labels)."""


class Aborted(RMError):
    """The call lost a race it cannot win by retrying as is: e.g. the task's lease expired or
    passed to someone else. Lease again and redo the work."""


class Cancelled(RMError):
    """The caller went away (an HTTP client disconnected) before its answer was ready."""


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
    Aborted: grpc.StatusCode.ABORTED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: its RMError class's entry, else INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


# The same errors over HTTP, as Google's API design guide maps gRPC codes to HTTP statuses.
HTTP_STATUS: dict[type[RMError], int] = {
    InvalidArgument: 400,
    FailedPrecondition: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    AlreadyExists: 409,
    Aborted: 409,
    Overloaded: 429,
    Unavailable: 503,
    DeadlineExceeded: 504,
    Cancelled: 499,  # nginx's "client closed request": nobody reads it, the metrics count it
}


def http_status(exc: BaseException) -> int:
    """The HTTP status for an exception: its RMError class's entry, else 500."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
