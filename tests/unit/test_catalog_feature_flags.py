"""A catalog declared by flags: `--catalog-feature NAME[@COLUMN][=KIND[:ARG]]` (the file's three
kinds) and `--catalog-item KEY=COLUMN` (the file's [item] keys), merged into the declaration in
force (a flag replaces what it names), and every refusal one sentence naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from snaplearn_recommender.catalog import (
    CatalogError,
    FeatureSpec,
    load_catalog,
    parse_feature_flag,
    parse_feature_flags,
    parse_item_flags,
)
from snaplearn_recommender.catalog_sync import CatalogSyncSettings
from snaplearn_recommender.config import RecommenderSettings

CSV = (
    "\ufeffitem_id,title,concepts,Topic,tags,minutes,grade\n"
    "a-1,Fractions one,fractions,Number,visual|short,5,3\n"
    "a-2,Fractions two,fractions,Number,visual,12,4\n"
    "g-1,Angles,geometry,Shape,,30,5\n"
)


def test_each_kind_and_its_argument() -> None:
    assert parse_feature_flag("topic") == FeatureSpec("topic", "categorical")
    assert parse_feature_flag("topic@Topic=categorical") == FeatureSpec("topic", "categorical", "Topic")
    assert parse_feature_flag("tags=multi") == FeatureSpec("tags", "multi", separator=";")
    assert parse_feature_flag("tags=multi:|") == FeatureSpec("tags", "multi", separator="|")
    assert parse_feature_flag("tags=multi:, ").separator == ", "  # taken as given
    assert parse_feature_flag("minutes=numeric") == FeatureSpec("minutes", "numeric")
    assert parse_feature_flag(" minutes = NUMERIC:0, 10,20 ").buckets == (0.0, 10.0, 20.0)


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        ("topic=colour", "the type must be one of categorical, multi, numeric"),
        ("=categorical", "give a feature name before '='"),
        ("topic@=categorical", "give the column after '@'"),
        ("topic=categorical:x", "a categorical feature takes nothing after ':'"),
        ("minutes=numeric:0,ten", "bucket edges must be numbers separated by commas"),
        ("minutes=numeric:20,10", "buckets must be finite, ascending and distinct"),
        ("title=categorical", "feature name 'title' must be a plain name"),
    ],
)
def test_a_bad_flag_is_refused_in_one_sentence_naming_it(flag: str, reason: str) -> None:
    with pytest.raises(CatalogError) as refused:
        parse_feature_flag(flag)
    message = str(refused.value)
    assert message.startswith(f"--catalog-feature {flag!r}: ") and reason in message
    assert "\n" not in message


def test_a_feature_given_twice_is_refused() -> None:
    with pytest.raises(CatalogError, match="declares feature 'topic' twice"):
        parse_feature_flags(["topic", "topic=multi"])


def test_flags_alone_declare_the_features_beside_the_sample_columns(tmp_path: Path) -> None:
    path = tmp_path / "school.csv"
    path.write_text(CSV, encoding="utf-8")
    flags = parse_feature_flags(["topic@Topic", "tags=multi:|", "minutes=numeric:10,20"])
    catalog = load_catalog(path, features=flags)
    first = catalog.get("a-1")
    assert first is not None
    assert {name: sorted(values) for name, values in first.features.items()} == {
        "grade": ["3"],  # the sample's grade column, declared where present
        "minutes": ["<10"],
        "tags": ["short", "visual"],
        "topic": ["Number"],
    }
    assert first.numbers["minutes"] == 5.0
    angles = catalog.get("g-1")
    assert angles is not None and angles.features["minutes"] == (">=20",) and "tags" not in angles.features
    assert sorted(catalog.feature_index["topic"]) == ["Number", "Shape"]


def test_flags_merge_into_a_declaration_file_and_replace_its_feature_of_the_same_name(tmp_path: Path) -> None:
    path = tmp_path / "school.csv"
    path.write_text(CSV, encoding="utf-8")
    (tmp_path / "school.features.toml").write_text(
        '[features.topic]\ntype = "categorical"\ncolumn = "Topic"\n'
        '[features.minutes]\ntype = "numeric"\n',  # one bucket per whole minute
        encoding="utf-8",
    )
    catalog = load_catalog(path, features=parse_feature_flags(["minutes=numeric:10", "tags=multi:|"]))
    item = catalog.get("a-2")
    assert item is not None
    assert item.features["topic"] == ("Number",)  # from the file
    assert item.features["minutes"] == (">=10",)  # the flag's buckets, not the file's
    assert set(item.features) == {"topic", "minutes", "tags"}  # a file declares no sample columns


def test_a_flagged_column_the_file_lacks_is_refused_naming_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "school.csv"
    path.write_text(CSV, encoding="utf-8")
    with pytest.raises(CatalogError) as refused:
        load_catalog(path, features=parse_feature_flags(["level=numeric"]))
    assert str(refused.value).startswith(
        f"{path}, line 1: missing column 'level', declared by --catalog-feature level"
    )
    with pytest.raises(CatalogError, match="column 'Topic' is already used by feature 'topic'"):
        load_catalog(path, features=parse_feature_flags(["topic@Topic", "kind@Topic"]))
    with pytest.raises(CatalogError, match="column 'title' is the item's id or title"):
        load_catalog(path, features=parse_feature_flags(["name@title"]))


def test_jsonl_catalogs_take_flags_too(tmp_path: Path) -> None:
    path = tmp_path / "school.jsonl"
    path.write_text(
        '{"item_id": "a-1", "title": "One", "concepts": "fractions", "tags": "x|y", "minutes": 7}\n',
        encoding="utf-8",
    )
    item = load_catalog(path, features=parse_feature_flags(["tags=multi:|", "minutes=numeric:5"])).get("a-1")
    assert item is not None and sorted(item.features["tags"]) == ["x", "y"]
    assert item.features["minutes"] == (">=5",)


def test_the_flag_repeats_reads_a_json_list_from_the_environment_and_refuses_in_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--catalog", "s.csv", "--catalog-feature", "topic@Topic", "--catalog-feature", "tags=multi:|"]
    settings = RecommenderSettings.from_argv(argv, environ={})
    assert settings.catalog_feature == ["topic@Topic", "tags=multi:|"]
    assert [spec.name for spec in settings.catalog_feature_specs()] == ["topic", "tags"]
    from_env = RecommenderSettings.from_env(
        {"SNAPLEARN_RECOMMENDER_CATALOG": "s.csv", "SNAPLEARN_RECOMMENDER_CATALOG_FEATURE": '["topic"]'}
    )
    assert from_env.catalog_feature == ["topic"]
    sync = CatalogSyncSettings.from_argv(
        ["--catalog", "s.csv", "--checkpoint-dir", "c", "--catalog-feature", "tags=multi:|"], environ={}
    )
    assert sync.catalog_feature == ["tags=multi:|"]
    for bad, reason in (
        (["--catalog", "s.csv", "--catalog-feature", "topic=colour"], "'topic=colour': the type must be"),
        (
            ["--catalog-feature", "topic"],
            "--catalog-feature declares columns of a catalog file: give --catalog",
        ),
    ):
        with pytest.raises(SystemExit) as exited:
            RecommenderSettings.from_argv(bad, environ={})
        assert exited.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--catalog-feature" in error and reason in error


EXAMPLE = Path(__file__).resolve().parents[2] / "recommender_worker" / "examples" / "school_catalog.csv"
# The example's declaration file (school_catalog.features.toml), as flags.
EXAMPLE_ITEM_FLAGS = ["id=Exercise ID", "title=Title", "concepts=Concepts", "prerequisites=Needs"]
EXAMPLE_FEATURE_FLAGS = [
    "topic@Topic",
    "area@Area=multi:|",
    "grade@Grade=numeric",
    "minutes@Minutes=numeric:15,25",
]


def test_flags_alone_declare_what_the_example_file_declares(tmp_path: Path) -> None:
    alone = tmp_path / EXAMPLE.name  # without the declaration beside it
    alone.write_bytes(EXAMPLE.read_bytes())  # its BOM included
    by_flags = load_catalog(
        alone, features=parse_feature_flags(EXAMPLE_FEATURE_FLAGS), item=parse_item_flags(EXAMPLE_ITEM_FLAGS)
    )
    by_file = load_catalog(EXAMPLE)
    assert len(by_flags) == len(by_file) > 0
    assert list(by_flags) == list(by_file)
    assert any(item.prerequisites for item in by_flags)


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        ("identifier=Exercise ID", "expected KEY=VALUE with KEY one of id, title, concepts"),
        ("id", "expected KEY=VALUE"),
        ("title= ", "the title column must be named"),
        ("concept_separator=", "a separator must not be empty"),
    ],
)
def test_a_bad_item_flag_is_refused_in_one_sentence_naming_it(flag: str, reason: str) -> None:
    with pytest.raises(CatalogError) as refused:
        parse_item_flags([flag])
    assert str(refused.value).startswith(f"--catalog-item {flag!r}: ") and reason in str(refused.value)
    with pytest.raises(CatalogError, match="--catalog-item gives id twice"):
        parse_item_flags(["id=a", "id=b"])


def test_item_flags_replace_the_files_item_columns(tmp_path: Path) -> None:
    path = tmp_path / "renamed.csv"
    path.write_text("code,name,concepts\nx-1,One,fractions\n", encoding="utf-8")
    (tmp_path / "renamed.features.toml").write_text('[item]\nid = "item_id"\n', encoding="utf-8")
    with pytest.raises(CatalogError, match="missing column 'item_id'"):
        load_catalog(path)
    catalog = load_catalog(path, item=parse_item_flags(["id=code", "title=name"]))
    assert [(item.item_id, item.title) for item in catalog] == [("x-1", "One")]
    settings = RecommenderSettings.from_argv(
        ["--catalog", str(path), "--catalog-item", "id=code"], environ={}
    )
    assert settings.catalog_item_columns() == {"id_column": "code"}
