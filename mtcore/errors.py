"""Status codes and the exception hierarchy that carries them.

Every error that can reach a tenant is an `MTError` subclass with a fixed `Status`.
The client raises the same classes from a reply's status, so a caller catches
`ModelNotFound` whether the broker said it or a local check did. Where a builtin
exception means the same thing, the class inherits it too (`TooLarge` is a
`ValueError`), so generic handlers keep working.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Reply status codes of the tenant protocol (shared/PROTOCOL.md), by stage."""

    OK = 0
    # 1x: framing and arguments
    MALFORMED = 10  # frames or header cannot be parsed
    UNSUPPORTED_VERSION = 11  # unknown protocol tag
    UNKNOWN_COMMAND = 12  # command byte not in the table
    TOO_LARGE = 13  # a frame or message exceeds a configured limit
    BAD_ARGUMENT = 14  # a header field is missing or of the wrong type
    # 2x: identity and quotas
    UNAUTHENTICATED = 20  # no valid identity
    FORBIDDEN = 21  # the identity may not do this
    QUOTA_EXCEEDED = 22  # a tenant quota would be crossed
    RATE_LIMITED = 23  # the tenant's request rate is over its limit
    # 3x: models and uploads
    MODEL_NOT_FOUND = 30  # no such model visible to this tenant
    MODEL_INVALID = 31  # the uploaded bytes are not an acceptable model
    MODEL_EXISTS = 32  # name taken and `replace` not set
    UPLOAD_CORRUPT = 33  # size or sha256 mismatch, missing chunks, unknown handle
    # 4x: inputs
    INPUT_INVALID = 40  # input names, dtypes or shapes do not match the model
    # 5x: deadlines and load
    DEADLINE_UNMEETABLE = 50  # rejected on arrival
    DEADLINE_EXPIRED = 51  # dropped while queued
    OVERLOADED = 52  # the service sheds load
    # 6x: execution
    WORKER_LOST = 60  # the worker running it was lost and no retry fits
    EXEC_FAILED = 61  # the model failed while running
    LOAD_FAILED = 62  # the model could not be loaded on any worker
    # 9x: the service itself
    INTERNAL = 90  # a bug: the message says where
    SHUTTING_DOWN = 91  # the broker is stopping


class MTError(Exception):
    """An error with a protocol status code and a message a person can act on."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str, status: Status | int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            try:
                self.status = Status(status)
            except ValueError:  # a peer sent a code we do not know: still an error
                self.status = Status.INTERNAL
                self.args = (f"{message} (unknown status {status})",)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"[{int(self.status)} {self.status.name}] {self.message}"


class ProtocolError(MTError, ValueError):
    status = Status.MALFORMED


class UnsupportedVersion(ProtocolError):
    status = Status.UNSUPPORTED_VERSION


class UnknownCommand(ProtocolError):
    status = Status.UNKNOWN_COMMAND


class TooLarge(MTError, ValueError):
    status = Status.TOO_LARGE


class BadArgument(MTError, ValueError):
    status = Status.BAD_ARGUMENT


class Unauthenticated(MTError, PermissionError):
    status = Status.UNAUTHENTICATED


class Forbidden(MTError, PermissionError):
    status = Status.FORBIDDEN


class QuotaExceeded(MTError):
    status = Status.QUOTA_EXCEEDED


class RateLimited(MTError):
    status = Status.RATE_LIMITED


class ModelNotFound(MTError, LookupError):
    status = Status.MODEL_NOT_FOUND


class ModelInvalid(MTError, ValueError):
    status = Status.MODEL_INVALID


class ModelExists(MTError):
    status = Status.MODEL_EXISTS


class UploadCorrupt(MTError, ValueError):
    status = Status.UPLOAD_CORRUPT


class InputInvalid(MTError, ValueError):
    status = Status.INPUT_INVALID


class DeadlineUnmeetable(MTError, TimeoutError):
    status = Status.DEADLINE_UNMEETABLE


class DeadlineExpired(MTError, TimeoutError):
    status = Status.DEADLINE_EXPIRED


class Overloaded(MTError):
    status = Status.OVERLOADED


class WorkerLost(MTError):
    status = Status.WORKER_LOST


class ExecFailed(MTError):
    status = Status.EXEC_FAILED


class LoadFailed(MTError):
    status = Status.LOAD_FAILED


class PoolExhausted(LoadFailed, MemoryError):
    """A worker's memory pool has no room for a model's weights: to a tenant, a load
    that failed (the worker reports its own stage status to the broker)."""


class InternalError(MTError):
    status = Status.INTERNAL


class ShuttingDown(MTError):
    status = Status.SHUTTING_DOWN


_BY_STATUS: dict[Status, type[MTError]] = {
    cls.status: cls
    for cls in (
        ProtocolError,
        UnsupportedVersion,
        UnknownCommand,
        TooLarge,
        BadArgument,
        Unauthenticated,
        Forbidden,
        QuotaExceeded,
        RateLimited,
        ModelNotFound,
        ModelInvalid,
        ModelExists,
        UploadCorrupt,
        InputInvalid,
        DeadlineUnmeetable,
        DeadlineExpired,
        Overloaded,
        WorkerLost,
        ExecFailed,
        LoadFailed,
        InternalError,
        ShuttingDown,
    )
}


def error_for(status: int, message: str) -> MTError:
    """The typed exception for a reply's status (an unknown code keeps its number)."""
    try:
        code = Status(status)
    except ValueError:
        return MTError(f"{message} (unknown status {status})")
    return _BY_STATUS.get(code, MTError)(message, code)
