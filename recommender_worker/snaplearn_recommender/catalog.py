"""The learning catalog: the practice items the recommender can suggest.

A catalog is ordered and immutable (an item's position is its row in the model, for good: a
retired item keeps its row, is hidden, and can come back). An item needs an id and a title;
everything else is optional and declared, not fixed:

- concepts (what vision labels map to), a multi-valued column, ';'-joined by default;
- prerequisites, a list of item ids of the same catalog;
- any number of FEATURES: categorical (one value), multi (several values, a separator) or
  numeric (a number, bucketed for the model: its own bucket per whole value, or the declared
  bucket edges). Every feature is a model feature (`name:value`) and a filter of Recommend and
  SimilarItems.

Users bring their own catalog as CSV or JSONL with a small declaration beside it
(`<catalog stem>.features.toml` or `.json`, see `load_schema`); without one the sample's columns
(grade, format, difficulty) are declared where present. Flags declare the same things
(`--catalog-feature`, `--catalog-item`: parse_feature_flag, parse_item_flags), merged into that
declaration: what a flag names replaces what the declaration says of it. Without a catalog the
recommender uses `generate_sample_catalog`, tied to the default vision labels (DEFAULT_TOPICS),
whose grade, format and difficulty are ordinary declared features (SAMPLE_SCHEMA).

Every refusal is one CatalogError sentence naming the file, the 1-based line and the column.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from snaplearn.events.v1 import events_pb2
from snaplearn_common.topics import DEFAULT_TOPICS

FORMATS: tuple[str, ...] = ("video", "worksheet", "quiz", "game", "lesson")
MIN_GRADE, MAX_GRADE = 1, 8
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
CSV_COLUMNS: tuple[str, ...] = ("item_id", "title", "concepts", "grade", "format", "difficulty")
CONCEPT_SEPARATOR = ";"
DECLARATION_SUFFIXES: tuple[str, ...] = (".features.toml", ".features.json")
# Column names a feature may not take: they are the item's own fields.
RESERVED = frozenset({"item_id", "title", "concepts", "prerequisites"})

FeatureKind = Literal["categorical", "multi", "numeric"]
FEATURE_KINDS: tuple[FeatureKind, ...] = get_args(FeatureKind)
FEATURE_FLAG = "--catalog-feature"  # features declared on the command line (parse_feature_flag)
ITEM_FLAG = "--catalog-item"  # the item's own columns on the command line (parse_item_flags)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class CatalogError(ValueError):
    """A catalog, declaration or label-mapping file (or item) is invalid; the message says where and why."""


# --- declarations --------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """3.0 -> '3', 2.5 -> '2.5' (bucket labels and CSV cells)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One declared feature: where it comes from and how its values become model features."""

    name: str
    kind: FeatureKind = "categorical"
    column: str = ""  # the CSV column / JSONL field ("" = the name)
    separator: str = CONCEPT_SEPARATOR  # multi only
    buckets: tuple[float, ...] = ()  # numeric only: ascending edges; () = one bucket per whole value
    required: bool = False

    def __post_init__(self) -> None:
        if not self.column:
            object.__setattr__(self, "column", self.name)
        if not _NAME.match(self.name) or self.name in RESERVED:
            raise CatalogError(
                f"feature name {self.name!r} must be a plain name, not one of {sorted(RESERVED)}"
            )
        if self.kind not in FEATURE_KINDS:
            raise CatalogError(f"feature {self.name!r}: type must be one of {', '.join(FEATURE_KINDS)}")
        if self.kind == "multi" and not self.separator:
            raise CatalogError(f"feature {self.name!r}: separator must not be empty")
        if list(self.buckets) != sorted(set(self.buckets)) or not all(map(math.isfinite, self.buckets)):
            raise CatalogError(f"feature {self.name!r}: buckets must be finite, ascending and distinct")

    def bucket(self, number: float) -> str:
        """The model's token for a numeric value: the value itself, or its bucket between edges."""
        if not self.buckets:
            return format_number(number)
        edges = self.buckets
        if number < edges[0]:
            return f"<{format_number(edges[0])}"
        for low, high in itertools.pairwise(edges):
            if low <= number < high:
                return f"{format_number(low)}-{format_number(high)}"
        return f">={format_number(edges[-1])}"


