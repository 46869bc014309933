"""Pseudonymous user ids: a keyed HMAC of the id a caller sends, taken before the id enters an
event, the model, a snapshot or a checkpoint. Off by default (DECISIONS D54).

With a key set (SNAPLEARN_PSEUDONYM_KEY, or a file: --pseudonym-key-file /
SNAPLEARN_PSEUDONYM_KEY_FILE; declared in pseudonym_settings), both servers replace every user
id by

    <tenant>/<26 base32 characters>   for an id `<tenant>/<rest>` (the tenant rule, D46, reads it)
    <26 base32 characters>            for an id without a tenant prefix

the first 128 bits of HMAC-SHA256(key, id), so the vision server and the recommender, given the
same key, agree on every student without sharing anything else. Callers keep using their own
ids: the servers check the tenant rule on the id sent, look the student up by its pseudonym and
answer in the id sent. A different key gives different pseudonyms: a rotated key makes every
student new (their history stays under the old pseudonyms until forgotten with the old key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any, Protocol, TypeVar

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import InvalidInput
from snaplearn_common.events import HEADER_EVENT_TYPE, IMAGE_CLASSIFIED_TYPE, EncodedEvent
from snaplearn_common.ids import MAX_ID_CHARS, check_user_id

# 128 bits: collisions between students are out of reach for any school's population, and the
# id stays short enough for a tenant prefix within the one id limit.
DIGEST_BYTES = 16
DIGEST_CHARS = len(base64.b32encode(bytes(DIGEST_BYTES)).rstrip(b"="))
MIN_KEY_BYTES = 16
MAX_TENANT_CHARS = MAX_ID_CHARS - 1 - DIGEST_CHARS
# Domain separation: the same key used elsewhere never yields these values.
_CONTEXT = b"snaplearn user id v1\0"
KEY_FILE_NAMES = "--pseudonym-key-file (env SNAPLEARN_PSEUDONYM_KEY_FILE)"


def load_key(key: str | None, key_file: Path | None) -> bytes | None:
    """The key's bytes (a file's without trailing whitespace), None when none is set; ValueError
    for a key file that cannot be read or a key shorter than MIN_KEY_BYTES."""
    if key is not None:
        raw, where = key.encode(), "SNAPLEARN_PSEUDONYM_KEY"
    elif key_file is not None:
        try:
            raw = key_file.read_bytes().rstrip()
        except OSError as error:
            raise ValueError(f"{KEY_FILE_NAMES} cannot be read: {error.strerror}") from None
        where = KEY_FILE_NAMES
    else:
        return None
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"{where} holds {len(raw)} bytes; a pseudonym key needs at least {MIN_KEY_BYTES}")
    return raw


class UserIds:
    """The id a server stores and publishes for the user id a caller sent: its pseudonym when a
    key is set, else the id itself. `internal` checks the id first (the one id rule)."""

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a pseudonym key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    @property
    def pseudonymous(self) -> bool:
        return self._key is not None

    def internal(self, user_id: str) -> str:
        """InvalidInput for an id the one id rule refuses (or whose tenant prefix leaves no room
        for the pseudonym)."""
        check_user_id(user_id)
        if self._key is None:
            return user_id
        digest = hmac.new(self._key, _CONTEXT + user_id.encode(), hashlib.sha256).digest()[:DIGEST_BYTES]
        pseudonym = base64.b32encode(digest).rstrip(b"=").decode().lower()
        tenant, slash, rest = user_id.partition("/")
        if not (slash and tenant and rest):
            return pseudonym
        if len(tenant) > MAX_TENANT_CHARS:
            raise InvalidInput(
                f"user_id's tenant prefix is {len(tenant)} characters; with pseudonymous ids the limit "
                f"is {MAX_TENANT_CHARS}"
            )
        return f"{tenant}/{pseudonym}"


class _Sink(Protocol):
    def publish(self, topic: str, event: EncodedEvent) -> Any: ...


S = TypeVar("S", bound=_Sink)


class PseudonymisingSink:
    """A sink in front of an event publisher that puts the pseudonym in each ImageClassified event
    (payload and record key) before handing it on; the vision server's only publishing path
    (Classify, ClassifyStream items, the Open Inference Protocol) goes through it."""

    def __init__(self, sink: _Sink, user_ids: UserIds) -> None:
        self._sink = sink
        self._user_ids = user_ids

    def publish(self, topic: str, event: EncodedEvent) -> Any:
        kind = dict(event.headers).get(HEADER_EVENT_TYPE, b"").decode()
        if kind != IMAGE_CLASSIFIED_TYPE:  # never let another kind through with the id it holds
            raise ValueError(f"cannot pseudonymise a {kind or 'untyped'} event")
        message = events_pb2.ImageClassified.FromString(event.value)
        message.user_id = pseudonym = self._user_ids.internal(message.user_id)
        rewritten = EncodedEvent(
            key=pseudonym.encode(), value=message.SerializeToString(), headers=event.headers
        )
        return self._sink.publish(topic, rewritten)


def pseudonymising_sink(sink: S | None, user_ids: UserIds) -> S | PseudonymisingSink | None:
    """`sink` itself when no key is set (or there is no sink), else a PseudonymisingSink before it."""
    if sink is None or not user_ids.pseudonymous:
        return sink
    return PseudonymisingSink(sink, user_ids)
