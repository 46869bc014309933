"""Feature vocabularies and the growable LightFM wrapper shared by the online model and evaluation.

LightFM is a factorisation over FEATURES, not ids: a user (item) is the weighted sum of the
embeddings of its feature columns. A pure collaborative model is "one identity feature per id";
a hybrid adds metadata columns (genres, concepts, age bands...). This module owns the two things
every caller needs:

- `Vocabulary` + `feature_matrix`: (feature name, weight) lists -> a CSR row per user/item.
- `HybridLightFM`: LightFM whose parameter arrays are created and grown here (capacity doubling,
  fresh rows drawn exactly as LightFM._initialize draws them), so that new ids and feature values
  can appear at any time without refitting; feature matrices may be narrower than the capacity
  (they are widened for free). `representations` are the biases and vectors whose dot product
  LightFM.predict computes (model snapshots are built from them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from lightfm import LightFM

# LightFM keeps six arrays per side (see LightFM._initialize); all are indexed by feature.
PARAMETER_ARRAYS = (
    "embeddings",
    "embedding_gradients",
    "embedding_momentum",
    "biases",
    "bias_gradients",
    "bias_momentum",
)
MIN_CAPACITY = 64
SIDES = ("item", "user")
LOSSES = ("warp", "bpr", "logistic", "warp-kos")

NamedFeatures = Sequence[tuple[str, float]]


class Vocabulary:
    """Append-only name -> index."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        for name in names:
            self.add(name)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def add(self, name: str) -> int:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = len(self._names)
            self._names.append(name)
        return index

    def get(self, name: str) -> int | None:
        return self._index.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)


def feature_matrix(rows: Iterable[NamedFeatures], vocabulary: Vocabulary) -> sp.csr_matrix:
    """One CSR row per entry of `rows`; unseen names are added to `vocabulary` (columns = its size).

    Repeated names in one row add up (as scipy sums duplicate COO entries).
    """
    row_ids: list[int] = []
    columns: list[int] = []
    weights: list[float] = []
    count = 0
    for count, features in enumerate(rows, start=1):
        for name, weight in features:
            row_ids.append(count - 1)
            columns.append(vocabulary.add(name))
            weights.append(weight)
    shape = (count, len(vocabulary))
    return sp.csr_matrix((weights, (row_ids, columns)), shape=shape, dtype=np.float32)


def positives_matrices(
    rows: npt.ArrayLike, items: npt.ArrayLike, weights: npt.ArrayLike, shape: tuple[int, int]
) -> tuple[sp.coo_matrix, sp.coo_matrix]:
    """(interactions, sample_weight) with ONE entry per (row, item), keeping the largest weight.

    LightFM's positive lookup must not see duplicate (user, item) entries.
    """
    n_items = shape[1]
    keys = np.asarray(rows, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64)
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    best = np.zeros(len(unique_keys), dtype=np.float32)
    np.maximum.at(best, inverse, np.asarray(weights, dtype=np.float32))
    row_ids, item_ids = np.divmod(unique_keys, n_items)
    interactions = sp.coo_matrix((np.ones(len(unique_keys), np.float32), (row_ids, item_ids)), shape=shape)
    return interactions, sp.coo_matrix((best, (row_ids, item_ids)), shape=shape)


def _widened(features: sp.csr_matrix, columns: int) -> sp.csr_matrix:
    """`features` as a CSR matrix with exactly `columns` columns (extra columns are empty)."""
    features = sp.csr_matrix(features, dtype=np.float32)
    if features.shape[1] == columns:
        return features
    if features.shape[1] > columns:
        raise ValueError(f"{features.shape[1]} feature columns but only {columns} parameter rows")
    return sp.csr_matrix(
        (features.data, features.indices, features.indptr), shape=(features.shape[0], columns)
    )


