"""Pseudonymous user ids (snaplearn_common.pseudonym): the HMAC rule, the tenant prefix kept, the
key's settings, and the vision server's sink rewriting ImageClassified events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from snaplearn_common.errors import InvalidInput
from snaplearn_common.events import (
    EncodedEvent,
    FeedbackKind,
    decode_image_classified,
    encode_feedback_recorded,
    encode_image_classified,
)
from snaplearn_common.ids import MAX_ID_CHARS
from snaplearn_common.pseudonym import (
    DIGEST_CHARS,
    MAX_TENANT_CHARS,
    PseudonymisingSink,
    UserIds,
    pseudonymising_sink,
)
from snaplearn_common.pseudonym_settings import PseudonymSettings
from snaplearn_common.records import Record
from snaplearn_common.settings import InvalidSettings

KEY = b"a-test-key-of-32-bytes-0123456789"


def test_a_pseudonym_is_stable_keyed_and_keeps_the_tenant_prefix() -> None:
    ids = UserIds(KEY)
    pseudonym = ids.internal("school-a/amy")
    tenant, _, digest = pseudonym.partition("/")
    assert tenant == "school-a" and len(digest) == DIGEST_CHARS and digest.isalnum()
    assert "amy" not in pseudonym
    assert ids.internal("school-a/amy") == pseudonym == UserIds(KEY).internal("school-a/amy")
    assert UserIds(KEY + b"!").internal("school-a/amy") != pseudonym  # another key: another student
    # The tenant is part of what is hashed: the same name in two schools is two students.
    assert ids.internal("school-b/amy").split("/")[1] != digest
    assert "/" not in ids.internal("amy") and len(ids.internal("amy")) == DIGEST_CHARS
    assert "/" not in ids.internal("/amy") and "/" not in ids.internal("amy/")


def test_without_a_key_ids_pass_as_sent_and_both_check_the_one_id_rule() -> None:
    assert UserIds().internal("school-a/amy") == "school-a/amy"
    assert not UserIds().pseudonymous and UserIds(KEY).pseudonymous
    for ids in (UserIds(), UserIds(KEY)):
        with pytest.raises(InvalidInput, match="user_id is required"):
            ids.internal("  ")
        with pytest.raises(InvalidInput, match=f"the limit is {MAX_ID_CHARS}"):
            ids.internal("x" * (MAX_ID_CHARS + 1))


def test_a_pseudonym_fits_the_id_limit_or_the_tenant_is_refused_in_words() -> None:
    ids = UserIds(KEY)
    longest = ids.internal("t" * MAX_TENANT_CHARS + "/amy")
    assert len(longest) == MAX_ID_CHARS
    with pytest.raises(InvalidInput, match=f"tenant prefix is {MAX_TENANT_CHARS + 1} characters"):
        ids.internal("t" * (MAX_TENANT_CHARS + 1) + "/amy")


def test_the_key_comes_from_the_environment_or_a_file_and_is_checked(tmp_path: Path) -> None:
    assert PseudonymSettings.from_env({}).user_ids().pseudonymous is False
    from_env = PseudonymSettings.from_env({"SNAPLEARN_PSEUDONYM_KEY": KEY.decode()})
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")  # `echo key > file` and Kubernetes Secrets alike
    from_file = PseudonymSettings.from_env({"SNAPLEARN_PSEUDONYM_KEY_FILE": str(key_file)})
    assert from_env.user_ids().internal("amy") == from_file.user_ids().internal("amy")
    assert "a-test-key" not in repr(from_env)  # a secret, never printed
    with pytest.raises(InvalidSettings, match=r"SNAPLEARN_PSEUDONYM_KEY holds 5 bytes; .* at least 16"):
        PseudonymSettings.from_env({"SNAPLEARN_PSEUDONYM_KEY": "short"})
    with pytest.raises(InvalidSettings, match=r"--pseudonym-key-file .* cannot be read: No such file"):
        PseudonymSettings.from_env({"SNAPLEARN_PSEUDONYM_KEY_FILE": str(tmp_path / "absent")})
    with pytest.raises(InvalidSettings, match="give the pseudonym key once"):
        PseudonymSettings.from_env({}, pseudonym_key=SecretStr(KEY.decode()), pseudonym_key_file=key_file)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        UserIds(b"short")


class _Collect:
    def __init__(self) -> None:
        self.events: list[EncodedEvent] = []

    def publish(self, topic: str, event: EncodedEvent) -> Any:
        self.events.append(event)
        return True


def test_the_sink_rewrites_an_image_classified_events_id_in_payload_and_key() -> None:
    sink = _Collect()
    front = pseudonymising_sink(sink, UserIds(KEY))
    assert isinstance(front, PseudonymisingSink)
    raw = encode_image_classified("e-1", "school-a/amy", 1_700_000_000.0, "m", "1", [("fractions", 0.9)])
    assert front.publish("topic", raw) is True
    (sent,) = sink.events
    pseudonym = UserIds(KEY).internal("school-a/amy")
    assert sent.key == pseudonym.encode() and b"amy" not in sent.value
    decoded = decode_image_classified(Record("topic", 0, 0, sent.key, sent.value, sent.headers))
    assert (decoded.user_id, decoded.event_id, decoded.labels[0].label) == (pseudonym, "e-1", "fractions")
    # Any other kind of event is refused rather than passed on with the id it holds.
    feedback = encode_feedback_recorded("e-2", "amy", "item", FeedbackKind.VIEWED, 1.0, None, None)
    with pytest.raises(ValueError, match="cannot pseudonymise"):
        front.publish("topic", feedback)
    # No key: the sink itself, nothing changes.
    assert pseudonymising_sink(sink, UserIds()) is sink
    assert pseudonymising_sink(None, UserIds(KEY)) is None
