"""Knowledge tracing: an online mastery estimate per student and concept (DECISIONS D43).

Two models share one interface (`predict` before `learn`, one attempt at a time, O(1) work each):

- `Elo`: the floor. P(correct) = sigmoid(ability[student] - difficulty[item]); after the answer
  both move by one learning rate times the surprise (outcome - prediction). Nothing else.
- `MasteryModel`: a logistic model over features each kept per student and concept and updated
  per attempt: an Elo ability with an uncertainty-adaptive rate (a/(1 + b*n), so a newcomer's
  first answers move it a lot and a veteran's little), a per-concept ability offset, PFA counts
  of right and wrong answers (per concept, with per-concept slopes, and overall), exponentially
  weighted recent correctness and the last answer (per concept and overall), and the item's
  difficulty. The weights are fitted once on training students (`fit`: L2 logistic regression,
  L-BFGS), or learned online from the attempts themselves (`MasteryOptions.online_rate`: one SGD
  step of the same loss per attempt, what the recommender does); the per-student state moves
  online either way. Items are exercises; each belongs to one
  concept (skill). Where the two coincide (ASSISTments' skills) pass no mapping.

The mastery of a concept is the predicted success on an item of average difficulty of it.
numpy/scipy only: no torch, no LightFM; the state of one student is a few floats per concept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

Item = str  # an exercise or a concept id
Student = Hashable
Attempt = tuple[Item, bool]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class Elo:
    """Plain Elo: ability - difficulty, one learning rate for both (the floor)."""

    name = "elo"

    def __init__(self, learning_rate: float = 0.4) -> None:
        if learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        self.learning_rate = learning_rate
        self.ability: dict[Student, float] = {}
        self.difficulty: dict[Item, float] = {}

    def predict(self, student: Student, item: Item) -> float:
        return sigmoid(self.ability.get(student, 0.0) - self.difficulty.get(item, 0.0))

    def learn(self, student: Student, item: Item, correct: bool) -> float:
        """Updates on one answer; returns the prediction made before it."""
        p = self.predict(student, item)
        step = self.learning_rate * (float(correct) - p)
        self.ability[student] = self.ability.get(student, 0.0) + step
        self.difficulty[item] = self.difficulty.get(item, 0.0) - step
        return p

    def mastery(self, student: Student, concept: Item) -> float:
        return self.predict(student, concept)

    def forget(self, student: Student) -> None:
        self.ability.pop(student, None)


# The dense features, in order (the weights' layout; see MasteryModel._features).
FEATURES = (
    "bias",
    "ability",
    "concept_ability",
    "item_easiness",
    "concept_correct",
    "concept_wrong",
    "concept_recent",
    "concept_last",
    "total_correct",
    "total_wrong",
    "total_recent",
    "last",
)
_DENSE = len(FEATURES)
# Signs the fit keeps, so that a right answer never lowers a prediction and a wrong one never
# raises it (PFA's fitted slopes may say practice by failing helps; a student's dashboard must
# not). Each of these features moves one way with the outcome; the rest do not move with it.
_NON_NEGATIVE = (
    "ability",
    "concept_ability",
    "concept_correct",
    "concept_recent",
    "concept_last",
    "total_correct",
    "total_recent",
    "last",
)
_NON_POSITIVE = ("concept_wrong", "total_wrong")
_LOW = np.array([0.0 if name in _NON_NEGATIVE else -np.inf for name in FEATURES])
_HIGH = np.array([0.0 if name in _NON_POSITIVE else np.inf for name in FEATURES])


@dataclass(slots=True)
class ConceptState:
    correct: int = 0
    wrong: int = 0
    recent: float = 0.0  # exponentially weighted correctness minus 1/2 (0 = no evidence)
    last: float = 0.0  # +1 last answer right, -1 wrong, 0 never tried
    ability: float = 0.0  # per-concept Elo offset on top of the student's ability


@dataclass(slots=True)
class StudentState:
    ability: float = 0.0
    answers: int = 0
    correct: int = 0
    recent: float = 0.0
    last: float = 0.0
    concepts: dict[Item, ConceptState] = field(default_factory=dict)


# The online learning rate the recommender uses (MasteryOptions.online_rate there).
ONLINE_RATE = 0.003


@dataclass(frozen=True, slots=True)
class MasteryOptions:
    ability_rate: float = 1.0  # a in a/(1 + b*n)
    ability_decay: float = 0.05  # b
    concept_rate: float = 0.6
    difficulty_rate: float = 0.4  # item difficulty learning in the Elo pass of `fit`
    concept_decay: float = 0.7  # weight of the older evidence in the per-concept recent average
    total_decay: float = 0.9
    # A concept never tried starts as if its last answers were wrong: a first attempt is harder
    # than the student's level elsewhere, and a wrong first answer then changes nothing on these
    # features (an untried concept's estimate cannot rise by failing it).
    new_recent: float = -0.5
    new_last: float = -1.0
    l2: float = 1.0  # on the per-item and per-concept weights (the dense ones get l2 / 100)
    # Online learning of the weights (and the items' Elo difficulties) from every attempt `learn`
    # sees: one projected SGD step of the same logistic loss (the fit's sign bounds kept). 0 keeps
    # the weights fixed (a model fitted offline and evaluated as such).
    online_rate: float = 0.0


def _vector(state: StudentState, c: ConceptState, easiness: float) -> list[float]:
    """The model's features of one student on one concept; easiness is minus the item's
    difficulty (0: an item of average difficulty, what mastery() asks about)."""
    return [
        1.0,
        state.ability,
        c.ability,
        easiness,
        math.log1p(c.correct),
        math.log1p(c.wrong),
        c.recent,
        c.last,
        math.log1p(state.correct),
        math.log1p(state.answers - state.correct),
        state.recent,
        state.last,
    ]


class MasteryModel:
    """Elo + PFA features with fitted logistic weights; per-student state updated per attempt."""

    name = "mastery"

    def __init__(
        self, concept_of: Mapping[Item, Item] | None = None, options: MasteryOptions | None = None
    ) -> None:
        self.options = options or MasteryOptions()
        self.concept_of: Mapping[Item, Item] = concept_of or {}
        self.students: dict[Student, StudentState] = {}
        self.difficulty: dict[Item, float] = {}
        # Weights: dense (FEATURES), per item intercept, per concept slopes of right/wrong counts.
        # Unfitted, the model is the Elo its state keeps: sigmoid(ability + concept offset - difficulty).
        self.dense = np.zeros(_DENSE)
        for name in ("ability", "concept_ability", "item_easiness"):
            self.dense[FEATURES.index(name)] = 1.0
        self.item_bias: dict[Item, float] = {}
        self.concept_correct: dict[Item, float] = {}
        self.concept_wrong: dict[Item, float] = {}
        # Mean item term (intercept + easiness) of each concept's items: an average item of it.
        self.concept_bias: dict[Item, float] = {}

    def _new_concept(self) -> ConceptState:
        return ConceptState(recent=self.options.new_recent, last=self.options.new_last)

    def concept(self, item: Item) -> Item:
        return self.concept_of.get(item, item)

    # ---- features -----------------------------------------------------------------------------

    def _features(self, state: StudentState, item: Item) -> tuple[list[float], ConceptState | None]:
        concept_state = state.concepts.get(self.concept(item))
        c = concept_state or self._new_concept()
        return _vector(state, c, -self.difficulty.get(item, 0.0)), concept_state

    def _logit(self, x: Sequence[float], item: Item) -> float:
        concept = self.concept(item)
        return (
            float(np.dot(self.dense, x))
            + self.item_bias.get(item, 0.0)
            + self.concept_correct.get(concept, 0.0) * x[4]
            + self.concept_wrong.get(concept, 0.0) * x[5]
        )

    def predict(self, student: Student, item: Item) -> float:
        state = self.students.get(student) or StudentState()
        x, _ = self._features(state, item)
        return sigmoid(self._logit(x, item))

    def mastery(self, student: Student, concept: Item) -> float:
        """Predicted success on an item of average difficulty of the concept."""
        state = self.students.get(student) or StudentState()
        c = state.concepts.get(concept) or self._new_concept()
        x = _vector(state, c, 0.0)
        logit = float(np.dot(self.dense, x)) + self.concept_bias.get(concept, 0.0)
        logit += self.concept_correct.get(concept, 0.0) * x[4] + self.concept_wrong.get(concept, 0.0) * x[5]
        return sigmoid(logit)

    # ---- the online update --------------------------------------------------------------------

    def _update(self, state: StudentState, item: Item, correct: bool, learn_difficulty: bool) -> None:
        o = self.options
        y = float(correct)
        concept = self.concept(item)
        c = state.concepts.get(concept)
        if c is None:
            c = state.concepts[concept] = self._new_concept()
        difficulty = self.difficulty.get(item, 0.0)
        surprise = y - sigmoid(state.ability + c.ability - difficulty)
        state.ability += o.ability_rate / (1.0 + o.ability_decay * state.answers) * surprise
        c.ability += o.concept_rate / (1.0 + o.ability_decay * (c.correct + c.wrong)) * surprise
        if learn_difficulty:
            if "_seen" not in self.__dict__:  # online learning keeps it; pickles from before lack it
                self._seen = {}
            seen = self._seen.get(item, 0)
            self.difficulty[item] = difficulty - o.difficulty_rate / (1.0 + o.ability_decay * seen) * surprise
            self._seen[item] = seen + 1
        signed = y - 0.5
        c.recent = o.concept_decay * c.recent + (1 - o.concept_decay) * signed
        state.recent = o.total_decay * state.recent + (1 - o.total_decay) * signed
        c.last = state.last = 1.0 if correct else -1.0
        if correct:
            c.correct += 1
            state.correct += 1
        else:
            c.wrong += 1
        state.answers += 1

    def learn(self, student: Student, item: Item, correct: bool) -> float:
        """Updates the student's state on one answer (and, learning online, the weights); returns
        the prediction made before it."""
        state = self.students.get(student)
        if state is None:
            state = self.students[student] = StudentState()
        x, _ = self._features(state, item)
        p = sigmoid(self._logit(x, item))
        rate = self.options.online_rate
        if rate > 0:
            self._sgd_step(x, item, float(correct) - p, rate)
        self._update(state, item, correct, learn_difficulty=rate > 0)
        return p

    def _sgd_step(self, x: Sequence[float], item: Item, residual: float, rate: float) -> None:
        """One projected gradient step of the log loss on this attempt. The dense weights get a
        new array (never written in place: snapshots share the old one); the per-item and
        per-concept dictionaries are updated in place (a snapshot copies them)."""
        step = rate * residual
        self.dense = np.clip(self.dense + step * np.asarray(x), _LOW, _HIGH)
        concept = self.concept(item)
        self.item_bias[item] = self.item_bias.get(item, 0.0) + step
        self.concept_correct[concept] = max(0.0, self.concept_correct.get(concept, 0.0) + step * x[4])
        self.concept_wrong[concept] = min(0.0, self.concept_wrong.get(concept, 0.0) + step * x[5])
        # An average item of the concept: a running mean of its attempted items' terms.
        term = self.item_bias[item] + float(self.dense[3]) * x[3]  # x[3]: the item's easiness
        bias = self.concept_bias.get(concept)
        self.concept_bias[concept] = term if bias is None else 0.99 * bias + 0.01 * term

    def forget(self, student: Student) -> None:
        self.students.pop(student, None)

    # ---- fitting on training students ---------------------------------------------------------

    _seen: dict[Item, int]

    def fit(self, sequences: Iterable[Sequence[Attempt]], max_iterations: int = 200) -> MasteryModel:
        """Learns item difficulties (an Elo pass) then the logistic weights on these students.

        Each sequence is one student's attempts in time order. The per-student state made here
        is discarded: the fitted model starts every student fresh.
        """
        sequences = [list(s) for s in sequences]
        self._seen = {}
        for sequence in sequences:  # pass 1: item difficulties
            state = StudentState()
            for item, correct in sequence:
                self._update(state, item, correct, learn_difficulty=True)
        items = sorted({item for s in sequences for item, _ in s}, key=str)
        concepts = sorted({self.concept(item) for item in items}, key=str)
        item_index = {item: i for i, item in enumerate(items)}
        concept_index = {concept: i for i, concept in enumerate(concepts)}
        rows: list[list[float]] = []
        item_column: list[int] = []
        concept_column: list[int] = []
        outcomes: list[float] = []
        for sequence in sequences:  # pass 2: the features each attempt was predicted from
            state = StudentState()
            for item, correct in sequence:
                x, _ = self._features(state, item)
                rows.append(x)
                item_column.append(item_index[item])
                concept_column.append(concept_index[self.concept(item)])
                outcomes.append(float(correct))
                self._update(state, item, correct, learn_difficulty=False)
        weights = _fit_logistic(
            np.asarray(rows),
            np.asarray(item_column),
            np.asarray(concept_column),
            np.asarray(outcomes),
            len(items),
            len(concepts),
            self.options.l2,
            max_iterations,
        )
        self.dense = weights[:_DENSE]
        start = _DENSE
        self.item_bias = dict(zip(items, weights[start : start + len(items)].tolist(), strict=True))
        start += len(items)
        slopes = weights[start:].reshape(2, len(concepts))
        self.concept_correct = dict(zip(concepts, slopes[0].tolist(), strict=True))
        self.concept_wrong = dict(zip(concepts, slopes[1].tolist(), strict=True))
        easiness = float(self.dense[FEATURES.index("item_easiness")])
        totals: dict[Item, list[float]] = {}
        for item in items:
            term = self.item_bias[item] - easiness * self.difficulty.get(item, 0.0)
            totals.setdefault(self.concept(item), []).append(term)
        self.concept_bias = {concept: float(np.mean(terms)) for concept, terms in totals.items()}
        # _seen stays: learning online goes on from these counts.
        return self


def _fit_logistic(
    dense: npt.NDArray[np.float64],
    item: npt.NDArray[np.int64],
    concept: npt.NDArray[np.int64],
    y: npt.NDArray[np.float64],
    n_items: int,
    n_concepts: int,
    l2: float,
    max_iterations: int,
) -> npt.NDArray[np.float64]:
    """L2-regularised logistic regression over [dense | one-hot item | concept x (right, wrong) counts]."""
    n = len(y)
    d = dense.shape[1]
    log_correct = dense[:, FEATURES.index("concept_correct")]
    log_wrong = dense[:, FEATURES.index("concept_wrong")]
    penalty = np.concatenate([np.full(d, l2 / 100), np.full(n_items + 2 * n_concepts, l2)])
    penalty[0] = 0.0  # the intercept

    def loss(w: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
        wd = w[:d]
        wi = w[d : d + n_items]
        wc = w[d + n_items : d + n_items + n_concepts]
        ww = w[d + n_items + n_concepts :]
        z = dense @ wd + wi[item] + wc[concept] * log_correct + ww[concept] * log_wrong
        # log(1 + e^z) - y z, stably
        value = float(np.sum(np.logaddexp(0.0, z) - y * z)) / n + 0.5 * float(np.sum(penalty * w * w)) / n
        r = (1.0 / (1.0 + np.exp(-z)) - y) / n
        grad = np.concatenate(
            [
                dense.T @ r,
                np.bincount(item, weights=r, minlength=n_items),
                np.bincount(concept, weights=r * log_correct, minlength=n_concepts),
                np.bincount(concept, weights=r * log_wrong, minlength=n_concepts),
            ]
        )
        return value, grad + penalty * w / n

    start = np.zeros(d + n_items + 2 * n_concepts)
    start[FEATURES.index("ability")] = 1.0
    start[FEATURES.index("item_easiness")] = 1.0
    bounds: list[tuple[float | None, float | None]] = [(None, None)] * len(start)
    for name in _NON_NEGATIVE:
        bounds[FEATURES.index(name)] = (0.0, None)
    for name in _NON_POSITIVE:
        bounds[FEATURES.index(name)] = (None, 0.0)
    # The per-concept slopes of right / wrong counts keep the same signs as the shared ones.
    concept_start = d + n_items
    bounds[concept_start : concept_start + n_concepts] = [(0.0, None)] * n_concepts
    bounds[concept_start + n_concepts :] = [(None, 0.0)] * n_concepts
    result = minimize(
        loss, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iterations}
    )
    return np.asarray(result.x, dtype=np.float64)


# ---- "practise next": mastery shapes the ranking model's best candidates, with reasons ----------


# The defaults of PractiseWeights (see there).
READINESS_WEIGHT = 0.5
BAND_WEIGHT = 0.25
NEXT_STEP_WEIGHT = 16.0
PRACTISE_EXTRA = 40


@dataclass(frozen=True, slots=True)
class PractiseWeights:
    """How mastery shapes the ranking's head (DECISIONS D53): each of the ranking's first
    candidates (its top k + `extra`) is keyed by its ranking score standardised over that head,
    plus `readiness` x the share of its prerequisites mastered, plus `next_step` x how strongly it
    follows the concept the student practised last (a prerequisite of it: 0..1), plus `band` x
    (predicted success in the target band). The defaults are the values tuned on a validation
    split of ASSIST2015's training students by `python -m snaplearn_offline.knowledge_tracing`
    (its report prints them)."""

    readiness: float = READINESS_WEIGHT
    band: float = BAND_WEIGHT
    extra: int = PRACTISE_EXTRA
    next_step: float = NEXT_STEP_WEIGHT

    def __post_init__(self) -> None:
        finite = all(math.isfinite(w) for w in (self.readiness, self.band, self.next_step))
        if not finite or self.extra < 0:
            raise ValueError("practise weights must be finite and extra >= 0")


@dataclass(frozen=True, slots=True)
class Suggestion:
    item: Item
    success: float  # predicted success of this student on it
    ready: bool  # every prerequisite mastered
    in_band: bool  # success in the target band
    reason: str
    readiness: float = 1.0  # share of its prerequisites mastered (1 without any)
    next_step: float = 0.0  # how strongly it follows what the student practised last (0..1)


def readiness(required: Sequence[Item], level: Callable[[Item], float], mastered: float) -> float:
    """The share of `required` whose mastery level is at least `mastered` (1.0 when none)."""
    if not required:
        return 1.0
    return sum(level(r) >= mastered for r in required) / len(required)


def head_keys(
    scores: npt.ArrayLike,
    ready: npt.ArrayLike,
    in_band: npt.ArrayLike,
    weights: PractiseWeights,
    valid: npt.ArrayLike | None = None,
    next_step: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float64]:
    """The order keys (higher first) of a ranking's head, over the last axis (vectorised over any
    leading ones: the evaluation keys many students at once with the same code). Entries not
    `valid` get -inf."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s) if valid is None else np.asarray(valid, dtype=bool) & np.isfinite(s)
    count = np.maximum(ok.sum(axis=-1, keepdims=True), 1)
    filled = np.where(ok, s, 0.0)
    mean = filled.sum(axis=-1, keepdims=True) / count
    spread = np.sqrt((np.where(ok, s - mean, 0.0) ** 2).sum(axis=-1, keepdims=True) / count)
    z = (filled - mean) / np.where(spread > 0, spread, 1.0)
    key = z + weights.readiness * np.asarray(ready, dtype=np.float64)
    key = key + weights.band * np.asarray(in_band, dtype=np.float64)
    if next_step is not None:
        key = key + weights.next_step * np.asarray(next_step, dtype=np.float64)
    return np.where(ok, key, -np.inf)


