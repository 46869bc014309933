"""Knowledge tracing on the public student logs (../shared/data: ASSIST2015, STATICS2011), on a
subset of students so that it stays quick; the full runs are docs/benchmarks/knowledge_tracing.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from snaplearn_offline import knowledge_tracing as kt
from snaplearn_offline.datasets import load_attempts

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SNAPLEARN_KT_DATA", REPO.parent / "shared/data"))
ASSIST = DATA / "assist2015"
STATICS = DATA / "statics2011"


def _needs(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(
            f"public knowledge-tracing data not present ({', '.join(missing)}); set SNAPLEARN_KT_DATA"
        )


def test_assist2015_files_parse_as_three_line_students() -> None:
    _needs(ASSIST / "assist2015_test.csv")
    students = load_attempts(ASSIST / "assist2015_test.csv")
    assert len(students) > 1000
    assert all(len(s) > 0 for s in students)
    skills = {item for s in students for item, _ in s}
    assert 50 < len(skills) <= 100  # ids are the 100 skills


def test_mastery_beats_plain_elo_on_real_students(tmp_path: Path) -> None:
    train, test = ASSIST / "assist2015_train.csv", ASSIST / "assist2015_test.csv"
    statics_train, statics_test = STATICS / "STATICS_train.csv", STATICS / "STATICS_test.csv"
    concepts = STATICS / "STATICS_qid_sid_sname"
    _needs(train, test, statics_train, statics_test, concepts)
    out = tmp_path / "kt.json"
    argv = [
        *("--train", str(train), "--test", str(test), "--concepts", "-", "--name", "assist"),
        *("--train", str(statics_train), "--test", str(statics_test), "--concepts", str(concepts)),
        *("--name", "statics", "--students", "60", "--json", str(out)),
    ]
    assert kt.main(argv) == 0
    reports = {r["data"]: r for r in json.loads(out.read_text())["reports"]}
    assert set(reports) == {"assist", "statics"}
    for name, report in reports.items():
        assert report["train_students"] == report["test_students"] == 60
        assert report["auc"]["mastery"] > report["auc"]["elo"], name
        assert report["auc"]["mastery"] > 0.65, name
        policies = {p["policy"]: p for p in report["policies"]}
        assert policies["lightfm"]["hit"] > policies["popularity"]["hit"], name
        assert policies["practise-next (tuned)"]["hit"] > policies["popularity"]["hit"], name
        # Tuned on the training students' validation split (no shaping is one of the choices).
        assert report["validation"]["hit"] >= report["validation"]["lightfm_hit"], name
