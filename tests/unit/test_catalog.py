"""The learning catalog: sample generation, CSV/JSONL files, validation, label mapping."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_recommender.catalog import (
    FORMATS,
    SAMPLE_SCHEMA,
    Catalog,
    CatalogError,
    LearningItem,
    check_label_mapping,
    default_label_to_concepts,
    diff_catalogs,
    generate_sample_catalog,
    item_from_proto,
    item_to_proto,
    load_catalog,
    load_label_to_concepts,
    load_schema,
    save_catalog,
)


def _item(**overrides: object) -> LearningItem:
    fields: dict[str, object] = {
        "item_id": "fractions-x",
        "title": "Equivalent fractions (video, grade 4)",
        "concepts": ("fractions",),
        "grade": 4,
        "format": "video",
        "difficulty": 2,
    }
    fields.update(overrides)
    return LearningItem(**fields)  # type: ignore[arg-type]


def test_sample_catalog_is_deterministic_and_covers_every_default_topic() -> None:
    first = generate_sample_catalog(seed=0, items_per_topic=12)
    assert first == generate_sample_catalog(seed=0, items_per_topic=12)
    assert first != generate_sample_catalog(seed=1, items_per_topic=12)
    assert len(first) == 12 * len(DEFAULT_TOPICS)
    assert set(first.concepts) == set(DEFAULT_TOPICS)
    for topic in DEFAULT_TOPICS:
        assert sum(item.concepts[0] == topic for item in first) == 12
    spanning = [item for item in first if len(item.concepts) == 2]
    assert len(spanning) == 3 * len(DEFAULT_TOPICS)  # every 4th item of each topic
    fractions_items = first.positions_for_concept("fractions")
    assert any(first[p].concepts == ("division", "fractions") for p in fractions_items)


def test_sample_items_have_valid_metadata_and_descriptive_titles() -> None:
    catalog = generate_sample_catalog()
    for item in catalog:
        assert item.grade is not None and item.difficulty is not None
        assert 1 <= item.grade <= 8 and 1 <= item.difficulty <= 5 and item.format in FORMATS
        assert item.title.endswith(f"({item.format}, grade {item.grade})")
    first_fraction = catalog.get("fractions-001")
    assert first_fraction is not None
    assert first_fraction.title.startswith("Adding fractions with unlike denominators (")
    assert catalog.position("fractions-001") == 4 * 12
    assert catalog.get("nope") is None
    assert len({item.title for item in catalog}) == len(catalog.items), (
        "students see titles: keep them unique"
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_file_round_trip_keeps_every_field_and_the_order(tmp_path: Path, suffix: str) -> None:
    catalog = generate_sample_catalog(items_per_topic=5)
    path = tmp_path / f"catalog{suffix}"
    save_catalog(catalog, path)
    assert load_catalog(path) == catalog


def test_csv_joins_concepts_with_semicolons(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    save_catalog(Catalog([_item(concepts=("fractions", "decimals"))]), path)
    assert "fractions;decimals" in path.read_text()


SCHOOL_DECLARATION = """
# A school's exercise table, exported from Excel.
[item]
id = "Exercise ID"
title = "Title"
concepts = ""
prerequisites = "Needs"
prerequisite_separator = ","

[features.topic]
type = "categorical"
column = "Topic"

[features.area]
type = "multi"
column = "Areas"
separator = "|"

[features.minutes]
type = "numeric"
column = "Minutes"
buckets = [10, 20]

