"""RecommenderModel.forget and the StudentForgotten tombstone in apply: the event round trip, what
is erased, that the other students' state is untouched when the last row moves into the freed one,
in-batch order, exactly-once, and that the pickle (the checkpoint) no longer holds the id."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from snaplearn_common.errors import InvalidInput
from snaplearn_common.events import (
    FeedbackKind,
    decode_event,
    encode_student_forgotten,
)
from snaplearn_common.records import Record
from snaplearn_common.security.principal import SCOPE_BY_METHOD, Principal, Scope, scope_for
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, FeedbackEvent, ForgetEvent, RecommenderModel
from snaplearn_recommender.snapshot_store import CatalogCache, dump_snapshot

CATALOG = generate_sample_catalog()
T0 = 1_700_000_000.0
GONE = "gone-student-Xq81"


def _photo(number: int, user: str, topic: str) -> ClassifiedEvent:
    return ClassifiedEvent(f"p{number}", user, ((topic, 0.9),), T0 + number)


def _history(model: RecommenderModel) -> None:
    model.apply(
        [
            _photo(0, GONE, "fractions"),  # row 0: the last row will move into it
            _photo(1, "bea", "geometry"),
            _photo(2, "cal", "addition"),
            FeedbackEvent("f0", GONE, "fractions-002", FeedbackKind.COMPLETED, T0 + 3, True),
            FeedbackEvent("f1", GONE, "fractions-003", FeedbackKind.SKIPPED, T0 + 4),
            FeedbackEvent("f2", "cal", "addition-002", FeedbackKind.SKIPPED, T0 + 5),
            FeedbackEvent("f3", "cal", "addition-001", FeedbackKind.COMPLETED, T0 + 6, False),
        ]
    )


def test_the_tombstone_round_trips_and_a_bad_one_is_refused() -> None:
    encoded = encode_student_forgotten("t1", GONE, T0)
    record = Record("t", 0, 0, encoded.key, encoded.value, encoded.headers)
    assert encoded.key == GONE.encode()  # the student's own key: it follows their events
    assert ForgetEvent.from_proto(decode_event(record)) == ForgetEvent("t1", GONE, T0)  # type: ignore[arg-type]
    empty = encode_student_forgotten("t2", "", T0)
    with pytest.raises(InvalidInput, match="StudentForgotten without event_id or user_id"):
        decode_event(Record("t", 0, 0, b"", empty.value, empty.headers))


def test_forget_erases_the_student_and_leaves_the_others_as_they_were() -> None:
    model = RecommenderModel(CATALOG)
    _history(model)
    before = model.snapshot()
    cal_before = before.recommend("cal", 10)
    bea_profile, cal_profile = model.profile("bea"), model.profile("cal")
    result = model.apply([ForgetEvent("t1", GONE)])
    assert (result.applied, result.forgotten) == (1, 1)
    after = model.snapshot()
    assert set(after.user_index) == {"bea", "cal"} and model.n_users == 2
    assert sorted(after.user_index.values()) == [0, 1]  # rows stay dense
    assert model.profile(GONE) == {} and model.skipped(GONE) == ()
    assert after.mastery is not None and GONE not in after.mastery.students
    assert GONE not in after.recent_attempts
    assert after.recommend(GONE, 10).cold_start
    # cal moved from the last row into the freed one: same profile, skips, seen items, mastery, ranking.
    assert (model.profile("bea"), model.profile("cal")) == (bea_profile, cal_profile)
    assert model.skipped("cal") == ("addition-002",)
    cal_after = after.recommend("cal", 10)
    assert [(i.item_id, i.reason) for i in cal_after.items] == [
        (i.item_id, i.reason) for i in cal_before.items
    ]
    np.testing.assert_allclose(
        after.user_vectors[after.user_index["cal"]], before.user_vectors[before.user_index["cal"]], rtol=1e-6
    )
    assert GONE.encode() not in pickle.dumps(model)  # what a checkpoint writes
    # What a snapshot file holds.
    assert GONE.encode() in dump_snapshot(before, CatalogCache())[0]
    assert GONE.encode() not in dump_snapshot(after, CatalogCache())[0]


def test_a_tombstone_splits_the_batch_and_applies_exactly_once() -> None:
    model = RecommenderModel(CATALOG)
    result = model.apply(
        [
            _photo(0, GONE, "fractions"),
            ForgetEvent("t1", GONE),
            _photo(1, GONE, "geometry"),  # after the tombstone: a new student with this id
            ForgetEvent("t1", GONE),  # the same tombstone again (a redelivery): a duplicate
        ]
    )
    assert (result.applied, result.duplicates, result.forgotten, result.new_users) == (3, 1, 1, 2)
    assert model.events_applied == 3
    assert set(model.profile(GONE)) == {"geometry"}  # only what came after the tombstone
    assert model.apply([ForgetEvent("t2", "never-seen")]).forgotten == 1  # unknown: a harmless no-op
    assert model.n_users == 1


def test_forget_student_needs_the_admin_scope() -> None:
    method = "/snaplearn.recommender.v1.RecommenderService/ForgetStudent"
    assert SCOPE_BY_METHOD[method] is Scope.ADMIN and scope_for(method) is Scope.ADMIN
    assert not Principal("teacher", scopes=frozenset({"recommend", "feedback"})).allows(scope_for(method))