@dataclass(frozen=True, slots=True)
class CatalogSchema:
    """Which columns hold the id, title, concepts and prerequisites, and the declared features."""

    id_column: str = "item_id"
    title_column: str = "title"
    concepts_column: str = "concepts"
    concept_separator: str = CONCEPT_SEPARATOR
    prerequisites_column: str = "prerequisites"
    prerequisite_separator: str = CONCEPT_SEPARATOR
    features: tuple[FeatureSpec, ...] = ()

    def feature(self, name: str) -> FeatureSpec | None:
        return next((spec for spec in self.features if spec.name == name), None)

    def with_features(self, specs: Sequence[FeatureSpec], source: str = FEATURE_FLAG) -> CatalogSchema:
        """This schema with `specs` added; one named like a declared feature replaces it whole.
        CatalogError (naming `source`) for a column already used by another feature or the item."""
        if not specs:
            return self
        names = {spec.name for spec in specs}
        kept = [spec for spec in self.features if spec.name not in names]
        for index, spec in enumerate(specs):
            if spec.column in (self.id_column, self.title_column):
                raise CatalogError(f"{source} {spec.name}: column {spec.column!r} is the item's id or title")
            other = next((o for o in [*kept, *specs[:index]] if o.column == spec.column), None)
            if other is not None:
                raise CatalogError(
                    f"{source} {spec.name}: column {spec.column!r} is already used by feature {other.name!r}"
                )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return CatalogSchema(**{**values, "features": (*kept, *specs)})

    def with_item(self, columns: Mapping[str, str]) -> CatalogSchema:
        """This schema with the item's own columns (CatalogSchema field -> value) replaced."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return CatalogSchema(**{**values, **columns}) if columns else self

    def restricted_to(self, columns: Iterable[str]) -> CatalogSchema:
        """This schema without the (optional) features whose column is absent."""
        present = set(columns)
        kept = tuple(spec for spec in self.features if spec.column in present or spec.required)
        return CatalogSchema(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "features": kept})

    def to_toml(self) -> str:
        lines = ["[item]"]
        for key, value in (
            ("id", self.id_column),
            ("title", self.title_column),
            ("concepts", self.concepts_column),
            ("concept_separator", self.concept_separator),
            ("prerequisites", self.prerequisites_column),
            ("prerequisite_separator", self.prerequisite_separator),
        ):
            lines.append(f"{key} = {json.dumps(value)}")
        for spec in self.features:
            lines += ["", f"[features.{spec.name}]", f'type = "{spec.kind}"']
            if spec.column != spec.name:
                lines.append(f"column = {json.dumps(spec.column)}")
            if spec.kind == "multi":
                lines.append(f"separator = {json.dumps(spec.separator)}")
            if spec.buckets:
                lines.append(f"buckets = [{', '.join(format_number(b) for b in spec.buckets)}]")
            if spec.required:
                lines.append("required = true")
        return "\n".join(lines) + "\n"


# The sample catalog's declaration (also the default for a file without one).
SAMPLE_SCHEMA = CatalogSchema(
    features=(
        FeatureSpec("grade", "numeric"),
        FeatureSpec("format", "categorical"),
        FeatureSpec("difficulty", "numeric"),
    )
)
_ITEM_KEYS = {
    "id": "id_column",
    "title": "title_column",
    "concepts": "concepts_column",
    "concept_separator": "concept_separator",
    "prerequisites": "prerequisites_column",
    "prerequisite_separator": "prerequisite_separator",
}
_FEATURE_KEYS = {"type", "column", "separator", "buckets", "required"}


_FLAG_EXAMPLES = "e.g. topic=categorical, tags=multi:|, minutes=numeric:0,10,20"


def parse_feature_flag(text: str) -> FeatureSpec:
    """One feature declared on the command line (the file's kinds, one flag each):

        NAME[@COLUMN][=KIND]     KIND: categorical (the default) | multi[:SEPARATOR] (";" by
                                 default) | numeric[:EDGE,EDGE,...] (one bucket per whole value
                                 without edges)

    CatalogError in one sentence naming the flag and its value.
    """
    where = f"{FEATURE_FLAG} {text!r}"
    target, _, kind_text = text.partition("=")
    name, at, column = (part.strip() for part in target.partition("@"))
    if not name:
        raise CatalogError(f"{where}: give a feature name before '=' ({_FLAG_EXAMPLES})")
    if at and not column:
        raise CatalogError(f"{where}: give the column after '@' ({_FLAG_EXAMPLES})")
    kind, colon, argument = kind_text.partition(":")
    kind = kind.strip().lower() or "categorical"
    if kind not in FEATURE_KINDS:
        raise CatalogError(f"{where}: the type must be one of {', '.join(FEATURE_KINDS)} ({_FLAG_EXAMPLES})")
    separator = CONCEPT_SEPARATOR
    buckets: tuple[float, ...] = ()
    if kind == "categorical" and colon:
        raise CatalogError(f"{where}: a categorical feature takes nothing after ':' ({_FLAG_EXAMPLES})")
    if kind == "multi" and argument:
        separator = argument  # taken as given: a space or ", " is a separator too
    if kind == "numeric" and argument.strip():
        edges = [edge.strip() for edge in argument.split(",")]
        try:
            buckets = tuple(float(edge) for edge in edges)
        except ValueError:
            raise CatalogError(f"{where}: bucket edges must be numbers separated by commas") from None
    try:
        return FeatureSpec(name=name, kind=kind, column=column, separator=separator, buckets=buckets)
    except CatalogError as exc:
        raise CatalogError(f"{where}: {exc}") from None


def parse_feature_flags(texts: Sequence[str]) -> tuple[FeatureSpec, ...]:
    """Every --catalog-feature value; CatalogError for a bad one or a feature given twice."""
    specs = tuple(parse_feature_flag(text) for text in texts)
    names = [spec.name for spec in specs]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise CatalogError(f"{FEATURE_FLAG} declares feature {twice!r} twice; give each feature once")
    return specs


def parse_item_flags(texts: Sequence[str]) -> dict[str, str]:
    """The item's own columns on the command line, KEY=VALUE with the keys of a declaration's
    [item] table (id, title, concepts, concept_separator, prerequisites, prerequisite_separator),
    as CatalogSchema field -> value. CatalogError in one sentence naming the flag."""
    columns: dict[str, str] = {}
    for text in texts:
        where = f"{ITEM_FLAG} {text!r}"
        key, equals, value = text.partition("=")
        key = key.strip()
        if not equals or key not in _ITEM_KEYS:
            raise CatalogError(f"{where}: expected KEY=VALUE with KEY one of {', '.join(_ITEM_KEYS)}")
        if not key.endswith("separator"):
            value = value.strip()  # a column name; a separator is taken as given
        if not value and key in ("id", "title"):
            raise CatalogError(f"{where}: the {key} column must be named")
        if key.endswith("separator") and not value:
            raise CatalogError(f"{where}: a separator must not be empty")
        if _ITEM_KEYS[key] in columns:
            raise CatalogError(f"{ITEM_FLAG} gives {key} twice; give it once")
        columns[_ITEM_KEYS[key]] = value
    return columns


def checked_item_flags(values: list[str]) -> list[str]:
    """A settings validator of --catalog-item values, like checked_feature_flags."""
    try:
        parse_item_flags(values)
    except CatalogError as error:
        raise ValueError(str(error).removeprefix(ITEM_FLAG + " ")) from None
    return values


def checked_feature_flags(values: list[str]) -> list[str]:
    """A settings validator of --catalog-feature values (the trainer's and catalog-sync's): a bad
    one is a ValueError, which the settings report under the flag and its variable."""
    try:
        parse_feature_flags(values)
    except CatalogError as error:
        raise ValueError(str(error).removeprefix(FEATURE_FLAG + " ")) from None
    return values


def declaration_path(catalog_path: str | os.PathLike[str]) -> Path | None:
    """The declaration beside a catalog (`<stem>.features.toml` / `.json`), or None."""
    path = Path(catalog_path)
    for suffix in DECLARATION_SUFFIXES:
        candidate = path.with_name(path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _locate(text: str, *keys: str) -> tuple[int, int]:
    """1-based (line, column) of the last of `keys`, searched in order (best effort: line 1, col 1)."""
    line_number, column = 1, 1
    lines = text.splitlines()
    start = 0
    for key in keys:
        pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])")
        for index in range(start, len(lines)):
            found = pattern.search(lines[index])
            if found:
                line_number, column, start = index + 1, found.start() + 1, index
                break
    return line_number, column


def load_schema(path: str | os.PathLike[str]) -> CatalogSchema:
    """Read a declaration (TOML or JSON):

    [item]                      # all optional; these are the defaults
    id = "item_id"
    title = "title"
    concepts = "concepts"       # multi-valued; "" when the catalog has none
    concept_separator = ";"
    prerequisites = "prerequisites"
    [features.topic]            # one table per feature
    type = "categorical"        # or "multi" (with separator = "|") or "numeric" (buckets = [2, 5])
    column = "Topic"            # the column / field name, when it differs from the feature's
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f", line {found.group(1)}, column {found.group(2)}" if found else ""
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)) or "syntax error"
        raise CatalogError(f"{path}{where}: not valid TOML ({reason})") from None

    def fail(problem: str, *keys: str) -> CatalogError:
        line, column = _locate(text, *keys)
        return CatalogError(f"{path}, line {line}, column {column}: {problem}")

    if not isinstance(raw, dict):
        raise fail("expected a table (object) with [item] and [features.<name>] sections")
    unknown = sorted(set(raw) - {"item", "features"})
    if unknown:
        raise fail(f"unknown section {unknown[0]!r} (use item and features)", unknown[0])
    values: dict[str, Any] = {}
    item = raw.get("item", {})
    if not isinstance(item, dict):
        raise fail("item must be a table", "item")
    for key, value in item.items():
        if key not in _ITEM_KEYS:
            raise fail(f"unknown item key {key!r} (known: {', '.join(_ITEM_KEYS)})", "item", key)
        if not isinstance(value, str) or (key in ("id", "title") and not value.strip()):
            raise fail(
                f"item.{key} must be a{' non-empty' if key in ('id', 'title') else ''} string", "item", key
            )
        values[_ITEM_KEYS[key]] = value.strip()
    declared = raw.get("features", {})
    if not isinstance(declared, dict):
        raise fail("features must be a table of [features.<name>] tables", "features")
    specs: list[FeatureSpec] = []
    for name, options in declared.items():
        if isinstance(options, str):  # shorthand: topic = "categorical"
            options = {"type": options}
        if not isinstance(options, dict):
            raise fail(f"feature {name!r} must be a table or a type name", name)
        for key in options:
            if key not in _FEATURE_KEYS:
                raise fail(
                    f"feature {name!r}: unknown key {key!r} (known: {', '.join(sorted(_FEATURE_KEYS))})",
                    name,
                    key,
                )
        kind = options.get("type", "categorical")
        buckets = options.get("buckets", [])
        if not isinstance(buckets, list) or not all(
            isinstance(b, int | float) and not isinstance(b, bool) for b in buckets
        ):
            raise fail(f"feature {name!r}: buckets must be a list of numbers", name, "buckets")
        for key in ("column", "separator", "type"):
            if key in options and not isinstance(options[key], str):
                raise fail(f"feature {name!r}: {key} must be a string", name, key)
        try:
            specs.append(
                FeatureSpec(
                    name=str(name).strip(),
                    kind=kind,
                    column=str(options.get("column", "")).strip(),
                    separator=str(options.get("separator", CONCEPT_SEPARATOR)),
                    buckets=tuple(float(b) for b in buckets),
                    required=bool(options.get("required", False)),
                )
            )
        except CatalogError as exc:
            key = next((k for k in ("type", "buckets", "separator") if k in options and k in str(exc)), "")
            raise fail(str(exc), name, *((key,) if key else ())) from None
    columns = [spec.column for spec in specs]
    taken = {values.get("id_column", "item_id"), values.get("title_column", "title")}
    for spec in specs:
        if columns.count(spec.column) > 1 or spec.column in taken:
            raise fail(f"feature {spec.name!r}: column {spec.column!r} is already used", spec.name)
    return CatalogSchema(**values, features=tuple(specs))


