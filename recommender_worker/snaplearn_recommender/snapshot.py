"""An immutable, precomputed view of the model that answers Recommend and SimilarItems.

The worker builds one after every micro-batch and swaps it in with a single reference
assignment, so readers never block on training and never see a half-updated model.
Everything here is read-only: numpy arrays have writeable=False and mappings are proxies.

Serving cost is dominated by one pass over the item matrix, so each snapshot precomputes, once,
what every request would otherwise rebuild: the item matrix with the bias folded in as a last
column (score = one float32 matvec), the cold-start scores, one boolean mask per concept, and
unit-norm item embeddings for SimilarItems. Feature filters use the catalog's own index (positions
per feature value, numeric columns), built once per catalog, not per snapshot. Filters are ORs
within one filter and ANDs across filters; retired items are never allowed. When the filters leave
few items, only those rows are scored.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from snaplearn_common.errors import InvalidInput, NotFound
from snaplearn_recommender.catalog import FORMATS, Catalog, LearningItem, format_number
from snaplearn_recommender.mastery import MasteryModel, PractiseWeights, Suggestion, practise_next

DEFAULT_K = 10
MAX_K = 100
# A concept counts as one of the user's interests when it has at least this share of the profile.
INTEREST_MIN_SHARE = 0.15
INTEREST_TOP_N = 3
# Filters keeping at most this share of the catalog score only the kept rows (a gather of a few
# rows is cheaper than a full matvec); above it, scoring everything and masking is cheaper.
SELECTIVE_SHARE = 0.25
# _top_k on at least this many scores first narrows them with a threshold from every 64th score.
SAMPLED_TOP_K_MIN = 4096
TOP_K_SAMPLE_STRIDE = 64

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# How many known values a refusal lists.
SHOWN_VALUES = 20


@dataclass(frozen=True, slots=True)
class FeatureFilter:
    """Keep items whose feature `name` has one of `values` (when given) and, for a numeric feature,
    lies in [minimum, maximum] (each bound when given)."""

    name: str
    values: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One answered exercise, as the model learned it (predicted: P(correct) just before)."""

    item_id: str
    correct: bool
    score: float | None
    time_s: float
    predicted: float


@dataclass(frozen=True, slots=True)
class ConceptMastery:
    concept: str
    mastery: float
    mastered: bool
    correct: int
    incorrect: int


@dataclass(frozen=True, slots=True)
class StudentStateResult:
    user_id: str
    concepts: tuple[ConceptMastery, ...]  # weakest first
    attempts: tuple[Attempt, ...]  # oldest first
    recommended: RecommendResult


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    item_id: str
    score: float
    title: str
    concepts: tuple[str, ...]
    grade: int | None
    format: str | None
    reason: str
    # Declared features: name -> values (a numeric feature: its value, formatted), and prerequisites.
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    prerequisites: tuple[str, ...] = ()
    numbers: Mapping[str, float] = field(default_factory=dict)  # numeric features' values


@dataclass(frozen=True, slots=True)
class RecommendResult:
    user_id: str
    items: tuple[RecommendedItem, ...]
    model_version: str
    cold_start: bool
    events_applied: int


