"""Versioned, published snapshots: the trainer writes them, stateless query replicas load the newest.

Layout of a snapshot store (a directory today; see `open_storage`):

    snapshot-000000000007.snap   one file per version: a header line (JSON manifest) + the payload
    snapshot-000000000008.snap
    LATEST                       the newest version's manifest (JSON), replaced atomically

A version file is `MAGIC`, one line of JSON (the manifest: version, sha256 and size of the payload,
model version, events applied, users, items, times), then the payload: the catalog pickled (a
section of its own, so an unchanged catalog is pickled and unpickled once, see CatalogCache), then
the Snapshot pickled through its constructor fields, so fields added to Snapshot later travel
without changes here, and the derived arrays are rebuilt (read-only) by Snapshot.__post_init__ on
load instead of being stored.

Publishing writes the version file atomically (snaplearn_common.files), then LATEST the same
way, then deletes versions beyond the newest `retain`, or every older version when the new
snapshot lacks a student an older one holds (ForgetStudent, D48): a forgotten id then stays in no
file of the store, and replicas, which follow LATEST, load the new version. A reader polls LATEST
with a cheap change token (a stat; an ETag on an object store), loads the newest version it has
not loaded, verifies size and sha256 and falls back to older retained versions when a file is
corrupt or partial: a bad file is logged once and skipped, and whatever was serving keeps serving.

The payload is a pickle: the store must be writable by the trainer only (the sha256 guards against
torn or damaged files, not against someone who can write the store).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from snaplearn_common.files import atomic_write
from snaplearn_recommender.catalog import Catalog
from snaplearn_recommender.snapshot import Snapshot

log = logging.getLogger(__name__)

MAGIC = b"SNAPLEARN-SNAPSHOT 1\n"
FORMAT = 1
LATEST = "LATEST"
DEFAULT_RETAIN = 5
_VERSION_NAME = re.compile(r"^snapshot-(\d{12})\.snap$")


class CorruptSnapshot(Exception):
    """A version file that cannot be used: torn, damaged, or not a snapshot."""


# --- storage: the only part that knows where bytes live ------------------------------------------


class SnapshotStorage(Protocol):
    """Named blobs with atomic replacement: a reader sees a whole old or a whole new blob."""

    location: str

    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes:
        """The blob's bytes; FileNotFoundError when there is none."""
        ...

    def names(self) -> list[str]: ...

    def delete(self, name: str) -> None:
        """Remove the blob if it exists."""
        ...

    def token(self, name: str) -> Hashable | None:
        """Something that changes whenever the blob is replaced (cheap); None when absent."""
        ...


class LocalDirectoryStorage:
    """A directory on a local or shared (NFS / ReadWriteMany) file system."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.location = str(self.directory)

    def put(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # atomic_write's temporary file is dot-prefixed: `names` skips it.
        atomic_write(self.directory / name, data)

    def get(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def names(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.directory) if not entry.name.startswith(".")]
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def token(self, name: str) -> Hashable | None:
        try:
            stat = os.stat(self.directory / name)
        except FileNotFoundError:
            return None
        # A rename gives a new inode; mtime and size catch in-place rewrites by other tools.
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def open_storage(location: str | os.PathLike[str]) -> SnapshotStorage:
    """The storage for a `--snapshot-dir` value: a directory path (or file:// URL).

    Object stores (s3://, gs://) are not implemented: mount the bucket as a file system, or add a
    SnapshotStorage whose `put` is a single PUT and whose `token` is the object's ETag.
    """
    text = os.fspath(location)
    if text.startswith("file://"):
        return LocalDirectoryStorage(text.removeprefix("file://"))
    if "://" in text:
        raise ValueError(
            f"snapshot store {text!r}: only directories are supported (object stores are not yet); "
            "use a shared volume path"
        )
    return LocalDirectoryStorage(text)


# --- the format ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotManifest:
    version: int  # the store's sequence number, increasing by publish
    model_version: str  # Snapshot.version (what Recommend reports)
    events_applied: int
    n_users: int
    n_items: int
    created_at: float  # when the trainer built the snapshot
    published_at: float
    sha256: str  # of the payload
    size: int  # of the payload, bytes
    catalog_size: int  # the payload's first catalog_size bytes are the catalog, the rest the snapshot
    file: str
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SnapshotManifest:
        values = json.loads(data)
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise ValueError(f"unsupported snapshot manifest format: {str(values)[:200]}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _students(snapshot: Snapshot) -> frozenset[str]:
    """Every user id a snapshot holds (rows, and attempts of students it keeps them for)."""
    return frozenset(snapshot.user_index).union(snapshot.recent_attempts)


def version_file(version: int) -> str:
    return f"snapshot-{version:012d}.snap"


def _rebuild_snapshot(cls: type[Snapshot], values: dict[str, Any]) -> Snapshot:
    return cls(**values)


def _mapping_proxy(values: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(values)  # the type itself cannot be pickled by reference


class _SnapshotPickler(pickle.Pickler):
    """Pickles a Snapshot as its constructor fields; mapping proxies as plain dicts; the catalog as
    a reference to the payload's catalog section."""

    def __init__(self, file: io.BytesIO, catalog: Catalog) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._catalog = catalog

    def persistent_id(self, obj: Any) -> str | None:
        return "catalog" if obj is self._catalog else None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Snapshot):
            values = {f.name: getattr(obj, f.name) for f in fields(obj) if f.init}
            return _rebuild_snapshot, (type(obj), values)
        if isinstance(obj, MappingProxyType):
            return _mapping_proxy, (dict(obj),)
        return NotImplemented


class _SnapshotUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, catalog: Catalog) -> None:
        super().__init__(file)
        self._catalog = catalog

    def persistent_load(self, pid: Any) -> Any:
        if pid != "catalog":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._catalog