def save_schema(schema: CatalogSchema, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(schema.to_toml(), encoding="utf-8")


# --- items ---------------------------------------------------------------------------------------

Tokens = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LearningItem:
    """One practice item. `features` maps a declared feature to its model tokens (categorical:
    one value; multi: its values; numeric: its bucket), `numbers` a numeric feature to its value.

    grade / format / difficulty are kept for the sample catalog and older callers: given, they
    become the features of the same name; read, they are those features' values (None if absent).
    """

    item_id: str
    title: str
    concepts: tuple[str, ...] = ()
    grade: int | None = None
    format: str | None = None
    difficulty: int | None = None
    features: Mapping[str, Tokens] = field(default_factory=dict)
    numbers: Mapping[str, float] = field(default_factory=dict)
    prerequisites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        features = {str(k): tuple(v) for k, v in dict(self.features).items()}
        numbers = {str(k): float(v) for k, v in dict(self.numbers).items()}
        for name, value in (("grade", self.grade), ("difficulty", self.difficulty)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise CatalogError(f"item {self.item_id!r}: {name} must be an integer, got {value!r}")
                numbers[name] = float(value)
                features[name] = (str(value),)
        if self.format is not None:
            features["format"] = (str(self.format),)
        set_(self, "concepts", tuple(self.concepts))
        set_(self, "prerequisites", tuple(self.prerequisites))
        set_(self, "features", MappingProxyType(dict(sorted(features.items()))))
        set_(self, "numbers", MappingProxyType(dict(sorted(numbers.items()))))
        for name in ("grade", "difficulty"):
            number = numbers.get(name)
            set_(self, name, int(number) if number is not None and number.is_integer() else None)
        format_ = features.get("format")
        set_(self, "format", format_[0] if format_ and len(format_) == 1 else None)
        problem = _item_problem(self)
        if problem:
            raise CatalogError(f"item {self.item_id!r}: {problem}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LearningItem) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[Any, ...]:
        return (
            self.item_id,
            self.title,
            self.concepts,
            tuple(self.features.items()),
            tuple(self.numbers.items()),
            self.prerequisites,
        )

    def __getstate__(self) -> tuple[Any, ...]:
        return (
            self.item_id,
            self.title,
            self.concepts,
            dict(self.features),
            dict(self.numbers),
            self.prerequisites,
        )

    def __setstate__(self, state: Sequence[Any]) -> None:
        if len(state) == 6 and not isinstance(state[3], dict):  # pickled before declared features
            item_id, title, concepts, grade, format_, difficulty = state
            features: dict[str, Any] = {}
            numbers: dict[str, Any] = {}
            prerequisites: tuple[str, ...] = ()
        else:
            item_id, title, concepts, features, numbers, prerequisites = state
            grade = format_ = difficulty = None
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "numbers", numbers)
        for name, value in zip(
            ("item_id", "title", "concepts", "grade", "format", "difficulty", "prerequisites"),
            (item_id, title, concepts, grade, format_, difficulty, prerequisites),
            strict=True,
        ):
            object.__setattr__(self, name, value)
        LearningItem.__post_init__(self)

    def feature(self, name: str) -> Tokens:
        """The item's tokens of one feature (() when it has none)."""
        return self.features.get(name, ())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "title": self.title, "concepts": list(self.concepts)}
        for name, tokens in self.features.items():
            number = self.numbers.get(name)
            if number is not None:
                out[name] = int(number) if number.is_integer() else number
            else:
                out[name] = tokens[0] if len(tokens) == 1 else list(tokens)
        if self.prerequisites:
            out["prerequisites"] = list(self.prerequisites)
        return out


def _item_problem(item: LearningItem) -> str | None:
    if not isinstance(item.item_id, str) or not item.item_id.strip():
        return "item_id must be a non-empty string"
    if not isinstance(item.title, str) or not item.title.strip():
        return "title must be a non-empty string"
    for concept in item.concepts:
        if not isinstance(concept, str) or not concept.strip() or CONCEPT_SEPARATOR in concept:
            return f"concept {concept!r} must be a non-empty string without {CONCEPT_SEPARATOR!r}"
    if len(set(item.concepts)) != len(item.concepts):
        return f"concepts {list(item.concepts)} contain duplicates"
    for name, tokens in item.features.items():
        if not _NAME.match(name) or name in RESERVED:
            return f"feature name {name!r} must be a plain name, not one of {sorted(RESERVED)}"
        if not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            return f"feature {name!r} needs non-empty values"
    for name, number in item.numbers.items():
        if not math.isfinite(number) or name not in item.features:
            return f"numeric feature {name!r} must be a finite number with a bucket"
    for prerequisite in item.prerequisites:
        if not isinstance(prerequisite, str) or not prerequisite.strip():
            return "prerequisites must be non-empty item ids"
        if prerequisite == item.item_id:
            return "an item cannot be its own prerequisite"
    return None


class Catalog:
    """Ordered, immutable items with lookups by id, concept and feature value.

    Retired items keep their position (their model rows) but are not in the catalog for any
    lookup by id or concept: `position`/`get` return None, they are never recommended or
    sampled as positives. `row` finds any item's position, retired or not.
    """

    def __init__(self, items: Iterable[LearningItem], retired: Iterable[str] = ()) -> None:
        self._items: tuple[LearningItem, ...] = tuple(items)
        index: dict[str, int] = {}
        for position, item in enumerate(self._items):
            if item.item_id in index:
                raise CatalogError(
                    f"duplicate item_id {item.item_id!r} (positions {index[item.item_id]}, {position})"
                )
            index[item.item_id] = position
        self._rows: Mapping[str, int] = MappingProxyType(index)
        self._retired = frozenset(index[i] for i in retired if i in index)
        by_concept: dict[str, list[int]] = {}
        for position, item in enumerate(self._items):
            if position not in self._retired:
                for concept in item.concepts:
                    by_concept.setdefault(concept, []).append(position)
        self._by_concept = MappingProxyType({c: tuple(p) for c, p in by_concept.items()})

    def __len__(self) -> int:
        """Every row, retired ones included (the size of the model's item arrays)."""
        return len(self._items)

    def __iter__(self) -> Iterator[LearningItem]:
        return iter(self._items)

    def __getitem__(self, position: int) -> LearningItem:
        return self._items[position]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and (self._items, self._retired) == (other._items, other._retired)

    def __hash__(self) -> int:
        return hash((self._items, self._retired))

    def __reduce__(self) -> tuple[type[Catalog], tuple[tuple[LearningItem, ...], tuple[str, ...]]]:
        # The lookups are mapping proxies (not picklable); they are rebuilt from the items.
        return (Catalog, (self._items, self.retired_ids))

    @property
    def items(self) -> tuple[LearningItem, ...]:
        return self._items

    @property
    def active_items(self) -> tuple[LearningItem, ...]:
        return tuple(item for p, item in enumerate(self._items) if p not in self._retired)

    @property
    def n_active(self) -> int:
        return len(self._items) - len(self._retired)

    @property
    def retired_ids(self) -> tuple[str, ...]:
        return tuple(self._items[p].item_id for p in sorted(self._retired))

    @property
    def concepts(self) -> tuple[str, ...]:
        """Concepts of the active items, in order of first appearance."""
        return tuple(self._by_concept)

    @property
    def formats(self) -> tuple[str, ...]:
        """Values of the `format` feature among active items (FORMATS order first)."""
        present = self.feature_values("format")
        return tuple(sorted(present, key=lambda f: (FORMATS.index(f) if f in FORMATS else len(FORMATS), f)))

    def position(self, item_id: str) -> int | None:
        """The position of an ACTIVE item (None for unknown or retired ids)."""
        position = self._rows.get(item_id)
        return None if position is None or position in self._retired else position

    def row(self, item_id: str) -> int | None:
        """The position of any item, retired or not."""
        return self._rows.get(item_id)

    def is_retired(self, item_id: str) -> bool:
        position = self._rows.get(item_id)
        return position is not None and position in self._retired

    def get(self, item_id: str) -> LearningItem | None:
        position = self.position(item_id)
        return None if position is None else self._items[position]

    def positions_for_concept(self, concept: str) -> tuple[int, ...]:
        return self._by_concept.get(concept, ())

    @cached_property
    def active_mask(self) -> npt.NDArray[np.bool_]:
        mask = np.ones(len(self._items), dtype=bool)
        mask[list(self._retired)] = False
        mask.flags.writeable = False
        return mask

    @cached_property
    def feature_index(self) -> Mapping[str, Mapping[str, npt.NDArray[np.int64]]]:
        """feature -> token -> sorted positions of the active items that have it."""
        index: dict[str, dict[str, list[int]]] = {}
        for position, item in enumerate(self._items):
            if position in self._retired:
                continue
            for name, tokens in item.features.items():
                by_token = index.setdefault(name, {})
                for token in tokens:
                    by_token.setdefault(token, []).append(position)
        return MappingProxyType(
            {
                name: MappingProxyType({t: _frozen(np.array(p, dtype=np.int64)) for t, p in by_token.items()})
                for name, by_token in index.items()
            }
        )

    @cached_property
    def numeric_columns(self) -> Mapping[str, npt.NDArray[np.float64]]:
        """numeric feature -> value per position (NaN where an item has none)."""
        names = sorted({name for item in self._items for name in item.numbers})
        columns = {name: np.full(len(self._items), np.nan) for name in names}
        for position, item in enumerate(self._items):
            for name, number in item.numbers.items():
                columns[name][position] = number
        return MappingProxyType({name: _frozen(column) for name, column in columns.items()})

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.feature_index)

    def feature_values(self, name: str) -> tuple[str, ...]:
        return tuple(self.feature_index.get(name, {}))

    def extended(self, new_items: Iterable[LearningItem]) -> Catalog:
        """A new catalog with new_items appended (existing positions are unchanged)."""
        return Catalog((*self._items, *new_items), self.retired_ids)

    def with_item(self, item: LearningItem) -> Catalog:
        """`item` added, or replacing (and un-retiring) the item of the same id in its position."""
        position = self._rows.get(item.item_id)
        if position is None:
            position = len(self._items)
            rows: Mapping[str, int] = MappingProxyType({**self._rows, item.item_id: position})
            items = (*self._items, item)
        else:
            rows = self._rows
            items = (*self._items[:position], item, *self._items[position + 1 :])
        return self._successor(items, rows, self._retired - {position}, (position,))

    def with_retired(self, item_ids: Iterable[str]) -> Catalog:
        """These items retired (unknown ids are ignored)."""
        positions = {self._rows[i] for i in item_ids if i in self._rows} - self._retired
        if not positions:
            return self
        return self._successor(self._items, self._rows, self._retired | positions, tuple(sorted(positions)))

    def _successor(
        self,
        items: tuple[LearningItem, ...],
        rows: Mapping[str, int],
        retired: frozenset[int],
        touched: Sequence[int],
    ) -> Catalog:
        """This catalog with the items at `touched` positions added, replaced or retired: the
        lookups are updated for those positions only (a live change to a large catalog must not
        cost a pass over every item in Python)."""
        new = Catalog.__new__(Catalog)
        new._items, new._rows, new._retired = items, rows, retired

        def before(position: int) -> LearningItem | None:
            active = position < len(self._items) and position not in self._retired
            return self._items[position] if active else None

        def after(position: int) -> LearningItem | None:
            return None if position in retired else items[position]

        by_concept = dict(self._by_concept)
        for position in touched:
            old, current = before(position), after(position)
            for concept in {*(old.concepts if old else ()), *(current.concepts if current else ())}:
                kept = [p for p in by_concept.get(concept, ()) if p != position]
                if current is not None and concept in current.concepts:
                    kept.insert(int(np.searchsorted(kept, position)), position)
                if kept:
                    by_concept[concept] = tuple(kept)
                else:
                    by_concept.pop(concept, None)

        def first_appearance(entry: tuple[str, tuple[int, ...]]) -> tuple[int, int]:
            concept, positions = entry
            return positions[0], items[positions[0]].concepts.index(concept)

        new._by_concept = MappingProxyType(dict(sorted(by_concept.items(), key=first_appearance)))
        if "feature_index" in self.__dict__:
            index = {name: dict(by_value) for name, by_value in self.feature_index.items()}
            for position in touched:
                old, current = before(position), after(position)
                for name, tokens in (old.features if old else {}).items():
                    for token in tokens:
                        remaining = index[name][token]
                        remaining = remaining[remaining != position]
                        if len(remaining):
                            index[name][token] = _frozen(remaining)
                        else:
                            del index[name][token]
                    if not index[name]:
                        del index[name]
                for name, tokens in (current.features if current else {}).items():
                    by_value = index.setdefault(name, {})
                    for token in tokens:
                        present = by_value.get(token, np.empty(0, dtype=np.int64))
                        where = int(np.searchsorted(present, position))
                        by_value[token] = _frozen(np.insert(present, where, position))
            new.__dict__["feature_index"] = MappingProxyType(
                {name: MappingProxyType(by_value) for name, by_value in index.items()}
            )
        if "numeric_columns" in self.__dict__:
            names = set(self.numeric_columns) | {n for p in touched for n in items[p].numbers}
            columns: dict[str, npt.NDArray[np.float64]] = {}
            for name in sorted(names):
                column = np.full(len(items), np.nan)
                previous = self.numeric_columns.get(name)
                if previous is not None:
                    column[: len(previous)] = previous
                for position in touched:
                    column[position] = items[position].numbers.get(name, np.nan)
                columns[name] = _frozen(column)
            new.__dict__["numeric_columns"] = MappingProxyType(columns)
        return new


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


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
    """A deterministic catalog with items_per_topic items for each of DEFAULT_TOPICS (SAMPLE_SCHEMA)."""
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
                    # A topic's items build on each other: each needs the one before it.
                    prerequisites=(f"{topic}-{number:03d}",) if number else (),
                )
            )
    return Catalog(items)


