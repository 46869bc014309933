"""`python -m snaplearn_recommender.catalog_sync`: publish a catalog file's differences to the bus.

It compares the catalog a school wants (a .csv / .jsonl file and its declaration) with the one
the recommender serves, read from where the trainer keeps it (its checkpoint directory, or the
newest published snapshot), and publishes one CatalogItemAdded / Changed / Retired event per
difference on the recommender's topic; the running worker applies them in order, exactly once,
without a restart. Nothing else is published: an unchanged catalog publishes nothing.

Each event goes to EVERY partition of the topic (same payload and event id, a key chosen to land
on each): student events are keyed by user, so a student's feedback on a new item may sit in any
partition, and a replay after a restart reads partitions in no fixed order relative to each other.
With a copy in each, every partition holds the item's change before any feedback published after
it; the model applies the first copy and skips the others (event-id dedupe, and each change's time
as the item's version, so a late copy never undoes a newer change).

The serving catalog read this way may lag changes that are on the bus but not yet checkpointed;
publishing such a change again is harmless, because applying a catalog change is idempotent (an
add or change of an item to the content it already has, a retire of a retired item, change nothing).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Self

from pydantic import AfterValidator, Field, model_validator

from snaplearn.events.v1 import events_pb2
from snaplearn_common.eventbus.base import EventBus, partition_for_key
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.events import EncodedEvent, encode_catalog_change
from snaplearn_common.settings import Cli, Settings, SettingsConfigDict, none_for
from snaplearn_recommender.catalog import (
    FEATURE_FLAG,
    ITEM_FLAG,
    Catalog,
    CatalogDiff,
    CatalogError,
    checked_feature_flags,
    checked_item_flags,
    diff_catalogs,
    item_to_proto,
    load_catalog,
    parse_feature_flags,
    parse_item_flags,
)
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.snapshot_store import SnapshotStore, open_storage

log = logging.getLogger(__name__)

_UNSET_IF_EMPTY = none_for("")


class CatalogSyncSettings(Settings):
    """Publish the differences between a catalog file and the serving catalog as catalog events."""

    model_config = SettingsConfigDict(env_prefix="SNAPLEARN_CATALOG_SYNC_")
    cli_prog: ClassVar[str | None] = "python -m snaplearn_recommender.catalog_sync"

    catalog_path: Annotated[Path, Cli(flag="--catalog", metavar="PATH")] = Field(
        description="the catalog wanted, .csv or .jsonl"
    )
    catalog_features_path: Annotated[
        Path | None, Cli(flag="--catalog-features", metavar="PATH"), _UNSET_IF_EMPTY
    ] = Field(default=None, description="its declaration (unset: the one beside the catalog)")
    catalog_feature: Annotated[
        list[str],
        Cli(flag=FEATURE_FLAG, metavar="NAME[@COLUMN][=KIND[:ARG]]", repeatable=True),
        AfterValidator(checked_feature_flags),
    ] = Field(default_factory=list, description="a feature declared as the trainer's flag declares it")
    catalog_item: Annotated[
        list[str],
        Cli(flag=ITEM_FLAG, metavar="KEY=VALUE", repeatable=True),
        AfterValidator(checked_item_flags),
    ] = Field(default_factory=list, description="the item's own columns, as the trainer's flag gives them")
    checkpoint_dir: Annotated[Path | None, Cli(metavar="DIR"), _UNSET_IF_EMPTY] = Field(
        default=None, description="the trainer's checkpoint directory (its catalog is the serving one)"
    )
    snapshot_dir: Annotated[str | None, Cli(metavar="DIR"), _UNSET_IF_EMPTY] = Field(
        default=None, description="or: the snapshot store (the newest published snapshot's catalog)"
    )
    dry_run: Annotated[bool, Field(description="print the differences, publish nothing")] = False
    bus: BusSettings = Field(default_factory=BusSettings.from_env)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.checkpoint_dir is None) == (self.snapshot_dir is None):
            raise ValueError("give exactly one of --checkpoint-dir and --snapshot-dir (the serving catalog)")
        return self


@dataclass(frozen=True, slots=True)
class SyncResult:
    changes: CatalogDiff
    published: int


def serving_catalog(checkpoint_dir: Path | None = None, snapshot_dir: str | None = None) -> Catalog:
    """The catalog the recommender serves: its checkpoint's, or the newest published snapshot's.
    CatalogError when there is none yet (start the recommender with a catalog first)."""
    if checkpoint_dir is not None:
        checkpoint = Checkpointer(checkpoint_dir).load()
        if checkpoint is None:
            raise CatalogError(f"{checkpoint_dir}: no checkpoint yet (has the trainer run?)")
        return checkpoint.model.catalog
    assert snapshot_dir is not None
    store = SnapshotStore(open_storage(snapshot_dir))
    versions = store.versions()
    if not versions:
        raise CatalogError(f"{snapshot_dir}: no published snapshot yet (has the trainer published?)")
    return store.load(versions[-1])[1].catalog


def change_events(changes: CatalogDiff, now_s: float | None = None) -> list[EncodedEvent]:
    """One event per change, in the order: additions, changes, retirements."""
    time_s = time.time() if now_s is None else now_s
    stamp = events_pb2.CatalogItemAdded().time
    stamp.FromNanoseconds(int(time_s * 1e9))
    events: list[EncodedEvent] = []
    for item in changes.added:
        events.append(
            encode_catalog_change(
                events_pb2.CatalogItemAdded(event_id=_event_id(), time=stamp, item=item_to_proto(item))
            )
        )
    for item in changes.changed:
        events.append(
            encode_catalog_change(
                events_pb2.CatalogItemChanged(event_id=_event_id(), time=stamp, item=item_to_proto(item))
            )
        )
    for item_id in changes.retired:
        events.append(
            encode_catalog_change(
                events_pb2.CatalogItemRetired(event_id=_event_id(), time=stamp, item_id=item_id)
            )
        )
    return events


def _event_id() -> str:
    # Random, not derived from the content: an item retired and later added back with the same
    # content must not be taken for a duplicate of its first addition.
    return f"catalog-{uuid.uuid4()}"


def partition_keys(key: bytes, partitions: int) -> list[bytes]:
    """One key per partition (index = partition), each derived from `key`, by the bus's own rule."""
    keys: list[bytes | None] = [None] * partitions
    missing = partitions
    suffix = 0
    while missing:
        candidate = key + b"#" + str(suffix).encode()
        partition = partition_for_key(candidate, partitions)
        if keys[partition] is None:
            keys[partition] = candidate
            missing -= 1
        suffix += 1
    return [k for k in keys if k is not None]


