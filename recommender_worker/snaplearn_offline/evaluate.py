"""Offline quality: `python -m snaplearn_offline.evaluate --help`.

Trains the recommender's LightFM (features.HybridLightFM, the class the online model uses) on a
train split and reports precision@k, recall@k, NDCG@k and AUC on the held-out split, both over
all items and with each user's training items excluded, next to a popularity baseline.

MovieLens 100k with LightFM's published setting (examples/movielens/example.ipynb: all ratings
positive and unweighted, ua.base/ua.test, WARP, learning rate 0.05, 10 components, 10 epochs):

    python -m snaplearn_offline.evaluate --movielens ../shared/data/movielens-100k \\
        --components 10 --epochs 10 --features identity items items+users --no-sample-weights

By default the weight column (MovieLens: the rating) weights each training positive.
Knowledge tracing on the three-line format: `python -m snaplearn_offline.evaluate knowledge-tracing
--help` (the same as python -m snaplearn_offline.knowledge_tracing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from snaplearn_offline.datasets import (
    FORMATS,
    Features,
    IndexedSplit,
    index_split,
    load_features,
    load_interactions,
    random_split,
    time_split,
)
from snaplearn_offline.metrics import popularity_scores, ranking_metrics, scores
from snaplearn_recommender.features import LOSSES, HybridLightFM, NamedFeatures, Vocabulary, feature_matrix

# Feature sets: which metadata joins the identity features (LightFM's pure CF is "identity").
VARIANTS = {"identity": (False, False), "items": (True, False), "items+users": (True, True)}
# LightFM takes sample weights with these losses (not with k-OS WARP).
WEIGHTED_LOSSES = ("warp", "bpr", "logistic")


@dataclass(frozen=True, slots=True)
class ModelOptions:
    loss: str = "warp"
    components: int = 10
    epochs: int = 10
    learning_rate: float = 0.05
    item_alpha: float = 0.0
    user_alpha: float = 0.0
    max_sampled: int = 10
    metadata_weight: float = 1.0
    threads: int = 1
    sample_weights: bool = True  # the interactions' weight column, where the loss supports it


@dataclass(frozen=True, slots=True)
class Result:
    model: str
    features: str
    exclude_train: bool
    metrics: dict[str, list[float]]  # metric -> one value per seed
    curve: dict[str, list[list[float]]]  # metric -> per evaluated epoch, one value per seed
    fit_seconds: float  # mean per seed

    def mean(self, metric: str) -> float:
        return float(np.mean(self.metrics[metric]))


def with_metadata(
    identity: str | None, metadata: NamedFeatures, metadata_weight: float
) -> list[tuple[str, float]]:
    """identity (weight 1) + metadata rescaled to sum to `metadata_weight`.

    Rescaling keeps rows with many metadata values from drowning their identity feature.
    """
    features: list[tuple[str, float]] = [] if identity is None else [(identity, 1.0)]
    total = sum(weight for _, weight in metadata)
    if metadata and total > 0:
        features += [(name, metadata_weight * weight / total) for name, weight in metadata]
    return features


def side_features(ids: Sequence[str], side: str, metadata: Features | None, weight: float) -> sp.csr_matrix:
    """identity (`side:id`) + the id's metadata features (rescaled to sum to `weight`)."""
    rows = (with_metadata(f"{side}:{i}", (metadata or {}).get(i, ()), weight) for i in ids)
    return feature_matrix(rows, Vocabulary())


def _evaluate(
    score_users: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.floating]], split: IndexedSplit, k: int
) -> dict[bool, dict[str, float]]:
    return {
        exclude: ranking_metrics(score_users, split.test, k, train=split.train if exclude else None).means()
        for exclude in (False, True)
    }


def _scorer(
    model: HybridLightFM, user_features: sp.csr_matrix, item_features: sp.csr_matrix
) -> Callable[[npt.NDArray[np.int64]], npt.NDArray[np.float32]]:
    """Scores of the model as it is now, for blocks of user rows."""
    item = model.representations("item", item_features)
    user_biases, user_vectors = model.representations("user", user_features)
    return lambda rows: scores((user_biases[rows], user_vectors[rows]), item)


def training_weights(
    split: IndexedSplit, interactions: sp.coo_matrix, options: ModelOptions
) -> sp.coo_matrix | None:
    """The weight of each training positive, entry for entry as `interactions` lists them (LightFM
    wants the same rows and columns in the same order), or None: weights off, none given, or a
    loss that takes none."""
    if not options.sample_weights or options.loss not in WEIGHTED_LOSSES or split.train_weights is None:
        return None
    cells = np.asarray(split.train_weights[interactions.row, interactions.col]).ravel()
    return sp.coo_matrix(
        (cells.astype(np.float32), (interactions.row, interactions.col)), shape=interactions.shape
    )


