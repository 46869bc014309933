"""The learning catalog: sample generation, CSV/JSONL files, validation, label mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_recommender.catalog import (
    FORMATS,
    Catalog,
    CatalogError,
    LearningItem,
    check_label_mapping,
    default_label_to_concepts,
    generate_sample_catalog,
    load_catalog,
    load_label_to_concepts,
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


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a,Title,fractions,9,video,2", "bad.csv:2: item 'a': grade must be 1..8, got 9"),
        ("a,Title,fractions,4,podcast,2", "format must be one of video, worksheet, quiz, game, lesson"),
        ("a,Title,fractions,4,video,7", "difficulty must be 1..5, got 7"),
        ("a,Title,,4,video,2", "needs at least one concept"),
        ("a,Title,fractions,four,video,2", "grade must be an integer, got 'four'"),
        (",Title,fractions,4,video,2", "item_id must be a non-empty string"),
    ],
)
def test_csv_validation_names_the_line_and_the_problem(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("item_id,title,concepts,grade,format,difficulty\n" + row + "\n")
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_csv_missing_column_and_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("item_id,title,concepts,grade\na,T,fractions,3\n")
    with pytest.raises(CatalogError, match="missing column"):
        load_catalog(path)
    path.write_text("item_id,title,concepts,grade,format,difficulty\na,T,x,3,quiz,1\na,U,y,3,quiz,1\n")
    with pytest.raises(CatalogError, match="duplicate item_id 'a'"):
        load_catalog(path)


def test_jsonl_validation(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_item().to_json())
    path.write_text(good + "\n{not json\n")
    with pytest.raises(CatalogError, match=r"bad.jsonl:2: not valid JSON"):
        load_catalog(path)
    path.write_text(json.dumps({**_item().to_json(), "concepts": [1, 2]}) + "\n")
    with pytest.raises(CatalogError, match="concepts must be a list of strings"):
        load_catalog(path)
    path.write_text("\n")
    with pytest.raises(CatalogError, match="catalog has no items"):
        load_catalog(path)
    with pytest.raises(CatalogError, match=r"unsupported catalog format '\.xml'"):
        load_catalog(tmp_path / "catalog.xml")


def test_items_validate_themselves() -> None:
    with pytest.raises(CatalogError, match="contain duplicates"):
        _item(concepts=("fractions", "fractions"))
    with pytest.raises(CatalogError, match="without ';'"):
        _item(concepts=("a;b",))
    with pytest.raises(CatalogError, match="title must be a non-empty string"):
        _item(title=" ")


def test_label_mapping_defaults_to_identity_and_loads_from_json(tmp_path: Path) -> None:
    assert dict(default_label_to_concepts()) == {topic: (topic,) for topic in DEFAULT_TOPICS}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"fraction_bar": ["fractions", "division"], "ruler": "geometry"}))
    mapping = load_label_to_concepts(path)
    assert dict(mapping) == {"fraction_bar": ("fractions", "division"), "ruler": ("geometry",)}
    check_label_mapping(mapping, generate_sample_catalog())


def test_label_mapping_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"ruler": []}))
    with pytest.raises(CatalogError, match="label 'ruler' must map to a concept"):
        load_label_to_concepts(path)
    path.write_text("[1, 2]")
    with pytest.raises(CatalogError, match="expected a JSON object"):
        load_label_to_concepts(path)
    with pytest.raises(CatalogError, match=r"concept\(s\) with no catalog items: trigonometry"):
        check_label_mapping({"triangle": ("trigonometry",)}, generate_sample_catalog())
