"""Catalog changes in the model and on the bus: added / changed / retired events are applied in
order, exactly once, through the checkpoint; retired items are never recommended, sampled or
used as a SimilarItems source; new items are scored from their features at once."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import InvalidInput, NotFound
from snaplearn_common.events import (
    CATALOG_ITEM_RETIRED_TYPE,
    HEADER_EVENT_TYPE,
    EncodedEvent,
    decode_event,
    encode_catalog_change,
)
from snaplearn_common.records import Record
from snaplearn_recommender.catalog import LearningItem, generate_sample_catalog, item_to_proto
from snaplearn_recommender.catalog_sync import change_events
from snaplearn_recommender.model import CatalogChange, ClassifiedEvent, ModelEvent, RecommenderModel
from snaplearn_recommender.snapshot import FeatureFilter

CATALOG = generate_sample_catalog(items_per_topic=6)


def _photos(user: str, concept: str, count: int, start: int = 0) -> list[ClassifiedEvent]:
    return [
        ClassifiedEvent(f"{user}-{i}", user, ((concept, 0.9),), 100.0 + i)
        for i in range(start, start + count)
    ]


def _new_item(item_id: str = "fractions-new", **features: tuple[str, ...]) -> LearningItem:
    return LearningItem(
        item_id,
        "Fractions of a pizza",
        ("fractions",),
        features={"format": ("game",), "topic": ("Food",), **features},
        numbers={},
    )


def _record(event: EncodedEvent, offset: int = 0) -> Record:
    return Record(
        topic="t", partition=0, offset=offset, key=event.key, value=event.value, headers=event.headers
    )


def test_catalog_events_round_trip_through_their_own_types_keyed_by_item() -> None:
    item = _new_item()
    added = events_pb2.CatalogItemAdded(event_id="c-1", item=item_to_proto(item))
    encoded = encode_catalog_change(added)
    assert encoded.key == b"fractions-new"
    decoded = decode_event(_record(encoded))
    change = CatalogChange.from_proto(decoded)
    assert change == CatalogChange("c-1", "added", "fractions-new", item, 0.0)
    retired = encode_catalog_change(events_pb2.CatalogItemRetired(event_id="c-2", item_id="fractions-001"))
    assert dict(retired.headers)[HEADER_EVENT_TYPE] == CATALOG_ITEM_RETIRED_TYPE.encode()
    assert CatalogChange.from_proto(decode_event(_record(retired))) == CatalogChange(
        "c-2", "retired", "fractions-001", None, 0.0
    )
    broken = encode_catalog_change(events_pb2.CatalogItemChanged(event_id="c-3"))
    with pytest.raises(InvalidInput, match="CatalogItemChanged without event_id, item_id or title"):
        decode_event(_record(broken))


def test_added_changed_retired_apply_in_order_once_and_survive_a_checkpoint() -> None:
    model = RecommenderModel(CATALOG)
    model.apply(_photos("fran", "fractions", 5))
    fractions = [CATALOG[p].item_id for p in CATALOG.positions_for_concept("fractions")]
    retired, changed_id = fractions[0], fractions[1]
    changed = LearningItem(
        changed_id, "Fractions, rewritten", ("fractions",), grade=3, format="quiz", difficulty=1
    )
    new = _new_item()
    events: list[ModelEvent] = [
        CatalogChange("c-1", "added", new.item_id, new),
        CatalogChange("c-2", "changed", changed_id, changed),
        CatalogChange("c-3", "retired", retired, None),
        *_photos("fran", "fractions", 5, start=5),
    ]
    result = model.apply(events)
    assert (result.applied, result.catalog_changes) == (8, 3)
    again = model.apply(events)  # redelivered: deduplicated by event id
    assert (again.applied, again.duplicates) == (0, 8)

    restored = pickle.loads(pickle.dumps(model))  # what a checkpoint holds
    for current in (model, restored):
        snapshot = current.snapshot()
        for user in ("fran", "someone-new"):
            ids = [i.item_id for i in snapshot.recommend(user, k=100).items]
            assert retired not in ids and new.item_id in ids and len(ids) == snapshot.catalog.n_active
        assert retired not in current.skipped("fran")
        assert snapshot.catalog.get(changed_id) == changed
        assert snapshot.catalog.row(changed_id) == CATALOG.position(changed_id)  # it keeps its row
        with pytest.raises(NotFound, match="retired from this model's catalog"):
            snapshot.similar_items(retired)
        similar = snapshot.similar_items(new.item_id, k=100)
        assert retired not in [i.item_id for i in similar.items]
        food = snapshot.recommend("fran", features=(FeatureFilter("topic", ("Food",)),))
        assert [i.item_id for i in food.items] == [new.item_id]  # cold start: recommendable at once
        assert not current.has_item(retired)

    # A retired item is never sampled as a positive again.
    position = model.catalog.row(retired)
    seen_before = set(model._seen_sets[model.snapshot().user_index["fran"]])
    model.apply(_photos("fran", "fractions", 30, start=10))
    seen_after = model._seen_sets[model.snapshot().user_index["fran"]]
    assert position not in seen_after - seen_before

    # Adding it back brings it back in its old row.
    model.apply([CatalogChange("c-4", "added", retired, CATALOG.get(retired))])
    assert model.catalog.position(retired) == position
    assert retired in [i.item_id for i in model.snapshot().recommend("fran", k=100).items]


def test_a_new_items_score_comes_from_its_features() -> None:
    model = RecommenderModel(CATALOG)
    model.apply(_photos("geo", "geometry", 20))
    new_geometry = LearningItem(
        "geometry-new", "Tiling patterns", ("geometry",), grade=4, format="video", difficulty=2
    )
    new_other = LearningItem(
        "exponents-new", "Powers of two", ("exponents",), grade=8, format="quiz", difficulty=5
    )
    model.apply(
        [
            CatalogChange("c-1", "added", new_geometry.item_id, new_geometry),
            CatalogChange("c-2", "added", new_other.item_id, new_other),
        ]
    )
    ids = [i.item_id for i in model.snapshot().recommend("geo", k=100).items]
    assert ids.index("geometry-new") < ids.index("exponents-new")


def test_sync_catalog_and_change_events_publish_only_the_differences() -> None:
    model = RecommenderModel(CATALOG)
    wanted = CATALOG.with_item(_new_item()).with_retired(["geometry-001"])
    changes = model.sync_catalog(wanted)
    assert [i.item_id for i in changes.added] == ["fractions-new"] and changes.retired == ("geometry-001",)
    assert not model.sync_catalog(wanted)
    events = change_events(changes, now_s=5.0)
    kinds = [dict(e.headers)[HEADER_EVENT_TYPE].decode().rsplit(".", 1)[1] for e in events]
    assert kinds == ["CatalogItemAdded", "CatalogItemRetired"]
    assert len({dict(e.headers)["event-id"] for e in events}) == 2


def test_the_incremental_item_matrix_equals_a_full_rebuild() -> None:
    model = RecommenderModel(CATALOG)
    changed = LearningItem(
        "geometry-002", "Geometry, new", ("geometry", "fractions"), features={"topic": ("Shapes",)}
    )
    model.apply(
        [
            CatalogChange("c-1", "added", "fractions-new", _new_item()),
            CatalogChange("c-2", "changed", changed.item_id, changed),
            CatalogChange("c-3", "retired", "geometry-003", None),
        ]
    )
    model.add_items([_new_item("decimals-new")])
    incremental, membership = model._item_features.copy(), model._concept_membership.copy()
    del model._item_features
    model._rebuild_item_arrays()  # from scratch
    assert (incremental != model._item_features).nnz == 0
    np.testing.assert_array_equal(membership, model._concept_membership)
    row = model.catalog.row("geometry-002")
    names = {model._item_vocab.names[c] for c in incremental[row].indices}
    assert names == {"item:geometry-002", "concept:geometry", "concept:fractions", "topic:Shapes"}
