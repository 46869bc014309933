"""Offline ranking metrics over a held-out split: precision@k, recall@k, NDCG@k and ROC AUC.

`scores` turns two HybridLightFM.representations into the score rows they are computed on.

Per user with at least one held-out positive, over the score row of every item:
- candidates: all items, or (exclude_train) all items except that user's TRAINING positives
  (a held-out positive that also occurs in training stays a candidate);
- precision@k = hits in the top k / k; recall@k = hits / held-out positives;
- NDCG@k with binary gains: sum over hits of 1/log2(rank + 2) (rank 0-based), divided by the
  ideal DCG of min(k, positives) hits;
- AUC = P(random positive scores above a random non-positive candidate), ties count 1/2
  (the Mann-Whitney statistic from average ranks).
Users are processed in blocks: memory is O(block x items), the work is numpy throughout.
Definitions match lightfm.evaluation (precision_at_k, recall_at_k, auc_score) except that
LightFM's AUC counts a tie as a win; with continuous scores ties do not occur.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.stats import rankdata

ScoreFunction = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.floating]]


@dataclass(frozen=True, slots=True)
class RankingMetrics:
    """Per-user metric arrays (one entry per evaluated user, in `users` order)."""

    k: int
    users: npt.NDArray[np.int64]
    precision: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]
    ndcg: npt.NDArray[np.float64]
    auc: npt.NDArray[np.float64]

    def means(self) -> dict[str, float]:
        return {
            f"precision@{self.k}": float(self.precision.mean()),
            f"recall@{self.k}": float(self.recall.mean()),
            f"ndcg@{self.k}": float(self.ndcg.mean()),
            "auc": float(self.auc.mean()),
        }


def _binary_csr(matrix: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1.0
    out.sum_duplicates()
    out.data[:] = 1.0
    return out


def ranking_metrics(
    score_users: ScoreFunction,
    test: sp.spmatrix,
    k: int = 10,
    train: sp.spmatrix | None = None,
    block_cells: int = 1 << 22,
) -> RankingMetrics:
    """Metrics for every user with a test positive; `score_users(rows)` -> [len(rows), n_items] scores.

    train=None ranks every item; a train matrix excludes each user's training positives.
    Users are scored `block_cells // n_items` at a time (bounded memory for large catalogs).
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    test_csr = _binary_csr(test)
    n_items = test_csr.shape[1]
    excluded = None
    if train is not None:
        if train.shape != test_csr.shape:
            raise ValueError(f"train shape {train.shape} != test shape {test_csr.shape}")
        excluded = _binary_csr(train) - _binary_csr(train).multiply(test_csr)  # keep test positives
        excluded = sp.csr_matrix(excluded)
        excluded.eliminate_zeros()
    users = np.flatnonzero(test_csr.getnnz(axis=1) > 0).astype(np.int64)
    k_eff = min(k, n_items)
    discounts = 1.0 / np.log2(np.arange(2, k_eff + 2))
    ideal = np.cumsum(discounts)
    parts: list[tuple[npt.NDArray[np.float64], ...]] = []
    block_users = max(1, block_cells // max(n_items, 1))
    for start in range(0, len(users), block_users):
        rows = users[start : start + block_users]
        scores = np.asarray(score_users(rows), dtype=np.float64)
        if scores.shape != (len(rows), n_items):
            raise ValueError(f"score_users returned {scores.shape}, expected {(len(rows), n_items)}")
        positives = test_csr[rows].toarray() > 0
        n_excluded = np.zeros(len(rows))
        if excluded is not None:
            block_excluded = excluded[rows].toarray() > 0
            scores = np.where(block_excluded, -np.inf, scores)
            n_excluded = block_excluded.sum(axis=1)
        n_positive = positives.sum(axis=1)

        top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        top_scores = np.take_along_axis(scores, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_scores, axis=1, kind="stable"), axis=1)
        # An excluded item can only reach the top k when fewer than k candidates remain: not a hit.
        hits = np.take_along_axis(positives, top, axis=1) & np.isfinite(
            np.take_along_axis(scores, top, axis=1)
        )
        n_hits = hits.sum(axis=1)
        dcg = (hits * discounts).sum(axis=1)

        # Ascending average ranks; excluded items (-inf) take the lowest n_excluded ranks.
        ranks = rankdata(scores, method="average", axis=1) - n_excluded[:, None]
        n_negative = n_items - n_excluded - n_positive
        rank_sum = np.where(positives, ranks, 0.0).sum(axis=1)
        wins = rank_sum - n_positive * (n_positive + 1) / 2.0
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.where(n_negative > 0, wins / (n_positive * n_negative), 0.5)
        parts.append(
            (
                n_hits / k,
                n_hits / n_positive,
                dcg / ideal[np.minimum(n_positive, k_eff) - 1],
                auc,
            )
        )
    if not parts:
        empty = np.zeros(0)
        return RankingMetrics(k=k, users=users, precision=empty, recall=empty, ndcg=empty, auc=empty)
    precision, recall, ndcg, auc = (np.concatenate(column) for column in zip(*parts, strict=True))
    return RankingMetrics(k=k, users=users, precision=precision, recall=recall, ndcg=ndcg, auc=auc)


def popularity_scores(train: sp.spmatrix) -> npt.NDArray[np.float64]:
    """Per-item score of the popularity baseline: number of distinct training users."""
    return np.asarray(_binary_csr(train).sum(axis=0), dtype=np.float64).ravel()


def scores(
    user: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    item: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> npt.NDArray[np.float32]:
    """[n_users, n_items] scores from two `representations`: what LightFM.predict computes."""
    user_biases, user_vectors = user
    item_biases, item_vectors = item
    out: npt.NDArray[Any] = user_vectors @ item_vectors.T
    out += user_biases[:, None]
    out += item_biases[None, :]
    return out
