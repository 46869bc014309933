"""The learning catalog: the practice items the recommender can suggest.

A catalog is immutable and ordered (an item's position is its row in the model). Users
bring their own as CSV (concepts ';'-joined) or JSONL; without one the recommender uses
`generate_sample_catalog`, which is tied to the default vision labels (DEFAULT_TOPICS).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from snaplearn_common.topics import DEFAULT_TOPICS

FORMATS: tuple[str, ...] = ("video", "worksheet", "quiz", "game", "lesson")
MIN_GRADE, MAX_GRADE = 1, 8
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
CSV_COLUMNS: tuple[str, ...] = ("item_id", "title", "concepts", "grade", "format", "difficulty")
CONCEPT_SEPARATOR = ";"


class CatalogError(ValueError):
    """A catalog or label-mapping file (or item) is invalid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class LearningItem:
    item_id: str
    title: str
    concepts: tuple[str, ...]
    grade: int
    format: str
    difficulty: int

    def __post_init__(self) -> None:
        problem = _item_problem(self)
        if problem:
            raise CatalogError(f"item {self.item_id!r}: {problem}")

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "title": self.title,
            "concepts": list(self.concepts),
            "grade": self.grade,
            "format": self.format,
            "difficulty": self.difficulty,
        }


def _item_problem(item: LearningItem) -> str | None:
    if not isinstance(item.item_id, str) or not item.item_id.strip():
        return "item_id must be a non-empty string"
    if not isinstance(item.title, str) or not item.title.strip():
        return "title must be a non-empty string"
    if not isinstance(item.concepts, tuple) or not item.concepts:
        return "needs at least one concept"
    for concept in item.concepts:
        if not isinstance(concept, str) or not concept.strip() or CONCEPT_SEPARATOR in concept:
            return f"concept {concept!r} must be a non-empty string without {CONCEPT_SEPARATOR!r}"
    if len(set(item.concepts)) != len(item.concepts):
        return f"concepts {list(item.concepts)} contain duplicates"
    if isinstance(item.grade, bool) or not isinstance(item.grade, int):
        return f"grade must be an integer, got {item.grade!r}"
    if not MIN_GRADE <= item.grade <= MAX_GRADE:
        return f"grade must be {MIN_GRADE}..{MAX_GRADE}, got {item.grade}"
    if item.format not in FORMATS:
        return f"format must be one of {', '.join(FORMATS)}; got {item.format!r}"
    if isinstance(item.difficulty, bool) or not isinstance(item.difficulty, int):
        return f"difficulty must be an integer, got {item.difficulty!r}"
    if not MIN_DIFFICULTY <= item.difficulty <= MAX_DIFFICULTY:
        return f"difficulty must be {MIN_DIFFICULTY}..{MAX_DIFFICULTY}, got {item.difficulty}"
    return None


class Catalog:
    """Ordered, immutable items with lookups by id and by concept."""

    def __init__(self, items: Iterable[LearningItem]) -> None:
        self._items: tuple[LearningItem, ...] = tuple(items)
        index: dict[str, int] = {}
        by_concept: dict[str, list[int]] = {}
        for position, item in enumerate(self._items):
            if item.item_id in index:
                raise CatalogError(
                    f"duplicate item_id {item.item_id!r} (positions {index[item.item_id]}, {position})"
                )
            index[item.item_id] = position
            for concept in item.concepts:
                by_concept.setdefault(concept, []).append(position)
        self._index = MappingProxyType(index)
        self._by_concept = MappingProxyType({c: tuple(p) for c, p in by_concept.items()})

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[LearningItem]:
        return iter(self._items)

    def __getitem__(self, position: int) -> LearningItem:
        return self._items[position]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __reduce__(self) -> tuple[type[Catalog], tuple[tuple[LearningItem, ...]]]:
        # The lookups are mapping proxies (not picklable); they are rebuilt from the items.
        return (Catalog, (self._items,))

    @property
    def items(self) -> tuple[LearningItem, ...]:
        return self._items

    @property
    def concepts(self) -> tuple[str, ...]:
        """Concepts in order of first appearance."""
        return tuple(self._by_concept)

    @property
    def formats(self) -> tuple[str, ...]:
        """Formats present in this catalog, in FORMATS order."""
        present = {item.format for item in self._items}
        return tuple(f for f in FORMATS if f in present)

    def position(self, item_id: str) -> int | None:
        return self._index.get(item_id)

    def get(self, item_id: str) -> LearningItem | None:
        position = self._index.get(item_id)
        return None if position is None else self._items[position]

    def positions_for_concept(self, concept: str) -> tuple[int, ...]:
        return self._by_concept.get(concept, ())

    def extended(self, new_items: Iterable[LearningItem]) -> Catalog:
        """A new catalog with new_items appended (existing positions are unchanged)."""
        return Catalog((*self._items, *new_items))


