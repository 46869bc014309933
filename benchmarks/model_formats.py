"""One network in every format: bare runtime vs our server vs peers (snaplearn_bench.model_formats).

Run from anywhere as `python benchmarks/model_formats.py --help`; the harness is the package beside
this script (installed as snaplearn-bench, or found here when it is not).
"""

from snaplearn_bench.model_formats import main

if __name__ == "__main__":
    raise SystemExit(main())
