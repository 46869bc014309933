"""After a ForgetStudent the snapshot store keeps no older version that holds the student (D48):
the publish that first lacks a student deletes every older version, in this process or after a
restart; without a forget, retention keeps its `retain` versions."""

from __future__ import annotations

from pathlib import Path

from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, ForgetEvent, RecommenderModel
from snaplearn_recommender.snapshot_store import LocalDirectoryStorage, SnapshotStore, SnapshotWatcher

FORGOTTEN = "zed-store-4Rk8"
KEPT = "amy-store-2Pq"


def _store(tmp_path: Path, retain: int = 5) -> SnapshotStore:
    return SnapshotStore(LocalDirectoryStorage(tmp_path / "snapshots"), retain=retain)


def _model() -> RecommenderModel:
    model = RecommenderModel(generate_sample_catalog())
    model.apply(
        [
            ClassifiedEvent(f"e-{i}", user, (("fractions", 0.9),), 1_000.0 + i)
            for i, user in enumerate([FORGOTTEN, KEPT] * 3)
        ]
    )
    return model


def _holding(tmp_path: Path, user: str) -> list[str]:
    return sorted(p.name for p in (tmp_path / "snapshots").iterdir() if user.encode() in p.read_bytes())


def test_the_first_publish_without_a_forgotten_student_deletes_every_older_version(tmp_path: Path) -> None:
    model = _model()
    store = _store(tmp_path)
    for _ in range(3):
        store.publish(model.snapshot())
    assert store.versions() == [1, 2, 3] and len(_holding(tmp_path, FORGOTTEN)) == 3

    # A replica follows the store while it is pruned: it ends on the newest version.
    replica = SnapshotWatcher(store, lambda manifest, snapshot: None)
    assert replica.poll() is not None and replica.current is not None and replica.current.version == 3

    model.apply([ForgetEvent("forget-1", FORGOTTEN)])
    manifest = store.publish(model.snapshot())
    assert store.versions() == [manifest.version] == [4]
    assert _holding(tmp_path, FORGOTTEN) == []
    assert _holding(tmp_path, KEPT)  # the same grep finds a student who stays
    assert replica.poll() is not None and replica.current.version == 4

    # Retention is back to normal afterwards.
    for _ in range(3):
        store.publish(model.snapshot())
    assert store.versions() == [4, 5, 6, 7]


def test_a_restarted_trainer_compares_with_the_newest_version_in_the_store(tmp_path: Path) -> None:
    model = _model()
    for _ in range(2):
        _store(tmp_path).publish(model.snapshot())  # each a fresh store object: a restart
    assert _store(tmp_path).versions() == [1, 2]
    _store(tmp_path).publish(model.snapshot())  # nobody forgotten: older versions stay
    assert _store(tmp_path).versions() == [1, 2, 3]

    model.apply([ForgetEvent("forget-1", FORGOTTEN)])
    _store(tmp_path).publish(model.snapshot())
    assert _store(tmp_path).versions() == [4]
    assert _holding(tmp_path, FORGOTTEN) == []


def test_new_students_alone_never_prune(tmp_path: Path) -> None:
    model = _model()
    store = _store(tmp_path, retain=3)
    store.publish(model.snapshot())
    model.apply([ClassifiedEvent("e-new", "newcomer", (("geometry", 0.9),), 2_000.0)])
    store.publish(model.snapshot())
    assert store.versions() == [1, 2]