# --- files ---------------------------------------------------------------------------------------


def load_catalog(
    path: str | os.PathLike[str],
    schema: CatalogSchema | str | os.PathLike[str] | None = None,
    features: Sequence[FeatureSpec] = (),
    item: Mapping[str, str] | None = None,
) -> Catalog:
    """Load a .csv or .jsonl catalog with its declaration (`schema`: a CatalogSchema, a declaration
    file, or None for the one beside the catalog, else SAMPLE_SCHEMA's columns where present).

    features: declared by flags (parse_feature_flags), merged into that declaration: a flag's
    feature replaces the declared one of its name, the others are added; a CSV must have their
    columns. item: the item's own columns by flags (parse_item_flags), replacing the declared ones.

    CatalogError names the file, the 1-based line and the column of the first problem.
    """
    path = Path(path)
    if schema is None:
        found = declaration_path(path)
        declared = load_schema(found) if found else None
    elif isinstance(schema, CatalogSchema):
        declared = schema
    else:
        declared = load_schema(schema)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise CatalogError(f"{path}: unsupported catalog format {suffix!r} (use .csv or .jsonl)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is not part of the first column
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CatalogError(
            f"{path}, line {line}, column {column}: not UTF-8 text (save it as UTF-8)"
        ) from None
    if suffix == ".csv":
        return _load_csv(path, text, declared, tuple(features), dict(item or {}))
    if features or item:
        declared = (declared or SAMPLE_SCHEMA).with_item(item or {}).with_features(features)
    return _load_jsonl(path, text, declared)


def save_catalog(catalog: Catalog, path: str | os.PathLike[str], schema: CatalogSchema | None = None) -> None:
    """Write the catalog's active items (and, for a schema other than SAMPLE_SCHEMA, its declaration)."""
    path = Path(path)
    schema = schema or SAMPLE_SCHEMA
    suffix = path.suffix.lower()
    items = catalog.active_items
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            columns = [schema.id_column, schema.title_column]
            has_prerequisites = any(item.prerequisites for item in items)
            if schema.concepts_column:
                columns.append(schema.concepts_column)
            columns += [spec.column for spec in schema.features]
            if has_prerequisites:
                columns.append(schema.prerequisites_column)
            writer.writerow(columns)
            for item in items:
                row = [item.item_id, item.title]
                if schema.concepts_column:
                    row.append(schema.concept_separator.join(item.concepts))
                row += [_cell(item, spec) for spec in schema.features]
                if has_prerequisites:
                    row.append(schema.prerequisite_separator.join(item.prerequisites))
                writer.writerow(row)
    elif suffix in (".jsonl", ".ndjson"):
        with path.open("w", encoding="utf-8") as out:
            for item in items:
                out.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    else:
        raise CatalogError(f"{path}: unsupported catalog format {suffix!r} (use .csv or .jsonl)")
    if schema != SAMPLE_SCHEMA:
        save_schema(schema, path.with_name(path.stem + DECLARATION_SUFFIXES[0]))


def _cell(item: LearningItem, spec: FeatureSpec) -> str:
    number = item.numbers.get(spec.name)
    if number is not None:
        return format_number(number)
    return spec.separator.join(item.feature(spec.name))


class _Refusal(Exception):
    """A problem in one field: the loader adds the file, line and column."""

    def __init__(self, problem: str, column: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.column = column


def _split(value: str, separator: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(separator) if part.strip())


def _parsed_item(fields: Mapping[str, Any], schema: CatalogSchema) -> LearningItem:
    """One item from a row's fields (str for CSV, JSON values for JSONL); _Refusal names the field."""

    def text(column: str, required: bool) -> str:
        value = fields.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise _Refusal(f"{column} is empty (every item needs one)", column)
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise _Refusal(f"{column} must be a string, got {value!r}", column)
        return str(value).strip()

    def listed(column: str, separator: str) -> tuple[str, ...]:
        value = fields.get(column)
        if value is None:
            return ()
        if isinstance(value, str):
            return _split(value, separator)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value if v.strip())
        raise _Refusal(f"{column} must be a list of strings or a {separator!r}-joined string", column)

    item_id = text(schema.id_column, required=True)
    title = text(schema.title_column, required=True)
    concepts = listed(schema.concepts_column, schema.concept_separator) if schema.concepts_column else ()
    if len(set(concepts)) != len(concepts):
        concepts = tuple(dict.fromkeys(concepts))
    for concept in concepts:
        if CONCEPT_SEPARATOR in concept:
            raise _Refusal(
                f"concept {concept!r} must not contain {CONCEPT_SEPARATOR!r}", schema.concepts_column
            )
    prerequisites = (
        listed(schema.prerequisites_column, schema.prerequisite_separator)
        if schema.prerequisites_column
        else ()
    )
    features: dict[str, Tokens] = {}
    numbers: dict[str, float] = {}
    for spec in schema.features:
        value = fields.get(spec.column)
        if value is None or (isinstance(value, str) and not value.strip()) or value == []:
            if spec.required:
                raise _Refusal(f"{spec.column} is empty but the declaration makes it required", spec.column)
            continue
        if spec.kind == "numeric":
            number = _number(value)
            if number is None:
                raise _Refusal(f"{spec.column} must be a number, got {value!r}", spec.column)
            numbers[spec.name] = number
            features[spec.name] = (spec.bucket(number),)
        elif spec.kind == "multi":
            tokens = listed(spec.column, spec.separator)
            if tokens:
                features[spec.name] = tuple(dict.fromkeys(tokens))
        else:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise _Refusal(f"{spec.column} must be one value, got {value!r}", spec.column)
            features[spec.name] = (format_number(value) if isinstance(value, float) else str(value).strip(),)
    if item_id in prerequisites:
        raise _Refusal(f"item {item_id!r} lists itself as a prerequisite", schema.prerequisites_column)
    try:
        return LearningItem(
            item_id=item_id,
            title=title,
            concepts=concepts,
            features=features,
            numbers=numbers,
            prerequisites=tuple(dict.fromkeys(prerequisites)),
        )
    except CatalogError as exc:
        raise _Refusal(str(exc)) from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        try:
            number = float(str(value).strip().replace(",", ".") if str(value).count(",") == 1 else str(value))
        except ValueError:
            return None
    return number if math.isfinite(number) else None


@dataclass
class _Row:
    item: LearningItem
    line: int
    columns: Mapping[str, int]  # field -> 1-based column


def _load_csv(
    path: Path,
    text: str,
    declared: CatalogSchema | None,
    flagged: tuple[FeatureSpec, ...] = (),
    item_columns: Mapping[str, str] | None = None,
) -> Catalog:
    lines = text.splitlines(keepends=True)
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(f"{path}, line 1: the file is empty (expected a header row)") from None
    except csv.Error as exc:
        raise CatalogError(f"{path}, line 1: not a readable CSV header ({exc})") from None
    names = [name.strip() for name in header]
    schema = declared if declared is not None else SAMPLE_SCHEMA.restricted_to(names)
    schema = schema.with_item(item_columns or {}).with_features(flagged)
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if name and name in seen:
            raise CatalogError(
                f"{path}, line 1, column {position}: column {name!r} appears twice (also column {seen[name]})"
            )
        seen[name] = position
    needed = [schema.id_column, schema.title_column]
    needed += [spec.column for spec in schema.features if declared is not None or spec in flagged]
    missing = [name for name in needed if name not in seen]
    if missing:
        by_flag = next((spec.name for spec in flagged if spec.column == missing[0]), None)
        declared_by = f", declared by {FEATURE_FLAG} {by_flag}" if by_flag else ""
        raise CatalogError(
            f"{path}, line 1: missing column {missing[0]!r}{declared_by} "
            f"(the header has {', '.join(repr(n) for n in names)})"
        )
    rows: list[_Row] = []
    line = 1
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise CatalogError(f"{path}, line {reader.line_num}: not readable CSV ({exc})") from None
        line = start
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(names) and any(cell.strip() for cell in cells[len(names) :]):
            raise CatalogError(
                f"{path}, line {line}, column {len(names) + 1}: the row has {len(cells)} fields but the "
                f"header has {len(names)}"
            )
        fields = {name: cells[i] for i, name in enumerate(names) if i < len(cells) and name}
        try:
            item = _parsed_item(fields, schema)
        except _Refusal as refusal:
            where = f"{path}, line {line}"
            if refusal.column is not None and refusal.column in seen:
                where += f", column {seen[refusal.column]} ({refusal.column})"
            raise CatalogError(f"{where}: {refusal.problem}") from None
        rows.append(_Row(item, line, seen))
    return _checked(rows, path, schema)


def _load_jsonl(path: Path, text: str, declared: CatalogSchema | None) -> Catalog:
    schema = declared if declared is not None else SAMPLE_SCHEMA
    rows: list[_Row] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CatalogError(
                f"{path}, line {line_number}, column {exc.colno}: not valid JSON ({exc.msg})"
            ) from None
        if not isinstance(fields, dict):
            raise CatalogError(f"{path}, line {line_number}, column 1: expected a JSON object per line")
        columns = {key: _json_column(line, key) for key in fields}
        missing = [c for c in (schema.id_column, schema.title_column) if c not in fields]
        if missing:
            raise CatalogError(f"{path}, line {line_number}, column 1: missing field {missing[0]!r}")
        try:
            item = _parsed_item(fields, schema)
        except _Refusal as refusal:
            where = f"{path}, line {line_number}"
            if refusal.column is not None:
                where += f", column {columns.get(refusal.column, 1)} ({refusal.column})"
            raise CatalogError(f"{where}: {refusal.problem}") from None
        rows.append(_Row(item, line_number, columns))
    return _checked(rows, path, schema)


def _json_column(line: str, key: str) -> int:
    found = line.find(json.dumps(key, ensure_ascii=False))
    if found < 0:
        found = line.find(json.dumps(key))
    return found + 1 if found >= 0 else 1


def _checked(rows: list[_Row], path: Path, schema: CatalogSchema) -> Catalog:
    """Whole-catalog rules: at least one item, unique ids, prerequisites that exist, no cycles."""
    if not rows:
        raise CatalogError(f"{path}: the catalog has no items")
    first_line: dict[str, int] = {}
    for row in rows:
        earlier = first_line.get(row.item.item_id)
        if earlier is not None:
            column = row.columns.get(schema.id_column, 1)
            raise CatalogError(
                f"{path}, line {row.line}, column {column} ({schema.id_column}): duplicate item_id "
                f"{row.item.item_id!r} (first on line {earlier})"
            )
        first_line[row.item.item_id] = row.line
    for row in rows:
        for prerequisite in row.item.prerequisites:
            if prerequisite not in first_line:
                column = row.columns.get(schema.prerequisites_column, 1)
                raise CatalogError(
                    f"{path}, line {row.line}, column {column} ({schema.prerequisites_column}): prerequisite "
                    f"{prerequisite!r} is not an item of this catalog"
                )
    cycle = _prerequisite_cycle({row.item.item_id: row.item.prerequisites for row in rows})
    if cycle:
        row = next(r for r in rows if r.item.item_id == cycle[0])
        column = row.columns.get(schema.prerequisites_column, 1)
        raise CatalogError(
            f"{path}, line {row.line}, column {column} ({schema.prerequisites_column}): prerequisites form "
            f"a cycle ({' -> '.join(cycle)})"
        )
    return Catalog(row.item for row in rows)


def _prerequisite_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One cycle of the prerequisite graph (ids, first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    for root in graph:
        if state.get(root):
            continue
        path: list[str] = []
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(graph.get(root, ())))]
        state[root] = 1
        path.append(root)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(graph.get(child, ()))))
    return None


