"""Simulated students, online model vs retrained once (snaplearn_bench.recommender_simulation).

Run from anywhere as `python benchmarks/recommender_simulation.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.recommender_simulation import main

if __name__ == "__main__":
    raise SystemExit(main())
