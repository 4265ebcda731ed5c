"""Domain errors of the coordinator's service layer; transports map `code` to their own
status (gRPC StatusCode, HTTP status)."""

from __future__ import annotations

import enum
import uuid


class Code(enum.StrEnum):
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    DATA_LOSS = "DATA_LOSS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    ABORTED = "ABORTED"  # a concurrent operation on the same resource: retry
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the server-side deadline of a call passed


class ServiceError(Exception):
    def __init__(self, code: Code, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # sent as `retry-after` metadata (gRPC) / header (HTTP)


def new_error_id() -> str:
    """The id an unexpected error is logged under and the only detail its caller gets."""
    return uuid.uuid4().hex[:16]