def evaluate_lightfm(
    split: IndexedSplit,
    user_features: sp.csr_matrix,
    item_features: sp.csr_matrix,
    options: ModelOptions,
    seed: int,
    k: int,
    curve_every: int,
) -> tuple[list[tuple[int, dict[bool, dict[str, float]]]], float]:
    """Train for options.epochs, evaluating every `curve_every` epochs and at the end.

    Returns ([(epoch, {exclude_train: metrics})], fit seconds).
    """
    model = HybridLightFM(
        no_components=options.components,
        loss=options.loss,
        learning_rate=options.learning_rate,
        seed=seed,
        item_alpha=options.item_alpha,
        user_alpha=options.user_alpha,
        max_sampled=options.max_sampled,
    )
    interactions = split.train.tocoo()
    sample_weight = training_weights(split, interactions, options)
    checkpoints = sorted({*range(curve_every, options.epochs, curve_every), options.epochs})
    points: list[tuple[int, dict[bool, dict[str, float]]]] = []
    fit_seconds = 0.0
    trained = 0
    for epoch in checkpoints:
        started = time.perf_counter()
        model.fit_partial(
            interactions,
            user_features,
            item_features,
            sample_weight=sample_weight,
            epochs=epoch - trained,
            num_threads=options.threads,
        )
        fit_seconds += time.perf_counter() - started
        trained = epoch
        score_users = _scorer(model, user_features, item_features)
        points.append((epoch, _evaluate(score_users, split, k)))
    return points, fit_seconds


def run(
    split: IndexedSplit,
    variants: Sequence[str],
    options: ModelOptions,
    seeds: Sequence[int],
    k: int,
    user_metadata: Features | None = None,
    item_metadata: Features | None = None,
    curve_every: int = 0,
) -> list[Result]:
    popularity = popularity_scores(split.train)
    baseline = _evaluate(lambda rows: np.broadcast_to(popularity, (len(rows), len(popularity))), split, k)
    results = [
        Result("popularity", "-", exclude, {m: [v] for m, v in baseline[exclude].items()}, {}, 0.0)
        for exclude in (False, True)
    ]
    for variant in variants:
        with_items, with_users = VARIANTS[variant]
        if (with_items and item_metadata is None) or (with_users and user_metadata is None):
            raise ValueError(f"features {variant!r} need {'item' if with_items else 'user'} feature files")
        weight = options.metadata_weight
        users = side_features(split.user_ids, "user", user_metadata if with_users else None, weight)
        items = side_features(split.item_ids, "item", item_metadata if with_items else None, weight)
        runs = [
            evaluate_lightfm(split, users, items, options, seed, k, curve_every or options.epochs)
            for seed in seeds
        ]
        epochs = [epoch for epoch, _ in runs[0][0]]
        fit_seconds = float(np.mean([seconds for _, seconds in runs]))
        for exclude in (False, True):
            final = [points[-1][1][exclude] for points, _ in runs]
            metrics = {m: [f[m] for f in final] for m in final[0]}
            curve = {
                m: [[points[i][1][exclude][m] for points, _ in runs] for i in range(len(epochs))]
                for m in metrics
            }
            curve["epoch"] = [[float(e)] for e in epochs]
            results.append(Result(f"lightfm-{options.loss}", variant, exclude, metrics, curve, fit_seconds))
    return results


def markdown_table(results: Sequence[Result], k: int) -> str:
    metrics = [f"precision@{k}", f"recall@{k}", f"ndcg@{k}", "auc"]
    lines = [
        "| model | features | training items | " + " | ".join(metrics) + " | fit s/seed |",
        "|---|---|---|" + "---:|" * (len(metrics) + 1),
    ]
    for result in results:
        cells = []
        for metric in metrics:
            values = result.metrics[metric]
            spread = f" ± {np.std(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        fit = f"{result.fit_seconds:.1f}" if result.model != "popularity" else "-"
        excluded = "excluded" if result.exclude_train else "ranked"
        lines.append(
            f"| {result.model} | {result.features} | {excluded} | " + " | ".join(cells) + f" | {fit} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], k: int, path: Path, title: str) -> None:
    import matplotlib  # optional (the `bench` extra): imported only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 5.0))
    for axis, metric in zip(axes, (f"precision@{k}", "auc"), strict=True):
        for index, result in enumerate(r for r in results if r.curve):
            epochs = [e[0] for e in result.curve["epoch"]]
            means = [float(np.mean(v)) for v in result.curve[metric]]
            style = "-" if result.exclude_train else "--"
            label = f"{result.features}, train {'excluded' if result.exclude_train else 'ranked'}"
            axis.plot(epochs, means, style, marker="o", markersize=3, color=f"C{index // 2}", label=label)
        for result in results:
            if result.model == "popularity":
                style = "-" if result.exclude_train else "--"
                label = f"popularity, train {'excluded' if result.exclude_train else 'ranked'}"
                axis.axhline(result.mean(metric), color="grey", linestyle=style, linewidth=1, label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"test {metric}")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False, handlelength=4)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m snaplearn_offline.evaluate", description=__doc__)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--movielens",
        type=Path,
        metavar="DIR",
        help="MovieLens 100k folder: shorthand for --format movielens --train DIR/ua.base "
        "--test DIR/ua.test --user-features DIR/u.user --item-features DIR/u.item",
    )
    data.add_argument("--interactions", type=Path, help="one interactions file, split by --split")
    data.add_argument("--train", type=Path, help="training interactions (with --test: a given split)")
    data.add_argument("--test", type=Path, help="held-out interactions")
    data.add_argument("--format", choices=FORMATS, default="tsv", help="interactions (and features) format")
    data.add_argument("--user-features", type=Path, help="user feature file (same --format)")
    data.add_argument("--item-features", type=Path, help="item feature file (same --format)")
    data.add_argument("--split", choices=("given", "random", "time"), help="default: given with --test")
    data.add_argument("--test-fraction", type=float, default=0.2)
    data.add_argument("--split-seed", type=int, default=0)
    data.add_argument("--min-weight", type=float, default=0.0, help="weight >= this is a positive")
    model = parser.add_argument_group("model")
    model.add_argument("--features", nargs="+", choices=tuple(VARIANTS), default=["identity"])
    model.add_argument("--loss", choices=LOSSES, default="warp")
    model.add_argument("--components", type=int, default=10)
    model.add_argument("--epochs", type=int, default=10)
    model.add_argument("--learning-rate", type=float, default=0.05)
    model.add_argument("--item-alpha", type=float, default=0.0)
    model.add_argument("--user-alpha", type=float, default=0.0)
    model.add_argument("--max-sampled", type=int, default=10)
    model.add_argument("--metadata-weight", type=float, default=1.0, help="metadata weight vs identity 1")
    model.add_argument("--threads", type=int, default=1, help=">1 is faster but not deterministic")
    model.add_argument(
        "--sample-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weight each training positive by its weight column (losses warp, bpr, logistic); "
        "--no-sample-weights trains on 0/1 positives (LightFM's published MovieLens setting)",
    )
    model.add_argument("--seeds", type=int, nargs="+", default=[0])
    out = parser.add_argument_group("output")
    out.add_argument("--k", type=int, default=10)
    out.add_argument("--curve-every", type=int, default=0, help="also evaluate every N epochs (plot)")
    out.add_argument("--json", type=Path, help="write results as JSON")
    out.add_argument("--markdown", type=Path, help="write the command + table as Markdown")
    out.add_argument("--plot", type=Path, help="write a PNG of the curves (needs matplotlib)")
    return parser


