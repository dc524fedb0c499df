"""The one error the engine raises for a request it will not or cannot answer with a result.

Its status is an HTTP status code because that is the vocabulary every edge understands: the HTTP edges send
it as is, the gRPC edge maps it to a gRPC status code. The message says what to send instead or when to retry.
"""
from __future__ import annotations


class RequestError(Exception):
    """A request answered with an error: `status` (4xx for the client's mistake, 503 for overload), a message
    that says what to do, and headers for the answer (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 answer_at: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        # Pacing (engine/admission.py): an HTTP edge answers no earlier than this time.monotonic(); None: at once.
        self.answer_at = answer_at


def too_large(what: str, size: int | str, limit: int, setting: str) -> RequestError:
    return RequestError(413, f"{what} is {size} bytes, over the limit of {limit} bytes (server setting {setting})")
