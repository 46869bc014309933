"""What checking a bearer token costs the interceptor: a JWT (ES256) verified for the first time,
and the same token again (cached until it expires; D45).

    python benchmarks/token_verify.py [--tokens 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from snaplearn_common.security.tokens import TokenVerifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    key = ec.generate_private_key(ec.SECP256R1())
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "keys.pem"
        keys.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        verifier = TokenVerifier(jwt_keys=keys, algorithms=("ES256",))
        expires = int(time.time()) + 3600
        tokens = [
            jwt.encode({"sub": f"app-{i}", "scope": "recommend", "exp": expires}, key, algorithm="ES256")
            for i in range(args.tokens)
        ]
        first, again = [], []
        for token in tokens:
            started = time.perf_counter()
            verifier.verify(token)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            verifier.verify(token)
            again.append(time.perf_counter() - started)
    print(
        f"{args.tokens} ES256 tokens: first verify median {statistics.median(first) * 1e6:.0f} us, "
        f"cached median {statistics.median(again) * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
