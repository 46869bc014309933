"""Vision A/B: our server at a git ref vs this checkout, interleaved (snaplearn_bench.vision_ab).

Run from anywhere as `python benchmarks/vision_ab.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.vision_ab import main

if __name__ == "__main__":
    raise SystemExit(main())
