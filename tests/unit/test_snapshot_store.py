"""The snapshot store: versioned atomic publish, retention, checksums, the polling watcher."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, RecommenderModel
from snaplearn_recommender.snapshot import Snapshot
from snaplearn_recommender.snapshot_store import (
    LATEST,
    MAGIC,
    CorruptSnapshot,
    LocalDirectoryStorage,
    SnapshotManifest,
    SnapshotStore,
    SnapshotWatcher,
    decode_version_file,
    open_storage,
    version_file,
)


@pytest.fixture(scope="module")
def snapshots() -> list[Snapshot]:
    """Three snapshots of one model, each after more events (the last one knows 'fran')."""
    model = RecommenderModel(generate_sample_catalog())
    built = [model.snapshot()]
    for round_ in range(2):
        events = [
            ClassifiedEvent(f"e{round_}-{i}", "fran", (("fractions", 0.9),), 1_000.0 + i) for i in range(8)
        ]
        model.apply(events)
        built.append(model.snapshot())
    return built


def _store(tmp_path: Path, retain: int = 5) -> SnapshotStore:
    return SnapshotStore(LocalDirectoryStorage(tmp_path / "snapshots"), retain=retain)


def test_round_trip_keeps_every_constructor_field_and_rebuilds_derived_arrays_read_only(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    store = _store(tmp_path)
    original = snapshots[-1]
    manifest = store.publish(original)
    loaded_manifest, loaded = store.load(manifest.version)

    assert loaded_manifest == manifest
    assert (manifest.model_version, manifest.events_applied) == (original.version, 16)
    assert (manifest.n_users, manifest.n_items) == (1, original.n_items)
    for field in dataclasses.fields(Snapshot):
        ours, theirs = getattr(loaded, field.name), getattr(original, field.name)
        if isinstance(ours, np.ndarray):
            assert np.array_equal(ours, theirs), field.name
            assert not ours.flags.writeable, f"{field.name} is writeable after loading"
        elif field.name.endswith("_masks"):
            assert ours.keys() == theirs.keys(), field.name
        elif field.name == "catalog":
            assert [i.item_id for i in ours] == [i.item_id for i in theirs]
        elif field.name == "seen_items":
            assert {k: v.tolist() for k, v in ours.items()} == {k: v.tolist() for k, v in theirs.items()}
        elif field.name == "mastery":  # the knowledge-tracing model: its students and weights
            assert ours.students == theirs.students and np.array_equal(ours.dense, theirs.dense)
        else:
            assert ours == theirs, field.name
    assert loaded.recommend("fran", k=10) == original.recommend("fran", k=10)
    assert not loaded.recommend("fran").cold_start


def test_publish_is_versioned_and_latest_points_at_the_newest(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    store = _store(tmp_path)
    assert store.latest_manifest() is None and store.versions() == []
    manifests = [store.publish(snapshot) for snapshot in snapshots]

    assert [m.version for m in manifests] == [1, 2, 3]
    assert store.versions() == [1, 2, 3]
    assert store.latest_manifest() == manifests[-1]
    # Only whole files are visible: no temp files left behind, one file per version plus LATEST.
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names == [LATEST, version_file(1), version_file(2), version_file(3)]
    # The header's checksum is the payload's.
    data = (tmp_path / "snapshots" / version_file(3)).read_bytes()
    header_end = data.index(b"\n", len(MAGIC))
    assert hashlib.sha256(data[header_end + 1 :]).hexdigest() == manifests[-1].sha256


def test_a_new_store_object_continues_the_numbering(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    _store(tmp_path).publish(snapshots[0])
    assert _store(tmp_path).publish(snapshots[1]).version == 2  # a restarted trainer


def test_retention_keeps_the_newest_versions(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    store = _store(tmp_path, retain=2)
    for _ in range(3):
        for snapshot in snapshots:
            store.publish(snapshot)
    assert store.versions() == [8, 9]
    assert store.latest_manifest() is not None and store.latest_manifest().version == 9  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) - 100], "torn write"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "sha256"),
        (lambda data: b"garbage" + data, "bad magic"),
        (lambda data: MAGIC + b"{not json\n" + data[len(MAGIC) :], "bad header"),
    ],
    ids=["truncated", "flipped-byte", "bad-magic", "bad-header"],
)
def test_damaged_files_are_rejected(
    tmp_path: Path, snapshots: list[Snapshot], damage: object, message: str
) -> None:
    store = _store(tmp_path)
    manifest = store.publish(snapshots[0])
    path = tmp_path / "snapshots" / manifest.file
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CorruptSnapshot, match=message):
        store.load(manifest.version)


def test_a_file_renamed_to_another_version_is_rejected(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    store = _store(tmp_path)
    store.publish(snapshots[0])
    directory = tmp_path / "snapshots"
    (directory / version_file(7)).write_bytes((directory / version_file(1)).read_bytes())
    with pytest.raises(CorruptSnapshot, match="version 1"):
        store.load(7)


def test_watcher_loads_the_newest_then_nothing_until_latest_changes(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    store = _store(tmp_path)
    served: list[tuple[int, str]] = []
    watcher = SnapshotWatcher(
        store, lambda manifest, snapshot: served.append((manifest.version, snapshot.version))
    )
    assert watcher.poll() is None  # nothing published yet

    store.publish(snapshots[0])
    store.publish(snapshots[1])
    loaded = watcher.poll()
    assert loaded is not None and loaded.version == 2
    assert served == [(2, snapshots[1].version)]  # only the newest, not every version
    assert watcher.poll() is None  # LATEST unchanged

    store.publish(snapshots[2])
    assert watcher.poll() is not None
    assert served[-1] == (3, snapshots[2].version) and watcher.current is not None
    assert watcher.current.version == 3


def test_watcher_skips_a_corrupt_newest_version_and_keeps_the_current_one(
    tmp_path: Path, snapshots: list[Snapshot], caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    served: list[int] = []
    failures: list[int] = []
    watcher = SnapshotWatcher(
        store,
        lambda manifest, _: served.append(manifest.version),
        lambda version, _: failures.append(version),
    )
    store.publish(snapshots[0])
    assert watcher.poll() is not None and served == [1]

    manifest = store.publish(snapshots[1])
    path = tmp_path / "snapshots" / manifest.file
    path.write_bytes(path.read_bytes()[:-10])  # a torn newest file
    with caplog.at_level(logging.WARNING, logger="snaplearn_recommender.snapshot_store"):
        assert watcher.poll() is None
    assert served == [1] and failures == [2]
    assert "skipping version 2" in caplog.text and "torn write" in caplog.text
    assert watcher.current is not None and watcher.current.version == 1  # the previous one keeps serving

    store.publish(snapshots[2])  # the trainer's next publish gets past it
    assert watcher.poll() is not None and served == [1, 3]
    assert failures == [2]  # a bad version is reported once, not on every poll


def test_a_fresh_watcher_falls_back_to_the_newest_valid_version(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    store = _store(tmp_path)
    for snapshot in snapshots:
        store.publish(snapshot)
    (tmp_path / "snapshots" / version_file(3)).write_bytes(b"SNAPLEARN-SNAPSHOT 1\n")
    watcher = SnapshotWatcher(store, lambda manifest, snapshot: None)
    loaded = watcher.poll()
    assert loaded is not None and loaded.version == 2 and loaded.model_version == snapshots[1].version


def test_an_unreadable_latest_is_logged_and_versions_are_still_found(
    tmp_path: Path, snapshots: list[Snapshot], caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    store.publish(snapshots[0])
    (tmp_path / "snapshots" / LATEST).write_text("{")
    watcher = SnapshotWatcher(store, lambda manifest, snapshot: None)
    with caplog.at_level(logging.WARNING):
        loaded = watcher.poll()
    assert loaded is not None and loaded.version == 1
    assert "unreadable LATEST" in caplog.text


def test_header_fields_round_trip_and_unknown_fields_are_ignored(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    store = _store(tmp_path)
    manifest = store.publish(snapshots[0])
    data = (tmp_path / "snapshots" / manifest.file).read_bytes()
    decoded, _ = decode_version_file(data, expected_version=1)
    assert decoded == manifest
    newer = manifest.to_json().replace(b"{", b'{"added_later": 1, ', 1)
    assert SnapshotManifest.from_json(newer) == manifest


def test_object_store_urls_are_refused_not_faked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only directories"):
        open_storage("s3://bucket/snapshots")
    storage = open_storage(f"file://{tmp_path}")
    assert isinstance(storage, LocalDirectoryStorage) and storage.directory == tmp_path


def test_retain_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retain"):
        _store(tmp_path, retain=0)


def test_an_unchanged_catalog_is_unpickled_once_and_a_new_one_is_read(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    trainer, replica = _store(tmp_path), _store(tmp_path)
    first = replica.load(trainer.publish(snapshots[0]).version)[1]
    second = replica.load(trainer.publish(snapshots[1]).version)[1]
    assert second.catalog is first.catalog  # the same catalog section: reused, not unpickled again

    model = RecommenderModel(generate_sample_catalog())
    extra = dataclasses.replace(model.catalog[0], item_id="brand-new-item", title="Brand new item")
    model.add_items([extra])
    grown = replica.load(trainer.publish(model.snapshot()).version)[1]
    assert grown.catalog is not first.catalog and grown.catalog.position("brand-new-item") is not None
    assert grown.n_items == first.n_items + 1
