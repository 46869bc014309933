"""The offline evaluation command end to end: files -> split -> our LightFM pipeline -> metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from snaplearn_offline import evaluate
from snaplearn_offline.datasets import (
    Interactions,
    index_split,
    load_features,
    load_interactions,
    time_split,
)

REPO = Path(__file__).resolve().parents[2]
MOVIELENS = Path(os.environ.get("SNAPLEARN_MOVIELENS_100K", REPO.parent / "shared/data/movielens-100k"))


def _write_synthetic(folder: Path) -> tuple[Path, Path]:
    """90 users x 60 items in 3 taste groups (items of one group each); uniform popularity.

    interactions.tsv has a header and `user item weight time`; items.tsv maps item -> group feature.
    """
    rng = np.random.default_rng(7)
    lines = ["user\titem\tweight\ttime"]
    for user in range(90):
        group = user % 3
        liked = rng.choice(np.arange(20) + 20 * group, size=10, replace=False)
        for item in [*liked, *rng.choice(60, size=2, replace=False)]:
            lines.append(f"u{user}\ti{item}\t{rng.integers(1, 6)}\t{1_000 + rng.integers(10_000)}")
    interactions = folder / "interactions.tsv"
    interactions.write_text("\n".join(lines) + "\n")
    items = folder / "items.tsv"
    items.write_text("\n".join(f"i{i}\tgroup:{i // 20}\t1" for i in range(60)) + "\n")
    return interactions, items


def _by_row(payload: dict, model: str, features: str, exclude: bool) -> dict[str, float]:
    for result in payload["results"]:
        if (result["model"], result["features"], result["exclude_train"]) == (model, features, exclude):
            return {name: float(np.mean(values)) for name, values in result["metrics"].items()}
    raise AssertionError(f"no result for {model} {features} exclude={exclude}")


def test_random_split_learns_taste_groups_far_above_popularity(tmp_path: Path) -> None:
    interactions, items = _write_synthetic(tmp_path)
    out = tmp_path / "out"
    argv = [
        *("--interactions", str(interactions), "--item-features", str(items), "--split", "random"),
        *("--features", "identity", "items", "--epochs", "20", "--components", "8", "--k", "5"),
        *("--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--curve-every", "10"),
    ]
    assert evaluate.main(argv) == 0
    payload = json.loads((out / "r.json").read_text())
    assert payload["split"] == "random" and payload["users"] == 90 and payload["items"] == 60
    assert payload["train_positives"] + payload["test_positives"] > 0.95 * 90 * 12  # few duplicates
    popularity = _by_row(payload, "popularity", "-", exclude=True)
    for features in ("identity", "items"):
        learned = _by_row(payload, "lightfm-warp", features, exclude=True)
        assert learned["auc"] > popularity["auc"] + 0.2, (features, learned, popularity)
        assert learned["precision@5"] > popularity["precision@5"]
    curve = next(r["curve"] for r in payload["results"] if r["features"] == "items")
    assert curve["epoch"] == [[10.0], [20.0]]
    table = (out / "r.md").read_text()
    assert "| lightfm-warp | items | excluded |" in table and "--split random" in table


def test_command_line_with_given_csv_files_and_user_features(tmp_path: Path) -> None:
    data = load_interactions(_write_synthetic(tmp_path)[0], "tsv")
    train, test = time_split(data, 0.25)
    for name, part in (("train.csv", train), ("test.csv", test)):
        rows = zip(part.users, part.items, part.weights, part.times, strict=True)
        (tmp_path / name).write_text("".join(f"{u},{i},{w},{t}\n" for u, i, w, t in rows))
    (tmp_path / "users.csv").write_text("".join(f"u{u},taste:{u % 3}\n" for u in range(90)))
    (tmp_path / "items.csv").write_text(
        "id,feature,weight\n" + "".join(f"i{i},group:{i // 20},1\n" for i in range(60))
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "snaplearn_offline.evaluate", "--format", "csv"),
            *("--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv")),
            *("--user-features", str(tmp_path / "users.csv"), "--item-features", str(tmp_path / "items.csv")),
            *("--features", "items+users", "--epochs", "5", "--loss", "bpr", "--seeds", "0", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "given split: 90 users x 60 items" in result.stdout
    assert "| lightfm-bpr | items+users | ranked |" in result.stdout
    assert " ± " in result.stdout  # two seeds: mean ± std


def test_splits_and_loaders(tmp_path: Path) -> None:
    data = Interactions(
        np.array(["a", "a", "b", "b"]),
        np.array(["x", "y", "x", "z"]),
        np.ones(4),
        np.array([4.0, 1.0, 3.0, 2.0]),
    )
    train, test = time_split(data, 0.5)
    assert sorted(train.times) == [1.0, 2.0] and sorted(test.times) == [3.0, 4.0]
    split = index_split(train, test, extra_items=["w"])
    assert split.item_ids == ("w", "x", "y", "z") and split.train.nnz == 2 and split.test.nnz == 2

    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    users = load_features(tmp_path / "u.user", "movielens", "user")
    assert users["1"] == [(n, 1.0) for n in ("age:18-24", "gender:M", "occupation:technician", "zip:8")]
    assert users["2"][0] == ("age:50-55", 1.0) and users["2"][3] == ("zip:other", 1.0)
    flags = "|".join("1" if g in (1, 2) else "0" for g in range(19))
    (tmp_path / "u.item").write_text(f"2|GoldenEye (1995)|01-Jan-1995||http://x|{flags}\n")
    assert load_features(tmp_path / "u.item", "movielens", "item") == {
        "2": [("genre:Action", 1.0), ("genre:Adventure", 1.0)]
    }
    (tmp_path / "bad.tsv").write_text("a\tb\t1\t0\nc\td\toops\t0\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: weight and time must be numbers"):
        load_interactions(tmp_path / "bad.tsv", "tsv")


@pytest.mark.skipif(not (MOVIELENS / "ua.base").is_file(), reason=f"MovieLens 100k not found at {MOVIELENS}")
def test_movielens_100k_fast_variant_beats_popularity(tmp_path: Path) -> None:
    """A few epochs of the published setting (the full run is in docs/benchmarks/recommender_quality.md)."""
    argv = ["--movielens", str(MOVIELENS), "--epochs", "3", "--features", "identity", "items"]
    assert evaluate.main([*argv, "--json", str(tmp_path / "ml.json")]) == 0
    payload = json.loads((tmp_path / "ml.json").read_text())
    assert (payload["users"], payload["items"]) == (943, 1682)
    assert (payload["train_positives"], payload["test_positives"]) == (90_570, 9_430)
    popularity = _by_row(payload, "popularity", "-", exclude=False)
    assert popularity["auc"] == pytest.approx(0.836, abs=0.005)
    for features in ("identity", "items"):
        learned = _by_row(payload, "lightfm-warp", features, exclude=False)
        assert learned["auc"] > popularity["auc"] + 0.03, (features, learned)
        assert learned["precision@10"] > popularity["precision@10"]
