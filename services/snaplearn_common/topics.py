"""The learning concepts the default vision model recognises.

Shared by the vision model's dataset generator (labels) and the sample learning catalog
(concepts), so that a prediction maps onto practice items without any glue.
"""

from __future__ import annotations

# Order matters: it is the label index of the default model.
DEFAULT_TOPICS: tuple[str, ...] = (
    "addition",
    "subtraction",
    "multiplication",
    "division",
    "fractions",
    "decimals",
    "exponents",
    "square_roots",
    "equations",
    "geometry",
)