class CatalogCache:
    """Pickles and unpickles each catalog once.

    A large catalog (one Python object per item) is most of a snapshot's pickling and loading
    time, and it rarely changes: Catalog is immutable (new items make a new object), so the
    writer keys on identity and the reader on the section's sha256.
    """

    def __init__(self) -> None:
        self._written: tuple[Catalog, bytes] | None = None  # holds the object: its id stays unique
        self._read: tuple[str, Catalog] | None = None

    def encode(self, catalog: Catalog) -> bytes:
        if self._written is None or self._written[0] is not catalog:
            self._written = (catalog, pickle.dumps(catalog, protocol=pickle.HIGHEST_PROTOCOL))
        return self._written[1]

    def decode(self, data: memoryview) -> Catalog:
        digest = hashlib.sha256(data).hexdigest()
        if self._read is None or self._read[0] != digest:
            catalog = pickle.loads(data)
            if not isinstance(catalog, Catalog):
                raise TypeError(f"catalog section holds a {type(catalog).__name__}")
            self._read = (digest, catalog)
        return self._read[1]


def dump_snapshot(snapshot: Snapshot, catalogs: CatalogCache | None = None) -> tuple[bytes, int]:
    """(payload, size of its catalog section): the catalog pickled, then the rest of the snapshot."""
    catalog = (catalogs or CatalogCache()).encode(snapshot.catalog)
    buffer = io.BytesIO()
    buffer.write(catalog)
    _SnapshotPickler(buffer, snapshot.catalog).dump(snapshot)
    return buffer.getvalue(), len(catalog)


def encode_version_file(manifest: SnapshotManifest, payload: bytes) -> bytes:
    return MAGIC + manifest.to_json() + b"\n" + payload


def decode_version_file(
    data: bytes, expected_version: int | None = None, catalogs: CatalogCache | None = None
) -> tuple[SnapshotManifest, Snapshot]:
    """Manifest and snapshot from a version file's bytes; CorruptSnapshot if anything is off."""
    if not data.startswith(MAGIC):
        raise CorruptSnapshot("not a snapshot file (bad magic)")
    header_end = data.find(b"\n", len(MAGIC))
    if header_end < 0:
        raise CorruptSnapshot("truncated header")
    try:
        manifest = SnapshotManifest.from_json(data[len(MAGIC) : header_end])
    except (ValueError, TypeError) as error:
        raise CorruptSnapshot(f"bad header: {error}") from error
    if expected_version is not None and manifest.version != expected_version:
        raise CorruptSnapshot(f"header says version {manifest.version}, file name {expected_version}")
    payload = memoryview(data)[header_end + 1 :]
    if len(payload) != manifest.size:
        raise CorruptSnapshot(f"payload is {len(payload)} bytes, header says {manifest.size} (torn write?)")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.sha256:
        raise CorruptSnapshot(f"sha256 {digest[:12]}... is not the header's {manifest.sha256[:12]}...")
    if not 0 < manifest.catalog_size < len(payload):
        raise CorruptSnapshot(f"catalog section of {manifest.catalog_size} bytes does not fit the payload")
    try:
        catalog = (catalogs or CatalogCache()).decode(payload[: manifest.catalog_size])
        snapshot = _SnapshotUnpickler(io.BytesIO(payload[manifest.catalog_size :]), catalog).load()
    except Exception as error:  # a payload that hashes right but does not unpickle: wrong code version
        raise CorruptSnapshot(f"payload does not load: {error!r}") from error
    if not isinstance(snapshot, Snapshot):
        raise CorruptSnapshot(f"payload is a {type(snapshot).__name__}, not a Snapshot")
    return manifest, snapshot


# --- the store ----------------------------------------------------------------------------------


