"""Snapshot.recommend / similar_items against brute-force references on random small catalogs.

The catalogs are large enough (5,000 items) that the sampled top-k and the selective-filter
paths run, and random vectors make ties impossible, so the expected order is unique.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import numpy as np
import pytest

from snaplearn_common.errors import InvalidInput, NotFound
from snaplearn_recommender.catalog import FORMATS, Catalog, LearningItem
from snaplearn_recommender.snapshot import MAX_K, FeatureFilter, Snapshot

CONCEPTS = ("fractions", "geometry", "algebra", "decimals")
N_ITEMS = 5_000
DIM = 8


def _snapshot(seed: int = 0, n_items: int = N_ITEMS) -> Snapshot:
    rng = np.random.default_rng(seed)
    grades = rng.integers(1, 9, n_items)
    formats = rng.integers(len(FORMATS), size=n_items)
    items = []
    membership = np.zeros((n_items, len(CONCEPTS)), dtype=bool)
    for i in range(n_items):
        columns = sorted({int(rng.integers(len(CONCEPTS))), int(rng.integers(len(CONCEPTS)))})
        membership[i, columns] = True
        items.append(
            LearningItem(
                item_id=f"item-{i}",
                title=f"Item {i}",
                concepts=tuple(CONCEPTS[c] for c in columns),
                grade=int(grades[i]),
                format=FORMATS[int(formats[i])],
                difficulty=1,
            )
        )
    n_users = 20
    seen = {
        row: np.sort(rng.choice(n_items, size=min(50, n_items // 2), replace=False)).astype(np.int64)
        for row in range(n_users)
    }
    profiles = rng.random((n_users, len(CONCEPTS))).astype(np.float32)
    return Snapshot(
        version="test.1",
        events_applied=123,
        catalog=Catalog(items),
        concepts=CONCEPTS,
        item_vectors=rng.normal(size=(n_items, DIM)).astype(np.float32),
        item_biases=rng.normal(size=n_items).astype(np.float32),
        concept_membership=membership,
        popularity=rng.integers(0, 50, n_items).astype(np.float32) + rng.random(n_items).astype(np.float32),
        user_index={f"user-{row}": row for row in range(n_users)},
        user_vectors=rng.normal(size=(n_users, DIM)).astype(np.float32),
        user_profiles=profiles / profiles.sum(axis=1, keepdims=True),
        seen_items=seen,
    )


def _allowed(
    snapshot: Snapshot, grades: Collection[int], formats: Collection[str], concepts: Collection[str]
):
    """The filter semantics, one item at a time (the reference the vectorised code must match)."""
    keep = []
    for item in snapshot.catalog:
        keep.append(
            (not grades or item.grade in grades)
            and (not formats or item.format in formats)
            and (not concepts or any(c in item.concepts for c in concepts))
        )
    return np.array(keep)


def _reference_top(scores: np.ndarray, keep: np.ndarray, k: int) -> list[int]:
    order = sorted((p for p in range(len(scores)) if keep[p]), key=lambda p: (-scores[p], p))
    return order[:k]


FILTERS: list[dict[str, Any]] = [
    {},
    {"grades": (5,)},
    {"grades": (3, 4, 5, 6)},
    {"formats": ("video", "quiz")},
    {"grades": (2,), "formats": ("game",), "concepts": ("algebra",)},
    {"concepts": ("fractions", "decimals")},
    {"grades": (1, 8), "formats": ("video", "worksheet", "quiz", "game", "lesson")},
]


@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("exclude_seen", [False, True])
def test_recommend_matches_brute_force(filters: dict, exclude_seen: bool) -> None:
    snapshot = _snapshot()
    for user_row in (0, 7):
        user = f"user-{user_row}"
        scores = (
            snapshot.item_vectors.astype(np.float64) @ snapshot.user_vectors[user_row] + snapshot.item_biases
        )
        keep = _allowed(snapshot, **{"grades": (), "formats": (), "concepts": (), **filters})
        if exclude_seen:
            keep[snapshot.seen_items[user_row]] = False
        for k in (1, 20, MAX_K):
            result = snapshot.recommend(user, k, exclude_seen, **filters)
            expected = _reference_top(scores, keep, k)
            assert [item.item_id for item in result.items] == [f"item-{p}" for p in expected]
            np.testing.assert_allclose(
                [item.score for item in result.items], scores[expected], rtol=1e-4, atol=1e-4
            )
            assert not result.cold_start and result.model_version == "test.1"


def test_exclude_seen_leaves_out_exactly_the_seen_items() -> None:
    snapshot = _snapshot()
    seen = {f"item-{p}" for p in snapshot.seen_items[3]}
    every = snapshot.recommend("user-3", MAX_K)
    unseen = snapshot.recommend("user-3", MAX_K, exclude_seen=True)
    assert seen & {item.item_id for item in every.items}, (
        "the test needs a user whose top items include seen ones"
    )
    assert not seen & {item.item_id for item in unseen.items}


@pytest.mark.parametrize("filters", FILTERS[:3])
def test_cold_start_ranks_by_popularity_then_bias(filters: dict) -> None:
    snapshot = _snapshot()
    scores = np.log1p(snapshot.popularity.astype(np.float64)) + 1e-3 * snapshot.item_biases
    keep = _allowed(snapshot, **{"grades": (), "formats": (), "concepts": (), **filters})
    result = snapshot.recommend("somebody-new", 20, exclude_seen=True, **filters)
    assert result.cold_start
    assert [item.item_id for item in result.items] == [f"item-{p}" for p in _reference_top(scores, keep, 20)]


def test_ties_are_broken_by_catalog_position() -> None:
    snapshot = _snapshot()
    tied = dataclasses.replace(
        snapshot,
        item_vectors=np.zeros_like(snapshot.item_vectors),
        item_biases=np.zeros_like(snapshot.item_biases),
        popularity=np.zeros_like(snapshot.popularity),
    )
    assert [item.item_id for item in tied.recommend("user-1", 5).items] == [f"item-{p}" for p in range(5)]
    assert [item.item_id for item in tied.recommend("new", 5, grades=(4,)).items] == [
        f"item-{p}" for p in _reference_top(np.zeros(N_ITEMS), _allowed(tied, (4,), (), ()), 5)
    ]


def test_filters_that_keep_fewer_than_k_items_return_all_of_them() -> None:
    snapshot = _snapshot(n_items=300)
    keep = _allowed(snapshot, (2,), ("game",), ("algebra",))
    result = snapshot.recommend("user-0", MAX_K, grades=(2,), formats=("game",), concepts=("algebra",))
    assert 0 < len(result.items) == int(keep.sum()) < MAX_K


@pytest.mark.parametrize("filters", FILTERS[:5])
def test_similar_items_matches_brute_force_cosine(filters: dict) -> None:
    snapshot = _snapshot()
    vectors = snapshot.item_vectors.astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for position in (0, 1234):
        cosine = unit @ unit[position]
        keep = _allowed(snapshot, **{"grades": (), "formats": (), "concepts": (), **filters})
        keep[position] = False
        result = snapshot.similar_items(f"item-{position}", 20, **filters)
        expected = _reference_top(cosine, keep, 20)
        assert result.item_id == f"item-{position}" and result.model_version == "test.1"
        assert [item.item_id for item in result.items] == [f"item-{p}" for p in expected]
        np.testing.assert_allclose([item.score for item in result.items], cosine[expected], atol=1e-5)
        assert all(item.reason for item in result.items)


def test_similar_items_never_returns_the_item_itself() -> None:
    snapshot = _snapshot(n_items=30)
    result = snapshot.similar_items("item-4", MAX_K)
    assert len(result.items) == 29 and "item-4" not in {item.item_id for item in result.items}


def test_unknown_item_is_not_found_with_a_clear_message() -> None:
    with pytest.raises(NotFound, match="unknown item_id 'nope'"):
        _snapshot(n_items=30).similar_items("nope", 5)


@pytest.mark.parametrize("k", [-1, MAX_K + 1])
def test_k_out_of_range_is_invalid_for_both_apis(k: int) -> None:
    snapshot = _snapshot(n_items=30)
    with pytest.raises(InvalidInput, match="k must be between 1 and"):
        snapshot.recommend("user-0", k)
    with pytest.raises(InvalidInput, match="k must be between 1 and"):
        snapshot.similar_items("item-0", k)


def test_bad_filters_are_invalid_input() -> None:
    snapshot = _snapshot(n_items=30)
    assert snapshot.similar_items("item-0", 5, grades=(0,)).items == ()  # a grade no item has
    with pytest.raises(InvalidInput, match="unknown feature 'topic'; this catalog's features are difficulty"):
        snapshot.recommend("user-0", 5, features=(FeatureFilter("topic", ("x",)),))
    with pytest.raises(InvalidInput, match="feature 'format' is not numeric"):
        snapshot.recommend("user-0", 5, features=(FeatureFilter("format", minimum=1),))
    with pytest.raises(InvalidInput, match="'four' is not a number"):
        snapshot.recommend("user-0", 5, features=(FeatureFilter("grade", ("four",)),))
    with pytest.raises(InvalidInput, match="unknown format value"):
        snapshot.recommend("user-0", 5, formats=("podcast",))
    with pytest.raises(InvalidInput, match="unknown concept"):
        snapshot.recommend("user-0", 5, concepts=("topology",))


def test_snapshot_and_its_derived_arrays_are_read_only_and_unchanged_by_requests() -> None:
    snapshot = _snapshot()
    arrays = {
        name: getattr(snapshot, name).copy()
        for name in ("scoring_columns", "cold_start_scores", "unit_item_columns", "item_vectors")
    }
    masks = [
        *(p for by_value in snapshot.catalog.feature_index.values() for p in by_value.values()),
        *snapshot.catalog.numeric_columns.values(),
        *snapshot.concept_masks.values(),
    ]
    mask_copies = [mask.copy() for mask in masks]
    for filters in FILTERS:
        snapshot.recommend("user-2", 20, True, **filters)
        snapshot.recommend("new", 20, True, **filters)
        snapshot.similar_items("item-9", 20, **filters)
    for name, before in arrays.items():
        assert not getattr(snapshot, name).flags.writeable
        np.testing.assert_array_equal(getattr(snapshot, name), before)
    for mask, before in zip(masks, mask_copies, strict=True):
        assert not mask.flags.writeable
        np.testing.assert_array_equal(mask, before)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.version = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.concept_masks["x"] = masks[0]  # type: ignore[index]
