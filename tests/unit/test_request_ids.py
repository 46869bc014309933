"""Generated request ids: unique, UUID version 4 shaped, distinct between processes."""

from __future__ import annotations

import uuid

from snaplearn_vision.core.request_ids import RequestIds


def test_ids_are_unique_and_parse_as_version_4_uuids() -> None:
    ids = RequestIds()
    made = [ids.next() for _ in range(10_000)]
    assert len(set(made)) == len(made)
    for text in (made[0], made[-1]):
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_two_generators_do_not_share_a_prefix() -> None:
    # As two server processes: the random part differs (a 2^-74 chance that it does not).
    first, second = RequestIds().next(), RequestIds().next()
    assert first[:24] != second[:24]
    assert first[24:] == second[24:] == "000000000000"
