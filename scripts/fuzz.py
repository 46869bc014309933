"""The long fuzz run: the decode path and every servicer, with many random examples.

    .venv/bin/python scripts/fuzz.py                 # 2000 examples per property
    .venv/bin/python scripts/fuzz.py --examples 20000 -x

CI runs the same tests with a few derandomized examples (tests/unit/test_fuzz_decoding.py,
tests/integration/test_fuzz_servicers.py). Here the examples are random: a failure prints the
falsifying example and a @reproduce_failure blob to replay it; add it to the hostile corpus
(tests/hostile/make_corpus.py) or as a regression test with the fix.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/unit/test_fuzz_decoding.py", "tests/integration/test_fuzz_servicers.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=2000, help="examples per property (default 2000)")
    parser.add_argument("--only", choices=["decode", "servicers"], help="run one of the two fuzz modules")
    args, pytest_args = parser.parse_known_args(argv)
    tests = {"decode": TESTS[:1], "servicers": TESTS[1:]}.get(args.only or "", TESTS)
    env = {**os.environ, "SNAPLEARN_FUZZ_EXAMPLES": str(args.examples)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        *tests,
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "timeout=0",
        "-W",
        "ignore::UserWarning",
        *pytest_args,
    ]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