# --- vision label -> concepts --------------------------------------------------------------------

LabelMapping = Mapping[str, tuple[str, ...]]


def default_label_to_concepts() -> LabelMapping:
    """Identity for the default vision labels: each label is a catalog concept."""
    return MappingProxyType({topic: (topic,) for topic in DEFAULT_TOPICS})


def load_label_to_concepts(path: str | os.PathLike[str]) -> LabelMapping:
    """Read {"label": ["concept", ...] | "concept", ...} from a JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}, line 1, column 1: expected a JSON object mapping label -> concept(s)")
    mapping: dict[str, tuple[str, ...]] = {}
    for label, concepts in raw.items():
        if isinstance(concepts, str):
            concepts = [concepts]
        if (
            not isinstance(concepts, list)
            or not concepts
            or not all(isinstance(c, str) and c.strip() for c in concepts)
        ):
            line, column = _locate(text, json.dumps(label))
            raise CatalogError(
                f"{path}, line {line}, column {column}: label {label!r} must map to a concept or a "
                "non-empty list of concepts"
            )
        mapping[label.strip()] = tuple(c.strip() for c in concepts)
    return MappingProxyType(mapping)


def check_label_mapping(mapping: LabelMapping | None, catalog: Catalog) -> None:
    """Every concept of a GIVEN mapping must have items (else its label could never lead anywhere).

    None (no mapping given: labels are concept names) checks nothing: labels that name no concept
    of this catalog are simply not used, which is not the user's mistake.
    """
    if mapping is None:
        return
    known = set(catalog.concepts)
    unknown = sorted({c for concepts in mapping.values() for c in concepts} - known)
    if unknown:
        shown = ", ".join(catalog.concepts) or "none"
        raise CatalogError(
            f"the label mapping names concept(s) with no catalog items: {', '.join(unknown)} "
            f"(the catalog's concepts: {shown})"
        )


# --- on the bus (catalog-change events) -----------------------------------------------------------


def item_to_proto(item: LearningItem) -> events_pb2.CatalogItem:
    message = events_pb2.CatalogItem(
        item_id=item.item_id, title=item.title, concepts=item.concepts, prerequisites=item.prerequisites
    )
    for name, tokens in item.features.items():
        feature = message.features.add(name=name, values=tokens)
        if name in item.numbers:
            feature.number = item.numbers[name]
    return message


def item_from_proto(message: events_pb2.CatalogItem) -> LearningItem:
    """CatalogError for an item that breaks LearningItem's rules (the worker dead-letters it)."""
    return LearningItem(
        item_id=message.item_id,
        title=message.title,
        concepts=tuple(message.concepts),
        features={f.name: tuple(f.values) for f in message.features},
        numbers={f.name: f.number for f in message.features if f.HasField("number")},
        prerequisites=tuple(message.prerequisites),
    )


@dataclass(frozen=True, slots=True)
class CatalogDiff:
    """What turns one catalog into another: new items, changed items, retired ids."""

    added: tuple[LearningItem, ...]
    changed: tuple[LearningItem, ...]
    retired: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.retired)


def diff_catalogs(serving: Catalog, wanted: Catalog) -> CatalogDiff:
    """The changes that make `serving`'s active items equal `wanted`'s."""
    added: list[LearningItem] = []
    changed: list[LearningItem] = []
    for item in wanted.active_items:
        current = serving.get(item.item_id)
        if current is None:
            added.append(item)  # new, or retired and back
        elif current != item:
            changed.append(item)
    retired = tuple(item.item_id for item in serving.active_items if wanted.get(item.item_id) is None)
    return CatalogDiff(tuple(added), tuple(changed), retired)
