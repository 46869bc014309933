"""Knowledge-tracing evaluation: the three-line parser, prerequisites, practise-next, the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from snaplearn_offline import evaluate
from snaplearn_offline import knowledge_tracing as kt
from snaplearn_offline.datasets import load_attempts, load_concept_map


def test_three_line_format_is_parsed_in_order(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("3\n7,7,9\n0,1,1\n\n2\n9,10,\n1,0,\n")
    assert load_attempts(path) == [[("7", False), ("7", True), ("9", True)], [("9", True), ("10", False)]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3\n7,7\n0,1\n", r"bad\.csv:1: 3 attempts announced but line 2 has 2 ids and line 3 has 2"),
        ("x\n7\n1\n", r"bad\.csv:1: expected the number of attempts"),
        ("1\n7\n2\n", r"bad\.csv:3: outcomes must be 0 or 1"),
        ("1\n7\n", r"bad\.csv: expected three lines per student"),
    ],
)
def test_three_line_format_errors_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_attempts(path)


def test_concept_map_skips_the_header(tmp_path: Path) -> None:
    path = tmp_path / "qid_sid"
    path.write_text("qid\tskillid\tskillname\n1\t4\tforces\n2\t4\tforces\n3\t5\tmoments\n")
    assert load_concept_map(path) == {"qid": "skillid", "1": "4", "2": "4", "3": "5"}


def test_auc_counts_ties_as_half() -> None:
    assert kt.roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert kt.roc_auc([True, False, True, False], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both"):
        kt.roc_auc([True, True], [0.1, 0.2])


def test_prerequisites_are_what_most_students_start_before() -> None:
    orders = [["a", "b", "c"]] * 8 + [["b", "a", "c"]] * 3 + [["c"]]
    prerequisites = kt.derive_prerequisites(orders, min_share=0.5, min_students=5)
    assert prerequisites["b"] == frozenset({"a"})
    assert prerequisites["c"] == frozenset({"a", "b"})  # 11 of the 12 who start c did both first
    assert "a" not in prerequisites  # 3 of 11 started b first: not a majority


def test_practise_next_regroups_only_the_head_of_the_ranking() -> None:
    mastery = {"a": 0.9, "b": 0.3, "c": 0.7, "d": 0.6, "e": 0.7}
    prerequisites = {"c": frozenset({"b"}), "d": frozenset({"a"})}
    ranked = ["c", "b", "d", "e"]
    shaped = kt.practise_next(ranked, mastery.__getitem__, prerequisites, (0.55, 0.85), 0.8, window=3)
    # d: prerequisite a mastered, in band; b: no prerequisites, out of band; c: b not mastered.
    assert shaped == ["d", "b", "c", "e"]


def _tracks(students: int, seed: int) -> list[list[tuple[str, bool]]]:
    """Two curricula (a0..a7 for most students, b0..b7 for the others), each followed in order;
    success grows with ability and right answers on the skill."""
    rng = np.random.default_rng(seed)
    out = []
    for student in range(students):
        track = "a" if student % 10 < 7 else "b"
        ability = rng.normal()
        attempts = []
        for skill in range(int(rng.integers(3, 9))):
            right = 0
            for _ in range(4):
                p = 1 / (1 + math.exp(-(ability - 0.2 * skill + 0.5 * right - 0.3)))
                correct = bool(rng.random() < p)
                right += correct
                attempts.append((f"{track}{skill}", correct))
        out.append(attempts)
    return out


def _write(path: Path, students: list[list[tuple[str, bool]]]) -> Path:
    lines = []
    for attempts in students:
        lines += [
            str(len(attempts)),
            ",".join(i for i, _ in attempts),
            ",".join(str(int(c)) for _, c in attempts),
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluation_command_on_a_synthetic_curriculum(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", _tracks(150, seed=3))
    test = _write(tmp_path / "test.csv", _tracks(60, seed=4))
    out = tmp_path / "out"
    argv = [
        *("--train", str(train), "--test", str(test), "--name", "tracks", "--k", "3"),
        *("--json", str(out / "kt.json"), "--markdown", str(out / "kt.md")),
    ]
    assert kt.main(argv) == 0
    payload = json.loads((out / "kt.json").read_text())
    (report,) = payload["reports"]
    assert (report["data"], report["train_students"], report["test_students"]) == ("tracks", 150, 60)
    assert report["test_attempts"] == sum(len(s) for s in _tracks(60, seed=4))
    assert report["auc"]["mastery"] > 0.65
    assert report["auc"]["mastery"] > report["auc"]["elo"]
    policies = {p["policy"]: p for p in report["policies"]}
    assert set(policies) == {"popularity", "lightfm", "practise-next"}
    # Popularity recommends the big track's skills to the small track's students; the others
    # know from the skills practised which track a student is on.
    assert policies["lightfm"]["hit"] > policies["popularity"]["hit"] + 0.1
    assert policies["practise-next"]["hit"] > policies["popularity"]["hit"] + 0.1
    for policy in policies.values():
        assert 0.0 <= policy["recall"] <= 1.0 and policy["events"] > 100
    table = (out / "kt.md").read_text()
    assert "| tracks | practise-next |" in table and "--name tracks" in table
    # Deterministic: the same command gives the same numbers.
    assert kt.main([*argv[:-4], "--json", str(out / "again.json")]) == 0
    (again,) = json.loads((out / "again.json").read_text())["reports"]
    assert (again["auc"], again["policies"]) == (report["auc"], report["policies"])


def test_missing_file_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no such file: .*nothing\.csv"):
        kt.main(["--train", str(tmp_path / "nothing.csv"), "--test", str(tmp_path / "nothing.csv")])


def test_evaluate_has_it_as_a_sub_command(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", _tracks(40, seed=5))
    out = tmp_path / "kt.json"
    argv = ["knowledge-tracing", "--train", str(train), "--test", str(train), "--json", str(out)]
    assert evaluate.main(argv) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert report["data"] == "train" and report["test_students"] == 40
