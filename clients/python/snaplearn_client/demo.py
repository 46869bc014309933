"""The demo: simulated students photograph worksheets; their recommendations follow.

Each student has topics they work on. The demo prints each student's top
recommendations, sends their photos through the real vision server (which publishes
events to the bus), waits until the recommender's snapshot has applied them, and prints
the recommendations again with how many of the top items now match the student's topics.

The photos come from a folder of <topic>/<name>.png|jpg (`snaplearn up` renders one with
`python -m snaplearn_vision.worksheets --out DIR`), so the client needs no vision code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn_client.client import ChannelSecurity, RecommenderClient, VisionClient

TOP_N = 5


@dataclass(frozen=True)
class Student:
    user_id: str
    topics: tuple[str, ...]


DEMO_STUDENTS = (
    Student("demo-ada", ("fractions", "decimals")),
    Student("demo-ben", ("geometry",)),
    Student("demo-cleo", ("exponents", "square_roots")),
    Student("demo-dev", ("equations",)),
)


# A vision label -> the catalog concepts it stands for (the recommender's --label-map); a label
# missing from the map stands for the concept of the same name, as in the recommender.
LabelMap = Mapping[str, Sequence[str]]


def load_label_map(path: Path | None) -> LabelMap:
    """The recommender's --label-map file ({label: concept | [concepts]}); None: labels are concepts."""
    if path is None:
        return {}
    raw = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object mapping label -> concept(s)")
    return {
        str(label): [concepts] if isinstance(concepts, str) else list(concepts)
        for label, concepts in raw.items()
    }


def concepts_of(topics: Sequence[str], label_map: LabelMap) -> set[str]:
    """The catalog concepts a student's photographed topics (vision labels) stand for."""
    return {concept for topic in topics for concept in label_map.get(topic, (topic,))}


def students_for(topics: Sequence[str]) -> tuple[Student, ...]:
    """The demo's students: the default four when the photos hold their topics, else one student
    per topic found (a custom model's labels), at most four."""
    if all(topic in topics for student in DEMO_STUDENTS for topic in student.topics):
        return DEMO_STUDENTS
    return tuple(Student(f"demo-{i + 1}-{topic}", (topic,)) for i, topic in enumerate(sorted(topics)[:4]))


def _matching(items: Sequence[recommender_pb2.RecommendedItem], concepts: set[str]) -> int:
    return sum(1 for item in items if set(item.concepts) & concepts)


def summarise(
    students: Sequence[Student],
    before: Mapping[str, recommender_pb2.RecommendResponse],
    after: Mapping[str, recommender_pb2.RecommendResponse],
    label_map: LabelMap,
) -> tuple[list[str], int]:
    """The summary's lines and the exit code: 0 when every student's top items moved toward their
    photos or already all matched them; a student whose list did not move is counted as such."""
    lines = [f"\nSummary: items in the top {TOP_N} that practise what the student photographed"]
    moved = already = 0
    for student in students:
        concepts = concepts_of(student.topics, label_map)
        was = _matching(before[student.user_id].items, concepts)
        now = _matching(after[student.user_id].items, concepts)
        if now > was:
            moved += 1
        elif was == now == TOP_N:
            already += 1
        lines.append(f"  {student.user_id:<10} before {was}/{TOP_N}  after {now}/{TOP_N}")
    stayed = len(students) - moved - already
    line = f"{moved}/{len(students)} students' recommendations moved toward their photos"
    if already:
        line += f"; {already} already matched them all before"
    if stayed:
        line += f"; {stayed} did not move"
    lines.append(line)
    return lines, 0 if stayed == 0 else 1


def _show(student: Student, reply: recommender_pb2.RecommendResponse, label_map: LabelMap) -> None:
    tag = " (cold start)" if reply.cold_start else ""
    matching = _matching(reply.items, concepts_of(student.topics, label_map))
    print(f"  {student.user_id}{tag}: {matching}/{len(reply.items)} match")
    for rank, item in enumerate(reply.items, 1):
        print(f"      {rank}. {item.title}  [{', '.join(item.concepts)}]")