@dataclass(frozen=True, slots=True)
class SimilarItemsResult:
    item_id: str
    items: tuple[RecommendedItem, ...]
    model_version: str


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
    The fields after `created_at` are derived in __post_init__ (not constructor arguments).
    """

    version: str
    events_applied: int
    catalog: Catalog
    concepts: tuple[str, ...]
    item_vectors: FloatArray  # (n_items, d)
    item_biases: FloatArray  # (n_items,)
    concept_membership: BoolArray  # (n_items, n_concepts)
    popularity: FloatArray  # (n_items,) score-weighted interaction counts
    user_index: Mapping[str, int]
    user_vectors: FloatArray  # (n_users, d)
    user_profiles: FloatArray  # (n_users, n_concepts), rows sum to 1 (or 0)
    seen_items: Mapping[int, IntArray]  # user row -> sorted item positions
    # user row -> sorted item positions skipped recently (RecordFeedback): never recommended.
    skipped_items: Mapping[int, IntArray] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    # The sample catalog's grade and format as arrays (-1: none; format: index into FORMATS),
    # derived from the catalog when not given (empty); kept for older snapshot files and callers
    # (filters use the catalog's feature index).
    item_grades: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    item_format_codes: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # Knowledge tracing (students with attempts only): the model with each student's state as
    # of this snapshot, their latest attempts, and how "practise next" uses them.
    mastery: MasteryModel | None = None
    recent_attempts: Mapping[str, tuple[Attempt, ...]] = field(default_factory=dict)
    practise_band: tuple[float, float] = (0.55, 0.85)
    mastery_threshold: float = 0.6
    practise_weights: PractiseWeights = field(default_factory=PractiseWeights)
    # Derived per snapshot (see the module docstring).
    # Item-major (d, n_items) layouts: the matvec then streams each row once, where an
    # (n_items, d) @ v product strides across rows.
    scoring_columns: FloatArray = field(init=False, repr=False)  # (d + 1, n_items): [vectors | bias].T
    cold_start_scores: FloatArray = field(init=False, repr=False)  # (n_items,)
    unit_item_columns: FloatArray = field(init=False, repr=False)  # (d, n_items), columns of norm 1 (or 0)
    concept_masks: Mapping[str, BoolArray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.item_grades) != self.n_items:
            grades = self.catalog.numeric_columns.get("grade")
            legacy = np.full(self.n_items, -1, dtype=np.int64)
            if grades is not None:
                legacy[~np.isnan(grades)] = grades[~np.isnan(grades)].astype(np.int64)
            object.__setattr__(self, "item_grades", legacy)
        if len(self.item_format_codes) != self.n_items:
            codes = np.full(self.n_items, -1, dtype=np.int64)
            for value, positions in self.catalog.feature_index.get("format", {}).items():
                if value in FORMATS:
                    codes[positions] = FORMATS.index(value)
            object.__setattr__(self, "item_format_codes", codes)
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
        if not isinstance(self.skipped_items, MappingProxyType):
            object.__setattr__(self, "skipped_items", MappingProxyType(dict(self.skipped_items)))
        if not isinstance(self.recent_attempts, MappingProxyType):
            object.__setattr__(self, "recent_attempts", MappingProxyType(dict(self.recent_attempts)))
        derived = _derived_arrays(self)
        for name, value in derived.items():
            object.__setattr__(self, name, value)

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
        features: Sequence[FeatureFilter] = (),
    ) -> RecommendResult:
        if not user_id or not user_id.strip():
            raise InvalidInput("user_id is required")
        k = _validated_k(k)
        allowed = self._filter_mask(grades, formats, concepts, features)
        user_row = self.user_index.get(user_id)
        excluded: IntArray | None = None
        if user_row is not None and exclude_seen:
            excluded = self.seen_items.get(user_row)
        if user_row is not None and user_row in self.skipped_items:
            excluded = _excluded_with_skips(excluded, self.skipped_items[user_row])
        learner = self.mastery is not None and user_id in self.mastery.students
        if user_row is None:
            # Popularity first; the learned item bias only breaks ties (e.g. before any event).
            positions, scores = self._best(None, k, allowed, excluded)
        else:
            query = np.append(self.user_vectors[user_row], np.float32(1.0))  # x bias column
            # A student with attempts: mastery reorders the ranking's best k + extra.
            extra = self.practise_weights.extra if learner else 0
            positions, scores = self._best(query, k + extra, allowed, excluded)
        if learner:
            items = self._practise_next(user_id, positions, scores, k)
        else:
            interests = () if user_row is None else self._interests(user_row)
            items = tuple(
                self._item(int(p), float(s), _reason(self.catalog[int(p)].concepts, interests))
                for p, s in zip(positions, scores, strict=True)
            )
        return RecommendResult(
            user_id=user_id,
            items=items,
            model_version=self.version,
            cold_start=user_row is None,
            events_applied=self.events_applied,
        )

    def similar_items(
        self,
        item_id: str,
        k: int = 0,
        grades: Collection[int] = (),
        formats: Collection[str] = (),
        concepts: Collection[str] = (),
        features: Sequence[FeatureFilter] = (),
    ) -> SimilarItemsResult:
        """Items whose embeddings are closest (cosine) to `item_id`'s, best first, without itself."""
        if not item_id or not item_id.strip():
            raise InvalidInput("item_id is required")
        position = self.catalog.position(item_id)
        if position is None:
            what = "retired from" if self.catalog.is_retired(item_id) else "not in"
            raise NotFound(
                f"unknown item_id {item_id!r}: {what} this model's catalog ({self.catalog.n_active} items)"
            )
        k = _validated_k(k)
        allowed = self._filter_mask(grades, formats, concepts, features)
        itself = np.array([position], dtype=np.int64)
        query = self.unit_item_columns[:, position].copy()
        positions, scores = self._best(query, k, allowed, itself, cosine=True)
        source = self.catalog[position]
        return SimilarItemsResult(
            item_id=item_id,
            items=tuple(
                self._item(int(p), float(s), _similar_reason(source, self.catalog[int(p)]))
                for p, s in zip(positions, scores, strict=True)
            ),
            model_version=self.version,
        )

    def top_concepts(self, user_id: str) -> tuple[str, ...]:
        """The user's current interests (largest profile shares first); () for unknown users."""
        user_row = self.user_index.get(user_id)
        return () if user_row is None else self._interests(user_row)

    def _best(
        self,
        query: FloatArray | None,
        k: int,
        allowed: BoolArray | None,
        excluded: IntArray | None,
        cosine: bool = False,
    ) -> tuple[IntArray, FloatArray]:
        """(positions, scores) of the k best allowed, non-excluded items; query None = cold start.

        `allowed` is a fresh array this call may write (from _filter_mask) or None (everything).
        """
        by_column = self.unit_item_columns if cosine else self.scoring_columns
        if allowed is None and self.catalog.n_active < self.n_items:
            allowed = self.catalog.active_mask.copy()  # retired items are never recommended
        if allowed is not None:
            if excluded is not None and len(excluded):
                allowed[excluded] = False
            kept = int(np.count_nonzero(allowed))
            if kept <= SELECTIVE_SHARE * self.n_items:
                candidates = np.flatnonzero(allowed)
                if query is None:
                    scores = self.cold_start_scores[candidates]
                else:
                    scores = query @ np.take(by_column, candidates, axis=1)
                top = _top_k(scores, min(k, kept))
                return candidates[top], scores[top]
        else:
            kept = self.n_items - (0 if excluded is None else len(excluded))
        scores = self.cold_start_scores if query is None else query @ by_column
        if allowed is not None or (excluded is not None and len(excluded)):
            scores = scores.copy() if query is None else scores  # a matvec result is already ours
            if allowed is not None:
                scores[~allowed] = -np.inf
            else:
                scores[excluded] = -np.inf
        top = _top_k(scores, min(k, kept))
        return top, scores[top]

    def _filter_mask(
        self,
        grades: Collection[int],
        formats: Collection[str],
        concepts: Collection[str],
        features: Sequence[FeatureFilter] = (),
    ) -> BoolArray | None:
        """A fresh boolean array of the (active) items the filters keep, or None when there are none.

        grades and formats are the sample catalog's features of those names, kept as fields of
        their own for older clients; any declared feature is filtered through `features`.
        """
        wanted = list(features)
        if grades:
            wanted.append(FeatureFilter("grade", tuple(str(int(g)) for g in grades)))
        if formats:
            wanted.append(FeatureFilter("format", tuple(formats)))
        masks = [self._feature_mask(spec) for spec in wanted]
        if concepts:
            unknown = sorted(c for c in concepts if c not in self.concept_masks)
            if unknown:
                raise InvalidInput(
                    f"unknown concept(s) {unknown}; this catalog teaches {', '.join(self.catalog.concepts)}"
                )
            masks.append(self._union(self.concept_masks, concepts))
        if not masks:
            return None
        allowed = masks[0] if masks[0].flags.writeable else masks[0].copy()
        for mask in masks[1:]:
            allowed &= mask
        if self.catalog.n_active < self.n_items:
            allowed &= self.catalog.active_mask
        return allowed

    def _feature_mask(self, spec: FeatureFilter) -> BoolArray:
        """The items one feature filter keeps (a fresh array); InvalidInput names what is wrong."""
        index = self.catalog.feature_index
        name = spec.name.strip()
        if name not in index:
            known = ", ".join(self.catalog.feature_names) or "none"
            raise InvalidInput(f"unknown feature {name!r}; this catalog's features are {known}")
        column = self.catalog.numeric_columns.get(name)
        ranged = spec.minimum is not None or spec.maximum is not None
        if ranged and column is None:
            raise InvalidInput(f"feature {name!r} is not numeric: filter it by values, not a range")
        mask = np.ones(self.n_items, dtype=bool)
        if spec.values:
            if column is not None:
                numbers = []
                for value in spec.values:
                    try:
                        numbers.append(float(value))
                    except ValueError:
                        raise InvalidInput(
                            f"feature {name!r} is numeric; {value!r} is not a number"
                        ) from None
                mask = np.isin(column, np.array(numbers))
            else:
                unknown = sorted(v for v in dict.fromkeys(spec.values) if v not in index[name])
                if unknown:
                    known = ", ".join(list(index[name])[:SHOWN_VALUES])
                    raise InvalidInput(f"unknown {name} value(s) {unknown}; this catalog has {known}")
                mask = np.zeros(self.n_items, dtype=bool)
                for value in spec.values:
                    mask[index[name][value]] = True
        if ranged:
            assert column is not None
            low = -np.inf if spec.minimum is None else spec.minimum
            high = np.inf if spec.maximum is None else spec.maximum
            if np.isnan(low) or np.isnan(high):  # NaN compares false both ways: it would match nothing
                raise InvalidInput(f"feature {name!r}: min/max must be numbers, not NaN")
            if low > high:
                raise InvalidInput(f"feature {name!r}: min {low} is above max {high}")
            with np.errstate(invalid="ignore"):
                mask &= (column >= low) & (column <= high)
        return mask

    def _union(self, masks: Mapping[Any, BoolArray], keys: Collection[Any]) -> BoolArray:
        """OR of a few precomputed masks (a loop over filter values, never over items)."""
        distinct = list(dict.fromkeys(keys))
        if len(distinct) == 1:
            return masks.get(distinct[0], self._no_items())  # read-only; _filter_mask copies it
        union = np.zeros(self.n_items, dtype=bool)
        for key in distinct:
            if key in masks:
                union |= masks[key]
        return union

    def student_state(self, user_id: str, k: int = 0) -> StudentStateResult:
        """Mastery per attempted concept, latest attempts, and Recommend's answer (one snapshot).
        NotFound for a student this snapshot has no events of."""
        recommended = self.recommend(user_id, k)  # validates user_id and k
        if recommended.cold_start:
            raise NotFound(f"no events of student {user_id!r} in this model")
        model = self.mastery
        state = None if model is None else model.students.get(user_id)
        concepts = (
            ()
            if model is None or state is None
            else tuple(
                sorted(
                    (
                        ConceptMastery(name, level, level >= self.mastery_threshold, c.correct, c.wrong)
                        for name, c in state.concepts.items()
                        for level in (model.mastery(user_id, name),)
                    ),
                    key=lambda m: (m.mastery, m.concept),
                )
            )
        )
        return StudentStateResult(user_id, concepts, self.recent_attempts.get(user_id, ()), recommended)

    def concept_of(self, item_id: str) -> str:
        """The concept an item's attempts train (its first; the item itself when it has none)."""
        item = self.catalog.get(item_id)
        return item.concepts[0] if item is not None and item.concepts else item_id

    def practise(
        self, user_id: str, ranked: Sequence[str], scores: Sequence[float] | None = None
    ) -> list[Suggestion]:
        """mastery.practise_next over `ranked` for a student (the settings this snapshot carries)."""
        model = self.mastery
        assert model is not None

        def prerequisites(item_id: str) -> tuple[str, ...]:
            item = self.catalog.get(item_id)
            return () if item is None else item.prerequisites

        def title(item_id: str) -> str:
            item = self.catalog.get(item_id)
            return item_id if item is None else item.title

        tried = model.students[user_id].concepts if user_id in model.students else {}

        def mastery(item_id: str) -> float:
            # A concept never attempted is not mastered, whatever the student's level elsewhere:
            # "you have mastered X" must rest on answers about X.
            concept = self.concept_of(item_id)
            return model.mastery(user_id, concept) if concept in tried else 0.0

        attempts = self.recent_attempts.get(user_id, ())
        latest = self.concept_of(attempts[-1].item_id) if attempts else None

        def next_step(item_id: str) -> float:
            # The catalog's declared prerequisites are the direct ones: an item that builds on
            # the concept just practised is the next step.
            return float(any(self.concept_of(p) == latest for p in prerequisites(item_id)))

        return practise_next(
            ranked,
            success=lambda i: model.predict(user_id, i),
            mastery=mastery,
            prerequisites=prerequisites,
            band=self.practise_band,
            mastered=self.mastery_threshold,
            title=title,
            scores=scores,
            weights=self.practise_weights,
            next_step=next_step,
        )

    def _practise_next(
        self, user_id: str, positions: IntArray, scores: FloatArray, k: int
    ) -> tuple[RecommendedItem, ...]:
        ranked = {
            self.catalog[int(p)].item_id: (int(p), float(s)) for p, s in zip(positions, scores, strict=True)
        }
        return tuple(
            self._item(*ranked[suggestion.item], suggestion.reason)
            for suggestion in self.practise(user_id, list(ranked), [s for _, s in ranked.values()])[:k]
        )

    def _no_items(self) -> BoolArray:
        return read_only(np.zeros(self.n_items, dtype=bool))

    def _interests(self, user_row: int) -> tuple[str, ...]:
        profile = self.user_profiles[user_row]
        order = np.argsort(-profile, kind="stable")[:INTEREST_TOP_N]
        return tuple(self.concepts[i] for i in order if profile[i] >= INTEREST_MIN_SHARE)

    def _item(self, position: int, score: float, reason: str) -> RecommendedItem:
        item = self.catalog[position]
        features = {
            name: (format_number(item.numbers[name]),) if name in item.numbers else tokens
            for name, tokens in item.features.items()
        }
        return RecommendedItem(
            item_id=item.item_id,
            score=score,
            title=item.title,
            concepts=item.concepts,
            grade=item.grade,
            format=item.format,
            reason=reason,
            features=MappingProxyType(features),
            prerequisites=item.prerequisites,
            numbers=item.numbers,
        )


