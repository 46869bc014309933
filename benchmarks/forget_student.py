"""One ForgetStudent tombstone applied to a model with many students (RecommenderModel.forget).

Run: .venv/bin/python benchmarks/forget_student.py
"""

import time

from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, ForgetEvent, RecommenderModel

m = RecommenderModel(generate_sample_catalog())
m.apply(
    [ClassifiedEvent(f"p{i}", f"u{i}", (("fractions", 0.9),), 1.7e9 + i) for i in range(10_000)], train=False
)
times = []
for i in range(20):
    t = time.perf_counter()
    m.apply([ForgetEvent(f"f{i}", f"u{i * 7}")])
    times.append(time.perf_counter() - t)
times.sort()
print(f"users=10000 forget median {times[10] * 1e3:.2f} ms max {times[-1] * 1e3:.2f} ms")
