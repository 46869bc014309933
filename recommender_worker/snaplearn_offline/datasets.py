"""Interaction logs and side features from files, and the train/test splits of the evaluation.

Interactions: one (user, item, weight, time) per line.
- `movielens`: MovieLens u.data / ua.base / ua.test: tab-separated `user item rating timestamp`.
- `tsv` / `csv`: `user, item[, weight[, time]]`; a first line whose weight/time is not a number,
  or whose first two cells name the user and item columns (`user,item`), is a header. Missing
  weight = 1, missing time = 0. The weight is a positive's sample weight in training (where the
  loss supports it) as well as what `--min-weight` cuts on.
Features: per id, a list of (feature name, weight).
- `movielens` users (u.user `id|age|gender|occupation|zip`): age band, gender, occupation and
  the zip code's first digit (US region), each weight 1.
- `movielens` items (u.item `id|title|date|video date|url|19 genre flags`): one feature per genre.
- `tsv` / `csv`: `id, feature[, weight]`, one line per (id, feature).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

FORMATS = ("movielens", "tsv", "csv")
# The genre columns of u.item, in order (MovieLens 100k README / u.genre).
MOVIELENS_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# MovieLens 1M's published age groups, applied to 100k's exact ages.
AGE_BANDS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))

Features = dict[str, list[tuple[str, float]]]


@dataclass(frozen=True, slots=True)
class Interactions:
    users: npt.NDArray[np.str_]
    items: npt.NDArray[np.str_]
    weights: npt.NDArray[np.float64]
    times: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, mask_or_index: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> Interactions:
        return Interactions(
            self.users[mask_or_index],
            self.items[mask_or_index],
            self.weights[mask_or_index],
            self.times[mask_or_index],
        )


def _rows(path: Path, delimiter: str) -> Iterator[list[str]]:
    with path.open(newline="", encoding="latin-1") as source:  # MovieLens files are latin-1
        for row in csv.reader(source, delimiter=delimiter):
            if row and any(cell.strip() for cell in row):
                yield [cell.strip() for cell in row]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# First cells of a header line naming the columns (compared case-insensitively).
USER_COLUMNS = frozenset({"user", "user_id", "userid", "student", "student_id"})
ITEM_COLUMNS = frozenset({"item", "item_id", "itemid", "exercise", "exercise_id"})


def _is_header(row: Sequence[str]) -> bool:
    return row[0].lower() in USER_COLUMNS and row[1].lower() in ITEM_COLUMNS


def _delimiter(file_format: str) -> str:
    if file_format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {file_format!r}")
    return "," if file_format == "csv" else "\t"


def load_interactions(path: str | Path, file_format: str = "movielens") -> Interactions:
    users: list[str] = []
    items: list[str] = []
    weights: list[float] = []
    times: list[float] = []
    for line_number, row in enumerate(_rows(Path(path), _delimiter(file_format)), start=1):
        if len(row) < 2:
            raise ValueError(f"{path}:{line_number}: expected user, item[, weight[, time]], got {row}")
        if line_number == 1 and file_format != "movielens" and _is_header(row):
            continue
        weight = _number(row[2]) if len(row) > 2 else 1.0
        time = _number(row[3]) if len(row) > 3 else 0.0
        if weight is None or time is None:
            if line_number == 1 and file_format != "movielens":
                continue  # header
            raise ValueError(f"{path}:{line_number}: weight and time must be numbers, got {row}")
        users.append(row[0])
        items.append(row[1])
        weights.append(weight)
        times.append(time)
    return Interactions(
        np.array(users, dtype=np.str_),
        np.array(items, dtype=np.str_),
        np.array(weights, dtype=np.float64),
        np.array(times, dtype=np.float64),
    )


def _age_band(age: int) -> str:
    return next((band for limit, band in AGE_BANDS if age < limit), "56+")


def load_features(path: str | Path, file_format: str, side: str) -> Features:
    """id -> [(feature, weight)] for `side` ("user" or "item"); see the module docstring."""
    path = Path(path)
    features: Features = {}
    if file_format == "movielens":
        for row in _rows(path, "|"):
            if side == "user":
                entity, age, gender, occupation, zip_code = row[:5]
                names = [f"age:{_age_band(int(age))}", f"gender:{gender}", f"occupation:{occupation}"]
                names.append(f"zip:{zip_code[:1]}" if zip_code[:1].isdigit() else "zip:other")
            elif side == "item":
                entity, flags = row[0], row[5:]
                names = [
                    f"genre:{g}" for g, flag in zip(MOVIELENS_GENRES, flags, strict=False) if flag == "1"
                ]
            else:
                raise ValueError(f"side must be user or item, got {side!r}")
            features[entity] = [(name, 1.0) for name in names]
        return features
    for line_number, row in enumerate(_rows(path, _delimiter(file_format)), start=1):
        weight = _number(row[2]) if len(row) > 2 else 1.0
        if len(row) < 2 or weight is None:
            if line_number == 1:
                continue  # header
            raise ValueError(f"{path}:{line_number}: expected id, feature[, weight], got {row}")
        features.setdefault(row[0], []).append((row[1], weight))
    return features


def random_split(data: Interactions, test_fraction: float, seed: int) -> tuple[Interactions, Interactions]:
    """A uniformly random `test_fraction` of the interactions is held out."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    test = np.random.default_rng(seed).random(len(data)) < test_fraction
    return data.subset(~test), data.subset(test)


