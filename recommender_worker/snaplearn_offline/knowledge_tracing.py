"""Knowledge tracing on real learners: `python -m snaplearn_offline.knowledge_tracing --help`.

Reads the three-line format (datasets.load_attempts), fits the mastery models on the training
students and replays each test student in time order (prequential: every attempt is predicted,
then learned). Reports

- correctness AUC of each model's prediction over all test attempts (plain Elo and ours);
- "practise next": at every attempt that starts a concept new to the student (after their first
  attempt), each policy ranks the concepts the student has not practised yet; hit@k = the concept
  actually started next is in the top k; recall@k = |top k and the concepts the student starts
  later| / min(k, their number). Means over those events. Policies:
  - popularity: concepts by how many training students practised them;
  - lightfm: the recommender's HybridLightFM trained once on training students, a row per
    (student, point in time) whose user features are the concepts practised so far and whose
    positives are the concepts started next;
  - practise-next: the same LightFM ranking with its head reordered by the recommender's own
    keys (mastery.head_keys, DECISIONS D53): the LightFM score blended with readiness (the share
    of the concept's prerequisites the student has mastered), the next step (how often the
    training students started it right after the concept this student practised last: the
    direct prerequisite, weighted) and the success band. Prerequisites come from the training
    students' order: A is a prerequisite of B when most students who start B have started A
    before (derive_prerequisites). The weights, the head's size, the mastery threshold and the
    prerequisite share are tuned on a validation split of the training students (a mastery
    model, LightFM and prerequisites made on the rest): of the settings that beat LightFM there
    on both hit@k and recall@k by at least --min-margin, the best hit@k + recall@k (tune); the
    test students are measured once, with everything made on all training students. Also
    reported: the recommender's defaults and the D44 regrouping (ready first, then in band).

    python -m snaplearn_offline.knowledge_tracing --train DIR/assist2015_train.csv \\
        --test DIR/assist2015_test.csv --markdown docs/benchmarks/knowledge_tracing.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.stats import rankdata

from snaplearn_offline.datasets import Sequence3, load_attempts, load_concept_map
from snaplearn_recommender.features import HybridLightFM, Vocabulary, feature_matrix
from snaplearn_recommender.mastery import (
    ONLINE_RATE,
    Elo,
    MasteryModel,
    MasteryOptions,
    PractiseWeights,
    head_keys,
)


class Tracer(Protocol):
    name: str

    def learn(self, student: Hashable, item: str, correct: bool) -> float: ...


def roc_auc(outcomes: Sequence[bool] | npt.NDArray[np.bool_], predictions: Sequence[float]) -> float:
    """P(a right answer was predicted above a wrong one), ties 1/2 (Mann-Whitney)."""
    y = np.asarray(outcomes, dtype=bool)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both right and wrong answers")
    ranks = rankdata(np.asarray(predictions, dtype=np.float64))
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def prequential(model: Tracer, students: Sequence[Sequence3]) -> tuple[float, int]:
    """(AUC, attempts) of predict-then-learn over each student's attempts in order."""
    outcomes: list[bool] = []
    predictions: list[float] = []
    for index, attempts in enumerate(students):
        for item, correct in attempts:
            predictions.append(model.learn(("test", index), item, correct))
            outcomes.append(correct)
    return roc_auc(outcomes, predictions), len(outcomes)


def fit_elo(train: Sequence[Sequence3], learning_rate: float) -> Elo:
    """Plain Elo replayed over the training students (its difficulties carry over to test)."""
    elo = Elo(learning_rate)
    for index, attempts in enumerate(train):
        for item, correct in attempts:
            elo.learn(("train", index), item, correct)
    return elo


# ---- practise next -----------------------------------------------------------------------------


def concept_order(attempts: Sequence3, concept_of: Mapping[str, str]) -> list[str]:
    """The concepts of a student in the order first practised."""
    seen: dict[str, None] = {}
    for item, _ in attempts:
        seen.setdefault(concept_of.get(item, item), None)
    return list(seen)