def _wait_applied(recommender: RecommenderClient, user_id: str, target: int, timeout_s: float) -> float:
    """Poll until the recommender's snapshot has applied `target` events; returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if recommender.recommend(user_id, k=1).events_applied >= target:
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(f"recommender did not apply {target} events within {timeout_s:.0f} s")


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_photos(folder: Path, topics: Sequence[str]) -> dict[str, list[bytes]]:
    """The photos of each topic, from folder/<topic>/*, in name order; names the topics that have none."""
    photos = {
        topic: [
            p.read_bytes() for p in sorted((folder / topic).glob("*")) if p.suffix.lower() in PHOTO_SUFFIXES
        ]
        for topic in topics
    }
    missing = [topic for topic, found in photos.items() if not found]
    if missing:
        raise FileNotFoundError(
            f"{folder} has no photos for {', '.join(missing)} (expected {folder}/<topic>/*.png)"
        )
    return photos


def photo_topics(folder: Path) -> list[str]:
    """The topics (vision labels) the photo folder has a subfolder of photos for."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of <topic>/*.png photos")
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and any(p.suffix.lower() in PHOTO_SUFFIXES for p in entry.iterdir())
    )


def run_demo(
    vision_target: str,
    recommender_target: str,
    photos_dir: Path,
    photos_per_student: int = 6,
    label_map_path: Path | None = None,
    security: ChannelSecurity | None = None,
) -> int:
    label_map = load_label_map(label_map_path)
    students = students_for(photo_topics(photos_dir))
    topics = sorted({topic for student in students for topic in student.topics})
    photos: Mapping[str, list[bytes]] = load_photos(photos_dir, topics)
    with (
        VisionClient(vision_target, timeout_s=10, security=security) as vision,
        RecommenderClient(recommender_target, security=security) as rec,
    ):
        vision.wait_ready()
        rec.wait_ready()
        print("\n== SnapLearn demo: photos in, recommendations out ==")
        for student in students:
            print(f"  {student.user_id} photographs {', '.join(student.topics)}")

        print(f"\nBefore: top {TOP_N} for each student")
        before = {s.user_id: rec.recommend(s.user_id, k=TOP_N) for s in students}
        for student in students:
            _show(student, before[student.user_id], label_map)
        applied_before = max(reply.events_applied for reply in before.values())

        print(f"\nSending {photos_per_student} photos per student to the vision server")
        sent = correct = 0
        last_returned = 0.0
        for i in range(photos_per_student):
            for student in students:
                topic = student.topics[i % len(student.topics)]
                image = photos[topic][(i // len(student.topics)) % len(photos[topic])]
                reply = vision.classify(image, student.user_id, top_k=3)
                last_returned = time.monotonic()
                sent += 1
                correct += reply.labels[0].label == topic
                print(
                    f"  {student.user_id:<10} photo of {topic:<13} -> {reply.labels[0].label:<13}"
                    f" {reply.labels[0].score:.2f}  (queued {reply.queue_ms:.1f} ms,"
                    f" computed {reply.compute_ms:.1f} ms)"
                )
        print(f"  {correct}/{sent} photos recognised as the topic they show")

        waited = _wait_applied(rec, students[0].user_id, applied_before + sent, timeout_s=60)
        fresh_ms = (time.monotonic() - last_returned) * 1000
        print(f"\nAll {sent} events applied by the recommender {fresh_ms:.0f} ms after the last photo")
        print(f"(waited {waited * 1000:.0f} ms after sending finished)")

        print(f"\nAfter: top {TOP_N} for each student")
        after = {s.user_id: rec.recommend(s.user_id, k=TOP_N) for s in students}
        for student in students:
            _show(student, after[student.user_id], label_map)

        lines, rc = summarise(students, before, after, label_map)
        print("\n".join(lines))
        return rc
