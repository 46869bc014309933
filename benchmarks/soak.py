"""Soak: the whole pipeline at a fraction of capacity for N minutes (snaplearn_bench.soak).

Run from anywhere as `python benchmarks/soak.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.soak import main

if __name__ == "__main__":
    raise SystemExit(main())
