"""The one rule for the ids callers send (user, item, request): every RPC of both servers checks
them here, so a student id accepted by Classify is accepted by Recommend and RecordFeedback, and
every refusal reads the same."""

from __future__ import annotations

from snaplearn_common.errors import InvalidInput

# Ids are keys of events, model rows and dedupe memories: bounded so that a caller cannot grow
# them without limit, generous enough for a UUID with a tenant prefix.
MAX_ID_CHARS = 128
_REQUIRED_HINTS = {"user_id": " (an opaque, stable id of the student)"}


def check_id(name: str, value: str, *, required: bool = True) -> None:
    """Raise InvalidInput unless `value` is a usable id: non-blank (when required), at most
    MAX_ID_CHARS characters."""
    if required and (not value or not value.strip()):
        raise InvalidInput(f"{name} is required{_REQUIRED_HINTS.get(name, '')}")
    if len(value) > MAX_ID_CHARS:
        raise InvalidInput(f"{name} is {len(value)} characters; the limit is {MAX_ID_CHARS}")


def check_user_id(user_id: str) -> None:
    check_id("user_id", user_id)
