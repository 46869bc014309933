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
  - practise-next: the same LightFM ranking with its head shaped by mastery: among its best
    candidates, concepts whose prerequisites the student has mastered come first, and within
    each group those whose predicted success is in the target band (practise_next).
    Prerequisites come from the training students' order: A is a prerequisite of B when most
    students who start B have started A before (derive_prerequisites).

    python -m snaplearn_offline.knowledge_tracing --train DIR/assist2015_train.csv \\
        --test DIR/assist2015_test.csv --markdown docs/benchmarks/knowledge_tracing.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.stats import rankdata

from snaplearn_offline.datasets import Sequence3, load_attempts, load_concept_map
from snaplearn_recommender.features import HybridLightFM, Vocabulary, feature_matrix
from snaplearn_recommender.mastery import Elo, MasteryModel, MasteryOptions
from snaplearn_recommender.mastery import practise_next as shape


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
    window: int = 0  # how many of the ranking's best are regrouped by mastery; 0 = k + 2
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


Policy = Callable[[str, Sequence[str]], list[str]]


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    hit: float
    recall: float
    events: int


def practise_next(
    ranked: Sequence[str],
    mastery: Callable[[str], float],
    prerequisites: Mapping[str, frozenset[str]],
    band: tuple[float, float],
    mastered: float,
    window: int,
) -> list[str]:
    """The online policy (mastery.practise_next) at concept level: success = mastery."""
    shaped = shape(
        ranked,
        mastery,
        mastery,
        lambda concept: sorted(prerequisites.get(concept, ())),
        band,
        mastered,
        window,
    )
    return [suggestion.item for suggestion in shaped]


def next_concept_metrics(
    train: Sequence[Sequence3],
    test: Sequence[Sequence3],
    mastery_model: MasteryModel,
    concept_of: Mapping[str, str],
    options: PolicyOptions,
    k: int = 10,
) -> list[PolicyResult]:
    """hit@k / recall@k of popularity, LightFM and practise-next over the test students' new concepts."""
    orders = [concept_order(attempts, concept_of) for attempts in train]
    popularity = Counter(c for order in orders for c in order)
    concepts = sorted(popularity, key=lambda c: (-popularity[c], c))
    for attempts in test:  # concepts only test students practise still rank (last)
        for concept in concept_order(attempts, concept_of):
            if concept not in popularity:
                popularity[concept] = 0
                concepts.append(concept)
    prerequisites = derive_prerequisites(orders, options.prerequisite_share)
    ranker = LightFMRanker(concepts, orders, options)
    names = ("popularity", "lightfm", "practise-next")
    hits = dict.fromkeys(names, 0.0)
    recalls = dict.fromkeys(names, 0.0)
    events = 0
    for index, attempts in enumerate(test):
        student = ("next", index)
        order = concept_order(attempts, concept_of)
        position = {c: i for i, c in enumerate(order)}
        practised: list[str] = []
        done: set[str] = set()
        for item, correct in attempts:
            concept = concept_of.get(item, item)
            if concept not in done and practised:
                events += 1
                future = set(order[position[concept] :])
                wanted = min(k, len(future))
                open_concepts = [c for c in concepts if c not in done]
                by_lightfm = ranker.scores(practised)
                lightfm = sorted(open_concepts, key=lambda c: -by_lightfm[ranker.column[c]])
                shaped = practise_next(
                    lightfm,
                    partial(mastery_model.mastery, student),
                    prerequisites,
                    options.band,
                    options.mastered,
                    options.window or k + 2,
                )
                for name, ranked in zip(names, (open_concepts, lightfm, shaped), strict=True):
                    top = ranked[:k]
                    hits[name] += concept in top
                    recalls[name] += len(future.intersection(top)) / wanted
            if concept not in done:
                done.add(concept)
                practised.append(concept)
            mastery_model.learn(student, item, correct)
        mastery_model.forget(student)
    return [PolicyResult(n, hits[n] / max(events, 1), recalls[n] / max(events, 1), events) for n in names]


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
    policies = next_concept_metrics(train, test, mastery, concept_of, options, k)
    return Report(
        name,
        len(train),
        len(test),
        attempts,
        {"elo": elo_auc, "mastery": mastery_auc},
        {"elo": elo_seconds, "mastery": mastery_seconds},
        policies,
        k,
    )


def markdown(reports: Sequence[Report]) -> str:
    lines = [
        "| data | train / test students | test attempts | AUC plain Elo | AUC mastery (ours) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.data} | {r.train_students} / {r.test_students} | {r.test_attempts} "
            f"| {r.auc['elo']:.4f} | {r.auc['mastery']:.4f} |"
        )
    lines += ["", "| data | policy | new-concept events | hit@k | recall@k |", "|---|---|---:|---:|---:|"]
    for r in reports:
        for p in r.policies:
            lines.append(f"| {r.data} | {p.policy} | {p.events} | {p.hit:.4f} | {p.recall:.4f} |")
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
    parser.add_argument("--mastered", type=float, default=0.6)
    parser.add_argument("--window", type=int, default=0, help="ranking head shaped by mastery (0: k+2)")
    parser.add_argument("--k", type=int, default=10)
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
            band=tuple(args.band), mastered=args.mastered, window=args.window, seed=args.seed
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