def practise_next(
    ranked: Sequence[Item],
    success: Callable[[Item], float],
    mastery: Callable[[Item], float],
    prerequisites: Callable[[Item], Sequence[Item]],
    band: tuple[float, float] = (0.55, 0.85),
    mastered: float = 0.6,
    window: int | None = None,
    title: Callable[[Item], str] = str,
    scores: Sequence[float] | None = None,
    weights: PractiseWeights | None = None,
    next_step: Callable[[Item], float] | None = None,
) -> list[Suggestion]:
    """The first `window` (default all) of `ranked` (the ranking model's order, best first, with
    its `scores`; without them, minus the position), reordered by `head_keys`: the ranking's
    score blended with readiness (the share of prerequisites mastered), the next step (how
    strongly the item follows what the student practised last; none without `next_step`) and
    the success band.
    Ties keep the ranking's order; the rest follows unchanged.

    Shaping only the head keeps the ranking model in charge: mastery reorders its best
    candidates, it does not promote items the ranking thinks unlikely.
    """
    low, high = band
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"band must satisfy 0 <= low <= high <= 1, got {band}")
    weights = weights or PractiseWeights()
    levels: dict[Item, float] = {}

    def level(item: Item) -> float:
        if item not in levels:
            levels[item] = mastery(item)
        return levels[item]

    def suggest(item: Item) -> Suggestion:
        p = success(item)
        required = list(prerequisites(item))
        missing = [r for r in required if level(r) < mastered]
        share = readiness(required, level, mastered)
        ready, in_band = not missing, low <= p <= high
        if missing:
            reason = f"first master {_names(missing, title)}"
        elif in_band and required:
            reason = f"you have mastered {_names(required, title)}; this is the next step"
        elif in_band:
            reason = "a good next challenge for you"
        elif p > high:
            reason = "you will probably find this easy: good for review"
        else:
            reason = "a stretch for now: try it once you have practised more"
        step = next_step(item) if next_step is not None else 0.0
        return Suggestion(item, p, ready, in_band, reason, share, step)

    size = len(ranked) if window is None else max(0, window)
    head = [suggest(item) for item in ranked[:size]]
    if head:
        given = scores[: len(head)] if scores is not None else [-float(i) for i in range(len(head))]
        keys = head_keys(
            given,
            [s.readiness for s in head],
            [s.in_band for s in head],
            weights,
            next_step=[s.next_step for s in head],
        )
        head = [head[i] for i in np.argsort(-keys, kind="stable").tolist()]
    return [*head, *(suggest(item) for item in ranked[size:])]


def _names(items: Sequence[Item], title: Callable[[Item], str]) -> str:
    names = [title(item) for item in items]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