def publish_changes(bus: EventBus, topic: str, partitions: int, changes: CatalogDiff) -> int:
    """Publish the changes, each to every partition (synchronously, in order); the number of
    changes published."""
    events = change_events(changes)
    if not events:
        return 0
    bus.create_topic(topic, partitions)  # idempotent
    count = bus.partitions_for(topic)
    producer = bus.producer()
    try:
        for event in events:
            for key in partition_keys(event.key, count):
                producer.send(topic, event.value, key=key, headers=event.headers)
        producer.flush(timeout_s=30.0)
    finally:
        producer.close()
    return len(events)


def sync(settings: CatalogSyncSettings, bus: EventBus | None = None) -> SyncResult:
    wanted = load_catalog(
        settings.catalog_path,
        settings.catalog_features_path,
        parse_feature_flags(settings.catalog_feature),
        parse_item_flags(settings.catalog_item),
    )
    changes = diff_catalogs(serving_catalog(settings.checkpoint_dir, settings.snapshot_dir), wanted)
    if settings.dry_run or not changes:
        return SyncResult(changes, 0)
    owned = bus is None
    bus = open_bus(settings.bus) if bus is None else bus
    try:
        published = publish_changes(bus, settings.bus.topic, settings.bus.partitions, changes)
    finally:
        if owned:
            bus.close()
    return SyncResult(changes, published)


def main(argv: Sequence[str] | None = None) -> int:
    settings = CatalogSyncSettings.from_argv(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    try:
        result = sync(settings)
    except CatalogError as exc:  # the user's files: one sentence, no traceback
        print(f"catalog sync: {exc}", file=sys.stderr)
        return 2
    changes = result.changes
    counts = f"{len(changes.added)} added, {len(changes.changed)} changed, {len(changes.retired)} retired"
    if settings.dry_run:
        print(f"{counts}; dry run, nothing published")
    else:
        print(f"{counts}; published {result.published} event(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
