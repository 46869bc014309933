"""The LightFM hybrid model, learned incrementally from ImageClassified events.

Features
- item: identity + concept:* + one `name:value` per declared catalog feature (the sample
  catalog's grade:*, format:*, difficulty:*; numeric features by bucket)
- user: identity + concept:* weighted by the user's CONCEPT PROFILE (time-decayed, score-
  weighted counts of the concepts their photos were classified as, normalised to sum 1).
  A brand-new student is therefore personalised by their first photo, before any fit.

Warm start: at construction the model is fitted on synthetic students who are nothing but
concept profiles (no identity feature), so all of that signal lands in the shared concept
embeddings, which is what makes the profile features meaningful from the first event.

Online: `apply(events)` dedupes by event id, updates profiles, turns each event into a few
weighted positive interactions and runs fit_partial on ONLY those. LightFM's parameters are
indexed by feature, never by user row, so the batch's interaction matrix has one row per
user *in the batch* (with those users' feature rows) and a column per catalog item: the
same update as a full-shape matrix with just the new rows, without O(all users) work.
New users, items and feature values grow LightFM's arrays in place (capacity doubling).

Engagement feedback (FeedbackRecorded, from RecordFeedback) arrives on the same stream and in
the same batches: `completed` is a strong positive for that item (weight `completed_weight`),
`viewed` a weak one (`viewed_weight`); both also count the item's concepts into the profile
and mark the item seen. `skipped` adds no positive and hides the item from that student's
recommendations for `skip_window_s` of EVENT time: the model's clock is the latest event time
it has applied, so replays and restored checkpoints expire skips exactly as the first run
did, and a skip synced late (older than the window) hides nothing.

Catalog changes (CatalogItemAdded / Changed / Retired) arrive on the same stream and are applied
in log order like the rest: an added item gets its model row at once and is scored from its
features (its identity embedding starts fresh); a changed item keeps its row and identity and
takes its new features; a retired item keeps its row but leaves every lookup, so it is never
recommended, sampled as a positive or a SimilarItems source (it can be added back). `sync_catalog`
does the same for a catalog file given at start against a checkpoint's catalog.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from lightfm import LightFM

from snaplearn_common.events import (
    FeedbackKind,
    attempt_correct,
    check_score,
    feedback_kind_from_proto,
    outcome_from_proto,
)
from snaplearn_recommender.catalog import (
    Catalog,
    CatalogDiff,
    LabelMapping,
    LearningItem,
    default_label_to_concepts,
    diff_catalogs,
    item_from_proto,
)
from snaplearn_recommender.features import (
    MIN_CAPACITY,
    PARAMETER_ARRAYS,
    HybridLightFM,
    Vocabulary,
    feature_matrix,
    positives_matrices,
)
from snaplearn_recommender.mastery import (
    BAND_WEIGHT,
    NEXT_STEP_WEIGHT,
    ONLINE_RATE,
    PRACTISE_EXTRA,
    READINESS_WEIGHT,
    MasteryModel,
    MasteryOptions,
    PractiseWeights,
    StudentState,
)
from snaplearn_recommender.snapshot import Attempt, Snapshot, read_only

if TYPE_CHECKING:
    from snaplearn.events.v1 import events_pb2

__all__ = [
    "PARAMETER_ARRAYS",
    "ApplyResult",
    "CatalogChange",
    "ClassifiedEvent",
    "FeedbackEvent",
    "ForgetEvent",
    "Loss",
    "ModelEvent",
    "ModelParams",
    "RecentIds",
    "RecommenderModel",
]


# The LightFM losses that take sample weights (feedback and label scores weigh positives).
Loss = Literal["warp", "bpr", "logistic"]


@dataclass(frozen=True, slots=True)
class ModelParams:
    no_components: int = 32
    loss: Loss = "warp"
    learning_rate: float = 0.05
    epochs_per_batch: int = 3
    seed: int = 0
    # Per event: this many positives from the top concept, plus one per other confident concept.
    items_per_event: int = 3
    max_concepts_per_event: int = 2
    min_label_score: float = 0.2
    profile_half_life_s: float = 7 * 24 * 3600.0
    prior_students_per_concept: int = 20
    prior_items_per_student: int = 8
    prior_epochs: int = 30
    dedupe_window: int = 100_000
    # 1 keeps training deterministic (LightFM's OpenMP fit is Hogwild with more threads).
    num_threads: int = 1
    # Engagement feedback (new fields go last: checkpoints unpickle fields by position).
    completed_weight: float = 1.0
    viewed_weight: float = 0.3
    skip_window_s: float = 24 * 3600.0
    # "Practise next" for students with attempts: the target band of predicted success and the
    # mastery above which a prerequisite counts as mastered.
    practise_low: float = 0.55
    practise_high: float = 0.85
    mastery_threshold: float = 0.6
    # How mastery reorders the ranking's head (mastery.PractiseWeights, DECISIONS D53) and the
    # mastery model's online learning rate (its weights learn from every attempt).
    readiness_weight: float = READINESS_WEIGHT
    band_weight: float = BAND_WEIGHT
    practise_extra: int = PRACTISE_EXTRA
    mastery_online_rate: float = ONLINE_RATE
    next_step_weight: float = NEXT_STEP_WEIGHT

    def __post_init__(self) -> None:
        if not 0.0 <= self.practise_low <= self.practise_high <= 1.0:
            raise ValueError("the practise band must satisfy 0 <= low <= high <= 1")
        if not 0.0 < self.mastery_threshold < 1.0:
            raise ValueError("mastery_threshold must be between 0 and 1 (exclusive)")
        self.practise_weights  # noqa: B018 (validates them)
        if not 0.0 <= self.mastery_online_rate < 1.0:
            raise ValueError("mastery_online_rate must be in [0, 1)")
        if self.no_components < 1 or self.epochs_per_batch < 1 or self.items_per_event < 1:
            raise ValueError("no_components, epochs_per_batch and items_per_event must be >= 1")
        if self.loss not in get_args(Loss):
            raise ValueError(f"loss must be warp, bpr or logistic (sample weights), got {self.loss!r}")
        if not self.learning_rate > 0 or not self.profile_half_life_s > 0:
            raise ValueError("learning_rate and profile_half_life_s must be > 0")
        if not self.completed_weight > 0 or not self.viewed_weight > 0 or not self.skip_window_s >= 0:
            raise ValueError("completed_weight and viewed_weight must be > 0, skip_window_s >= 0")

    @property
    def practise_weights(self) -> PractiseWeights:
        return PractiseWeights(
            self.readiness_weight, self.band_weight, self.practise_extra, self.next_step_weight
        )

    @classmethod
    def upgraded(cls, params: ModelParams) -> ModelParams:
        """`params` unpickled from an older checkpoint, with defaults for fields it lacks."""
        return cls(**{f.name: getattr(params, f.name) for f in fields(cls) if hasattr(params, f.name)})


@dataclass(frozen=True, slots=True)
class ClassifiedEvent:
    """The part of an ImageClassified event the model uses."""

    event_id: str
    user_id: str
    labels: tuple[tuple[str, float], ...]
    time_s: float

    @classmethod
    def from_proto(cls, message: events_pb2.ImageClassified) -> ClassifiedEvent:
        time_s = message.time.ToNanoseconds() / 1e9 if message.HasField("time") else 0.0
        labels = tuple((label.label, float(label.score)) for label in message.labels)
        return cls(event_id=message.event_id, user_id=message.user_id, labels=labels, time_s=time_s)


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """A FeedbackRecorded event: a student viewed, completed or skipped a catalog item."""

    event_id: str
    user_id: str
    item_id: str
    kind: FeedbackKind
    time_s: float
    # An attempt (an exercise answered): whether it counts as correct (None: not an attempt).
    correct: bool | None = None
    score: float | None = None

    @classmethod
    def from_proto(cls, message: events_pb2.FeedbackRecorded) -> FeedbackEvent:
        """InvalidInput for an unknown kind or outcome (the worker dead-letters such records)."""
        time_s = message.time.ToNanoseconds() / 1e9 if message.HasField("time") else 0.0
        score = message.score if message.HasField("score") else None
        check_score(score)
        return cls(
            event_id=message.event_id,
            user_id=message.user_id,
            item_id=message.item_id,
            kind=feedback_kind_from_proto(message.kind),
            time_s=time_s,
            correct=attempt_correct(outcome_from_proto(message.outcome), score),
            score=score,
        )


CatalogChangeKind = Literal["added", "changed", "retired"]


@dataclass(frozen=True, slots=True)
class CatalogChange:
    """A CatalogItemAdded / Changed (item given) or CatalogItemRetired (item None) event."""

    event_id: str
    kind: CatalogChangeKind
    item_id: str
    item: LearningItem | None
    time_s: float = 0.0

    @classmethod
    def from_proto(cls, message: Any) -> CatalogChange | None:
        """The change a CatalogItemAdded / Changed / Retired message makes; None for other messages.
        CatalogError (a ValueError) for an item that breaks the catalog's rules."""
        from snaplearn.events.v1 import events_pb2

        time_s = message.time.ToNanoseconds() / 1e9 if message.HasField("time") else 0.0
        if isinstance(message, events_pb2.CatalogItemRetired):
            return cls(message.event_id, "retired", message.item_id, None, time_s)
        if isinstance(message, events_pb2.CatalogItemAdded | events_pb2.CatalogItemChanged):
            kind: CatalogChangeKind = (
                "added" if isinstance(message, events_pb2.CatalogItemAdded) else "changed"
            )
            item = item_from_proto(message.item)
            return cls(message.event_id, kind, item.item_id, item, time_s)
        return None