# --- sample catalog -------------------------------------------------------------------------------

# Per topic: a typical grade range and a few lesson phrasings (US-style curriculum).
_TOPIC_GRADES: Mapping[str, tuple[int, int]] = {
    "addition": (1, 3),
    "subtraction": (1, 3),
    "multiplication": (3, 5),
    "division": (3, 5),
    "fractions": (3, 6),
    "decimals": (4, 6),
    "exponents": (6, 8),
    "square_roots": (7, 8),
    "equations": (6, 8),
    "geometry": (2, 8),
}
_TOPIC_PHRASES: Mapping[str, tuple[str, ...]] = {
    "addition": ("Adding within 20", "Adding two-digit numbers", "Adding with regrouping", "Column addition"),
    "subtraction": (
        "Subtracting within 20",
        "Subtracting with borrowing",
        "Missing subtrahends",
        "Column subtraction",
    ),
    "multiplication": ("Times tables to 10", "Multiplying by 10s and 100s", "Long multiplication", "Arrays"),
    "division": ("Sharing equally", "Division with remainders", "Long division", "Dividing by 10s"),
    "fractions": (
        "Adding fractions with unlike denominators",
        "Equivalent fractions",
        "Comparing fractions",
        "Multiplying fractions",
    ),
    "decimals": ("Place value with decimals", "Adding decimals", "Rounding decimals", "Multiplying decimals"),
    "exponents": ("Powers of 10", "Laws of exponents", "Negative exponents", "Scientific notation"),
    "square_roots": ("Perfect squares", "Estimating square roots", "Simplifying radicals", "Cube roots"),
    "equations": (
        "One-step equations",
        "Two-step equations",
        "Equations with variables on both sides",
        "Word problems",
    ),
    "geometry": ("Area of rectangles", "Perimeter", "Angles in a triangle", "Volume of prisms"),
}
# Some items practise two concepts at once (phrase, second concept).
_CROSS_TOPIC: Mapping[str, tuple[str, str]] = {
    "addition": ("Adding and subtracting within 100", "subtraction"),
    "subtraction": ("Checking subtraction with addition", "addition"),
    "multiplication": ("Multiplication and division fact families", "division"),
    "division": ("Dividing fractions", "fractions"),
    "fractions": ("Converting fractions to decimals", "decimals"),
    "decimals": ("Decimals and percentages of quantities", "multiplication"),
    "exponents": ("Squares and square roots", "square_roots"),
    "square_roots": ("Pythagorean theorem", "geometry"),
    "equations": ("Equations with fractions", "fractions"),
    "geometry": ("Area with multiplication", "multiplication"),
}
_CROSS_TOPIC_EVERY = 4  # every 4th item of a topic spans two concepts


def generate_sample_catalog(seed: int = 0, items_per_topic: int = 12) -> Catalog:
    """A deterministic catalog with items_per_topic items for each of DEFAULT_TOPICS."""
    if items_per_topic < 1:
        raise CatalogError(f"items_per_topic must be >= 1, got {items_per_topic}")
    rng = np.random.default_rng(seed)
    items: list[LearningItem] = []
    titles: set[str] = set()
    for topic in DEFAULT_TOPICS:
        low, high = _TOPIC_GRADES[topic]
        phrases = _TOPIC_PHRASES[topic]
        for number in range(items_per_topic):
            if number % _CROSS_TOPIC_EVERY == _CROSS_TOPIC_EVERY - 1:
                phrase, partner = _CROSS_TOPIC[topic]
                concepts: tuple[str, ...] = (topic, partner)
            else:
                phrase, concepts = phrases[number % len(phrases)], (topic,)
            # Redraw a few times so two items rarely share a title (students see titles, not ids).
            for _ in range(20):
                item_format = FORMATS[int(rng.integers(len(FORMATS)))]
                grade = int(rng.integers(low, high + 1))
                if f"{phrase} ({item_format}, grade {grade})" not in titles:
                    break
            titles.add(f"{phrase} ({item_format}, grade {grade})")
            # Harder within the topic's grade band, plus jitter so difficulty is not just grade.
            band = (grade - low) / max(1, high - low)
            difficulty = int(
                np.clip(round(1 + 3 * band + rng.integers(-1, 2)), MIN_DIFFICULTY, MAX_DIFFICULTY)
            )
            items.append(
                LearningItem(
                    item_id=f"{topic}-{number + 1:03d}",
                    title=f"{phrase} ({item_format}, grade {grade})",
                    concepts=concepts,
                    grade=grade,
                    format=item_format,
                    difficulty=difficulty,
                )
            )
    return Catalog(items)


