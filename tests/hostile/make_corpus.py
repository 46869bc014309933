"""Writes the hostile-input corpus (tests/corpus/): image files, raw request messages, the manifest.

Run once and commit the output; the corpus test reads the committed files, so a change in Pillow or
protobuf cannot silently change what is sent. Every file is made here from a seed, nothing is
downloaded. Rerun with:

    .venv/bin/python -m tests.hostile.make_corpus

Each manifest case names what it sends and the gRPC status it must get (never INTERNAL or UNKNOWN).
Request cases are stored as serialized bytes (hand-built where protobuf would refuse to build
them: non-UTF-8 strings, negative varints for unsigned fields, garbage), so the test sends them
as they are through a raw channel.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from snaplearn.recommender.v1 import recommender_pb2
from snaplearn.vision.v1 import vision_pb2
from snaplearn_oip import grpc_service_pb2 as oip
from snaplearn_vision.worksheets import sample_image_bytes

CORPUS = Path(__file__).resolve().parent.parent / "corpus"

CLASSIFY = "/snaplearn.vision.v1.VisionService/Classify"
STREAM = "/snaplearn.vision.v1.VisionService/ClassifyStream"
INFER = "/inference.GRPCInferenceService/ModelInfer"
RECOMMEND = "/snaplearn.recommender.v1.RecommenderService/Recommend"
SIMILAR = "/snaplearn.recommender.v1.RecommenderService/SimilarItems"
FEEDBACK = "/snaplearn.recommender.v1.RecommenderService/RecordFeedback"

MODEL = "worksheet-topics"
ITEM = "addition-001"  # the sample catalog's first item (generate_sample_catalog)
OK, INVALID, NOT_FOUND = "OK", "INVALID_ARGUMENT", "NOT_FOUND"


# -- raw protobuf wire format, for messages protobuf itself would not build ------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers as protobuf writes them: ten bytes, two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_bytes(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


# -- images ------------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, bit_depth: int = 1, idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height greyscale pixels, with whatever IDAT is given."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header's (SOF0) dimensions replaced."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def jpeg_with_exif_orientation(base: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(base, "JPEG", quality=80, exif=exif.tobytes())


def jpeg_with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """The JPEG with an APP1 (EXIF) segment holding payload inserted after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def images() -> list[tuple[str, bytes, str, str]]:
    """(name, bytes, expected status, why) per image case."""
    rng = random.Random(21)
    photo = Image.open(io.BytesIO(sample_image_bytes("fractions", seed=0))).convert("RGB").resize((96, 72))
    jpeg = encoded(photo, "JPEG", quality=80)
    png = encoded(photo, "PNG")
    tiff_lzw = encoded(photo, "TIFF", compression="tiff_lzw")
    gif_frames = [
        photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).rotate(a) for a in (0, 90, 180)
    ]
    gif = encoded(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=50, loop=0)
    grey16 = Image.new("I;16", (40, 30))
    grey16.putdata([(x * 1500) % 65536 for x in range(40 * 30)])
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    bomb_rows = b"".join(b"\x00" + b"\x00" * (8000 // 8) for _ in range(8000))
    text_bomb = (
        png[:33] + png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * 8_000_000, 9)) + png[33:]
    )
    return [
        ("valid_jpeg", jpeg, OK, "control: a small photo of a worksheet"),
        ("valid_png", png, OK, "control"),
        ("valid_webp", encoded(photo, "WEBP", quality=70), OK, "WebP is an accepted format"),
        ("valid_bmp", encoded(photo.resize((24, 18)), "BMP"), OK, "BMP is an accepted format"),
        ("animated_gif", gif, OK, "animated GIF: the first frame is classified"),
        (
            "cmyk_tiff",
            encoded(photo.resize((48, 36)).convert("CMYK"), "TIFF"),
            OK,
            "CMYK TIFF is converted to RGB",
        ),
        ("lzw_tiff", tiff_lzw, OK, "compressed TIFF"),
        ("grey16_tiff", encoded(grey16, "TIFF"), OK, "16-bit greyscale TIFF is rescaled to 8 bits"),
        ("grey16_png", encoded(grey16, "PNG"), OK, "16-bit greyscale PNG"),
        ("rgba_png", encoded(rgba, "PNG"), OK, "half-transparent PNG goes on white paper"),
        (
            "palette_transparent_gif",
            encoded(gif_frames[0], "GIF", transparency=0),
            OK,
            "palette + transparency",
        ),
        ("one_pixel_png", encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), OK, "1x1 image"),
        ("thin_strip_png", encoded(Image.new("L", (4000, 1), 90), "PNG"), OK, "4000x1: extreme aspect ratio"),
        (
            "exif_orientation_0",
            jpeg_with_exif_orientation(photo, 0),
            OK,
            "EXIF orientation 0 (invalid) ignored",
        ),
        ("exif_orientation_8", jpeg_with_exif_orientation(photo, 8), OK, "EXIF rotate 90"),
        ("exif_orientation_9", jpeg_with_exif_orientation(photo, 9), OK, "EXIF orientation past the range"),
        ("exif_orientation_65535", jpeg_with_exif_orientation(photo, 65535), OK, "EXIF orientation 0xFFFF"),
        (
            "exif_garbage",
            jpeg_with_app1(jpeg, b"Exif\x00\x00" + bytes(rng.randrange(256) for _ in range(64))),
            OK,
            "an EXIF block of random bytes: the photo is still a photo",
        ),
        (
            "exif_truncated_ifd",
            jpeg_with_app1(jpeg, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\x00"),
            OK,
            "an EXIF IFD claiming 255 entries it does not hold",
        ),
        (
            "polyglot_jpeg_zip",
            jpeg + b"PK\x03\x04" + bytes(40) + b"<script>alert(1)</script>",
            OK,
            "JPEG followed by a ZIP header and HTML: decoded as the JPEG",
        ),
        ("png_trailing_garbage", png + bytes(rng.randrange(256) for _ in range(300)), OK, "data after IEND"),
        ("empty", b"", INVALID, "zero bytes"),
        ("one_byte", b"\xff", INVALID, "one byte"),
        ("random_bytes", bytes(rng.randrange(256) for _ in range(2048)), INVALID, "seeded random bytes"),
        ("text", b"hello, this is not a photo\n", INVALID, "plain text"),
        (
            "svg",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            INVALID,
            "SVG: not accepted",
        ),
        ("pdf_header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", INVALID, "PDF"),
        (
            "ico_not_accepted",
            encoded(photo.resize((32, 32)), "ICO"),
            INVALID,
            "ICO decodes but is not accepted",
        ),
        ("wrong_magic_png_as_jpeg", b"\xff\xd8\xff\xe0" + png[4:], INVALID, "PNG body behind a JPEG magic"),
        ("wrong_magic_jpeg_as_png", b"\x89PNG\r\n\x1a\n" + jpeg[8:], INVALID, "JPEG body behind a PNG magic"),
        ("png_signature_only", png[:8], INVALID, "PNG signature, nothing after"),
        ("truncated_png", png[: len(png) // 2], INVALID, "PNG cut in half"),
        ("truncated_jpeg_header", jpeg[:100], INVALID, "JPEG cut inside its headers"),
        ("truncated_jpeg_scan", jpeg[: len(jpeg) - 200], INVALID, "JPEG cut inside its entropy-coded scan"),
        ("truncated_tiff", tiff_lzw[: len(tiff_lzw) // 2], INVALID, "TIFF cut in half"),
        ("truncated_gif", gif[:800], INVALID, "GIF cut inside its first frame"),
        (
            "gif_cut_after_first_frame",
            gif[: len(gif) // 3],
            OK,
            "later frames cut: the whole first frame is served",
        ),
        ("png_zero_size", png_claiming(0, 0), INVALID, "IHDR claiming 0x0"),
        ("jpeg_zero_size", jpeg_with_size(jpeg, 0, 0), INVALID, "SOF0 claiming 0x0"),
        (
            "png_bomb_over_our_limit",
            png_claiming(8000, 8000, 1, zlib.compress(bomb_rows, 9)),
            INVALID,
            "a real 64-megapixel 1-bit PNG in a few KB: over our limit, under Pillow's",
        ),
        ("png_bomb_header_4g", png_claiming(65535, 65535), INVALID, "IHDR claiming 4 gigapixels"),
        ("jpeg_huge_dimensions", jpeg_with_size(jpeg, 65500, 65500), INVALID, "SOF0 claiming 65500x65500"),
        ("png_text_bomb", text_bomb, INVALID, "a zTXt chunk inflating to megabytes"),
        ("png_bad_crc", png[:29] + b"\x00\x00\x00\x00" + png[33:], INVALID, "IHDR with a wrong CRC"),
    ]


# -- requests ----------------------------------------------------------------------------------------


def classify(**fields: Any) -> bytes:
    return vision_pb2.ClassifyRequest(**fields).SerializeToString()


def infer(
    photo: bytes,
    *,
    shape: tuple[int, ...] = (1, 1),
    datatype: str = "BYTES",
    name: str = "IMAGE",
    model: str = MODEL,
    version: str = "",
    contents: list[bytes] | None = None,
    raw: list[bytes] | None = None,
    outputs: list[Any] | None = None,
    parameters: dict[str, Any] | None = None,
) -> bytes:
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.extend(raw)
    else:
        tensor.contents.bytes_contents.extend([photo] if contents is None else contents)
    for output in outputs or []:
        request.outputs.append(output)
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(value)
    return request.SerializeToString()


def output(name: str = "PROBABILITIES", **parameter: Any) -> Any:
    tensor = oip.ModelInferRequest.InferRequestedOutputTensor(name=name)
    for key, value in parameter.items():
        tensor.parameters["classification"].CopyFrom(oip.InferParameter(**{key: value}))
    return tensor


def feedback(seconds: int | None = None, nanos: int = 0, **fields: Any) -> bytes:
    values: dict[str, Any] = {"user_id": "student-1", "item_id": ITEM, "kind": 2, **fields}
    message = recommender_pb2.RecordFeedbackRequest(**values)
    if seconds is not None:
        # Timestamp fields set on the wire: the Python API refuses out-of-range values.
        raw = field_varint(1, seconds) + (field_varint(2, nanos) if nanos else b"")
        return message.SerializeToString() + field_bytes(5, raw)
    return message.SerializeToString()


def requests(photo: bytes) -> list[tuple[str, str, bytes, str, str]]:
    """(name, method, serialized request, expected status, why) per unary request case."""
    long_id = "u" * 10_000
    bad_utf8 = b"stu\xff\xfedent"
    length_prefixed = struct.pack("<I", len(photo)) + photo
    rec = recommender_pb2.RecommendRequest
    sim = recommender_pb2.SimilarItemsRequest
    filters = recommender_pb2.RecommendFilters
    return [
        # Classify
        ("classify_ok", CLASSIFY, classify(user_id="student-1", image=photo), OK, "control"),
        ("classify_not_a_message", CLASSIFY, b"\xff\xff\xff\xff\x0f", INVALID, "bytes that do not parse"),
        ("classify_empty_user", CLASSIFY, classify(image=photo), INVALID, "user_id missing"),
        ("classify_blank_user", CLASSIFY, classify(user_id="   ", image=photo), INVALID, "user_id blank"),
        ("classify_10kb_user", CLASSIFY, classify(user_id=long_id, image=photo), INVALID, "10 KB user id"),
        (
            "classify_non_utf8_user",
            CLASSIFY,
            field_bytes(1, bad_utf8) + field_bytes(2, photo),
            INVALID,
            "user id bytes that are not UTF-8",
        ),
        (
            "classify_nul_user",
            CLASSIFY,
            classify(user_id="stu\x00dent", image=photo),
            OK,
            "NUL inside the user id: ids are opaque UTF-8, the same rule on both servers",
        ),
        ("classify_no_image", CLASSIFY, classify(user_id="student-1"), INVALID, "image missing"),
        (
            "classify_negative_top_k",
            CLASSIFY,
            classify(user_id="student-1", image=photo) + field_varint(3, -1),
            INVALID,
            "top_k = -1 on the wire (uint32: read as 4294967295)",
        ),
        (
            "classify_huge_top_k",
            CLASSIFY,
            classify(user_id="student-1", image=photo, top_k=1000),
            INVALID,
            "top_k beyond the model's labels",
        ),
        (
            "classify_unknown_model",
            CLASSIFY,
            classify(user_id="s", image=photo, model_name="no-such-model"),
            NOT_FOUND,
            "unknown model name",
        ),
        (
            "classify_unknown_version",
            CLASSIFY,
            classify(user_id="s", image=photo, model_name=MODEL, model_version="999"),
            NOT_FOUND,
            "unknown model version",
        ),
        (
            "classify_path_model_name",
            CLASSIFY,
            classify(user_id="s", image=photo, model_name="../../etc/passwd"),
            INVALID,
            "a model name that is a path",
        ),
        (
            "classify_10kb_request_id",
            CLASSIFY,
            classify(user_id="s", image=photo, request_id="r" * 10_000),
            INVALID,
            "10 KB request id",
        ),
        (
            "classify_unknown_fields",
            CLASSIFY,
            classify(user_id="s", image=photo) + field_varint(99, 7) + field_bytes(100, b"x"),
            OK,
            "unknown fields are ignored, as protobuf promises",
        ),
        # OIP ModelInfer
        ("infer_ok", INFER, infer(photo), OK, "control"),
        ("infer_ok_raw", INFER, infer(photo, raw=[length_prefixed]), OK, "control: raw_input_contents"),
        ("infer_not_a_message", INFER, b"\x0a\xff\xff\xff\xff\x0f", INVALID, "bytes that do not parse"),
        ("infer_no_model_name", INFER, infer(photo, model=""), INVALID, "model_name empty"),
        ("infer_unknown_model", INFER, infer(photo, model="no-such-model"), NOT_FOUND, "unknown model"),
        ("infer_unknown_version", INFER, infer(photo, version="999"), NOT_FOUND, "unknown version"),
        (
            "infer_no_inputs",
            INFER,
            oip.ModelInferRequest(model_name=MODEL).SerializeToString(),
            INVALID,
            "no input tensor",
        ),
        ("infer_wrong_datatype", INFER, infer(photo, datatype="FP32"), INVALID, "FP32 instead of BYTES"),
        ("infer_wrong_input_name", INFER, infer(photo, name="INPUT0"), INVALID, "unknown input name"),
        ("infer_shape_3d", INFER, infer(photo, shape=(1, 1, 1)), INVALID, "rank 3"),
        ("infer_shape_negative", INFER, infer(photo, shape=(-1, 1)), INVALID, "batch -1"),
        ("infer_shape_zero", INFER, infer(photo, shape=(0, 1)), INVALID, "batch 0"),
        ("infer_shape_huge", INFER, infer(photo, shape=(2**62, 1)), INVALID, "batch 2^62"),
        ("infer_shape_mismatch", INFER, infer(photo, shape=(2, 1)), INVALID, "shape says 2, one element"),
        (
            "infer_raw_truncated_prefix",
            INFER,
            infer(photo, raw=[b"\x10\x00"]),
            INVALID,
            "raw BYTES tensor with a cut length prefix",
        ),
        (
            "infer_raw_length_past_end",
            INFER,
            infer(photo, raw=[struct.pack("<I", 2**31) + photo]),
            INVALID,
            "raw BYTES element claiming 2 GB",
        ),
        (
            "infer_raw_extra_bytes",
            INFER,
            infer(photo, raw=[length_prefixed + b"\x00" * 7]),
            INVALID,
            "raw BYTES tensor with bytes past its last element",
        ),
        (
            "infer_raw_two_entries",
            INFER,
            infer(photo, raw=[length_prefixed, length_prefixed]),
            INVALID,
            "two raw entries for one input",
        ),
        ("infer_unknown_output", INFER, infer(photo, outputs=[output("LOGITS")]), INVALID, "unknown output"),
        (
            "infer_classification_zero",
            INFER,
            infer(photo, outputs=[output(int64_param=0)]),
            INVALID,
            "classification 0",
        ),
        (
            "infer_classification_negative",
            INFER,
            infer(photo, outputs=[output(int64_param=-5)]),
            INVALID,
            "classification -5",
        ),
        (
            "infer_classification_huge",
            INFER,
            infer(photo, outputs=[output(uint64_param=2**64 - 1)]),
            OK,
            "classification 2^64-1: every label, as Triton answers a k past the class count",
        ),
        (
            "infer_classification_string",
            INFER,
            infer(photo, outputs=[output(string_param="3")]),
            INVALID,
            "classification given as a string",
        ),
        (
            "infer_user_not_string",
            INFER,
            infer(photo, parameters={"user_id": oip.InferParameter(int64_param=7)}),
            INVALID,
            "user_id an int",
        ),
        (
            "infer_user_10kb",
            INFER,
            infer(photo, parameters={"user_id": oip.InferParameter(string_param=long_id)}),
            INVALID,
            "10 KB user id as a parameter",
        ),
        ("infer_bad_image", INFER, infer(b"not an image"), INVALID, "an element that is no image"),
        # Recommend
        ("recommend_ok", RECOMMEND, rec(user_id="student-1", k=5).SerializeToString(), OK, "control"),
        ("recommend_not_a_message", RECOMMEND, b"\x12\xff\xff", INVALID, "bytes that do not parse"),
        ("recommend_empty_user", RECOMMEND, rec(k=5).SerializeToString(), INVALID, "user_id missing"),
        (
            "recommend_10kb_user",
            RECOMMEND,
            rec(user_id=long_id).SerializeToString(),
            INVALID,
            "10 KB user id",
        ),
        ("recommend_non_utf8_user", RECOMMEND, field_bytes(1, bad_utf8), INVALID, "user id not UTF-8"),
        (
            "recommend_nul_user",
            RECOMMEND,
            rec(user_id="a\x00b").SerializeToString(),
            OK,
            "NUL in user id: opaque",
        ),
        (
            "recommend_k_zero",
            RECOMMEND,
            rec(user_id="student-1", k=0).SerializeToString(),
            OK,
            "k = 0 means the default",
        ),
        (
            "recommend_k_negative",
            RECOMMEND,
            field_bytes(1, b"student-1") + field_varint(2, -1),
            INVALID,
            "k = -1 on the wire (uint32: read as 4294967295)",
        ),
        (
            "recommend_k_huge",
            RECOMMEND,
            rec(user_id="student-1", k=100_000).SerializeToString(),
            INVALID,
            "k = 100000",
        ),
        (
            "recommend_unknown_filter_values",
            RECOMMEND,
            rec(
                user_id="s", filters=filters(formats=["hologram"], concepts=["alchemy"], grades=[2**32 - 1])
            ).SerializeToString(),
            INVALID,
            "filter values the catalog does not have are named back",
        ),
        (
            "recommend_unknown_feature_filter",
            RECOMMEND,
            rec(
                user_id="s",
                filters=filters(
                    features=[recommender_pb2.FeatureFilter(name="no-such-feature", values=["x"])]
                ),
            ).SerializeToString(),
            INVALID,
            "a feature the catalog does not declare",
        ),
        (
            "recommend_nan_feature_range",
            RECOMMEND,
            rec(
                user_id="s",
                filters=filters(
                    features=[recommender_pb2.FeatureFilter(name="difficulty", min=float("nan"))]
                ),
            ).SerializeToString(),
            INVALID,
            "NaN as a range bound",
        ),
        # SimilarItems
        ("similar_ok", SIMILAR, sim(item_id=ITEM, k=3).SerializeToString(), OK, "control"),
        ("similar_empty_item", SIMILAR, sim().SerializeToString(), INVALID, "item_id missing"),
        (
            "similar_unknown_item",
            SIMILAR,
            sim(item_id="no-such-item").SerializeToString(),
            NOT_FOUND,
            "unknown item",
        ),
        (
            "similar_10kb_item",
            SIMILAR,
            sim(item_id="i" * 10_000).SerializeToString(),
            INVALID,
            "10 KB item id",
        ),
        ("similar_non_utf8_item", SIMILAR, field_bytes(1, bad_utf8), INVALID, "item id not UTF-8"),
        (
            "similar_k_huge",
            SIMILAR,
            sim(item_id=ITEM, k=2**32 - 1).SerializeToString(),
            INVALID,
            "k = 2^32-1",
        ),
        # RecordFeedback
        ("feedback_ok", FEEDBACK, feedback(), OK, "control (time unset: the server's clock)"),
        ("feedback_not_a_message", FEEDBACK, b"\x2a\x05\x08", INVALID, "bytes that do not parse"),
        ("feedback_empty_user", FEEDBACK, feedback(user_id=""), INVALID, "user_id missing"),
        ("feedback_10kb_user", FEEDBACK, feedback(user_id=long_id), INVALID, "10 KB user id"),
        (
            "feedback_non_utf8_user",
            FEEDBACK,
            field_bytes(1, bad_utf8) + field_bytes(2, ITEM.encode()) + field_varint(3, 2),
            INVALID,
            "user id not UTF-8",
        ),
        ("feedback_unknown_item", FEEDBACK, feedback(item_id="no-such-item"), NOT_FOUND, "unknown item"),
        ("feedback_kind_unspecified", FEEDBACK, feedback(kind=0), INVALID, "kind unset"),
        (
            "feedback_kind_unknown_enum",
            FEEDBACK,
            feedback(kind=0) + field_varint(3, 99),
            INVALID,
            "kind 99, an enum value the proto does not declare",
        ),
        (
            "feedback_nanos_negative",
            FEEDBACK,
            feedback(seconds=1_700_000_000, nanos=-1),
            INVALID,
            "Timestamp nanos -1",
        ),
        ("feedback_seconds_2_62", FEEDBACK, feedback(seconds=2**62), INVALID, "Timestamp seconds 2^62"),
        ("feedback_seconds_minus_2_62", FEEDBACK, feedback(seconds=-(2**62)), INVALID, "seconds -2^62"),
        ("feedback_year_1900", FEEDBACK, feedback(seconds=-2_208_988_800), INVALID, "before 1970"),
        ("feedback_epoch", FEEDBACK, feedback(seconds=0, nanos=1), OK, "1970-01-01 is in the past"),
        ("feedback_far_future", FEEDBACK, feedback(seconds=253_402_300_799), INVALID, "year 9999"),
        (
            "feedback_10kb_request_id",
            FEEDBACK,
            feedback(request_id="r" * 10_000),
            INVALID,
            "10 KB request id",
        ),
    ]


def stream_item(item_id: int, photo: bytes, timeout_ms: float = 5000.0, **fields: Any) -> Any:
    return vision_pb2.ClassifyStreamItem(
        id=item_id,
        timeout_ms=timeout_ms,
        request=vision_pb2.ClassifyRequest(user_id=fields.pop("user_id", "student-1"), image=photo, **fields),
    )


def streams(photo: bytes) -> list[tuple[str, list[bytes], dict[str, str], str, str]]:
    """(name, messages, expected status per item id, expected end of stream, why) per stream case."""
    message = vision_pb2.ClassifyStreamRequest
    return [
        ("stream_ok", [message(items=[stream_item(1, photo)]).SerializeToString()], {"1": OK}, OK, "control"),
        ("stream_empty", [], {}, OK, "half-closed at once"),
        ("stream_empty_message", [message().SerializeToString()], {}, OK, "one message with nothing in it"),
        (
            "stream_item_and_cancel_same_message",
            [message(items=[stream_item(1, photo)], cancel_ids=[1]).SerializeToString()],
            {"1": "CANCELLED"},
            OK,
            "an item and its id in cancel_ids in one message is answered",
        ),
        (
            "stream_cancel_unknown_id",
            [message(cancel_ids=[424242]).SerializeToString()],
            {},
            OK,
            "cancelling an id never sent is ignored",
        ),
        (
            "stream_duplicate_ids",
            [message(items=[stream_item(7, photo), stream_item(7, photo)]).SerializeToString()],
            {"7": OK + "," + INVALID},
            OK,
            "a second item with a live id is refused, the first answered",
        ),
        (
            "stream_item_errors",
            [
                message(
                    items=[
                        stream_item(1, b"junk"),
                        stream_item(2, photo, user_id=""),
                        stream_item(3, photo, model_name="no-such-model"),
                    ]
                ).SerializeToString()
            ],
            {"1": INVALID, "2": INVALID, "3": NOT_FOUND},
            OK,
            "per-item statuses; the stream goes on",
        ),
        (
            "stream_timeout_negative",
            [message(items=[stream_item(1, photo, timeout_ms=-5.0)]).SerializeToString()],
            {"1": INVALID},
            OK,
            "negative time left",
        ),
        (
            "stream_timeout_nan",
            [message(items=[stream_item(1, photo, timeout_ms=float("nan"))]).SerializeToString()],
            {"1": INVALID},
            OK,
            "NaN time left",
        ),
        (
            "stream_timeout_inf",
            [message(items=[stream_item(1, photo, timeout_ms=float("inf"))]).SerializeToString()],
            {"1": INVALID},
            OK,
            "infinite time left",
        ),
        ("stream_garbage_message", [b"\x0a\xff\xff\xff\xff\x0f"], {}, INVALID, "bytes that do not parse"),
    ]


def main() -> None:
    shutil.rmtree(CORPUS, ignore_errors=True)
    (CORPUS / "images").mkdir(parents=True)
    (CORPUS / "requests").mkdir()
    # Requests carry a small JPEG: what they test is the message, not the photo.
    small = Image.open(io.BytesIO(sample_image_bytes("fractions", seed=0))).convert("RGB").resize((64, 48))
    photo = encoded(small, "JPEG", quality=70)
    cases: list[dict[str, Any]] = []
    for name, data, expect, why in images():
        (CORPUS / "images" / f"{name}.bin").write_bytes(data)
        cases.append(
            {"name": name, "kind": "image", "file": f"images/{name}.bin", "expect": expect, "why": why}
        )
    (CORPUS / "requests" / "photo.bin").write_bytes(photo)
    for name, method, data, expect, why in requests(photo):
        (CORPUS / "requests" / f"{name}.bin").write_bytes(data)
        cases.append(
            {
                "name": name,
                "kind": "unary",
                "method": method,
                "file": f"requests/{name}.bin",
                "expect": expect,
                "why": why,
            }
        )
    for name, messages, items, end, why in streams(photo):
        files = []
        for index, data in enumerate(messages):
            (CORPUS / "requests" / f"{name}.{index}.bin").write_bytes(data)
            files.append(f"requests/{name}.{index}.bin")
        cases.append(
            {
                "name": name,
                "kind": "stream",
                "method": STREAM,
                "files": files,
                "expect_items": items,
                "expect": end,
                "why": why,
            }
        )
    # Built by the test (too big to commit): one byte over the image limit, and a message over gRPC's.
    cases.append(
        {
            "name": "oversized_image",
            "kind": "oversized_image",
            "expect": INVALID,
            "why": "an image one byte over --max-image-bytes",
        }
    )
    cases.append(
        {
            "name": "oversized_message",
            "kind": "oversized_message",
            "expect": "RESOURCE_EXHAUSTED",
            "why": "a Classify message past the server's receive limit",
        }
    )
    (CORPUS / "manifest.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases, {sum(f.stat().st_size for f in CORPUS.rglob('*') if f.is_file())} bytes")


if __name__ == "__main__":
    main()
