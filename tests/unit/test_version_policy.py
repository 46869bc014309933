"""Version policies (Triton's, from a model-level config.json): which versions on disk are served."""

from __future__ import annotations

import pytest

from snaplearn_vision.core.versions import VersionPolicy
from snaplearn_vision.schema import InvalidModelConfig

ON_DISK = ["1", "2", "10", "3"]


def test_default_is_the_latest_version_only() -> None:
    policy = VersionPolicy.from_config({})
    assert policy.select(ON_DISK) == ["10"]  # numeric order, not text order
    assert policy.describe() == "the latest version"


@pytest.mark.parametrize(
    ("config", "selected", "described"),
    [
        ({"latest": {"num_versions": 2}}, ["3", "10"], "the latest 2 versions"),
        ({"latest": {"num_versions": 9}}, ["1", "2", "3", "10"], "the latest 9 versions"),
        ({"latest": {}}, ["10"], "the latest version"),
        ({"specific": {"versions": [3, 1, 7]}}, ["1", "3"], "versions 1, 3, 7"),
        ({"specific": {"versions": ["2"]}}, ["2"], "versions 2"),
        ({"all": {}}, ["1", "2", "3", "10"], "all versions"),
    ],
)
def test_policies_select_from_what_is_on_disk(
    config: dict[str, object], selected: list[str], described: str
) -> None:
    policy = VersionPolicy.from_config({"version_policy": config})
    assert policy.select(ON_DISK) == selected
    assert policy.describe() == described
    assert policy.select([]) == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"newest": {}}, "'newest' is not one of"),
        ({"latest": {"num_versions": 0}}, "num_versions must be >= 1"),
        ({"latest": {"num_versions": "2"}}, "must be an integer"),
        ({"latest": {"num_versions": True}}, "must be an integer"),
        ({"specific": {"versions": []}}, "at least one version"),
        ({"specific": {"versions": ["0"]}}, "positive integers"),
        ({"specific": {"versions": "1"}}, "must be a list"),
        ({"latest": {}, "all": {}}, "exactly one of"),
        ({"all": []}, "must be an object"),
        ([], "exactly one of"),
    ],
)
def test_invalid_policies_say_what_is_wrong(config: object, message: str) -> None:
    with pytest.raises(InvalidModelConfig, match=message):
        VersionPolicy.from_config({"version_policy": config})