def load_split(args: argparse.Namespace) -> tuple[IndexedSplit, Features | None, Features | None, str]:
    if args.movielens is not None:
        args.format = "movielens"
        args.train = args.train or args.movielens / "ua.base"
        args.test = args.test or args.movielens / "ua.test"
        args.user_features = args.user_features or args.movielens / "u.user"
        args.item_features = args.item_features or args.movielens / "u.item"
    split_kind = args.split or ("given" if args.test is not None else "random")
    if split_kind == "given":
        if args.train is None or args.test is None:
            raise SystemExit("a given split needs --train and --test (or --movielens DIR)")
        train, test = load_interactions(args.train, args.format), load_interactions(args.test, args.format)
    else:
        source = args.interactions or args.train
        if source is None:
            raise SystemExit(f"a {split_kind} split needs --interactions")
        data = load_interactions(source, args.format)
        if split_kind == "random":
            train, test = random_split(data, args.test_fraction, args.split_seed)
        else:
            train, test = time_split(data, args.test_fraction)
    wanted = [VARIANTS[v] for v in args.features]
    users = items = None
    if any(u for _, u in wanted) and args.user_features is not None:
        users = load_features(args.user_features, args.format, "user")
    if any(i for i, _ in wanted) and args.item_features is not None:
        items = load_features(args.item_features, args.format, "item")
    split = index_split(train, test, args.min_weight, tuple(users or ()), tuple(items or ()))
    return split, users, items, split_kind


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["knowledge-tracing"]:  # the student logs' evaluation, as a sub-command
        from snaplearn_offline import knowledge_tracing

        return knowledge_tracing.main(argv[1:])
    args = _parser().parse_args(argv)
    split, users, items, split_kind = load_split(args)
    options = ModelOptions(
        loss=args.loss,
        components=args.components,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        item_alpha=args.item_alpha,
        user_alpha=args.user_alpha,
        max_sampled=args.max_sampled,
        metadata_weight=args.metadata_weight,
        threads=args.threads,
        sample_weights=args.sample_weights,
    )
    results = run(split, args.features, options, args.seeds, args.k, users, items, args.curve_every)
    command = "python -m snaplearn_offline.evaluate " + " ".join(argv)
    summary = (
        f"{split_kind} split: {len(split.user_ids)} users x {len(split.item_ids)} items, "
        f"{split.train.nnz} train / {split.test.nnz} test positives; seeds {list(args.seeds)}"
    )
    table = markdown_table(results, args.k)
    print(summary, table, sep="\n\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"```bash\n{command}\n```\n\n{summary}\n\n{table}\n")
    if args.json:
        payload: dict[str, Any] = {
            "command": command,
            "split": split_kind,
            "users": len(split.user_ids),
            "items": len(split.item_ids),
            "train_positives": int(split.train.nnz),
            "test_positives": int(split.test.nnz),
            "k": args.k,
            "seeds": list(args.seeds),
            "options": asdict(options),
            "results": [asdict(result) for result in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot(results, args.k, args.plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
