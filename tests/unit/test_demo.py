"""The demo's verdict (issue 21): it said "recommendations moved" when nothing had moved, and
judged students by vision labels even when a label map sends them to other concepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn_client import cli
from snaplearn_client.demo import DEMO_STUDENTS, TOP_N, Student, load_label_map, students_for, summarise


def _reply(*concepts: str) -> recommender_pb2.RecommendResponse:
    items = [recommender_pb2.RecommendedItem(item_id=f"i{n}", concepts=[c]) for n, c in enumerate(concepts)]
    return recommender_pb2.RecommendResponse(items=items)


ADA, BEN = Student("ada", ("fractions",)), Student("ben", ("geometry",))


def test_a_demo_where_nothing_moved_says_so_and_fails() -> None:
    before = {
        "ada": _reply(*["fractions"] * TOP_N),
        "ben": _reply("geometry", "algebra", "algebra", "x", "y"),
    }
    lines, rc = summarise([ADA, BEN], before, dict(before), {})
    assert lines[-1] == (
        "0/2 students' recommendations moved toward their photos; 1 already matched them all before; "
        "1 did not move"
    )
    assert rc == 1


def test_a_demo_where_every_student_moved_passes() -> None:
    before = {"ada": _reply("x", "x", "x", "x", "x"), "ben": _reply("geometry", "x", "x", "x", "x")}
    after = {"ada": _reply("fractions", "x", "x", "x", "x"), "ben": _reply(*["geometry"] * TOP_N)}
    lines, rc = summarise([ADA, BEN], before, after, {})
    assert lines[-1] == "2/2 students' recommendations moved toward their photos" and rc == 0
    assert "  ada        before 0/5  after 1/5" in lines


def test_a_label_map_decides_which_concepts_match(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"halves": ["fractions"], "shapes": "geometry"}))
    label_map = load_label_map(path)
    students = students_for(["halves", "shapes"])  # a custom model's labels: one student each
    assert [s.topics for s in students] == [("halves",), ("shapes",)]
    before = {s.user_id: _reply("x", "x", "x", "x", "x") for s in students}
    after = {students[0].user_id: _reply("fractions", "x", "x", "x", "x"),
             students[1].user_id: _reply("geometry", "geometry", "x", "x", "x")}  # fmt: skip
    lines, rc = summarise(students, before, after, label_map)
    assert rc == 0, lines
    _, unmapped_rc = summarise(students, before, after, {})
    assert unmapped_rc == 1  # without the map, "halves" matches no catalog concept


def test_the_default_photos_give_the_default_students() -> None:
    topics = sorted({t for s in DEMO_STUDENTS for t in s.topics} | {"extra"})
    assert students_for(topics) == DEMO_STUDENTS


def test_a_demo_without_photos_says_so_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(
        ["--vision", "127.0.0.1:1", "--recommender", "127.0.0.1:1", "demo", "--photos", str(tmp_path / "no")]
    )
    assert rc == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {tmp_path / 'no'} is not a folder of <topic>/*.png photos"
    )
