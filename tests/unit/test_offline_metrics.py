"""Offline ranking metrics: hand-computed cases, and agreement with lightfm.evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from lightfm.evaluation import auc_score, precision_at_k, recall_at_k

from snaplearn_offline.metrics import popularity_scores, ranking_metrics, scores
from snaplearn_recommender.features import HybridLightFM, Vocabulary, feature_matrix

# 2 users x 5 items. User 0 ranks items 0..4 in that order; user 1 in reverse order.
SCORES = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
TEST = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]))
TRAIN = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))


def _score_rows(matrix: np.ndarray):
    return lambda rows: matrix[rows]


def test_hand_computed_case_over_all_items() -> None:
    metrics = ranking_metrics(_score_rows(SCORES), TEST, k=2)
    assert metrics.users.tolist() == [0, 1]
    # user 0: top-2 = items 0, 1 -> one hit at rank 1; user 1: top-2 = items 4, 3 -> none.
    assert metrics.precision.tolist() == [0.5, 0.0]
    assert metrics.recall.tolist() == [0.5, 0.0]
    ideal = 1 + 1 / math.log2(3)
    assert metrics.ndcg == pytest.approx([(1 / math.log2(3)) / ideal, 0.0])
    # user 0: positives 1 (beats 2,3,4 of negatives {0,2,4}: 2 of 3) and 3 (beats 4: 1 of 3) -> 3/6.
    # user 1: positive 0 is the lowest score -> 0 of 4.
    assert metrics.auc == pytest.approx([0.5, 0.0])
    assert metrics.means() == pytest.approx(
        {"precision@2": 0.25, "recall@2": 0.25, "ndcg@2": 0.5 * (1 / math.log2(3)) / ideal, "auc": 0.25}
    )


def test_hand_computed_case_excluding_training_items() -> None:
    metrics = ranking_metrics(_score_rows(SCORES), TEST, k=2, train=TRAIN)
    # user 0 without item 0: top-2 = items 1, 2 -> hit at rank 0; user 1 without 4: top-2 = 3, 2.
    assert metrics.precision.tolist() == [0.5, 0.0]
    ideal = 1 + 1 / math.log2(3)
    assert metrics.ndcg == pytest.approx([1 / ideal, 0.0])
    # user 0 negatives {2, 4}: item 1 beats both, item 3 beats 4 -> 3/4. user 1 negatives {1,2,3}: 0/3.
    assert metrics.auc == pytest.approx([0.75, 0.0])


def test_ties_count_half_and_a_training_item_that_is_also_held_out_stays_a_candidate() -> None:
    tied = np.array([[1.0, 1.0, 1.0, 0.0]])
    test = sp.csr_matrix(np.array([[1, 0, 0, 0]]))
    # item 0 ties with 2 negatives and beats 1: (0.5 + 0.5 + 1) / 3.
    assert ranking_metrics(_score_rows(tied), test, k=1).auc == pytest.approx([2 / 3])
    both = ranking_metrics(_score_rows(np.array([[3.0, 2.0, 1.0, 0.0]])), test, k=1, train=test)
    assert both.precision.tolist() == [1.0] and both.auc.tolist() == [1.0]


def test_users_without_held_out_items_are_skipped_and_k_beyond_candidates_counts_no_excluded_hit() -> None:
    test = sp.csr_matrix(np.array([[0, 0, 0], [0, 1, 0]]))
    train = sp.csr_matrix(np.array([[0, 0, 0], [1, 0, 1]]))
    metrics = ranking_metrics(
        _score_rows(np.array([[0.0, 0.0, 0.0], [3.0, 2.0, 1.0]])), test, k=3, train=train
    )
    assert metrics.users.tolist() == [1]
    assert metrics.precision.tolist() == [pytest.approx(1 / 3)]  # one real candidate in the top 3
    assert metrics.recall.tolist() == [1.0] and metrics.ndcg.tolist() == [1.0]
    assert metrics.auc.tolist() == [0.5]  # no negative candidates left: undefined -> 0.5
    with pytest.raises(ValueError, match="k must be >= 1"):
        ranking_metrics(_score_rows(SCORES), TEST, k=0)


def test_popularity_counts_distinct_training_users() -> None:
    train = sp.csr_matrix(np.array([[2, 1, 0], [1, 0, 0], [0, 0, 0]]))
    assert popularity_scores(train).tolist() == [2.0, 1.0, 0.0]


def _synthetic(seed: int = 3) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """40 users x 60 items: each user likes one of 3 item blocks; 25% of positives held out."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((40, 60))
    for user in range(40):
        block = np.arange(20) + 20 * (user % 3)
        dense[user, rng.choice(block, size=8, replace=False)] = 1
        dense[user, rng.choice(60, size=2, replace=False)] = 1
    held_out = (rng.random(dense.shape) < 0.25) & (dense > 0)
    return sp.csr_matrix(np.where(held_out, 0, dense)), sp.csr_matrix(np.where(held_out, dense, 0))


@pytest.mark.parametrize("exclude_train", [False, True])
def test_metrics_agree_with_lightfm_evaluation_on_a_model_trained_by_hybrid_lightfm(
    exclude_train: bool,
) -> None:
    train, test = _synthetic()
    users = feature_matrix(([(f"user:{u}", 1.0)] for u in range(40)), Vocabulary())
    items = feature_matrix(([(f"item:{i}", 1.0), (f"block:{i // 20}", 0.5)] for i in range(60)), Vocabulary())
    model = HybridLightFM(no_components=8, seed=1)
    model.fit_partial(train.tocoo(), users, items, epochs=5)
    user_repr = model.representations("user", users)
    item_repr = model.representations("item", items)

    ours = ranking_metrics(
        lambda rows: scores((user_repr[0][rows], user_repr[1][rows]), item_repr),
        test,
        k=5,
        train=train if exclude_train else None,
    )

    # LightFM's own evaluation of the same LightFM object (features widened to its capacity).
    widen = {
        "user_features": sp.csr_matrix(
            (users.data, users.indices, users.indptr), (40, model.capacity("user"))
        ),
        "item_features": sp.csr_matrix(
            (items.data, items.indices, items.indptr), (60, model.capacity("item"))
        ),
        "train_interactions": train if exclude_train else None,
    }
    assert ours.users.tolist() == np.flatnonzero(test.getnnz(axis=1)).tolist()
    np.testing.assert_allclose(ours.precision, precision_at_k(model.lightfm, test, k=5, **widen), atol=1e-6)
    np.testing.assert_allclose(ours.recall, recall_at_k(model.lightfm, test, k=5, **widen), atol=1e-6)
    np.testing.assert_allclose(ours.auc, auc_score(model.lightfm, test, **widen), atol=1e-5)
    assert ours.means()["auc"] > 0.75  # the model learned the blocks: the comparison is not vacuous
