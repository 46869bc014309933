"""Event bus end to end: throughput, freshness, cost of publishing (snaplearn_bench.bus_freshness).

Run from anywhere as `python benchmarks/bus_freshness.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.bus_freshness import main

if __name__ == "__main__":
    raise SystemExit(main())