def derive_prerequisites(
    orders: Sequence[Sequence[str]], min_share: float = 0.5, min_students: int = 10
) -> dict[str, frozenset[str]]:
    """B -> {A: at least min_share of the (>= min_students) students who start B started A before}."""
    starts: Counter[str] = Counter()
    before: Counter[tuple[str, str]] = Counter()
    for order in orders:
        starts.update(order)
        for position, later in enumerate(order):
            for earlier in order[:position]:
                before[(earlier, later)] += 1
    prerequisites: dict[str, set[str]] = {}
    for (earlier, later), count in before.items():
        if starts[later] >= min_students and count >= min_share * starts[later]:
            prerequisites.setdefault(later, set()).add(earlier)
    return {concept: frozenset(required) for concept, required in prerequisites.items()}


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    band: tuple[float, float] = (0.55, 0.85)
    mastered: float = 0.6  # mastery at or above this counts as mastered (prerequisites)
    prerequisite_share: float = 0.5
    # What the validation split of the training students tunes (see shaping_grid).
    validation_share: float = 0.2
    shares: tuple[float, ...] = (0.3, 0.5, 0.7)
    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7)
    extras: tuple[int, ...] = (10, 20, 40, 90)
    readiness_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    band_weights: tuple[float, ...] = (-0.25, 0.0, 0.25)
    next_step_weights: tuple[float, ...] = (0.0, 4.0, 8.0, 16.0, 32.0)
    # The tuned shaping must beat LightFM on validation by at least this on hit@k AND recall@k
    # (see tune): a margin smaller than this is within what another split of the same students
    # could take back, and the target is above LightFM on both metrics on the test students.
    min_margin: float = 0.005
    components: int = 16
    epochs: int = 10
    learning_rate: float = 0.05
    prefixes_per_student: int = 20
    seed: int = 0


