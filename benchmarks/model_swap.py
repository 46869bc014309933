"""A hot swap under load (snaplearn_bench.model_swap): `python benchmarks/model_swap.py --help`."""

from snaplearn_bench.model_swap import main

if __name__ == "__main__":
    raise SystemExit(main())
