"""The vision comparison: our server vs the raw bound vs peers (snaplearn_bench.vision_bench).

Run from anywhere as `python benchmarks/vision_bench.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.vision_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