# --- files ---------------------------------------------------------------------------------------


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    """Load a .csv or .jsonl catalog; CatalogError names the file and line of the first problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        return _load_jsonl(path)
    raise CatalogError(f"{path}: unsupported catalog format {suffix!r} (use .csv or .jsonl)")


def save_catalog(catalog: Catalog, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            for item in catalog:
                concepts = CONCEPT_SEPARATOR.join(item.concepts)
                writer.writerow(
                    [item.item_id, item.title, concepts, item.grade, item.format, item.difficulty]
                )
    elif suffix in (".jsonl", ".ndjson"):
        with path.open("w", encoding="utf-8") as out:
            for item in catalog:
                out.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    else:
        raise CatalogError(f"{path}: unsupported catalog format {suffix!r} (use .csv or .jsonl)")


def _parse_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool):
        raise CatalogError(f"{field_name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise CatalogError(f"{field_name} must be an integer, got {value!r}") from None


def _item_from_fields(fields: Mapping[str, Any], concepts: Sequence[str]) -> LearningItem:
    return LearningItem(
        item_id=str(fields["item_id"]).strip(),
        title=str(fields["title"]).strip(),
        concepts=tuple(c.strip() for c in concepts),
        grade=_parse_int(fields["grade"], "grade"),
        format=str(fields["format"]).strip().lower(),
        difficulty=_parse_int(fields["difficulty"], "difficulty"),
    )


def _load_csv(path: Path) -> Catalog:
    items: list[LearningItem] = []
    with path.open(newline="", encoding="utf-8") as source:
        reader = csv.DictReader(source)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise CatalogError(
                f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if any(row.get(c) is None for c in CSV_COLUMNS):
                raise CatalogError(f"{where}: row has fewer fields than the header")
            concepts = [c for c in row["concepts"].split(CONCEPT_SEPARATOR) if c.strip()]
            try:
                items.append(_item_from_fields(row, concepts))
            except CatalogError as exc:
                raise CatalogError(f"{where}: {exc}") from None
    return _non_empty(items, path)


def _load_jsonl(path: Path) -> Catalog:
    items: list[LearningItem] = []
    with path.open(encoding="utf-8") as source:
        for line_number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CatalogError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(fields, dict):
                raise CatalogError(f"{where}: expected a JSON object per line")
            missing = [c for c in CSV_COLUMNS if c not in fields]
            if missing:
                raise CatalogError(f"{where}: missing field(s) {', '.join(missing)}")
            concepts = fields["concepts"]
            if isinstance(concepts, str):
                concepts = concepts.split(CONCEPT_SEPARATOR)
            if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
                raise CatalogError(f"{where}: concepts must be a list of strings")
            try:
                items.append(_item_from_fields(fields, concepts))
            except CatalogError as exc:
                raise CatalogError(f"{where}: {exc}") from None
    return _non_empty(items, path)


def _non_empty(items: list[LearningItem], path: Path) -> Catalog:
    if not items:
        raise CatalogError(f"{path}: catalog has no items")
    try:
        return Catalog(items)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None


# --- vision label -> concepts --------------------------------------------------------------------

LabelMapping = Mapping[str, tuple[str, ...]]


def default_label_to_concepts() -> LabelMapping:
    """Identity for the default vision labels: each label is a catalog concept."""
    return MappingProxyType({topic: (topic,) for topic in DEFAULT_TOPICS})


def load_label_to_concepts(path: str | os.PathLike[str]) -> LabelMapping:
    """Read {"label": ["concept", ...] | "concept", ...} from a JSON file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: expected a JSON object mapping label -> concept(s)")
    mapping: dict[str, tuple[str, ...]] = {}
    for label, concepts in raw.items():
        if isinstance(concepts, str):
            concepts = [concepts]
        if (
            not isinstance(concepts, list)
            or not concepts
            or not all(isinstance(c, str) and c.strip() for c in concepts)
        ):
            raise CatalogError(
                f"{path}: label {label!r} must map to a concept or a non-empty list of concepts"
            )
        mapping[label] = tuple(c.strip() for c in concepts)
    return MappingProxyType(mapping)


def check_label_mapping(mapping: LabelMapping, catalog: Catalog) -> None:
    """Every mapped concept must have items; otherwise a label could never lead anywhere."""
    known = set(catalog.concepts)
    unknown = sorted({c for concepts in mapping.values() for c in concepts} - known)
    if unknown:
        raise CatalogError(
            f"label mapping names concept(s) with no catalog items: {', '.join(unknown)}; "
            f"catalog concepts are {', '.join(catalog.concepts)}"
        )
