"""Root test configuration. Fixtures live beside the tests that use them or in tests/helpers/."""

from __future__ import annotations

import os

# Two cores on CI machines: keep torch from oversubscribing them when tests run model code.
os.environ.setdefault("OMP_NUM_THREADS", "1")
