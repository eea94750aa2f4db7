"""The one exception tree of Rungate.

    RungateError                      base; carries an HTTP status and a snake_case code
    ├── ConfigError                   a setting is missing or invalid (start-up; names the variable)
    ├── StoreError                    the event log cannot be read or written (503)
    │   ├── ConcurrencyError          an append lost an optimistic-concurrency race (409)
    │   └── IntegrityError            the hash chain or a row does not verify
    ├── ClientError                   the caller sent something we refuse (4xx)
    │   ├── BadRequest                malformed JSON, missing field, wrong content type (400)
    │   ├── Unauthorized              missing or unknown token (401)
    │   ├── Forbidden                 authenticated but not allowed (403)
    │   ├── NotFound                  no such object (404)
    │   ├── Conflict                  the object is in a state that forbids the call (409)
    │   └── PayloadTooLarge           the body exceeds the configured limit (413)
    ├── GovernanceRefusal             a governance rule refused the call (402/403/429); canonical body
    └── ProviderError                 every upstream attempt failed (502)

Proxy routes render these in the caller's own wire format (OpenAI or Anthropic); admin routes render
`{"error": {"code", "message"}}`. Exactly one middleware does the rendering (`rungate.proxy.middleware`).
"""

from __future__ import annotations

from typing import Any


class RungateError(Exception):
    """Base of every error Rungate raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra: dict[str, Any] = extra or {}
        self.headers: dict[str, str] = headers or {}


class ConfigError(RungateError):
    """Raised at start-up when a setting is missing or invalid; the message names the variable."""

    code = "invalid_config"


class StoreError(RungateError):
    """Raised when the event log cannot be read or written; nothing was forwarded."""

    status = 503
    code = "store_unavailable"


class ConcurrencyError(StoreError):
    """Raised when an append's expected stream version no longer holds."""

    status = 409
    code = "version_conflict"


class IntegrityError(StoreError):
    """Raised when a stored row or the hash chain does not verify."""

    code = "integrity_error"


class ClientError(RungateError):
    """Base of errors caused by the caller."""

    status = 400
    code = "invalid_request"


class BadRequest(ClientError):
    """Raised for malformed JSON, a missing field or a wrong content type."""


class Unauthorized(ClientError):
    """Raised when the token is missing or unknown."""

    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    """Raised when the caller is known but not allowed."""

    status = 403
    code = "forbidden"


class NotFound(ClientError):
    """Raised when the addressed object does not exist (or is not the caller's)."""

    status = 404
    code = "not_found"


class Conflict(ClientError):
    """Raised when the object's state forbids the call (a closed run, a duplicate name)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    """Raised when a body exceeds the configured limit (checked after decompression)."""

    status = 413
    code = "payload_too_large"


class GovernanceRefusal(RungateError):
    """Raised when a governance rule refuses the call; rendered as the canonical governance body."""

    status = 403

    def __init__(self, message: str, *, code: str, status: int, run_id: str | None,
                 context: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, status=status, headers=headers)
        self.run_id = run_id
        self.context = context


class ProviderError(RungateError):
    """Raised when every upstream attempt failed; `attempts` lists each one."""

    status = 502
    code = "provider_error"

    def __init__(self, message: str, attempts: list[dict[str, Any]]) -> None:
        super().__init__(message, extra={"attempts": attempts})
        self.attempts = attempts
