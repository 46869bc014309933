"""Interaction files (snaplearn_offline.datasets): headers, and the weight column as a weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snaplearn_offline import evaluate
from snaplearn_offline.datasets import index_split, load_interactions
from snaplearn_recommender.features import HybridLightFM


@pytest.mark.parametrize("header", ["user,item", "User_ID,Item_ID", "student,exercise"])
def test_a_two_column_csv_header_is_a_header(tmp_path: Path, header: str) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(f"{header}\nann,fractions\nbo,decimals\n")
    data = load_interactions(path, "csv")
    assert list(data.users) == ["ann", "bo"] and list(data.items) == ["fractions", "decimals"]
    np.testing.assert_array_equal(data.weights, [1.0, 1.0])


def test_a_two_column_first_row_of_data_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("ann,fractions\nbo,decimals\n")
    assert list(load_interactions(path, "csv").users) == ["ann", "bo"]


def test_weights_keep_the_largest_duplicate_on_the_train_pattern(tmp_path: Path) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("user\titem\tweight\nann\tx\t2\nann\tx\t5\nbo\ty\t0.5\nbo\tx\t3\n")
    test = tmp_path / "test.tsv"
    test.write_text("ann\ty\t1\n")
    split = index_split(load_interactions(train, "tsv"), load_interactions(test, "tsv"), min_weight=1.0)
    assert split.train_weights is not None
    dense = split.train_weights.toarray()
    users, items = split.user_ids.index, split.item_ids.index
    assert dense[users("ann"), items("x")] == 5.0 and dense[users("bo"), items("x")] == 3.0
    assert dense[users("bo"), items("y")] == 0.0  # below --min-weight: not a positive at all
    assert (split.train_weights != 0).nnz == split.train.nnz


def test_the_weight_column_weights_training_where_the_loss_supports_it(tmp_path: Path) -> None:
    """Every user has two positives, one weighted 5 and one 1: trained with the weights, the
    heavy one scores higher; the weights are off for k-OS WARP and with --no-sample-weights."""
    lines = ["user\titem\tweight"]
    for user in range(30):
        lines += [f"u{user}\theavy\t5", f"u{user}\tlight\t1"]
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(lines) + "\n")
    data = load_interactions(train, "tsv")
    split = index_split(data, data.subset(np.arange(1)))
    interactions = split.train.tocoo()
    weights = evaluate.training_weights(split, interactions, evaluate.ModelOptions(loss="logistic"))
    assert weights is not None
    np.testing.assert_array_equal(weights.row, interactions.row)
    np.testing.assert_array_equal(weights.col, interactions.col)
    heavy, light = split.item_ids.index("heavy"), split.item_ids.index("light")
    assert set(weights.data[weights.col == heavy]) == {5.0} and set(weights.data[weights.col == light]) == {
        1.0
    }
    for options in (evaluate.ModelOptions(loss="warp-kos"), evaluate.ModelOptions(sample_weights=False)):
        assert evaluate.training_weights(split, interactions, options) is None

    users = evaluate.side_features(split.user_ids, "user", None, 1.0)
    items = evaluate.side_features(split.item_ids, "item", None, 1.0)
    model = HybridLightFM(no_components=4, loss="logistic", learning_rate=0.05, seed=0)
    model.fit_partial(interactions, users, items, sample_weight=weights, epochs=5)
    item_biases, item_vectors = model.representations("item", items)
    _, user_vectors = model.representations("user", users)
    scores = user_vectors @ item_vectors.T + item_biases
    assert (scores[:, heavy] > scores[:, light]).all()
