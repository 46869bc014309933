"""An immutable, precomputed view of the model that answers Recommend.

The worker builds one after every micro-batch and swaps it in with a single reference
assignment, so readers never block on training and never see a half-updated model.
Everything here is read-only: numpy arrays have writeable=False and mappings are proxies.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from snaplearn_common.errors import InvalidInput
from snaplearn_recommender.catalog import FORMATS, MAX_GRADE, MIN_GRADE, Catalog

DEFAULT_K = 10
MAX_K = 100
# A concept counts as one of the user's interests when it has at least this share of the profile.
INTEREST_MIN_SHARE = 0.15
INTEREST_TOP_N = 3

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    item_id: str
    score: float
    title: str
    concepts: tuple[str, ...]
    grade: int
    format: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecommendResult:
    user_id: str
    items: tuple[RecommendedItem, ...]
    model_version: str
    cold_start: bool
    events_applied: int


ArrayT = TypeVar("ArrayT", bound=npt.NDArray[Any])


def read_only(array: ArrayT) -> ArrayT:
    """Mark an array (that nobody else writes) read-only and return it."""
    array.flags.writeable = False
    return array


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Item/user representations and metadata, frozen at one point of the event stream.

    Row i of every item array is catalog[i]; row j of every user array is the user with
    user_index[...] == j; profile columns and concept_membership columns are `concepts`.
    """

    version: str
    events_applied: int
    catalog: Catalog
    concepts: tuple[str, ...]
    item_vectors: FloatArray  # (n_items, d)
    item_biases: FloatArray  # (n_items,)
    item_grades: IntArray  # (n_items,)
    item_format_codes: IntArray  # (n_items,) index into FORMATS
    concept_membership: BoolArray  # (n_items, n_concepts)
    popularity: FloatArray  # (n_items,) score-weighted interaction counts
    user_index: Mapping[str, int]
    user_vectors: FloatArray  # (n_users, d)
    user_profiles: FloatArray  # (n_users, n_concepts), rows sum to 1 (or 0)
    seen_items: Mapping[int, IntArray]  # user row -> sorted item positions
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in (
            "item_vectors",
            "item_biases",
            "item_grades",
            "item_format_codes",
            "concept_membership",
            "popularity",
            "user_vectors",
            "user_profiles",
        ):
            read_only(getattr(self, name))
        if not isinstance(self.user_index, MappingProxyType):
            object.__setattr__(self, "user_index", MappingProxyType(dict(self.user_index)))
        if not isinstance(self.seen_items, MappingProxyType):
            object.__setattr__(self, "seen_items", MappingProxyType(dict(self.seen_items)))

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    @property
    def n_users(self) -> int:
        return len(self.user_index)

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created_at

    def recommend(
        self,
        user_id: str,
        k: int = 0,
        exclude_seen: bool = False,
        grades: Collection[int] = (),
        formats: Collection[str] = (),
        concepts: Collection[str] = (),
    ) -> RecommendResult:
        if not user_id or not user_id.strip():
            raise InvalidInput("user_id is required")
        if k < 0 or k > MAX_K:
            raise InvalidInput(f"k must be between 1 and {MAX_K} (0 means {DEFAULT_K}), got {k}")
        k = k or DEFAULT_K
        allowed = self._filter_mask(grades, formats, concepts)

        user_row = self.user_index.get(user_id)
        cold_start = user_row is None
        if user_row is None:
            # Popularity first; the learned item bias only breaks ties (e.g. before any event).
            scores = np.log1p(self.popularity) + 1e-3 * self.item_biases
        else:
            scores = self.item_vectors @ self.user_vectors[user_row] + self.item_biases
            if exclude_seen:
                seen = self.seen_items.get(user_row)
                if seen is not None and len(seen):
                    allowed[seen] = False
        masked = np.where(allowed, scores, -np.inf).astype(np.float32)
        top = _top_k(masked, min(k, int(np.count_nonzero(allowed))))
        interests = () if user_row is None else self._interests(user_row)
        items = tuple(self._item(int(position), float(masked[position]), interests) for position in top)
        return RecommendResult(
            user_id=user_id,
            items=items,
            model_version=self.version,
            cold_start=cold_start,
            events_applied=self.events_applied,
        )

    def top_concepts(self, user_id: str) -> tuple[str, ...]:
        """The user's current interests (largest profile shares first); () for unknown users."""
        user_row = self.user_index.get(user_id)
        return () if user_row is None else self._interests(user_row)

    def _filter_mask(
        self, grades: Collection[int], formats: Collection[str], concepts: Collection[str]
    ) -> BoolArray:
        allowed = np.ones(self.n_items, dtype=bool)
        if grades:
            bad = sorted(g for g in grades if not MIN_GRADE <= g <= MAX_GRADE)
            if bad:
                raise InvalidInput(f"grades must be {MIN_GRADE}..{MAX_GRADE}; got {bad}")
            allowed &= np.isin(self.item_grades, np.fromiter(grades, dtype=np.int64))
        if formats:
            known = self.catalog.formats
            unknown = sorted(f for f in formats if f not in known)
            if unknown:
                raise InvalidInput(f"unknown format(s) {unknown}; this catalog has {', '.join(known)}")
            codes = np.array([FORMATS.index(f) for f in formats], dtype=np.int64)
            allowed &= np.isin(self.item_format_codes, codes)
        if concepts:
            column = {name: i for i, name in enumerate(self.concepts)}
            unknown = sorted(c for c in concepts if not self.catalog.positions_for_concept(c))
            if unknown:
                raise InvalidInput(
                    f"unknown concept(s) {unknown}; this catalog teaches {', '.join(self.catalog.concepts)}"
                )
            columns = [column[c] for c in concepts]
            allowed &= self.concept_membership[:, columns].any(axis=1)
        return allowed

    def _interests(self, user_row: int) -> tuple[str, ...]:
        profile = self.user_profiles[user_row]
        order = np.argsort(-profile, kind="stable")[:INTEREST_TOP_N]
        return tuple(self.concepts[i] for i in order if profile[i] >= INTEREST_MIN_SHARE)

    def _item(self, position: int, score: float, interests: tuple[str, ...]) -> RecommendedItem:
        item = self.catalog[position]
        return RecommendedItem(
            item_id=item.item_id,
            score=score,
            title=item.title,
            concepts=item.concepts,
            grade=item.grade,
            format=item.format,
            reason=_reason(item.concepts, interests),
        )


def _reason(item_concepts: tuple[str, ...], interests: tuple[str, ...]) -> str:
    if not interests:
        return "popular with students"
    for concept in interests:  # the user's strongest interest that this item practises
        if concept in item_concepts:
            return f"practises {concept.replace('_', ' ')}, which you photographed recently"
    return "popular with students who practise " + " and ".join(c.replace("_", " ") for c in interests[:2])


def _top_k(scores: FloatArray, k: int) -> IntArray:
    """Positions of the k highest scores, best first; ties broken by position (deterministic)."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    candidates = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order].astype(np.int64)