def _derived_arrays(snapshot: Snapshot) -> dict[str, Any]:
    """The per-snapshot precomputation: O(items x d), once per snapshot instead of per request."""
    n_items = snapshot.n_items
    scoring = np.empty((snapshot.item_vectors.shape[1] + 1, n_items), dtype=np.float32)
    scoring[:-1] = snapshot.item_vectors.T
    scoring[-1] = snapshot.item_biases
    cold = np.log1p(snapshot.popularity, dtype=np.float32) + np.float32(1e-3) * snapshot.item_biases
    norms = np.linalg.norm(snapshot.item_vectors, axis=1, keepdims=True)
    unit = snapshot.item_vectors / np.where(norms > 0, norms, 1).astype(np.float32)
    membership = snapshot.concept_membership
    concept_masks = {
        name: read_only(np.ascontiguousarray(membership[:, column]))
        for column, name in enumerate(snapshot.concepts)
        if column < membership.shape[1] and snapshot.catalog.positions_for_concept(name)
    }
    return {
        "scoring_columns": read_only(scoring),
        "cold_start_scores": read_only(cold.astype(np.float32, copy=False)),
        "unit_item_columns": read_only(np.ascontiguousarray(unit.T, dtype=np.float32)),
        "concept_masks": MappingProxyType(concept_masks),
    }


