"""Recommender serving at catalog scale (snaplearn_bench.recommender_serving).

Run from anywhere as `python benchmarks/recommender_serving.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.recommender_serving import main

if __name__ == "__main__":
    raise SystemExit(main())