def time_split(data: Interactions, test_fraction: float) -> tuple[Interactions, Interactions]:
    """The latest `test_fraction` of the interactions (by time, ties by file order) is held out."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    order = np.argsort(data.times, kind="stable")
    cut = len(data) - round(len(data) * test_fraction)
    return data.subset(order[:cut]), data.subset(order[cut:])


def _natural_order(ids: Iterable[str]) -> list[str]:
    """Numeric ids in numeric order (as MovieLens numbers them), else lexicographic."""
    unique = set(ids)
    if all(i.isdigit() for i in unique):
        return sorted(unique, key=int)
    return sorted(unique)


@dataclass(frozen=True, slots=True)
class IndexedSplit:
    """Train/test as binary positive matrices over one id space (rows = users, columns = items).

    train_weights: the weight of each training positive (the largest of its duplicates), on
    train's sparsity pattern; None where none were given.
    """

    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    train: sp.csr_matrix
    test: sp.csr_matrix
    train_weights: sp.csr_matrix | None = None


def index_split(
    train: Interactions,
    test: Interactions,
    min_weight: float = 0.0,
    extra_users: Sequence[str] = (),
    extra_items: Sequence[str] = (),
) -> IndexedSplit:
    """Interactions with weight >= min_weight become positives (1); ids come from both splits + extras.

    Test positives that are also training positives are kept in test (they are rare in the
    MovieLens splits and excluded metrics keep them as candidates).
    """
    user_ids = _natural_order([*train.users, *test.users, *extra_users])
    item_ids = _natural_order([*train.items, *test.items, *extra_items])
    user_row = {u: i for i, u in enumerate(user_ids)}
    item_column = {item: i for i, item in enumerate(item_ids)}
    shape = (len(user_ids), len(item_ids))

    def matrix(data: Interactions) -> sp.csr_matrix:
        kept = data.weights >= min_weight
        rows = [user_row[u] for u in data.users[kept]]
        columns = [item_column[i] for i in data.items[kept]]
        out = sp.csr_matrix((np.ones(len(rows)), (rows, columns)), shape=shape, dtype=np.float32)
        out.data[:] = 1.0  # duplicates summed: still one positive
        return out

    def weights(data: Interactions) -> sp.csr_matrix:
        largest: dict[tuple[int, int], float] = {}
        kept = data.weights >= min_weight
        for user, item, weight in zip(data.users[kept], data.items[kept], data.weights[kept], strict=True):
            cell = (user_row[user], item_column[item])
            largest[cell] = max(largest.get(cell, weight), weight)
        rows = [r for r, _ in largest]
        columns = [c for _, c in largest]
        return sp.csr_matrix((list(largest.values()), (rows, columns)), shape=shape, dtype=np.float32)

    return IndexedSplit(
        tuple(user_ids), tuple(item_ids), matrix(train), matrix(test), train_weights=weights(train)
    )


# ---- knowledge tracing: the three-line format (DKVMN's distribution of ASSIST2015 / STATICS2011) ----

Sequence3 = list[tuple[str, bool]]


def load_attempts(path: str | Path) -> list[Sequence3]:
    """One list of (exercise id, correct) per student, in time order, from the three-line format.

    Each student is three lines: the number of attempts, the exercise ids, the outcomes (1/0).
    Blank lines between students are allowed; a trailing comma on a line is ignored.
    """
    path = Path(path)
    lines = [
        (number, line.strip())
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1)
    ]
    lines = [(number, line) for number, line in lines if line]
    if len(lines) % 3:
        raise ValueError(f"{path}: expected three lines per student, got {len(lines)} non-empty lines")
    students: list[Sequence3] = []
    for start in range(0, len(lines), 3):
        (count_line, count), (ids_line, ids), (outcomes_line, outcomes) = lines[start : start + 3]
        try:
            expected = int(count.rstrip(","))
        except ValueError:
            raise ValueError(f"{path}:{count_line}: expected the number of attempts, got {count!r}") from None
        exercises = [cell.strip() for cell in ids.rstrip(",").split(",")]
        answers = [cell.strip() for cell in outcomes.rstrip(",").split(",")]
        if len(exercises) != expected or len(answers) != expected:
            raise ValueError(
                f"{path}:{count_line}: {expected} attempts announced but line {ids_line} has "
                f"{len(exercises)} ids and line {outcomes_line} has {len(answers)} outcomes"
            )
        if any(a not in ("0", "1") for a in answers):
            raise ValueError(f"{path}:{outcomes_line}: outcomes must be 0 or 1")
        students.append([(e, a == "1") for e, a in zip(exercises, answers, strict=True)])
    return students


def load_concept_map(path: str | Path) -> dict[str, str]:
    """Exercise id -> concept id from a file whose lines start `exercise<sep>concept` (tab or comma).

    STATICS_qid_sid_sname maps each question to its skill; lines that do not start with two
    fields (a header) are skipped.
    """
    mapping: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8-sig", errors="replace").splitlines():
        cells = [c.strip() for c in line.replace("\t", ",").split(",")]
        if len(cells) >= 2 and cells[0] and cells[1]:
            mapping[cells[0]] = cells[1]
    return mapping
