"""The client's declared-feature filters before any call: the friendly mapping and the CLI's
--feature flags become the FeatureFilter messages the server reads, and malformed ones are
refused in words (the server-side meaning is tested in tests/integration/test_client_recommender.py)."""

from __future__ import annotations

import math

import pytest

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn_client import cli
from snaplearn_client.client import feature_filter, feature_filters


def _plain(spec: recommender_pb2.FeatureFilter) -> tuple[str, list[str], float | None, float | None]:
    return (
        spec.name,
        list(spec.values),
        spec.min if spec.HasField("min") else None,
        spec.max if spec.HasField("max") else None,
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (["Fractions", "Geometry"], (["Fractions", "Geometry"], None, None)),
        ("Fractions", (["Fractions"], None, None)),
        (4, (["4"], None, None)),
        ([4, 5.5], (["4", "5.5"], None, None)),
        ((None, 20), ([], None, 20.0)),
        ((10, None), ([], 10.0, None)),
        ((10, 20.5), ([], 10.0, 20.5)),
        (("a", "b"), (["a", "b"], None, None)),  # a tuple of strings is values, not a range
        ({"values": ["x"], "min": 1, "max": 2}, (["x"], 1.0, 2.0)),
        ({"values": "x"}, (["x"], None, None)),
    ],
)
def test_the_friendly_form_becomes_a_feature_filter(
    spec: object, expected: tuple[list[str], float | None, float | None]
) -> None:
    assert _plain(feature_filter("f", spec)) == ("f", *expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ((None, None), "give at least one value or a bound"),
        ([], "give at least one value or a bound"),
        ({"max": math.inf}, "feature 'f': max must be a finite number"),
        ({"min": True}, "feature 'f': min must be a finite number"),
        ({"low": 1}, "unknown key 'low'"),
        ([None], "a feature value must be a string or a number"),
    ],
)
def test_a_malformed_filter_is_refused_in_words(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        feature_filter("f", spec)  # type: ignore[arg-type]


def test_messages_pass_through_and_a_mapping_keeps_its_order() -> None:
    message = recommender_pb2.FeatureFilter(name="topic", values=["A"])
    assert feature_filters([message]) == [message]
    assert feature_filters(None) == []
    assert [f.name for f in feature_filters({"topic": "A", "minutes": (None, 3)})] == ["topic", "minutes"]
    with pytest.raises(ValueError, match="expected FeatureFilter messages or a mapping"):
        feature_filters(["topic=A"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("topic=Fractions,Geometry", ("topic", ["Fractions", "Geometry"], None, None)),
        ("topic = Fractions", ("topic", ["Fractions"], None, None)),
        ("minutes<=20", ("minutes", [], None, 20.0)),
        ("minutes>=7.5", ("minutes", [], 7.5, None)),
        ("title=a<=b", ("title", ["a<=b"], None, None)),  # the first operator splits
    ],
)
def test_feature_flags(flag: str, expected: tuple[str, list[str], float | None, float | None]) -> None:
    assert _plain(cli.parse_feature(flag)) == expected


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("topic", "expected NAME=V[,V], NAME<=N or NAME>=N"),
        ("=x", "expected NAME=V[,V], NAME<=N or NAME>=N"),
        ("topic=", "no value after '='"),
        ("minutes<=twenty", "'twenty' is not a number"),
        ("minutes>=nan", "'nan' is not a number"),
    ],
)
def test_a_malformed_flag_is_a_usage_error_before_any_call(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--recommender", "127.0.0.1:1", "recommend", "--user", "u", "--feature", flag])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_feedback_flags_for_an_attempt_are_checked_before_any_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--recommender", "127.0.0.1:1", "feedback", "--user", "u", "--item", "i", "--kind", "completed"]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--outcome", "right"])
    assert exit_.value.code == 2
    assert "invalid choice: 'right'" in capsys.readouterr().err
