"""The recommender in one process for integration tests: its settings, and events to feed it.

Typical use, in an async test with a real bus:

    app = await TrainerApp.start(in_process_settings(tmp_path / "checkpoints"), bus)
    produced = await asyncio.to_thread(produce_classified, bus, [("fran", "fractions")] * 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC, encode_image_classified
from snaplearn_recommender.config import RecommenderSettings


def in_process_settings(checkpoint_dir: Path, **overrides: Any) -> RecommenderSettings:
    """Ports 0; events applied in 10 ms batches so tests wait little; no timed checkpoint during a
    test (one is written on stop). `overrides` are further RecommenderSettings fields (role...)."""
    return RecommenderSettings(
        port=0,
        metrics_port=0,
        checkpoint_dir=checkpoint_dir,
        batch_max_wait_ms=10,
        checkpoint_interval_s=3600,
        **overrides,
    )


def produce_classified(bus: EventBus, user_topics: Sequence[tuple[str, str]], first_id: int = 0) -> int:
    """One ImageClassified event per (user, topic), sent by a real producer; returns how many.

    Event ids and times count up from first_id, so a later call continues with first_id = the
    number sent so far."""
    with bus.producer() as producer:
        for number, (user, topic) in enumerate(user_topics, start=first_id):
            event = encode_image_classified(
                event_id=f"req-{number}",
                user_id=user,
                time_s=1_700_000_000.0 + number,
                model_name="snaplearn-topics",
                model_version="1",
                labels=[(topic, 0.85), ("addition", 0.1)],
            )
            producer.send(IMAGE_CLASSIFIED_TOPIC, event.value, key=event.key, headers=event.headers)
        producer.flush()
    return len(user_topics)
