"""What every scenario's tables share: numbers as cells, medians that skip nan, the order of
interleaved repetitions, and median tables printed as markdown."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

Median = Callable[[str], float]  # a field's median over one row's samples
Key = TypeVar("Key", bound=tuple[str, ...])


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, int | float) and value == value:
        return f"{value:.{digits}f}"
    return "n/a"


def pick(entry: dict[str, Any], path: str) -> float:
    """The number at a dotted `path` ("closed.throughput") of a nested result; nan if absent."""
    value: Any = entry
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return float(value) if isinstance(value, int | float) else math.nan


def median(values: Sequence[float]) -> float:
    numbers = [v for v in values if v == v]
    return statistics.median(numbers) if numbers else math.nan


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values; nan without any."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def alternating(items: Sequence[str], repetition: int) -> list[str]:
    """The order of measurement in an interleaved experiment: `items` as given in even
    repetitions, reversed in odd ones (a, b, then b, a, ...), so that drift in the machine's
    load over a run hits every item alike."""
    return list(items) if repetition % 2 == 0 else list(reversed(items))


def print_median_table(
    rows: Mapping[Key, Sequence[dict[str, Any]]],
    keys: Sequence[str],
    columns: Sequence[tuple[str, Callable[[Median], str]]],
) -> None:
    """Print a markdown table: a row per key tuple (headers `keys`), then one cell per column,
    made from the medians of that row's samples."""
    print("| " + " | ".join([*keys, *(header for header, _ in columns)]) + " |")
    print("|" + "---|" * len(keys) + "---:|" * len(columns))
    for key, samples in rows.items():

        def of(field: str, samples: Sequence[dict[str, Any]] = samples) -> float:
            return median([sample.get(field, math.nan) for sample in samples])

        print("| " + " | ".join([*key, *(cell(of) for _, cell in columns)]) + " |")