[features.grade]
type = "numeric"
column = "Grade"
"""
SCHOOL_CSV = (
    "\ufeffExercise ID , Title ,Topic, Areas ,Minutes,Grade,Needs\r\n"
    " frac-1 , Brüche vergleichen ,Fractions,number|visual, 5 ,4,\r\n"
    'frac-2,"Fractions, on a line",Fractions,number,15,4,frac-1\r\n'
    "\r\n"
    'geo-1,Ángulos ✓,Geometry,shape| visual ,25,5,"frac-1, frac-2"\r\n'
)


def _school(tmp_path: Path, csv_text: str = SCHOOL_CSV, declaration: str = SCHOOL_DECLARATION) -> Path:
    path = tmp_path / "school.csv"
    path.write_bytes(csv_text.encode("utf-8"))
    (tmp_path / "school.features.toml").write_text(declaration, encoding="utf-8")
    return path


def test_sample_catalog_declares_grade_format_and_difficulty_and_a_prerequisite_chain() -> None:
    catalog = generate_sample_catalog(items_per_topic=4)
    item = catalog.get("fractions-002")
    assert item is not None
    assert set(item.features) == {"grade", "format", "difficulty"}
    assert item.features["grade"] == (str(item.grade),) and item.numbers["grade"] == item.grade
    assert item.prerequisites == ("fractions-001",)
    assert catalog.get("fractions-001").prerequisites == ()  # type: ignore[union-attr]
    assert catalog.feature_names == ("difficulty", "format", "grade")
    assert {spec.name for spec in SAMPLE_SCHEMA.features} == {"grade", "format", "difficulty"}


def test_a_schools_own_catalog_with_declared_features_prerequisites_a_bom_and_stray_spaces(
    tmp_path: Path,
) -> None:
    catalog = load_catalog(_school(tmp_path))
    assert [item.item_id for item in catalog] == ["frac-1", "frac-2", "geo-1"]
    first, second, third = catalog
    assert first.title == "Brüche vergleichen" and third.title == "Ángulos ✓"
    assert first.concepts == ()  # this catalog has no concepts column
    assert dict(first.features) == {
        "area": ("number", "visual"),
        "grade": ("4",),
        "minutes": ("<10",),
        "topic": ("Fractions",),
    }
    assert first.numbers == {"grade": 4.0, "minutes": 5.0}
    assert second.features["minutes"] == ("10-20",) and third.features["minutes"] == (">=20",)
    assert third.features["area"] == ("shape", "visual")
    assert second.title == "Fractions, on a line"
    assert (first.prerequisites, second.prerequisites, third.prerequisites) == (
        (),
        ("frac-1",),
        ("frac-1", "frac-2"),
    )
    assert catalog.feature_values("topic") == ("Fractions", "Geometry")
    assert list(catalog.feature_index["area"]["visual"]) == [0, 2]
    assert first.grade == 4 and first.format is None


def test_a_declaration_can_be_json_or_given_explicitly_and_jsonl_reads_the_same(tmp_path: Path) -> None:
    lines = [
        {"id": "a", "name": "Alpha", "skills": ["x", "y"], "level": 2.5},
        {"id": "b", "name": "Beta", "skills": "y", "level": 3, "after": ["a"]},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("\ufeff" + "\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    declaration = tmp_path / "decl.json"
    declaration.write_text(
        json.dumps(
            {
                "item": {"id": "id", "title": "name", "concepts": "", "prerequisites": "after"},
                "features": {"skills": {"type": "multi"}, "level": "numeric"},
            }
        )
    )
    catalog = load_catalog(path, declaration)
    assert catalog[0].features == {"level": ("2.5",), "skills": ("x", "y")}
    assert catalog[1].prerequisites == ("a",) and catalog[1].numbers == {"level": 3.0}
    schema = load_schema(declaration)
    save_catalog(catalog, tmp_path / "copy.csv", schema)
    assert (tmp_path / "copy.features.toml").is_file()
    assert load_catalog(tmp_path / "copy.csv") == catalog


def _refusal(path: Path, *args: object) -> str:
    with pytest.raises(CatalogError) as caught:
        load_catalog(path, *args)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "Traceback" not in message and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            "frac-9,Nine,Fractions,number,lots,4,",
            "line 2, column 5 (Minutes): Minutes must be a number, got 'lots'",
        ),
        (
            "frac-9,Nine,Fractions,number,5,4,nope",
            "line 2, column 7 (Needs): prerequisite 'nope' is not an item of this catalog",
        ),
        (
            " ,Nine,Fractions,number,5,4,",
            "line 2, column 1 (Exercise ID): Exercise ID is empty (every item needs one)",
        ),
        ("frac-9,,Fractions,number,5,4,", "line 2, column 2 (Title): Title is empty"),
        (
            "frac-9,Nine,Fractions,number,5,4,frac-9",
            "line 2, column 7 (Needs): item 'frac-9' lists itself as a prerequisite",
        ),
        (
            "frac-9,Nine,Fractions,number,5,4,,extra",
            "line 2, column 8: the row has 8 fields but the header has 7",
        ),
    ],
)
def test_csv_refusals_name_the_file_the_line_and_the_column(tmp_path: Path, row: str, expected: str) -> None:
    path = _school(tmp_path, "\ufeffExercise ID,Title,Topic,Areas,Minutes,Grade,Needs\n" + row + "\n")
    message = _refusal(path)
    assert message.startswith(f"{path}, ") and expected in message


def test_duplicates_cycles_and_missing_columns_are_refused_by_line(tmp_path: Path) -> None:
    header = "Exercise ID,Title,Topic,Areas,Minutes,Grade,Needs\n"
    path = _school(tmp_path, header + "a,A,T,x,1,1,\nb,B,T,x,1,1,\na,Again,T,x,1,1,\n")
    assert "line 4, column 1 (Exercise ID): duplicate item_id 'a' (first on line 2)" in _refusal(path)
    path = _school(tmp_path, header + "a,A,T,x,1,1,c\nb,B,T,x,1,1,a\nc,C,T,x,1,1,b\n")
    assert "line 2, column 7 (Needs): prerequisites form a cycle (a -> c -> b -> a)" in _refusal(path)
    path = _school(tmp_path, "Exercise ID,Title,Topic,Areas,Grade,Needs\na,A,T,x,1,\n")
    assert f"{path}, line 1: missing column 'Minutes'" in _refusal(path)
    path = _school(tmp_path, "Exercise ID,Title,Topic,Title\n")
    assert "line 1, column 4: column 'Title' appears twice (also column 2)" in _refusal(path)
    path.write_bytes(header.encode() + b"a,Caf\xe9,T,x,1,1,\n")
    assert "line 2, column 6: not UTF-8 text" in _refusal(path)


def test_declaration_refusals_name_the_line_and_the_column(tmp_path: Path) -> None:
    path = _school(tmp_path, declaration='[features.topic]\ntype = "categorical\n')
    assert f"{tmp_path / 'school.features.toml'}, line 2, column" in _refusal(path)
    path = _school(
        tmp_path,
        declaration='[item]\nid = "Exercise ID"\n\n[features.topic]\ncolumn = "Topic"\n  type = "colour"\n',
    )
    message = _refusal(path)
    assert (
        "school.features.toml, line 6, column 3: feature 'topic': "
        "type must be one of categorical, multi, numeric" in message
    )
    path = _school(tmp_path, declaration='[features.topic]\nseperator = "|"\n')
    assert "line 2, column 1: feature 'topic': unknown key 'seperator'" in _refusal(path)
    path = _school(tmp_path, declaration='[features.minutes]\ntype = "numeric"\nbuckets = [20, 10]\n')
    assert "line 3, column 1: feature 'minutes': buckets must be finite, ascending and distinct" in _refusal(
        path
    )
    path = _school(tmp_path, declaration='[features.title]\ntype = "categorical"\n')
    assert "line 1, column 11: feature name 'title' must be a plain name" in _refusal(path)
    (tmp_path / "school.features.toml").unlink()
    (tmp_path / "school.features.json").write_text('{"features": {"topic": {"type": "multi",}}}')
    assert "school.features.json, line 1, column 41: not valid JSON" in _refusal(path)


def test_jsonl_refusals_name_the_line_and_the_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_item().to_json())
    path.write_text(good + "\n{not json\n")
    assert f"{path}, line 2, column 2: not valid JSON" in _refusal(path)
    line = json.dumps({**_item().to_json(), "concepts": [1, 2]})
    path.write_text(line + "\n")
    column = line.index('"concepts"') + 1
    assert f"line 1, column {column} (concepts): concepts must be a list of strings" in _refusal(path)
    line = json.dumps({**_item().to_json(), "grade": "four"})
    path.write_text(good + "\n" + line + "\n")
    column = line.index('"grade"') + 1
    assert f"line 2, column {column} (grade): grade must be a number, got 'four'" in _refusal(path)
    path.write_text("\n")
    assert "catalog has no items" in _refusal(path)
    assert "unsupported catalog format '.xml'" in _refusal(tmp_path / "catalog.xml")


def test_catalog_changes_keep_positions_and_diff_names_only_the_differences() -> None:
    catalog = generate_sample_catalog(items_per_topic=3)
    changed = _item(item_id="fractions-001", title="Fractions, new edition", grade=5)
    new = _item(item_id="fractions-new")
    updated = catalog.with_item(changed).with_item(new).with_retired(["geometry-003"])
    assert updated.row("fractions-001") == catalog.position("fractions-001")
    assert updated.get("fractions-001") == changed and updated.position("fractions-new") == len(catalog)
    assert updated.position("geometry-003") is None and updated.row("geometry-003") is not None
    assert updated.is_retired("geometry-003") and updated.n_active == len(catalog)
    assert updated.positions_for_concept("geometry") == tuple(
        p for p in catalog.positions_for_concept("geometry") if catalog[p].item_id != "geometry-003"
    )
    assert not updated.active_mask[updated.row("geometry-003")]
    diff = diff_catalogs(catalog, updated)
    assert (diff.added, diff.changed, diff.retired) == ((new,), (changed,), ("geometry-003",))
    assert not diff_catalogs(updated, updated)
    back = diff_catalogs(updated, catalog)
    assert [i.item_id for i in back.added] == ["geometry-003"] and back.retired == ("fractions-new",)
    assert pickle.loads(pickle.dumps(updated)) == updated
    assert item_from_proto(item_to_proto(changed)) == changed


def test_items_pickled_before_declared_features_still_load() -> None:
    old_state = ["fractions-x", "Equivalent fractions", ("fractions",), 4, "video", 2]
    item = LearningItem.__new__(LearningItem)
    item.__setstate__(old_state)
    assert item == _item(title="Equivalent fractions")
    assert item.features == {"difficulty": ("2",), "format": ("video",), "grade": ("4",)}


def test_items_validate_themselves() -> None:
    with pytest.raises(CatalogError, match="contain duplicates"):
        _item(concepts=("fractions", "fractions"))
    with pytest.raises(CatalogError, match="without ';'"):
        _item(concepts=("a;b",))
    with pytest.raises(CatalogError, match="title must be a non-empty string"):
        _item(title=" ")
    with pytest.raises(CatalogError, match="cannot be its own prerequisite"):
        _item(prerequisites=("fractions-x",))
    with pytest.raises(CatalogError, match="feature 'topic' needs non-empty values"):
        _item(features={"topic": ()})


def test_label_mapping_defaults_to_identity_and_loads_from_json(tmp_path: Path) -> None:
    assert dict(default_label_to_concepts()) == {topic: (topic,) for topic in DEFAULT_TOPICS}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"fraction_bar": ["fractions", "division"], "ruler": "geometry"}))
    mapping = load_label_to_concepts(path)
    assert dict(mapping) == {"fraction_bar": ("fractions", "division"), "ruler": ("geometry",)}
    check_label_mapping(mapping, generate_sample_catalog())


def test_no_label_mapping_given_is_never_a_complaint(tmp_path: Path) -> None:
    catalog = load_catalog(_school(tmp_path))  # no concept is a vision label here
    check_label_mapping(None, catalog)
    with pytest.raises(
        CatalogError,
        match=r"no catalog items: addition, .*fractions.*\(the catalog's concepts: none\)",
    ):
        check_label_mapping(default_label_to_concepts(), catalog)  # only when the user gives one


def test_label_mapping_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text('{\n  "ruler": []\n}')
    with pytest.raises(CatalogError, match="line 2, column 3: label 'ruler' must map to a concept"):
        load_label_to_concepts(path)
    path.write_text("[1, 2]")
    with pytest.raises(CatalogError, match="expected a JSON object"):
        load_label_to_concepts(path)
    with pytest.raises(CatalogError, match=r"concept\(s\) with no catalog items: trigonometry"):
        check_label_mapping({"triangle": ("trigonometry",)}, generate_sample_catalog())


EXAMPLE = Path(__file__).resolve().parents[2] / "recommender_worker" / "examples" / "school_catalog.csv"


def test_the_example_school_catalog_loads_with_its_declaration() -> None:
    assert EXAMPLE.read_bytes().startswith(b"\xef\xbb\xbf")  # saved by Excel: a BOM
    catalog = load_catalog(EXAMPLE)
    assert catalog.feature_names == ("area", "grade", "minutes", "topic")
    item = catalog.get("dec-02")
    assert item is not None and item.prerequisites == ("dec-01", "frac-02")
    assert item.concepts == ("decimals", "fractions") and item.features["minutes"] == ("15-25",)
    assert catalog.get("eq-02").title == "Équations à deux étapes"  # type: ignore[union-attr]


def test_the_recommender_refuses_a_bad_catalog_in_one_sentence_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "school.csv"
    bad.write_text("item_id,title,prerequisites\na,Alpha,b\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snaplearn_recommender.main",
            "--catalog",
            str(bad),
            "--bus-path",
            str(tmp_path / "bus.db"),
            "--checkpoint-dir",
            str(tmp_path / "checkpoints"),
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"snaplearn-recommender: {bad}, line 2, column 3 (prerequisites): prerequisite 'b' is not an item "
        "of this catalog"
    )


def test_incremental_lookups_after_changes_equal_a_catalog_built_from_scratch() -> None:
    rng = random.Random(7)
    catalog = generate_sample_catalog(items_per_topic=5)
    assert catalog.feature_index and catalog.numeric_columns  # computed: the successors update them
    topics = ("Food", "Space", "Sport")
    for step in range(60):
        ids = [item.item_id for item in catalog]
        action = rng.random()
        if action < 0.3:
            catalog = catalog.with_retired(rng.sample(ids, 2))
        else:
            item_id = rng.choice(ids) if action < 0.7 else f"new-{step}"
            concepts = tuple(rng.sample(DEFAULT_TOPICS, rng.randint(0, 2)))
            features: dict[str, tuple[str, ...]] = {"topic": (rng.choice(topics),)}
            numbers = {"minutes": float(rng.randint(1, 30))} if rng.random() < 0.7 else {}
            if numbers:
                features["minutes"] = (str(int(numbers["minutes"])),)
            catalog = catalog.with_item(
                LearningItem(item_id, f"T {step}", concepts, features=features, numbers=numbers)
            )
        fresh = Catalog(catalog.items, catalog.retired_ids)
        assert catalog == fresh and catalog.concepts == fresh.concepts
        for concept in fresh.concepts:
            assert catalog.positions_for_concept(concept) == fresh.positions_for_concept(concept)
        assert {n: {t: list(p) for t, p in v.items()} for n, v in catalog.feature_index.items()} == {
            n: {t: list(p) for t, p in v.items()} for n, v in fresh.feature_index.items()
        }
        assert catalog.numeric_columns.keys() == fresh.numeric_columns.keys()
        for name, column in fresh.numeric_columns.items():
            np.testing.assert_array_equal(catalog.numeric_columns[name], column)
        np.testing.assert_array_equal(catalog.active_mask, fresh.active_mask)
        assert all(catalog.position(i.item_id) == fresh.position(i.item_id) for i in fresh)
