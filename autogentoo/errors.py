"""Error codes shared by the daemon and agctl.

Every failure a user can see carries one of these codes. The code is the
contract (scripts match on it); the message is for people and may change.
The HTTP status and the agctl exit code follow from the code, so the two
sides never disagree about what an error means.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Code(StrEnum):
    # request and protocol
    BAD_REQUEST = "bad_request"
    INVALID_NAME = "invalid_name"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # who you are
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    # domain
    ALREADY_EXISTS = "already_exists"
    BUSY = "busy"
    CONFLICT = "conflict"
    UNSAFE_ARCHIVE = "unsafe_archive"
    UNSAFE_PATH = "unsafe_path"
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_SIGNATURE = "bad_signature"
    NO_SPACE = "no_space"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    MOUNT_BUSY = "mount_busy"
    JOB_FAILED = "job_failed"
    KCONFIG_DROPPED = "kconfig_dropped"
    TOO_LARGE = "too_large"
    # the daemon itself
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"


HTTP_STATUS: dict[Code, int] = {
    Code.BAD_REQUEST: 400,
    Code.INVALID_NAME: 400,
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.UNAUTHENTICATED: 401,
    Code.FORBIDDEN: 403,
    Code.ALREADY_EXISTS: 409,
    Code.BUSY: 409,
    Code.CONFLICT: 409,
    Code.UNSAFE_ARCHIVE: 422,
    Code.UNSAFE_PATH: 422,
    Code.DIGEST_MISMATCH: 422,
    Code.BAD_SIGNATURE: 422,
    Code.NO_SPACE: 507,
    Code.BACKEND_UNAVAILABLE: 503,
    Code.MOUNT_BUSY: 409,
    Code.JOB_FAILED: 422,
    Code.KCONFIG_DROPPED: 422,
    Code.TOO_LARGE: 422,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
}

# agctl exit codes: 0 success, 1 the job or command failed, 2 usage, then by
# class of error so a script can tell "fix your input" from "try later".
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CODES: dict[Code, int] = {
    Code.BAD_REQUEST: 2,
    Code.INVALID_NAME: 2,
    Code.INVALID_ARGUMENT: 2,
    Code.METHOD_NOT_ALLOWED: 2,
    Code.PAYLOAD_TOO_LARGE: 2,
    Code.UNSUPPORTED_MEDIA_TYPE: 2,
    Code.NOT_FOUND: 3,
    Code.UNAUTHENTICATED: 4,
    Code.FORBIDDEN: 4,
    Code.ALREADY_EXISTS: 5,
    Code.BUSY: 5,
    Code.CONFLICT: 5,
    Code.MOUNT_BUSY: 5,
    Code.UNSAFE_ARCHIVE: 6,
    Code.UNSAFE_PATH: 6,
    Code.DIGEST_MISMATCH: 6,
    Code.BAD_SIGNATURE: 6,
    Code.TOO_LARGE: 6,
    Code.KCONFIG_DROPPED: 6,
    Code.JOB_FAILED: 1,
    Code.NO_SPACE: 7,
    Code.BACKEND_UNAVAILABLE: 7,
    Code.UNAVAILABLE: 8,
    Code.INTERNAL: 9,
}
EXIT_UNREACHABLE = 8  # the daemon could not be reached at all


class AgError(Exception):
    """An error the user should see, with a stable code.

    Subclasses fix the code; `details` carries machine-readable context (the
    name that was refused, the mount that is busy) and is sent as-is.
    """

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, code: Code | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AgError:
        try:
            code = Code(body.get("code", "internal"))
        except ValueError:
            code = Code.INTERNAL
        details = body.get("details") or {}
        err = cls(str(body.get("message", "unknown error")), code=code)
        err.details = details if isinstance(details, dict) else {}
        return err


class BadRequest(AgError):
    code = Code.BAD_REQUEST


class InvalidName(AgError):
    code = Code.INVALID_NAME


class InvalidArgument(AgError):
    code = Code.INVALID_ARGUMENT


class NotFound(AgError):
    code = Code.NOT_FOUND


class Forbidden(AgError):
    code = Code.FORBIDDEN


class AlreadyExists(AgError):
    code = Code.ALREADY_EXISTS


class Busy(AgError):
    code = Code.BUSY


class Conflict(AgError):
    code = Code.CONFLICT


class UnsafeArchive(AgError):
    code = Code.UNSAFE_ARCHIVE


class UnsafePath(AgError):
    code = Code.UNSAFE_PATH


class DigestMismatch(AgError):
    code = Code.DIGEST_MISMATCH


class NoSpace(AgError):
    code = Code.NO_SPACE


class BackendUnavailable(AgError):
    code = Code.BACKEND_UNAVAILABLE


class MountBusy(AgError):
    code = Code.MOUNT_BUSY


class JobFailed(AgError):
    code = Code.JOB_FAILED


class KconfigDropped(AgError):
    code = Code.KCONFIG_DROPPED


class TooLarge(AgError):
    code = Code.TOO_LARGE


class Unavailable(AgError):
    code = Code.UNAVAILABLE


class CommandFailed(AgError):
    """A subprocess the daemon ran failed; the message names it and how."""

    code = Code.INTERNAL