class HybridLightFM:
    """LightFM with parameter arrays that grow with the feature vocabularies (single writer)."""

    def __init__(
        self,
        no_components: int = 32,
        loss: str = "warp",
        learning_rate: float = 0.05,
        seed: int = 0,
        item_alpha: float = 0.0,
        user_alpha: float = 0.0,
        max_sampled: int = 10,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.no_components = no_components
        self.lightfm = LightFM(
            no_components=no_components,
            loss=loss,
            learning_rate=learning_rate,
            item_alpha=item_alpha,
            user_alpha=user_alpha,
            max_sampled=max_sampled,
            random_state=np.random.RandomState(seed),
        )
        # Separate stream so that growth does not perturb LightFM's shuffles.
        self._init_rng = np.random.RandomState(seed + 1)
        for side in SIDES:
            for name, array in self._fresh_parameters(MIN_CAPACITY).items():
                setattr(self.lightfm, f"{side}_{name}", array)

    @classmethod
    def wrapping(cls, lightfm: LightFM, init_rng: np.random.RandomState) -> HybridLightFM:
        """A wrapper around an existing LightFM whose arrays were already created (old checkpoints)."""
        hybrid = cls.__new__(cls)
        hybrid.no_components = int(lightfm.no_components)
        hybrid.lightfm = lightfm
        hybrid._init_rng = init_rng
        return hybrid

    def capacity(self, side: str) -> int:
        return int(getattr(self.lightfm, f"{side}_embeddings").shape[0])

    def _fresh_parameters(self, rows: int) -> dict[str, npt.NDArray[np.float32]]:
        """New parameter rows exactly as LightFM._initialize makes them."""
        d = self.no_components
        embeddings = ((self._init_rng.rand(rows, d) - 0.5) / d).astype(np.float32)
        accumulator_start = 1.0 if self.lightfm.learning_schedule == "adagrad" else 0.0
        return {
            "embeddings": embeddings,
            "embedding_gradients": np.full((rows, d), accumulator_start, dtype=np.float32),
            "embedding_momentum": np.zeros((rows, d), dtype=np.float32),
            "biases": np.zeros(rows, dtype=np.float32),
            "bias_gradients": np.full(rows, accumulator_start, dtype=np.float32),
            "bias_momentum": np.zeros(rows, dtype=np.float32),
        }

    def reserve(self, side: str, needed: int) -> None:
        """Ensure parameter rows for `needed` features of `side` ("item"/"user"); existing rows are kept."""
        capacity = self.capacity(side)
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        fresh = self._fresh_parameters(new_capacity - capacity)
        for name in PARAMETER_ARRAYS:
            attribute = f"{side}_{name}"
            setattr(self.lightfm, attribute, np.concatenate([getattr(self.lightfm, attribute), fresh[name]]))

    def fit_partial(
        self,
        interactions: sp.coo_matrix,
        user_features: sp.csr_matrix,
        item_features: sp.csr_matrix,
        sample_weight: sp.coo_matrix | None = None,
        epochs: int = 1,
        num_threads: int = 1,
    ) -> None:
        """`epochs` passes over `interactions` (rows index user_features, columns item_features)."""
        self.reserve("user", user_features.shape[1])
        self.reserve("item", item_features.shape[1])
        self.lightfm.fit_partial(
            interactions,
            user_features=_widened(user_features, self.capacity("user")),
            item_features=_widened(item_features, self.capacity("item")),
            sample_weight=sample_weight,
            epochs=epochs,
            num_threads=num_threads,
        )

    def representations(
        self, side: str, features: sp.csr_matrix
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(biases [n], vectors [n, d]) of the rows of `features`: LightFM's latent representations."""
        self.reserve(side, features.shape[1])
        widened = _widened(features, self.capacity(side))
        biases = np.asarray(widened @ getattr(self.lightfm, f"{side}_biases"), dtype=np.float32)
        vectors = np.asarray(widened @ getattr(self.lightfm, f"{side}_embeddings"), dtype=np.float32)
        return biases.reshape(features.shape[0]), vectors.reshape(features.shape[0], self.no_components)
