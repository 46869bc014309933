"""The freshness benchmark's probes (snaplearn_bench.freshness) against a real recommender process
on a real embedded bus: every catalog path (add, change, retire, published as the sync command does)
and the answer path reach Recommend, and each answer shows in GetStudentState with its outcome
(the probe raises otherwise). Keeps the benchmark's definitions of "reached" true of the code."""

from __future__ import annotations

import uuid
from pathlib import Path

from snaplearn_bench.freshness import PROBE_TIMEOUT_S, answer_probes, catalog_probes
from snaplearn_bench.processes import bus_flags, recommender_process
from snaplearn_client import RecommenderClient
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.settings import BusSettings


def test_catalog_and_answer_probes_reach_a_real_recommender(tmp_path: Path) -> None:
    topic = f"freshness-{uuid.uuid4().hex[:8]}"
    settings = BusSettings.from_env(
        {}, backend="embedded", embedded_path=str(tmp_path / "bus.db"), topic=topic
    )
    flags = bus_flags("embedded", tmp_path, "", topic)
    with (
        recommender_process(tmp_path, tmp_path / "recommender", flags, "freshness-test") as recommender,
        open_bus(settings) as bus,
    ):
        catalog = catalog_probes(bus, topic, settings.partitions, recommender.target, probes=2)
        answers = answer_probes(recommender.target, probes=2)
        with RecommenderClient(recommender.target) as client:
            # Every probe item ended retired: none is recommendable any more.
            offered = [item.item_id for item in client.recommend("after-probes", k=100).items]
    for path in ("catalog_add", "catalog_change", "catalog_retire"):
        assert len(catalog[path]) == 2, path
        assert all(0 < s < PROBE_TIMEOUT_S for s in catalog[path]), (path, catalog[path])
    assert len(catalog["publish"]) == 6  # three publishes a probe
    assert len(answers) == 2 and all(0 < s < PROBE_TIMEOUT_S for s in answers)
    assert offered and not any(item_id.startswith("fresh-item-") for item_id in offered)
