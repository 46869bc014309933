"""snaplearn-client: classify a photo or ask for recommendations from the command line.

snaplearn-client classify IMAGE [IMAGE ...] --user U [--top-k 3] [--vision HOST:PORT]
snaplearn-client recommend --user U [--k 10] [--exclude-seen] [--grade 5] [--format video]
                           [--feature topic=Fractions,Geometry] [--feature minutes<=20]
snaplearn-client similar --item ID [--k 10] [--grade 5] [--format video] [--concept fractions]
                         [--feature NAME=V[,V]] [--feature NAME>=N]
snaplearn-client feedback --user U --item ID --kind completed|viewed|skipped [--request-id R]
                          [--outcome correct|incorrect] [--score 0.8]
snaplearn-client student-state --user U [--k 10]
snaplearn-client forget --user U [--request-id ID]
snaplearn-client demo --photos DIR [--vision HOST:PORT] [--recommender HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn_client.client import (
    ATTEMPT_OUTCOMES,
    DEFAULT_RECOMMENDER_TARGET,
    DEFAULT_VISION_TARGET,
    FEEDBACK_KINDS,
    OUTCOME_NAMES,
    ChannelSecurity,
    RecommenderClient,
)

FEATURE_HELP = (
    "filter on a declared feature of the catalog: NAME=V[,V...] (any of these values), "
    "NAME<=N or NAME>=N (a numeric feature's bound); repeat for more (an item passes all)"
)


def parse_feature(text: str) -> recommender_pb2.FeatureFilter:
    """One --feature flag: "topic=Fractions,Geometry", "minutes<=20" or "minutes>=10"."""
    operators = [(text.find(op), op) for op in ("<=", ">=", "=") if text.find(op) > 0]
    if not operators:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=V[,V], NAME<=N or NAME>=N")
    position, operator = min(operators)
    name, value = text[:position].strip(), text[position + len(operator) :].strip()
    if operator == "=":
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: no value after '='")
        return recommender_pb2.FeatureFilter(name=name, values=values)
    try:
        bound = float(value)
    except ValueError:
        bound = math.nan
    if not math.isfinite(bound):
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number")
    result = recommender_pb2.FeatureFilter(name=name)
    if operator == "<=":
        result.max = bound
    else:
        result.min = bound
    return result


def _recommender(args: argparse.Namespace) -> RecommenderClient:
    return RecommenderClient(args.recommender, timeout_s=args.timeout, security=_security(args))


def _security(args: argparse.Namespace) -> ChannelSecurity | None:
    token = os.environ.get("SNAPLEARN_TOKEN") or None
    if args.tls_ca is None and args.tls_cert is None and token is None:
        return None
    tls = args.tls_ca is not None or args.tls_cert is not None
    return ChannelSecurity(
        tls=tls, ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key, token=token
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snaplearn-client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision", default=os.environ.get("SNAPLEARN_VISION_TARGET", DEFAULT_VISION_TARGET))
    parser.add_argument(
        "--recommender", default=os.environ.get("SNAPLEARN_RECOMMENDER_TARGET", DEFAULT_RECOMMENDER_TARGET)
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    parser.add_argument("--json", action="store_true", help="print the raw response as JSON")
    # TLS and the token (the token only from SNAPLEARN_TOKEN: a process listing shows flags).
    parser.add_argument(
        "--tls-ca", default=os.environ.get("SNAPLEARN_TLS_CA"), help="TLS: the servers' CA (PEM)"
    )
    parser.add_argument(
        "--tls-cert", default=os.environ.get("SNAPLEARN_TLS_CLIENT_CERT"), help="mutual TLS: cert"
    )
    parser.add_argument(
        "--tls-key", default=os.environ.get("SNAPLEARN_TLS_CLIENT_KEY"), help="mutual TLS: key"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser(
        "classify", help="classify image files (several: over one ClassifyStream, an answer each)"
    )
    classify.add_argument("images", type=Path, nargs="+", metavar="image")
    classify.add_argument("--user", required=True)
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--model", default="")
    classify.add_argument("--model-version", default="")

    recommend = commands.add_parser("recommend", help="what should this student practise next?")
    recommend.add_argument("--user", required=True)
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--exclude-seen", action="store_true")
    recommend.add_argument("--grade", type=int, action="append", default=[])
    recommend.add_argument("--format", action="append", default=[])
    recommend.add_argument("--concept", action="append", default=[])
    recommend.add_argument("--feature", type=parse_feature, action="append", default=[], help=FEATURE_HELP)

    similar = commands.add_parser("similar", help="items like this one (the model's item space)")
    similar.add_argument("--item", required=True, help="an item_id of the catalog")
    similar.add_argument("--k", type=int, default=10)
    similar.add_argument("--grade", type=int, action="append", default=[])
    similar.add_argument("--format", action="append", default=[])
    similar.add_argument("--concept", action="append", default=[])
    similar.add_argument("--feature", type=parse_feature, action="append", default=[], help=FEATURE_HELP)

    feedback = commands.add_parser("feedback", help="record that a student viewed/completed/skipped an item")
    feedback.add_argument("--user", required=True)
    feedback.add_argument("--item", required=True, help="an item_id of the catalog")
    feedback.add_argument("--kind", required=True, choices=tuple(FEEDBACK_KINDS))
    feedback.add_argument("--request-id", default="", help="idempotency key (default: a new UUID)")
    feedback.add_argument(
        "--outcome", choices=tuple(ATTEMPT_OUTCOMES), default=None, help="an answered exercise: how it went"
    )
    feedback.add_argument("--score", type=float, default=None, help="the attempt's score in [0, 1]")

    state = commands.add_parser(
        "student-state", help="a student's mastery per concept, latest attempts and recommendations"
    )
    state.add_argument("--user", required=True)
    state.add_argument("--k", type=int, default=10, help="how many recommendations")

    forget = commands.add_parser("forget", help="erase a student from the recommender (admin)")
    forget.add_argument("--user", required=True)
    forget.add_argument("--request-id", default="", help="idempotency key: a retry publishes nothing")

    demo = commands.add_parser("demo", help="simulated students photograph worksheets; show recommendations")
    demo.add_argument(
        "--photos", type=Path, required=True, help="folder of <topic>/*.png photos (snaplearn up renders one)"
    )
    demo.add_argument("--photos-per-student", type=int, default=6)
    demo.add_argument(
        "--label-map",
        type=Path,
        default=None,
        help="the recommender's --label-map (JSON {label: [concepts]})",
    )
    return parser


def _print_classified(reply: Any, indent: str = "") -> None:
    print(f"{indent}model {reply.model_name}/{reply.model_version}  request {reply.request_id}")
    for rank, label in enumerate(reply.labels, 1):
        print(f"{indent}  {rank}. {label.label:<14} {label.score:.3f}")
    timing = f"queued {reply.queue_ms:.1f} ms, computed {reply.compute_ms:.1f} ms"
    print(f"{indent}  {timing} (batch of {reply.batch_size})")


def _to_json(message: Any) -> str:
    """A response as JSON, non-ASCII text (students' names, titles) kept as it is."""
    return MessageToJson(message, ensure_ascii=False)


def _print_items(items: Any, indent: str = "  ") -> None:
    for rank, item in enumerate(items, 1):
        print(f"{indent}{rank:>2}. {item.title}  [{', '.join(item.concepts)}]  {item.score:.2f}")
        print(f"{indent}    {item.reason}")


def _print_student_state(state: recommender_pb2.GetStudentStateResponse) -> None:
    print(f"student {state.user_id}, model {state.model_version}, {state.events_applied} events")
    print("mastery (weakest first):")
    if not state.concepts:
        print("  (no attempts yet)")
    width = max((len(c.concept) for c in state.concepts), default=0)
    for concept in state.concepts:
        mark = "mastered" if concept.mastered else "practising"
        counts = f"{concept.correct} right, {concept.incorrect} wrong"
        print(f"  {concept.concept:<{width}}  {concept.mastery:.2f}  {mark:<10}  ({counts})")
    print("recent attempts (oldest first):")
    if not state.recent_attempts:
        print("  (none)")
    for attempt in state.recent_attempts:
        when = attempt.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if attempt.HasField("time") else "-"
        outcome = OUTCOME_NAMES.get(attempt.outcome) or "scored"
        score = f"  score {attempt.score:.2f}" if attempt.HasField("score") else ""
        print(f"  {when}  {attempt.item_id}  {outcome}{score}  (predicted {attempt.predicted:.2f})")
    print("recommended:")
    _print_items(state.recommended)


class _Unreadable(Exception):
    """An input file the CLI cannot read; its message is what the user reads."""


def _read_images(paths: list[Path]) -> list[bytes]:
    """Every photo's bytes, read before any connection is made."""
    images = []
    for path in paths:
        try:
            images.append(path.read_bytes())
        except OSError as error:
            raise _Unreadable(f"cannot read {path}: {error.strerror or error}") from None
    return images


def _classify_many(args: argparse.Namespace, images: list[bytes]) -> int:
    """Several files over one ClassifyStream: an answer (or an error) per file; exit 1 if any failed."""
    from snaplearn_client.client import VisionClient

    with VisionClient(args.vision, timeout_s=args.timeout, security=_security(args)) as vision:
        outcomes = vision.classify_many(images, args.user, args.top_k, args.model, args.model_version)
    for path, outcome in zip(args.images, outcomes, strict=True):
        if args.json:
            response = json.loads(_to_json(outcome.response)) if outcome.response is not None else None
            print(json.dumps({"image": str(path), "code": outcome.code.name, "message": outcome.message,
                              "response": response}, ensure_ascii=False))  # fmt: skip
        elif outcome.response is not None:
            print(f"{path}:")
            _print_classified(outcome.response, indent="  ")
        else:
            print(f"{path}: error: {outcome.code.name}: {outcome.message}")
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    from snaplearn_client.client import VisionClient

    args = _parser().parse_args(argv)
    try:
        images = _read_images(args.images) if args.command == "classify" else []
    except _Unreadable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.command == "classify" and len(images) > 1:
            return _classify_many(args, images)
        if args.command == "classify":
            with VisionClient(args.vision, timeout_s=args.timeout, security=_security(args)) as vision:
                reply = vision.classify(images[0], args.user, args.top_k, args.model, args.model_version)
            if args.json:
                print(_to_json(reply))
                return 0
            _print_classified(reply)
        elif args.command == "recommend":
            with _recommender(args) as recommender:
                recommendation = recommender.recommend(
                    args.user,
                    args.k,
                    args.exclude_seen,
                    args.grade,
                    args.format,
                    args.concept,
                    features=args.feature,
                )
            if args.json:
                print(_to_json(recommendation))
                return 0
            cold = " (cold start)" if recommendation.cold_start else ""
            model = f"model {recommendation.model_version}, {recommendation.events_applied} events"
            print(f"for {recommendation.user_id}{cold}, {model}")
            _print_items(recommendation.items)
        elif args.command == "similar":
            with _recommender(args) as recommender:
                similar = recommender.similar_items(
                    args.item, args.k, args.grade, args.format, args.concept, features=args.feature
                )
            if args.json:
                print(_to_json(similar))
                return 0
            print(f"like {similar.item_id}, model {similar.model_version}")
            _print_items(similar.items)
        elif args.command == "feedback":
            with _recommender(args) as recommender:
                recorded = recommender.record_feedback(
                    args.user, args.item, args.kind, args.request_id, outcome=args.outcome, score=args.score
                )
            if args.json:
                print(_to_json(recorded))
                return 0
            state = "recorded" if recorded.accepted else "already recorded"
            attempt = f", {args.outcome}" if args.outcome else ""
            attempt += f", score {args.score:g}" if args.score is not None else ""
            print(f"{args.kind}{attempt} {args.item} for {args.user}: {state} (event {recorded.event_id})")
        elif args.command == "student-state":
            with _recommender(args) as recommender:
                student = recommender.student_state(args.user, args.k)
            if args.json:
                print(_to_json(student))
                return 0
            _print_student_state(student)
        elif args.command == "forget":
            with _recommender(args) as recommender:
                forgotten = recommender.forget_student(args.user, args.request_id)
            if args.json:
                print(_to_json(forgotten))
                return 0
            state = "forgotten" if forgotten.accepted else "already forgotten"
            print(f"{args.user}: {state} (tombstone event {forgotten.event_id})")
        else:
            from snaplearn_client.demo import run_demo

            try:
                return run_demo(
                    args.vision,
                    args.recommender,
                    args.photos,
                    args.photos_per_student,
                    args.label_map,
                    _security(args),
                )
            except (OSError, ValueError, TimeoutError) as error:  # photos, label map, a server too slow
                print(f"error: {error}", file=sys.stderr)
                return 2 if not isinstance(error, TimeoutError) else 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