def _excluded_with_skips(seen: IntArray | None, skipped: IntArray) -> IntArray:
    """Sorted, unique positions to leave out (one vectorised union; _best counts them)."""
    return skipped if seen is None else np.union1d(seen, skipped)


def _validated_k(k: int) -> int:
    if k < 0 or k > MAX_K:
        raise InvalidInput(f"k must be between 1 and {MAX_K} (0 means {DEFAULT_K}), got {k}")
    return k or DEFAULT_K


def _reason(item_concepts: tuple[str, ...], interests: tuple[str, ...]) -> str:
    if not interests:
        return "popular with students"
    for concept in interests:  # the user's strongest interest that this item practises
        if concept in item_concepts:
            return f"practises {concept.replace('_', ' ')}, which you photographed recently"
    return "popular with students who practise " + " and ".join(c.replace("_", " ") for c in interests[:2])


def _similar_reason(source: LearningItem, item: LearningItem) -> str:
    shared = [c for c in item.concepts if c in source.concepts]
    if shared:
        return f"also practises {' and '.join(c.replace('_', ' ') for c in shared[:2])}, like {source.title}"
    return f"learned to be close to {source.title}"


def _top_k(scores: FloatArray, k: int) -> IntArray:
    """Positions of the k highest scores, best first; ties broken by position (deterministic).

    Exact, and equal to a full stable sort's first k. On large arrays a threshold from a strided
    sample first narrows the candidates (one compare pass instead of a partition of everything);
    if fewer than k scores reach it, the full partition runs instead.
    """
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if len(scores) >= SAMPLED_TOP_K_MIN and k <= MAX_K:
        sample = scores[::TOP_K_SAMPLE_STRIDE]
        rank = 2 * k // TOP_K_SAMPLE_STRIDE + 2  # expect ~rank x stride > 2k scores above it
        threshold = np.partition(sample, len(sample) - rank)[len(sample) - rank]
        narrowed = np.flatnonzero(scores >= threshold)
        if len(narrowed) >= k:  # every top-k score is >= threshold: narrowed holds them all, in order
            return narrowed[_exact_top_k(scores[narrowed], k)]
    return _exact_top_k(scores, k)


def _exact_top_k(scores: FloatArray, k: int) -> IntArray:
    """One partition finds the k-th best score; all above it are in, ties at it lowest position first."""
    if k >= len(scores):
        candidates = np.arange(len(scores), dtype=np.int64)
    else:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        better = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)[: k - len(better)]
        candidates = np.concatenate([better, tied])
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order].astype(np.int64, copy=False)
