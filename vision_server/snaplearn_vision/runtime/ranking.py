"""Which labels a model's probabilities rank first. numpy only: the core ranks without torch."""

from __future__ import annotations

import numpy as np


def ranking(probabilities: np.ndarray) -> np.ndarray:
    """Label indices by descending probability (ties: label order), per row of a 1-D or 2-D array.

    The model thread ranks a whole batch in one call, so the event loop, which answers every
    request, does not sort each one.
    """
    return np.argsort(-probabilities, axis=-1, kind="stable")
