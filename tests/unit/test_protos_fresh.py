"""The committed generated code must match protos/ (CI fails when it is stale)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_image_classified_event_has_no_image_field() -> None:
    from snaplearn.events.v1 import events_pb2

    fields = {f.name for f in events_pb2.ImageClassified.DESCRIPTOR.fields}
    assert fields == {"event_id", "user_id", "time", "model_name", "model_version", "labels"}
    assert not any(f.type == f.TYPE_BYTES for f in events_pb2.ImageClassified.DESCRIPTOR.fields)