@dataclass(frozen=True, slots=True)
class ForgetEvent:
    """A StudentForgotten tombstone: erase everything the model holds about this student."""

    event_id: str
    user_id: str
    time_s: float = 0.0

    @classmethod
    def from_proto(cls, message: events_pb2.StudentForgotten) -> ForgetEvent:
        time_s = message.time.ToNanoseconds() / 1e9 if message.HasField("time") else 0.0
        return cls(event_id=message.event_id, user_id=message.user_id, time_s=time_s)


ModelEvent = ClassifiedEvent | FeedbackEvent | CatalogChange | ForgetEvent


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int  # new (non-duplicate) events
    duplicates: int
    interactions: int
    new_users: int
    without_known_concepts: int
    feedback: int = 0  # FeedbackRecorded events among `applied`
    unknown_items: int = 0  # feedback for items not in the catalog (ignored)
    catalog_changes: int = 0  # catalog events among `applied`
    forgotten: int = 0  # StudentForgotten tombstones among `applied`

    def __add__(self, other: ApplyResult) -> ApplyResult:
        return ApplyResult(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class RecentIds:
    """Membership over the last `window` ids added (older ids are forgotten)."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._order: deque[str] = deque()
        self._members: set[str] = set()

    def __contains__(self, item: object) -> bool:
        return item in self._members

    def __len__(self) -> int:
        return len(self._members)

    def add(self, item: str) -> None:
        if item in self._members:
            return
        self._order.append(item)
        self._members.add(item)
        if len(self._order) > self._window:
            self._members.discard(self._order.popleft())


# Each declared feature's total weight in an item's row (split among a multi feature's values).
FEATURE_WEIGHT = 0.5
RECENT_ATTEMPTS = 20  # per student, kept for the student-state view


def _item_feature_names(item: LearningItem) -> list[tuple[str, float]]:
    """(feature, weight) for one item; concept weights sum to 1 and each feature's to FEATURE_WEIGHT,
    so that items with many concepts or values do not dominate."""
    names = [(f"item:{item.item_id}", 1.0)]
    names += [(f"concept:{c}", 1.0 / len(item.concepts)) for c in item.concepts]
    for name, tokens in item.features.items():
        names += [(f"{name}:{token}", FEATURE_WEIGHT / len(tokens)) for token in tokens]
    return names


def _grown(array: npt.NDArray[Any], rows: int, fill: float = 0.0) -> npt.NDArray[Any]:
    """`array` with at least `rows` rows: capacity doubles, so appends are amortised O(1)."""
    if rows <= array.shape[0]:
        return array
    capacity = max(rows, 2 * array.shape[0], MIN_CAPACITY)
    out = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


class RecommenderModel:
    """LightFM hybrid recommender that learns from micro-batches of events (single writer)."""

    def __init__(
        self,
        catalog: Catalog,
        params: ModelParams | None = None,
        label_to_concepts: LabelMapping | None = None,
    ) -> None:
        self.params = params or ModelParams()
        self.label_to_concepts: dict[str, tuple[str, ...]] = dict(
            label_to_concepts or default_label_to_concepts()
        )
        self.catalog = Catalog(())
        self.events_applied = 0
        self.snapshots_built = 0
        self._hybrid = HybridLightFM(
            no_components=self.params.no_components,
            loss=self.params.loss,
            learning_rate=self.params.learning_rate,
            seed=self.params.seed,
        )
        # Separate streams so that sampling and LightFM's shuffles don't perturb each other.
        self._rng = np.random.default_rng(self.params.seed + 2)
        self._sampler = random.Random(self.params.seed + 3)  # per-event picks: cheaper than numpy for a few
        self._recent_event_ids = RecentIds(self.params.dedupe_window)
        self._item_vocab = Vocabulary()
        self._user_vocab = Vocabulary()
        self._concepts = Vocabulary()
        self._concept_user_feature = np.zeros(0, dtype=np.int64)  # concept -> user feature column
        # Per user (row = order of first event): identity feature column, profile, profile time.
        self._user_index: dict[str, int] = {}
        self._user_identity_feature = np.zeros(0, dtype=np.int64)
        self._profiles = np.zeros((0, 0), dtype=np.float64)
        self._profile_time = np.zeros(0, dtype=np.float64)
        # Seen items per user row: a set for sampling, sorted arrays (rebuilt per batch) for snapshots.
        self._seen_sets: dict[int, set[int]] = {}
        self._seen: dict[int, npt.NDArray[np.int64]] = {}
        self._popularity = np.zeros(0, dtype=np.float64)
        self._init_feedback_state()
        self._init_mastery(self.params.mastery_online_rate)
        self.add_items(catalog)
        self._warm_start()

    def _init_feedback_state(self) -> None:
        # Skips per user row: {item position: event time of the latest skip}; the sorted arrays of
        # what is hidden now (immutable, shared with snapshots); the model's event-time clock; and
        # the oldest skip time, so that expiring is a no-op until one can have expired.
        self._skips: dict[int, dict[int, float]] = {}
        self._skipped: dict[int, npt.NDArray[np.int64]] = {}
        self._clock = 0.0
        self._oldest_skip = math.inf

    def _init_mastery(self, online_rate: float) -> None:
        # Knowledge tracing on attempts (DECISIONS D43): item -> its concept (the first of the
        # catalog's; replaced, never mutated, so snapshots may share it), the live model, and per
        # student a copy frozen at the last batch that touched them plus the latest attempts.
        self._concept_of: dict[str, str] = {}
        self._mastery = MasteryModel(options=MasteryOptions(online_rate=online_rate))
        self._mastery.concept_of = self._concept_of  # the same dict (an empty one is falsy there)
        self._mastery_frozen: dict[Hashable, StudentState] = {}
        self._attempts: dict[str, tuple[Attempt, ...]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checkpoints pickled before HybridLightFM held `lightfm` and `_init_rng` directly.
        if "_hybrid" not in state:
            state["_hybrid"] = HybridLightFM.wrapping(state.pop("lightfm"), state.pop("_init_rng"))
        if "_skips" not in state:  # pickled before engagement feedback
            self._init_feedback_state()
            state["params"] = ModelParams.upgraded(state["params"])
        old_item_arrays = "_item_grades" in state  # pickled before declared features
        for name in ("_item_grades", "_item_format_codes", "_concept_items"):
            state.pop(name, None)
        if "_mastery" not in state:  # pickled before attempts
            state["params"] = ModelParams.upgraded(state["params"])
            self._init_mastery(state["params"].mastery_online_rate)
            self._concept_of = {
                item.item_id: item.concepts[0] for item in state["catalog"].items if item.concepts
            }
            self._mastery.concept_of = self._concept_of
        self.__dict__.update(state)
        if old_item_arrays:
            self._rebuild_item_arrays()
        if not all(hasattr(self.params, f.name) for f in fields(ModelParams)):  # older fields only
            self.params = ModelParams.upgraded(self.params)
        self.use_settings(self.params)

    def use_settings(self, params: ModelParams) -> None:
        """Takes the settings that hold no learned state (practise band, mastery threshold, how
        mastery shapes the ranking, the mastery model's online rate) from `params`: a restored
        checkpoint serves with the process's current settings, not the ones it was saved with."""
        self.params = replace(
            self.params,
            practise_low=params.practise_low,
            practise_high=params.practise_high,
            mastery_threshold=params.mastery_threshold,
            readiness_weight=params.readiness_weight,
            band_weight=params.band_weight,
            practise_extra=params.practise_extra,
            mastery_online_rate=params.mastery_online_rate,
            next_step_weight=params.next_step_weight,
        )
        options = self._mastery.options
        known = {f.name: getattr(options, f.name) for f in fields(MasteryOptions) if hasattr(options, f.name)}
        self._mastery.options = MasteryOptions(**{**known, "online_rate": params.mastery_online_rate})

    # --- sizes (for tests and metrics) ---------------------------------------------------------

    @property
    def n_users(self) -> int:
        return len(self._user_index)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    @property
    def n_item_features(self) -> int:
        return len(self._item_vocab)

    @property
    def n_user_features(self) -> int:
        return len(self._user_vocab)

    @property
    def lightfm(self) -> LightFM:
        """The underlying LightFM (its parameter arrays are grown by HybridLightFM)."""
        return self._hybrid.lightfm

    @property
    def item_feature_capacity(self) -> int:
        return self._hybrid.capacity("item")

    @property
    def user_feature_capacity(self) -> int:
        return self._hybrid.capacity("user")

    @property
    def clock_s(self) -> float:
        """The model's event time: the latest event time it has applied (0 before any)."""
        return self._clock

    def has_item(self, item_id: str) -> bool:
        """True for an active (not retired) item of the catalog."""
        return self.catalog.position(item_id) is not None

    def skipped(self, user_id: str) -> tuple[str, ...]:
        """Item ids hidden from this user right now (recently skipped), in catalog order."""
        row = self._user_index.get(user_id)
        hidden = self._skipped.get(row, ()) if row is not None else ()
        return tuple(self.catalog[int(p)].item_id for p in hidden)

    def item_feature(self, name: str) -> int | None:
        return self._item_vocab.get(name)

    def user_feature(self, name: str) -> int | None:
        return self._user_vocab.get(name)

    def profile(self, user_id: str) -> dict[str, float]:
        """The user's normalised concept profile ({} for unknown users)."""
        row = self._user_index.get(user_id)
        if row is None:
            return {}
        weights = self._normalised_profiles(np.array([row]))[0]
        return {self._concepts.names[i]: float(w) for i, w in enumerate(weights) if w > 0}

    # --- growth ---------------------------------------------------------------------------------

    def _add_concept(self, concept: str) -> int:
        index = self._concepts.get(concept)
        if index is not None:
            return index
        index = self._concepts.add(concept)
        column = self._user_vocab.add(f"concept:{concept}")
        self._hybrid.reserve("user", len(self._user_vocab))
        self._concept_user_feature = np.append(self._concept_user_feature, column)
        if self._profiles.shape[1] < len(self._concepts):
            columns = max(len(self._concepts), 2 * self._profiles.shape[1], 16)
            self._profiles = np.hstack(
                [self._profiles, np.zeros((self._profiles.shape[0], columns - self._profiles.shape[1]))]
            )
        return index

    def add_items(self, items: Iterable[LearningItem]) -> None:
        """Append items (new ids only); their new feature values get fresh parameter rows."""
        new_items = list(items)
        self.catalog = self.catalog.extended(new_items)
        self._register(new_items)
        self._rebuild_item_arrays()

    def _register(self, items: Sequence[LearningItem]) -> None:
        """Vocabulary, concepts, parameter rows and popularity for items now in self.catalog."""
        for item in items:
            for name, _ in _item_feature_names(item):
                self._item_vocab.add(name)
            for concept in item.concepts:
                self._add_concept(concept)
        changed = {
            i.item_id: i.concepts[0]
            for i in items
            if i.concepts and self._concept_of.get(i.item_id) != i.concepts[0]
        }
        if changed:
            self._concept_of = {**self._concept_of, **changed}
            self._mastery.concept_of = self._concept_of
        self._hybrid.reserve("item", len(self._item_vocab))
        if len(self._popularity) < len(self.catalog):
            grown = np.zeros(len(self.catalog))
            grown[: len(self._popularity)] = self._popularity
            self._popularity = grown

    def upsert_item(self, item: LearningItem) -> None:
        """Add `item`, or change the item of its id in place (keeping its row), un-retiring it.
        Call _rebuild_item_arrays (or use apply / sync_catalog, which do) before training or serving."""
        self.catalog = self.catalog.with_item(item)
        self._register([item])
        row = self.catalog.row(item.item_id)
        assert row is not None
        self.__dict__.setdefault("_changed_rows", set()).add(row)

    def retire_items(self, item_ids: Iterable[str]) -> None:
        """Never recommend these items again (unless added back); their rows stay."""
        self.catalog = self.catalog.with_retired(item_ids)

    def sync_catalog(self, catalog: Catalog, version_s: float | None = None) -> CatalogDiff:
        """Make the model's active items exactly `catalog`'s (e.g. a catalog given at start against a
        checkpoint's): new items added, changed ones updated, the rest retired. Returns the changes.

        The items it changes are stamped `version_s` (default: now), so catalog events published
        before it for those items (replayed after a restart) are stale and do not undo it."""
        changes = diff_catalogs(self.catalog, catalog)
        if changes:
            stamp = time.time() if version_s is None else version_s
            versions: dict[str, float] = self.__dict__.setdefault("_catalog_versions", {})
            for item_id in (*(i.item_id for i in (*changes.added, *changes.changed)), *changes.retired):
                versions[item_id] = max(versions.get(item_id, -math.inf), stamp)
            for item in (*changes.added, *changes.changed):
                self.upsert_item(item)
            self.retire_items(changes.retired)
            self._rebuild_item_arrays()
        return changes

    def _rebuild_item_arrays(self) -> None:
        """The item feature matrix and concept membership for the current catalog: only the rows
        upsert_item touched when there are few (a live change must not cost a pass over every
        item in Python), else all of them."""
        changed_rows: set[int] = self.__dict__.pop("_changed_rows", set())
        current: sp.csr_matrix | None = self.__dict__.get("_item_features")
        n_items = len(self.catalog)
        if current is not None:
            changed_rows.update(range(current.shape[0], n_items))  # appended by add_items too
        changed = sorted(changed_rows)
        if current is None or len(changed) > n_items // 4 or current.shape[0] > n_items:
            self._item_features = feature_matrix(map(_item_feature_names, self.catalog), self._item_vocab)
            membership = np.zeros((n_items, len(self._concepts)), dtype=bool)
            for position, item in enumerate(self.catalog):
                membership[position, [self._concepts.add(c) for c in item.concepts]] = True
            self._concept_membership = read_only(membership)
            return
        rows = feature_matrix((_item_feature_names(self.catalog[p]) for p in changed), self._item_vocab)
        width = len(self._item_vocab)
        base = sp.csr_matrix((current.data, current.indices, current.indptr), shape=(current.shape[0], width))
        if base.shape[0] < n_items:
            base = sp.vstack(
                [base, sp.csr_matrix((n_items - base.shape[0], width), dtype=np.float32)]
            ).tocsr()
        keep = np.ones(n_items, dtype=np.float32)
        keep[changed] = 0.0
        scatter = sp.csr_matrix(
            (np.ones(len(changed), dtype=np.float32), (changed, np.arange(len(changed)))),
            shape=(n_items, len(changed)),
        )
        features = (sp.diags(keep, format="csr") @ base + scatter @ rows).tocsr().astype(np.float32)
        features.eliminate_zeros()
        features.sort_indices()
        self._item_features = features
        membership = np.zeros((n_items, len(self._concepts)), dtype=bool)
        previous = self._concept_membership
        membership[: previous.shape[0], : previous.shape[1]] = previous
        for position in changed:
            membership[position] = False
            membership[position, [self._concepts.add(c) for c in self.catalog[position].concepts]] = True
        self._concept_membership = read_only(membership)

    def _user_row(self, user_id: str, time_s: float) -> int:
        row = self._user_index.get(user_id)
        if row is not None:
            return row
        row = self._user_index[user_id] = len(self._user_index)
        column = self._user_vocab.add(f"user:{user_id}")
        self._hybrid.reserve("user", len(self._user_vocab))
        self._user_identity_feature = _grown(self._user_identity_feature, row + 1)
        self._user_identity_feature[row] = column
        self._profiles = _grown(self._profiles, row + 1)
        self._profile_time = _grown(self._profile_time, row + 1)
        self._profile_time[row] = time_s
        return row

    # --- features -------------------------------------------------------------------------------

    def _normalised_profiles(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        profiles = self._profiles[rows, : len(self._concepts)]
        totals = profiles.sum(axis=1, keepdims=True)
        return np.divide(profiles, totals, out=np.zeros_like(profiles), where=totals > 0)

    def _concept_feature_rows(self, concept_weights: npt.NDArray[np.float64]) -> sp.csr_matrix:
        """User feature rows holding only concept features (no identity)."""
        rows, concepts = np.nonzero(concept_weights)
        columns = self._concept_user_feature[concepts]
        shape = (concept_weights.shape[0], len(self._user_vocab))
        return sp.csr_matrix(
            (concept_weights[rows, concepts], (rows, columns)), shape=shape, dtype=np.float32
        )

    def _user_feature_rows(self, user_rows: npt.NDArray[np.int64]) -> sp.csr_matrix:
        """identity (weight 1) + normalised concept profile, one row per entry of user_rows."""
        concept_part = self._concept_feature_rows(self._normalised_profiles(user_rows))
        identity = sp.csr_matrix(
            (np.ones(len(user_rows)), (np.arange(len(user_rows)), self._user_identity_feature[user_rows])),
            shape=concept_part.shape,
            dtype=np.float32,
        )
        return (identity + concept_part).tocsr()

    # --- training -------------------------------------------------------------------------------

    def _fit(
        self,
        rows: Sequence[int],
        items: Sequence[int],
        weights: Sequence[float],
        user_features: sp.csr_matrix,
        epochs: int,
    ) -> None:
        """fit_partial on just these (row, item, weight) positives; rows index user_features."""
        shape = (user_features.shape[0], self.n_items)
        interactions, sample_weight = positives_matrices(rows, items, weights, shape)
        self._hybrid.fit_partial(
            interactions,
            user_features,
            self._item_features,
            sample_weight=sample_weight,
            epochs=epochs,
            num_threads=self.params.num_threads,
        )

    def _warm_start(self) -> None:
        """Fit synthetic concept-profile students so concept embeddings mean something at once."""
        concepts = self.catalog.concepts
        profiles: list[npt.NDArray[np.float64]] = []
        rows: list[int] = []
        items: list[int] = []
        weights: list[float] = []
        for primary in range(len(concepts)):
            for _ in range(self.params.prior_students_per_concept):
                profile = np.zeros(len(self._concepts))
                profile[self._concepts.add(concepts[primary])] = 1.0
                candidates = list(self.catalog.positions_for_concept(concepts[primary]))
                if len(concepts) > 1 and self._rng.random() < 0.3:  # some students have a side interest
                    secondary = concepts[int(self._rng.integers(len(concepts)))]
                    if secondary != concepts[primary]:
                        profile[self._concepts.add(secondary)] = 0.5
                        candidates += list(self.catalog.positions_for_concept(secondary)[:2])
                chosen = self._rng.choice(
                    candidates, size=min(len(candidates), self.params.prior_items_per_student), replace=False
                )
                row = len(profiles)
                profiles.append(profile / profile.sum())
                rows += [row] * len(chosen)
                items += [int(i) for i in chosen]
                weights += [1.0] * len(chosen)
        if rows:
            features = self._concept_feature_rows(np.vstack(profiles))
            self._fit(rows, items, weights, features, epochs=self.params.prior_epochs)

    def _concept_scores(self, labels: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
        """Concepts of an event's labels with their score, best first (non-finite/<=0 dropped)."""
        scores: dict[str, float] = {}
        for label, raw_score in labels:
            if not math.isfinite(raw_score) or raw_score <= 0:
                continue
            score = min(raw_score, 1.0)
            mapped = self.label_to_concepts.get(label) or ((label,) if label in self._concepts else ())
            for concept in mapped:
                scores[concept] = max(scores.get(concept, 0.0), score)
        return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))

    def _update_profile(self, row: int, concept_scores: list[tuple[str, float]], time_s: float) -> None:
        last = self._profile_time[row]
        time_s = time_s if time_s > 0 else last  # no timestamp: no decay
        half_life = self.params.profile_half_life_s
        if time_s >= last:
            self._profiles[row] *= 0.5 ** ((time_s - last) / half_life)
            self._profile_time[row] = time_s
            factor = 1.0
        else:  # out of order: this event is older than the profile
            factor = 0.5 ** ((last - time_s) / half_life)
        for concept, score in concept_scores:
            self._profiles[row, self._add_concept(concept)] += score * factor

    def _choose_positives(self, row: int, concept_scores: list[tuple[str, float]]) -> list[tuple[int, float]]:
        """items_per_event items of the top concept + 1 per other confident concept, unseen first."""
        seen = self._seen_sets.get(row, set())
        chosen: dict[int, float] = {}
        kept = [
            (c, s)
            for rank, (c, s) in enumerate(concept_scores)
            if self.catalog.positions_for_concept(c) and (rank == 0 or s >= self.params.min_label_score)
        ][: self.params.max_concepts_per_event]
        for rank, (concept, score) in enumerate(kept):
            wanted = self.params.items_per_event if rank == 0 else 1
            # Active items only: a retired item is never a positive.
            pool = [p for p in self.catalog.positions_for_concept(concept) if p not in chosen]
            # Plain Python over a concept's items: a few dozen, where numpy set ops cost more.
            unseen = [p for p in pool if p not in seen]
            source = unseen or pool
            for position in self._sampler.sample(source, min(wanted, len(source))):
                chosen[position] = score
        return list(chosen.items())

    def _apply_feedback(self, event: FeedbackEvent, position: int) -> tuple[int, float] | None:
        """Profile, seen items, skips for one feedback event; (user row, positive weight) or None."""
        row = self._user_row(event.user_id, event.time_s)
        skips = self._skips.get(row)
        if event.kind is FeedbackKind.SKIPPED:
            skips = self._skips.setdefault(row, {})
            skips[position] = max(skips.get(position, event.time_s), event.time_s)
            self._oldest_skip = min(self._oldest_skip, event.time_s)
            return None
        if skips is not None:
            skips.pop(position, None)  # engaging with it after all ends the skip
        weight = (
            self.params.completed_weight
            if event.kind is FeedbackKind.COMPLETED
            else self.params.viewed_weight
        )
        concepts = self.catalog[position].concepts
        self._update_profile(row, [(c, weight / len(concepts)) for c in concepts], event.time_s)
        self._seen_sets.setdefault(row, set()).add(position)
        self._popularity[position] += weight
        return row, weight

    def apply(self, events: Iterable[ModelEvent], train: bool = True) -> ApplyResult:
        """Learn from one micro-batch of events, in order (duplicates by event_id are skipped).

        train=False updates profiles, seen items, skips and popularity but runs no fit_partial.
        A tombstone (ForgetEvent) splits the batch: what came before it is learned first, so the
        student's rows are erased after their last update and later events start a new student.
        """
        result = ApplyResult(0, 0, 0, 0, 0)
        segment: list[ModelEvent] = []
        for event in events:
            if not isinstance(event, ForgetEvent):
                segment.append(event)
                continue
            if segment:
                result += self._apply_segment(segment, train)
                segment = []
            if event.event_id in self._recent_event_ids:
                result += ApplyResult(0, 1, 0, 0, 0)
                continue
            self._recent_event_ids.add(event.event_id)
            self.forget(event.user_id)
            self.events_applied += 1
            result += ApplyResult(1, 0, 0, 0, 0, forgotten=1)
        if segment or not result.applied + result.duplicates:
            result += self._apply_segment(segment, train)
        return result

    def forget(self, user_id: str) -> bool:
        """Erase one student: user row, identity feature (name and learned parameters), profile,
        seen items, skips, mastery and attempts. Returns False for a student the model does not
        know. What the student taught the shared parameters (item and concept embeddings, item
        popularity) is aggregate and holds no id; it stays. The row of the last user moves into
        the freed row, so rows stay dense (snapshots index them 0..n_users-1)."""
        known = self._mastery.students.pop(user_id, None) is not None
        known = self._mastery_frozen.pop(user_id, None) is not None or known
        known = self._attempts.pop(user_id, None) is not None or known
        row = self._user_index.pop(user_id, None)
        if row is None:
            return known
        column = int(self._user_identity_feature[row])
        names = list(self._user_vocab.names)
        names[column] = f"forgotten:{column}"  # keeps the column (LightFM's arrays) but not the id
        self._user_vocab = Vocabulary(names)
        accumulator_start = 1.0 if self.lightfm.learning_schedule == "adagrad" else 0.0
        for name in PARAMETER_ARRAYS:
            getattr(self.lightfm, f"user_{name}")[column] = accumulator_start if "gradients" in name else 0.0
        last = len(self._user_index)  # the old last row
        by_row: list[dict[int, Any]] = [self._seen_sets, self._seen, self._skips, self._skipped]
        for mapping in by_row:
            mapping.pop(row, None)
        if row != last:
            moved = next(u for u, r in self._user_index.items() if r == last)
            self._user_index[moved] = row
            for array in (self._user_identity_feature, self._profiles, self._profile_time):
                array[row] = array[last]
            for mapping in by_row:
                if last in mapping:
                    mapping[row] = mapping.pop(last)
        self._user_identity_feature[last] = 0
        self._profiles[last] = 0.0
        self._profile_time[last] = 0.0
        return True

    def _apply_segment(self, events: Iterable[ModelEvent], train: bool) -> ApplyResult:
        applied = duplicates = new_users = without_concepts = feedback = unknown_items = 0
        catalog_changes = 0
        batch_rows: dict[int, int] = {}  # user row -> row in this batch's matrices
        learners: set[str] = set()  # users with attempts in this batch
        skip_rows: set[int] = set()  # user rows whose skips changed
        rows: list[int] = []
        items: list[int] = []
        weights: list[float] = []
        for event in events:
            if event.event_id in self._recent_event_ids:
                duplicates += 1
                continue
            self._recent_event_ids.add(event.event_id)
            applied += 1
            if isinstance(event, CatalogChange):
                # Not a student's event: it does not move the clock that expires skips.
                catalog_changes += 1
                self._apply_catalog_change(event)
                continue
            self._clock = max(self._clock, event.time_s)
            assert not isinstance(event, ForgetEvent)  # apply splits batches at tombstones
            if isinstance(event, FeedbackEvent):
                feedback += 1
                position = self.catalog.position(event.item_id)
                if position is None:  # the worker dead-letters these before they get here
                    unknown_items += 1
                    continue
                new_users += event.user_id not in self._user_index
                if event.correct is not None:
                    self._apply_attempt(event)
                    learners.add(event.user_id)
                positive = self._apply_feedback(event, position)
                if positive is None:
                    skip_rows.add(self._user_index[event.user_id])
                    continue
                row, weight = positive
                skip_rows.add(row)
                positives = [(position, weight)]
            else:
                concept_scores = self._concept_scores(event.labels)
                if not concept_scores:
                    without_concepts += 1  # nothing we can teach from this photo
                    continue
                new_users += event.user_id not in self._user_index
                row = self._user_row(event.user_id, event.time_s)
                self._update_profile(row, concept_scores, event.time_s)
                positives = self._choose_positives(row, concept_scores)
                if not positives:
                    continue
                for position, weight in positives:
                    self._popularity[position] += weight
                self._seen_sets.setdefault(row, set()).update(p for p, _ in positives)
            local_row = batch_rows.setdefault(row, len(batch_rows))
            for position, weight in positives:
                rows.append(local_row)
                items.append(position)
                weights.append(weight)
        for row in batch_rows:  # immutable arrays for snapshots, once per touched user
            self._seen[row] = read_only(np.array(sorted(self._seen_sets[row]), dtype=np.int64))
        self._refresh_skips(skip_rows)
        for user_id in learners:  # the copies snapshots share, once per touched student
            self._mastery_frozen[user_id] = copy.deepcopy(self._mastery.students[user_id])
        if catalog_changes:  # once per batch: the feature matrix is O(items)
            self._rebuild_item_arrays()
        if rows and train:
            user_rows = np.fromiter(batch_rows, dtype=np.int64, count=len(batch_rows))
            self._fit(rows, items, weights, self._user_feature_rows(user_rows), self.params.epochs_per_batch)
        self.events_applied += applied
        return ApplyResult(
            applied,
            duplicates,
            len(rows),
            new_users,
            without_concepts,
            feedback,
            unknown_items,
            catalog_changes,
        )

    def _apply_attempt(self, event: FeedbackEvent) -> None:
        assert event.correct is not None
        predicted = self._mastery.learn(event.user_id, event.item_id, event.correct)
        attempt = Attempt(event.item_id, event.correct, event.score, event.time_s, predicted)
        self._attempts[event.user_id] = (
            *self._attempts.get(event.user_id, ())[-(RECENT_ATTEMPTS - 1) :],
            attempt,
        )

    def _apply_catalog_change(self, change: CatalogChange) -> None:
        """Added and changed are the same upsert (applying one twice changes nothing); retiring an
        unknown id is a no-op. A change older (by its time) than the last one applied to the same
        item is stale and skipped: the sync command publishes a copy to every partition (so each
        partition sees an item before any feedback on it), and a late copy must not undo a newer
        change."""
        versions: dict[str, float] = self.__dict__.setdefault("_catalog_versions", {})
        if change.time_s < versions.get(change.item_id, -math.inf):
            return
        versions[change.item_id] = change.time_s
        if change.kind == "retired" or change.item is None:
            self.retire_items([change.item_id])
        else:
            self.upsert_item(change.item)

    def _refresh_skips(self, changed: set[int]) -> None:
        """Drop skips older than the window (by the model's clock); rebuild the hidden-item arrays
        of users whose skips changed. A loop over users with skips, and only once one expired."""
        cutoff = self._clock - self.params.skip_window_s
        if self._oldest_skip <= cutoff:
            oldest = math.inf
            for row, by_item in self._skips.items():
                expired = [p for p, t in by_item.items() if t <= cutoff]
                for position in expired:
                    del by_item[position]
                if expired:
                    changed.add(row)
                oldest = min(oldest, *by_item.values()) if by_item else oldest
            self._oldest_skip = oldest
        for row in changed:
            skips = self._skips.get(row)
            if skips:
                self._skipped[row] = read_only(np.array(sorted(skips), dtype=np.int64))
            else:
                self._skips.pop(row, None)
                self._skipped.pop(row, None)

    # --- serving --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """An immutable copy of everything Recommend needs (O(users + items) x d)."""
        user_rows = np.arange(self.n_users, dtype=np.int64)
        item_biases, item_vectors = self._hybrid.representations("item", self._item_features)
        _, user_vectors = self._hybrid.representations("user", self._user_feature_rows(user_rows))
        self.snapshots_built += 1
        concepts = self._concepts.names
        membership = self._concept_membership
        if membership.shape[1] < len(concepts):  # concepts seen only in labels have no items
            padding = np.zeros((membership.shape[0], len(concepts) - membership.shape[1]), dtype=bool)
            membership = np.hstack([membership, padding])
        return Snapshot(
            version=f"lightfm-{self.params.seed}.{self.snapshots_built}",
            events_applied=self.events_applied,
            catalog=self.catalog,
            concepts=concepts,
            item_vectors=item_vectors,
            item_biases=item_biases,
            concept_membership=membership,
            popularity=self._popularity.astype(np.float32),
            user_index=dict(self._user_index),
            user_vectors=user_vectors,
            user_profiles=self._normalised_profiles(user_rows).astype(np.float32),
            seen_items=dict(self._seen),
            skipped_items=dict(self._skipped),
            mastery=self._mastery_view(),
            recent_attempts=dict(self._attempts),
            practise_band=(self.params.practise_low, self.params.practise_high),
            mastery_threshold=self.params.mastery_threshold,
            practise_weights=self.params.practise_weights,
        )

    def _mastery_view(self) -> MasteryModel:
        """The knowledge-tracing model as of now, for a snapshot: the live one's weights (fixed
        online) and concept map (replaced, not mutated) with the students' frozen copies."""
        view = copy.copy(self._mastery)
        view.students = dict(self._mastery_frozen)
        # Learning online updates these in place (the dense weights are replaced, not written).
        for name in ("difficulty", "item_bias", "concept_correct", "concept_wrong", "concept_bias"):
            setattr(view, name, dict(getattr(self._mastery, name)))
        view.__dict__.pop("_seen", None)
        return view