class SnapshotStore:
    """Publishes (one writer: the trainer) and loads (any number of readers) versioned snapshots."""

    def __init__(self, storage: SnapshotStorage, retain: int = DEFAULT_RETAIN) -> None:
        if retain < 1:
            raise ValueError(f"retain must be at least 1, got {retain}")
        self.storage = storage
        self.retain = retain
        self._catalogs = CatalogCache()
        # The students of the version this store published last (None: not yet in this process).
        self._published_students: frozenset[str] | None = None

    def versions(self) -> list[int]:
        """Versions present, oldest first."""
        found = (_VERSION_NAME.match(name) for name in self.storage.names())
        return sorted(int(match.group(1)) for match in found if match)

    def latest_manifest(self) -> SnapshotManifest | None:
        """What LATEST points to; None when nothing was published or LATEST is unreadable."""
        try:
            return SnapshotManifest.from_json(self.storage.get(LATEST))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            log.warning("snapshot store %s: unreadable %s (%s)", self.storage.location, LATEST, error)
            return None

    def publish(self, snapshot: Snapshot) -> SnapshotManifest:
        payload, catalog_size = dump_snapshot(snapshot, self._catalogs)
        latest = self.latest_manifest()
        version = max([0, *self.versions(), latest.version if latest else 0]) + 1
        manifest = SnapshotManifest(
            version=version,
            model_version=snapshot.version,
            events_applied=snapshot.events_applied,
            n_users=snapshot.n_users,
            n_items=snapshot.n_items,
            created_at=snapshot.created_at,
            published_at=time.time(),
            sha256=hashlib.sha256(payload).hexdigest(),
            size=len(payload),
            catalog_size=catalog_size,
            file=version_file(version),
        )
        students = _students(snapshot)
        forgotten = self._forgets_since_last(students, latest)
        # The version file first: LATEST never names a file that is not whole.
        self.storage.put(manifest.file, encode_version_file(manifest, payload))
        self.storage.put(LATEST, manifest.to_json())
        self._published_students = students
        self._prune(version, keep=1 if forgotten else self.retain)
        if forgotten:
            log.info(
                "snapshot store %s: a student was forgotten; older versions deleted", self.storage.location
            )
        return manifest

    def _forgets_since_last(self, students: frozenset[str], latest: SnapshotManifest | None) -> bool:
        """Whether an older version may hold a student `students` lacks. Students leave a model only
        by ForgetStudent, and each publish prunes when one left, so comparing with the version
        published last suffices; after a restart that is the newest one in the store."""
        previous = self._published_students
        if previous is None and latest is not None:
            try:
                previous = _students(self.load(latest.version)[1])
            except (FileNotFoundError, CorruptSnapshot):
                return True  # unknown: prune rather than keep a copy of a forgotten student
        return previous is not None and not previous <= students

    def _prune(self, newest: int, keep: int) -> None:
        """Keep the newest `keep` versions; readers fall back among them."""
        for version in self.versions():
            if version <= newest - keep:
                self.storage.delete(version_file(version))

    def load(self, version: int) -> tuple[SnapshotManifest, Snapshot]:
        """CorruptSnapshot for a bad file; FileNotFoundError when it is gone (pruned)."""
        data = self.storage.get(version_file(version))
        return decode_version_file(data, expected_version=version, catalogs=self._catalogs)


class SnapshotWatcher:
    """Polls a store and hands each newer valid snapshot to `on_snapshot` (a query replica's loop).

    `poll()` is cheap when nothing changed (one token of LATEST). Not thread-safe: one caller.
    """

    def __init__(
        self,
        store: SnapshotStore,
        on_snapshot: Callable[[SnapshotManifest, Snapshot], None],
        on_failure: Callable[[int, str], None] | None = None,
    ) -> None:
        self.store = store
        self._on_snapshot = on_snapshot
        self._on_failure = on_failure
        self._token: Hashable | None = None
        self.current: SnapshotManifest | None = None
        self._bad: set[int] = set()  # versions found corrupt: logged once, never retried

    def poll(self) -> SnapshotManifest | None:
        """Load the newest valid version newer than the current one; its manifest, or None."""
        token = self.store.storage.token(LATEST)
        if token is None or token == self._token:
            return None
        latest = self.store.latest_manifest()
        current = self.current.version if self.current else 0
        candidates = set(self.store.versions())
        if latest is not None:
            candidates.add(latest.version)
        loaded = None
        for version in sorted(candidates, reverse=True):
            if version <= current:
                break
            if version in self._bad:
                continue
            try:
                manifest, snapshot = self.store.load(version)
            except FileNotFoundError:
                continue  # pruned since the listing, or LATEST names a file being replaced
            except CorruptSnapshot as error:
                self._bad.add(version)
                log.warning(
                    "snapshot store %s: skipping version %d: %s", self.store.storage.location, version, error
                )
                if self._on_failure is not None:
                    self._on_failure(version, str(error))
                continue
            self._on_snapshot(manifest, snapshot)
            self.current = loaded = manifest
            break
        # The token was taken before LATEST was read: a publish in between only causes one more poll.
        self._token = token
        return loaded