class LightFMRanker:
    """HybridLightFM over concepts; a student is the bag of concepts practised so far."""

    def __init__(self, concepts: Sequence[str], orders: Sequence[Sequence[str]], options: PolicyOptions):
        self.concepts = list(concepts)
        self.column = {c: i for i, c in enumerate(self.concepts)}
        rng = np.random.default_rng(options.seed)
        rows: list[list[tuple[str, float]]] = []
        positives: list[tuple[int, int]] = []
        for order in orders:
            points = np.arange(1, len(order))
            if len(points) > options.prefixes_per_student:
                points = np.sort(rng.choice(points, options.prefixes_per_student, replace=False))
            for point in points.tolist():
                row = len(rows)
                rows.append(self._bag(order[:point]))
                positives.extend((row, self.column[c]) for c in order[point : point + 3])
        self.vocabulary = Vocabulary(f"did:{c}" for c in self.concepts)
        user_features = feature_matrix(rows, self.vocabulary)
        item_features = sp.identity(len(self.concepts), dtype=np.float32, format="csr")
        r, c = zip(*positives, strict=True) if positives else ((), ())
        interactions = sp.coo_matrix(
            (np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(rows), len(self.concepts))
        )
        interactions.sum_duplicates()
        interactions.data[:] = 1.0
        self.model = HybridLightFM(
            no_components=options.components, learning_rate=options.learning_rate, seed=options.seed
        )
        if rows:
            self.model.fit_partial(interactions, user_features, item_features, epochs=options.epochs)
        biases, vectors = self.model.representations("item", item_features)
        self.item_biases, self.item_vectors = biases, vectors
        self.user_embeddings = self.model.lightfm.user_embeddings[: len(self.vocabulary)]

    @staticmethod
    def _bag(concepts: Sequence[str]) -> list[tuple[str, float]]:
        return [(f"did:{c}", 1.0 / len(concepts)) for c in concepts]

    def scores(self, practised: Sequence[str]) -> npt.NDArray[np.float32]:
        columns = [self.column[c] for c in practised if c in self.column]
        user = self.user_embeddings[columns].mean(axis=0) if columns else np.zeros(self.model.no_components)
        return np.asarray(self.item_biases + self.item_vectors @ user, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    hit: float
    recall: float
    events: int


@dataclass(frozen=True, slots=True)
class Shaping:
    """One way practise-next shapes the ranking (what the validation split tunes)."""

    weights: PractiseWeights
    mastered: float  # mastery at or above this counts as mastered
    prerequisite_share: float  # derive_prerequisites' min_share


@dataclass
class Events:
    """Every new-concept event of some students, as arrays over the concepts (columns, in
    popularity order): what each policy needs to rank, and what the student did."""

    concepts: list[str]
    lightfm: npt.NDArray[np.float32]  # (events, concepts) LightFM scores
    success: npt.NDArray[np.float32]  # predicted success (mastery) on each concept
    done: npt.NDArray[np.bool_]  # concepts practised before the event
    target: npt.NDArray[np.int64]  # the concept started
    future: npt.NDArray[np.bool_]  # the concepts started from then on
    last: npt.NDArray[np.int64]  # the concept of the student's previous attempt
    prerequisites: dict[float, npt.NDArray[np.float32]]  # share -> (concept, prerequisite) 0/1
    follows: npt.NDArray[np.float32]  # (a, b): share of the starts right after a that were b


def prerequisite_matrix(
    prerequisites: Mapping[str, frozenset[str]], column: Mapping[str, int]
) -> npt.NDArray[np.float32]:
    matrix = np.zeros((len(column), len(column)), dtype=np.float32)
    for concept, required in prerequisites.items():
        for r in required:
            if concept in column and r in column:
                matrix[column[concept], column[r]] = 1.0
    return matrix


def follow_matrix(
    students: Sequence[Sequence3], concept_of: Mapping[str, str], column: Mapping[str, int]
) -> npt.NDArray[np.float32]:
    """The direct prerequisite relation, weighted: (a, b) = of the new concepts these students
    started right after an attempt on a, the share that were b."""
    counts = np.zeros((len(column), len(column)), dtype=np.float64)
    for attempts in students:
        started: set[str] = set()
        previous: str | None = None
        for item, _ in attempts:
            concept = concept_of.get(item, item)
            if concept not in started:
                started.add(concept)
                if previous is not None:
                    counts[column[previous], column[concept]] += 1.0
            previous = concept
    totals = counts.sum(axis=1, keepdims=True)
    return (counts / np.maximum(totals, 1.0)).astype(np.float32)


def collect_events(
    train: Sequence[Sequence3],
    students: Sequence[Sequence3],
    mastery_model: MasteryModel,
    concept_of: Mapping[str, str],
    options: PolicyOptions,
    shares: Sequence[float],
) -> Events:
    """Trains popularity, LightFM and the prerequisites on `train`; replays `students` through the
    (fitted) mastery model, recording each new-concept event (after a student's first)."""
    orders = [concept_order(attempts, concept_of) for attempts in train]
    popularity = Counter(c for order in orders for c in order)
    concepts = sorted(popularity, key=lambda c: (-popularity[c], c))
    for attempts in students:  # concepts only these students practise still rank (last)
        for concept in concept_order(attempts, concept_of):
            if concept not in popularity:
                popularity[concept] = 0
                concepts.append(concept)
    column = {c: i for i, c in enumerate(concepts)}
    ranker = LightFMRanker(concepts, orders, options)
    lightfm, success, done, target, future, last = [], [], [], [], [], []
    for index, attempts in enumerate(students):
        student = ("next", index)
        order = concept_order(attempts, concept_of)
        position = {c: i for i, c in enumerate(order)}
        practised: list[str] = []
        mask = np.zeros(len(concepts), dtype=bool)
        previous = -1
        for item, correct in attempts:
            concept = concept_of.get(item, item)
            if not mask[column[concept]]:
                if practised:
                    lightfm.append(ranker.scores(practised))
                    success.append([mastery_model.mastery(student, c) for c in concepts])
                    done.append(mask.copy())
                    target.append(column[concept])
                    later = np.zeros(len(concepts), dtype=bool)
                    later[[column[c] for c in order[position[concept] :]]] = True
                    future.append(later)
                    last.append(previous)
                mask[column[concept]] = True
                practised.append(concept)
            mastery_model.learn(student, item, correct)
            previous = column[concept]
        mastery_model.forget(student)
    c = len(concepts)
    return Events(
        concepts,
        np.asarray(lightfm, dtype=np.float32).reshape(-1, c),
        np.asarray(success, dtype=np.float32).reshape(-1, c),
        np.asarray(done, dtype=bool).reshape(-1, c),
        np.asarray(target, dtype=np.int64),
        np.asarray(future, dtype=bool).reshape(-1, c),
        np.asarray(last, dtype=np.int64),
        {s: prerequisite_matrix(derive_prerequisites(orders, s), column) for s in shares},
        follow_matrix(train, concept_of, column),
    )


def _measure(events: Events, top: npt.NDArray[np.int64], k: int) -> tuple[float, float]:
    """(hit@k, recall@k) of the (events, >= k) concept columns ranked first."""
    top = top[:, :k]
    rows = np.arange(len(top))[:, None]
    hit = (top == events.target[:, None]).any(axis=1)
    wanted = np.minimum(k, events.future.sum(axis=1))
    recall = events.future[rows, top].sum(axis=1) / np.maximum(wanted, 1)
    return float(hit.mean()) if len(hit) else 0.0, float(recall.mean()) if len(hit) else 0.0


def _order(scores: npt.NDArray[np.floating], done: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Open concepts by score, best first, ties in column (popularity) order; done ones last."""
    return np.argsort(np.where(done, np.inf, -scores.astype(np.float64)), axis=1, kind="stable")


def shaped_order(
    events: Events, by_lightfm: npt.NDArray[np.int64], shaping: Shaping, band: tuple[float, float], k: int
) -> npt.NDArray[np.int64]:
    """The LightFM order with its head (top k + extra) reordered by mastery.head_keys, the online
    recommender's practise-next keys: readiness is the share of the concept's prerequisites
    mastered (attempted, and at or above the threshold); the next step how strongly the concept
    follows the one the student practised last (follow_matrix)."""
    rows = np.arange(len(by_lightfm))[:, None]
    head = by_lightfm[:, : min(k + shaping.weights.extra, by_lightfm.shape[1])]
    levels = np.where(events.done, events.success, 0.0)  # an untried concept is not mastered
    required = events.prerequisites[shaping.prerequisite_share]
    counts = required.sum(axis=1)
    mastered = (levels >= shaping.mastered).astype(np.float32)
    ready = np.where(counts > 0, (mastered @ required.T) / np.maximum(counts, 1), 1.0)
    low, high = band
    success = events.success[rows, head]
    keys = head_keys(
        events.lightfm[rows, head],
        ready[rows, head],
        (success >= low) & (success <= high),
        shaping.weights,
        valid=~events.done[rows, head],
        next_step=events.follows[events.last[:, None], head],
    )
    reordered = head[rows, np.argsort(-keys, axis=1, kind="stable")]
    return np.concatenate([reordered, by_lightfm[:, head.shape[1] :]], axis=1)


def policy_results(
    events: Events, shapings: Mapping[str, Shaping], band: tuple[float, float], k: int
) -> list[PolicyResult]:
    """hit@k / recall@k of popularity, LightFM and each named practise-next shaping."""
    n = len(events.target)
    popularity = _order(np.tile(-np.arange(len(events.concepts), dtype=np.float64), (n, 1)), events.done)
    by_lightfm = _order(events.lightfm, events.done)
    results = [
        PolicyResult("popularity", *_measure(events, popularity, k), n),
        PolicyResult("lightfm", *_measure(events, by_lightfm, k), n),
    ]
    for name, shaping in shapings.items():
        order = shaped_order(events, by_lightfm, shaping, band, k)
        results.append(PolicyResult(name, *_measure(events, order, k), n))
    return results


def tune(
    events: Events, grid: Sequence[Shaping], band: tuple[float, float], k: int, min_margin: float = 0.0
) -> tuple[Shaping, dict[str, float]]:
    """The shaping to use, judged on these (validation) events. The target is to beat LightFM on
    both hit@k and recall@k, so the candidates are the shapings that beat it on both by at least
    `min_margin`; of those, the best hit@k + recall@k wins. When none does, the one with the
    largest worst margin (min over the two metrics) wins. Ties: the first in grid order. Returns
    it and the validation numbers (its and LightFM's)."""
    by_lightfm = _order(events.lightfm, events.done)
    lightfm_hit, lightfm_recall = _measure(events, by_lightfm, k)
    best: tuple[bool, float] | None = None
    chosen, found = grid[0], {"hit": 0.0, "recall": 0.0}
    for shaping in grid:
        hit, recall = _measure(events, shaped_order(events, by_lightfm, shaping, band, k), k)
        margin = min(hit - lightfm_hit, recall - lightfm_recall)
        clear = margin >= min_margin - 1e-12
        score = (clear, hit + recall if clear else margin)
        if best is None or score[0] > best[0] or (score[0] == best[0] and score[1] > best[1] + 1e-12):
            best, chosen, found = score, shaping, {"hit": hit, "recall": recall}
    return chosen, {**found, "lightfm_hit": lightfm_hit, "lightfm_recall": lightfm_recall}


def shaping_grid(options: PolicyOptions) -> list[Shaping]:
    """The choices the validation split tunes; the first (no shaping at all) is LightFM itself."""
    grid = [Shaping(PractiseWeights(0.0, 0.0, 0, 0.0), options.mastered, options.prerequisite_share)]
    for share in options.shares:
        for mastered in options.thresholds:
            for extra in options.extras:
                for ready in options.readiness_weights:
                    for band in options.band_weights:
                        for step in options.next_step_weights:
                            weights = PractiseWeights(ready, band, extra, step)
                            grid.append(Shaping(weights, mastered, share))
    return grid


def next_concept_metrics(
    train: Sequence[Sequence3],
    test: Sequence[Sequence3],
    mastery_model: MasteryModel,
    concept_of: Mapping[str, str],
    options: PolicyOptions,
    k: int = 10,
    mastery_options: MasteryOptions | None = None,
) -> tuple[list[PolicyResult], Shaping, dict[str, float]]:
    """Tunes practise-next on a validation split of the training students (a mastery model, a
    LightFM and prerequisites made on the rest), then measures every policy once on the test
    students with models made on all training students. Returns the results, the chosen
    shaping and the validation numbers."""
    rng = np.random.default_rng(options.seed)
    held = set(rng.choice(len(train), int(len(train) * options.validation_share), replace=False).tolist())
    fit_part = [s for i, s in enumerate(train) if i not in held]
    held_out = [s for i, s in enumerate(train) if i in held]
    grid = shaping_grid(options)
    shares = sorted({g.prerequisite_share for g in grid})
    tuning_mastery = MasteryModel(concept_of, mastery_options).fit(fit_part)
    tuning = collect_events(fit_part, held_out, tuning_mastery, concept_of, options, shares)
    chosen, validation = tune(tuning, grid, options.band, k, options.min_margin)
    default = Shaping(PractiseWeights(), options.mastered, options.prerequisite_share)
    regrouping = Shaping(PractiseWeights(1000.0, 100.0, 2, 0.0), options.mastered, options.prerequisite_share)
    events = collect_events(train, test, mastery_model, concept_of, options, shares)
    shapings = {
        "practise-next (tuned)": chosen,
        "practise-next (defaults)": default,
        "regrouping (D44)": regrouping,
    }
    return policy_results(events, shapings, options.band, k), chosen, validation


# ---- the command -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    data: str
    train_students: int
    test_students: int
    test_attempts: int
    auc: dict[str, float]
    fit_seconds: dict[str, float]
    policies: list[PolicyResult]
    k: int
    chosen: Shaping
    validation: dict[str, float]  # hit / recall of the chosen shaping and of LightFM


def evaluate(
    name: str,
    train: Sequence[Sequence3],
    test: Sequence[Sequence3],
    concept_of: Mapping[str, str] | None = None,
    elo_rate: float = 0.4,
    options: PolicyOptions | None = None,
    mastery_options: MasteryOptions | None = None,
    k: int = 10,
) -> Report:
    options = options or PolicyOptions()
    concept_of = concept_of or {}
    started = time.perf_counter()
    elo = fit_elo(train, elo_rate)
    elo_seconds = time.perf_counter() - started
    started = time.perf_counter()
    mastery = MasteryModel(concept_of, mastery_options).fit(train)
    mastery_seconds = time.perf_counter() - started
    elo_auc, attempts = prequential(elo, test)
    mastery_auc, _ = prequential(mastery, test)
    for index in range(len(test)):
        mastery.forget(("test", index))
    online_auc = prequential_online(train, test, concept_of, mastery_options)
    policies, chosen, validation = next_concept_metrics(
        train, test, mastery, concept_of, options, k, mastery_options
    )
    return Report(
        name,
        len(train),
        len(test),
        attempts,
        {"elo": elo_auc, "mastery": mastery_auc, "online": online_auc},
        {"elo": elo_seconds, "mastery": mastery_seconds},
        policies,
        k,
        chosen,
        validation,
    )


def prequential_online(
    train: Sequence[Sequence3],
    test: Sequence[Sequence3],
    concept_of: Mapping[str, str],
    mastery_options: MasteryOptions | None = None,
) -> float:
    """The recommender's way: no offline fit, the weights learned online (MasteryOptions.online_rate,
    the recommender's default) from every attempt, the training students' first, then the test
    students' (predicted before learned); AUC over the test attempts."""
    base = mastery_options or MasteryOptions()
    options = replace(base, online_rate=base.online_rate or ONLINE_RATE)
    model = MasteryModel(concept_of, options)
    for index, attempts in enumerate(train):
        for item, correct in attempts:
            model.learn(("train", index), item, correct)
    return prequential(model, test)[0]


def markdown(reports: Sequence[Report]) -> str:
    lines = [
        "| data | train / test students | test attempts | AUC plain Elo | AUC mastery (ours) "
        "| AUC mastery learned online |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.data} | {r.train_students} / {r.test_students} | {r.test_attempts} "
            f"| {r.auc['elo']:.4f} | {r.auc['mastery']:.4f} | {r.auc['online']:.4f} |"
        )
    lines += ["", "| data | policy | new-concept events | hit@k | recall@k |", "|---|---|---:|---:|---:|"]
    for r in reports:
        for p in r.policies:
            lines.append(f"| {r.data} | {p.policy} | {p.events} | {p.hit:.4f} | {p.recall:.4f} |")
    lines += [
        "",
        "| data | tuned: readiness, band, next-step weights, extra, mastered, share "
        "| validation hit@k / recall@k | same, LightFM |",
    ]
    lines.append("|---|---|---:|---:|")
    for r in reports:
        w, v = r.chosen.weights, r.validation
        lines.append(
            f"| {r.data} | {w.readiness:g}, {w.band:g}, {w.next_step:g}, {w.extra}, {r.chosen.mastered:g}, "
            f"{r.chosen.prerequisite_share:g} | {v['hit']:.4f} / {v['recall']:.4f} "
            f"| {v['lightfm_hit']:.4f} / {v['lightfm_recall']:.4f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m snaplearn_offline.knowledge_tracing", description=__doc__
    )
    parser.add_argument("--train", type=Path, required=True, action="append", help="three-line file")
    parser.add_argument("--test", type=Path, required=True, action="append", help="three-line file")
    parser.add_argument(
        "--concepts",
        action="append",
        default=[],
        help="exercise -> concept file for the matching --train (e.g. STATICS_qid_sid_sname); '-' = none",
    )
    parser.add_argument("--name", action="append", default=[], help="label of each data set")
    parser.add_argument("--students", type=int, default=0, help="use only the first N of each split")
    parser.add_argument("--elo-rate", type=float, default=0.4)
    parser.add_argument("--band", type=float, nargs=2, default=(0.55, 0.85), metavar=("LOW", "HIGH"))
    parser.add_argument(
        "--mastered", type=float, default=0.6, help="mastery threshold of the defaults and regrouping rows"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--min-margin",
        type=float,
        default=PolicyOptions().min_margin,
        help="the tuned setting must beat LightFM on validation by this on hit@k and on recall@k",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if len(args.train) != len(args.test):
        raise SystemExit("give one --test per --train")
    reports = []
    for index, (train_path, test_path) in enumerate(zip(args.train, args.test, strict=True)):
        for path in (train_path, test_path):
            if not path.is_file():
                raise SystemExit(f"no such file: {path}")
        concepts_arg = args.concepts[index] if index < len(args.concepts) else "-"
        concept_of = load_concept_map(concepts_arg) if concepts_arg != "-" else {}
        train, test = load_attempts(train_path), load_attempts(test_path)
        if args.students:
            train, test = train[: args.students], test[: args.students]
        name = args.name[index] if index < len(args.name) else train_path.stem
        options = PolicyOptions(
            band=tuple(args.band), mastered=args.mastered, seed=args.seed, min_margin=args.min_margin
        )
        reports.append(evaluate(name, train, test, concept_of, args.elo_rate, options, k=args.k))
        print(markdown(reports[-1:]), flush=True)
    command = "python -m snaplearn_offline.knowledge_tracing " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = markdown(reports)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"```bash\n{command}\n```\n\n{table}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "reports": [asdict(r) for r in reports]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
