"""Deterministic synthetic "phone photos" of math-worksheet problems, one class per topic.

Everything is drawn with Pillow's bundled font (ImageFont.load_default) and its BASIC layout
engine, so a given seed renders the same pixels on every machine, with no system fonts. The
bundled font has no glyphs for the times, divide and minus signs, the radical or superscript
digits, so those are drawn as strokes.

A rendering has two parts: an ink mask of the problem (what the teacher printed or the student
wrote) and a photo of it (paper tint, lighting, position, rotation, ink colour, noise, blur,
JPEG), which is what the camera of a phone adds.

As a command it writes sample photos for demos and clients that have no renderer of their own:

    python -m snaplearn_vision.worksheets --out DIR --per-topic N [--seed S]

writes DIR/<topic>/<i>.png, i = 0..N-1, for every topic: sample_photo(topic, seed=S + i).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision.runtime.decoding import to_model_pixels

Rng = np.random.Generator

# Escaped: they look like x and - in an editor, which is exactly why the font lacks them.
TIMES, DIVIDE, MINUS = "\u00d7", "\u00f7", "\u2212"

# Canvas of a rendered photo when the caller does not choose one: small, because the model
# sees 64x64 anyway and rendering cost dominates dataset generation.
PHOTO_SIDE_RANGE = (112, 176)
SAMPLE_PHOTO_SIZE = (320, 240)
_SAMPLE_STREAM = 0x5A4D


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; the worksheet renderer needs it")
    # BASIC layout: raqm (if installed) could shape text differently on another machine.
    return font.font_variant(layout_engine=ImageFont.Layout.BASIC)


class _Pen:
    """Writes one line of math left to right onto an ink mask (255 = ink)."""

    def __init__(self, rng: Rng, size: int | None = None) -> None:
        self.rng = rng
        self.size = size if size is not None else int(rng.integers(20, 31))
        self.font = _font(self.size)
        self.bold = int(rng.random() < 0.3)
        self.line = max(1, round(self.size / 11)) + self.bold
        self.image = Image.new("L", (self.size * 24, self.size * 8), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.x = float(self.size)
        self.baseline = float(self.size * 4)
        # Height of the maths axis (where the bar of + sits) above the baseline.
        top, bottom = self.font.getbbox("+", anchor="ls")[1::2]
        self.axis = -(top + bottom) / 2

    def text(self, text: str, scale: float = 1.0, rise: float = 0.0) -> tuple[float, float]:
        """Writes text at the cursor; returns its (left, right) x."""
        font = self.font if scale == 1.0 else _font(max(8, round(self.size * scale)))
        left = self.x
        self.draw.text(
            (left, self.baseline - rise),
            text,
            fill=255,
            font=font,
            anchor="ls",
            stroke_width=self.bold,
            stroke_fill=255,
        )
        self.x += font.getlength(text) + self.bold
        return left, self.x

    def space(self, ems: float = 0.3) -> None:
        self.x += self.size * ems * float(self.rng.uniform(0.8, 1.3))

    def hline(self, x0: float, x1: float, y: float) -> None:
        self.draw.line([(x0, y), (x1, y)], fill=255, width=self.line)

    def operator(self, symbol: str) -> None:
        """+ and = come from the font; times, divide and minus are drawn (the font lacks them)."""
        self.space()
        if symbol in "+=?":
            self.text(symbol)
        else:
            half = self.size * 0.24
            cx, cy = self.x + half, self.baseline - self.axis
            if symbol == TIMES:
                d = half * 0.8
                self.draw.line([(cx - d, cy - d), (cx + d, cy + d)], fill=255, width=self.line)
                self.draw.line([(cx - d, cy + d), (cx + d, cy - d)], fill=255, width=self.line)
            elif symbol in (DIVIDE, MINUS):
                self.hline(cx - half, cx + half, cy)
                if symbol == DIVIDE:
                    r = max(1.5, self.line * 1.2)
                    for dy in (-half * 0.9, half * 0.9):
                        self.draw.ellipse([cx - r, cy + dy - r, cx + r, cy + dy + r], fill=255)
            else:
                raise ValueError(f"no drawing for operator {symbol!r}")
            self.x += 2 * half
        self.space()

    def blank(self) -> None:
        """What follows '=': nothing, a '?', a box or an answer line."""
        kind = self.rng.integers(0, 4)
        if kind == 1:
            self.space()
            self.text("?")
        elif kind == 2:
            self.space()
            s = self.size * 0.75
            self.draw.rectangle(
                [self.x, self.baseline - s, self.x + s, self.baseline], outline=255, width=self.line
            )
            self.x += s
        elif kind == 3:
            self.space()
            self.hline(self.x, self.x + self.size * 1.5, self.baseline + 2)
            self.x += self.size * 1.5

    def fraction(self, numerator: str, denominator: str) -> None:
        font = self.font
        width = max(font.getlength(numerator), font.getlength(denominator)) + self.size * 0.2
        bar_y = self.baseline - self.axis
        for text, y in ((numerator, bar_y - self.size * 0.18), (denominator, bar_y + self.size * 0.18)):
            anchor = "ms" if y < bar_y else "mt"
            self.draw.text(
                (self.x + width / 2, y),
                text,
                fill=255,
                font=font,
                anchor=anchor,
                stroke_width=self.bold,
                stroke_fill=255,
            )
        self.hline(self.x, self.x + width, bar_y)
        self.x += width

    def power(self, base: str, exponent: str) -> None:
        self.text(base)
        self.x += 1
        self.text(exponent, scale=0.6, rise=self.size * 0.45)

    def radical(self, radicand: str) -> None:
        """√ as a tick, a long stroke up, and a bar over the radicand."""
        s, y = self.size, self.baseline
        top = y - s * 0.85
        tick = [(self.x, y - s * 0.35), (self.x + s * 0.15, y - s * 0.42), (self.x + s * 0.32, y + 1)]
        self.draw.line([*tick, (self.x + s * 0.55, top)], fill=255, width=self.line, joint="curve")
        self.x += s * 0.6
        left, right = self.text(radicand)
        self.hline(self.x - (right - left) - s * 0.05, right + s * 0.08, top)

    def long_division(self, divisor: str, dividend: str) -> None:
        """Divisor, a ')' bracket, and a bar over the dividend: the school layout."""
        s, y = self.size, self.baseline
        self.text(divisor)
        self.x += s * 0.15
        top = y - s * 0.95
        self.draw.arc(
            [self.x - s * 0.3, top, self.x + s * 0.3, y + s * 0.25], -80, 80, fill=255, width=self.line
        )
        self.x += s * 0.3
        left, right = self.text(dividend)
        self.hline(left - s * 0.2, right + s * 0.15, top)

    def ink(self) -> Image.Image:
        box = self.image.getbbox()
        if box is None:
            raise RuntimeError("nothing was drawn")
        return self.image.crop(box)


def _stack_columns(rng: Rng, top: str, bottom: str, operator: str) -> Image.Image:
    """A column sum ("  47 / + 38 / ----"), laid out right-aligned like on a worksheet."""
    pen = _Pen(rng)
    width = pen.font.getlength(max(top, bottom, key=len)) + pen.size * 1.0
    right = pen.x + width
    for row, text in enumerate((top, bottom)):
        y = pen.baseline + row * pen.size * 1.15
        pen.draw.text(
            (right, y), text, fill=255, font=pen.font, anchor="rs", stroke_width=pen.bold, stroke_fill=255
        )
    pen.x, pen.baseline = right - width, pen.baseline + pen.size * 1.15
    pen.operator(operator)
    pen.hline(right - width - pen.size * 0.2, right + pen.size * 0.1, pen.baseline + pen.size * 0.3)
    return pen.ink()


def _n(rng: Rng, low: int, high: int) -> str:
    return str(int(rng.integers(low, high + 1)))


def _decimal(rng: Rng) -> str:
    places = int(rng.integers(1, 3))
    return f"{rng.integers(0, 100) + rng.integers(1, 10**places) / 10**places:.{places}f}"


def _arithmetic(operator: str, low: int, high: int) -> Callable[[Rng], Image.Image]:
    def draw(rng: Rng) -> Image.Image:
        a, b = _n(rng, low, high), _n(rng, max(2, low // 3), high)
        if rng.random() < 0.3:
            return _stack_columns(rng, a, b, operator)
        pen = _Pen(rng)
        pen.text(a)
        pen.operator(operator)
        pen.text(b)
        if rng.random() < 0.2 and operator in ("+", TIMES):
            pen.operator(operator)
            pen.text(_n(rng, 2, 20))
        pen.operator("=")
        pen.blank()
        return pen.ink()

    return draw


def _division(rng: Rng) -> Image.Image:
    divisor, quotient = int(rng.integers(2, 13)), int(rng.integers(2, 40))
    pen = _Pen(rng)
    if rng.random() < 0.45:
        pen.long_division(str(divisor), str(divisor * quotient))
    else:
        pen.text(str(divisor * quotient))
        pen.operator(DIVIDE)
        pen.text(str(divisor))
        pen.operator("=")
        pen.blank()
    return pen.ink()


def _fractions(rng: Rng) -> Image.Image:
    def fraction(pen: _Pen) -> None:
        den = int(rng.integers(2, 13))
        pen.fraction(str(int(rng.integers(1, den))), str(den))

    pen = _Pen(rng)
    if rng.random() < 0.2:
        pen.text(_n(rng, 1, 9))
        pen.space(0.15)
    fraction(pen)
    pen.operator(str(rng.choice(["+", MINUS, TIMES, DIVIDE, "="])))
    fraction(pen)
    pen.operator("=")
    pen.blank()
    return pen.ink()


def _decimals(rng: Rng) -> Image.Image:
    if rng.random() < 0.25:
        return _stack_columns(rng, _decimal(rng), _decimal(rng), str(rng.choice(["+", MINUS])))
    pen = _Pen(rng)
    pen.text(_decimal(rng))
    pen.operator(str(rng.choice(["+", MINUS, TIMES, DIVIDE])))
    pen.text(_decimal(rng))
    pen.operator("=")
    pen.blank()
    return pen.ink()


def _exponents(rng: Rng) -> Image.Image:
    pen = _Pen(rng)
    pen.power(_n(rng, 2, 12), _n(rng, 2, 5))
    if rng.random() < 0.5:
        pen.operator(str(rng.choice(["+", TIMES, MINUS])))
        pen.power(_n(rng, 2, 9), _n(rng, 2, 4))
    pen.operator("=")
    pen.blank()
    return pen.ink()


def _square_roots(rng: Rng) -> Image.Image:
    pen = _Pen(rng)
    if rng.random() < 0.2:
        pen.text(_n(rng, 2, 9))
    pen.radical(str(int(rng.integers(2, 20)) ** 2))
    if rng.random() < 0.3:
        pen.operator("+")
        pen.radical(str(int(rng.integers(2, 10)) ** 2))
    pen.operator("=")
    pen.blank()
    return pen.ink()


def _equations(rng: Rng) -> Image.Image:
    pen = _Pen(rng)
    variable = str(rng.choice(["x", "y", "n", "a", "m"]))
    if rng.random() < 0.25:
        pen.text("Solve:")
        pen.space(0.6)
    pen.text(_n(rng, 2, 9) + variable)
    pen.operator(str(rng.choice(["+", MINUS])))
    pen.text(_n(rng, 1, 20))
    pen.operator("=")
    pen.text(_n(rng, 10, 60))
    return pen.ink()


def _geometry(rng: Rng) -> Image.Image:
    """A labelled shape: the picture is the cue, the labels make it a worksheet."""
    size = int(rng.integers(16, 25))
    font = _font(size)
    image = Image.new("L", (size * 14, size * 12), 0)
    draw = ImageDraw.Draw(image)
    width = max(1, round(size / 9)) + int(rng.random() < 0.3)
    ox, oy = size * 2.5, size * 2.0
    w, h = float(rng.uniform(5, 9)) * size, float(rng.uniform(3.5, 7)) * size
    unit = str(rng.choice(["cm", "m", "in", ""]))

    def label(x: float, y: float, anchor: str) -> None:
        draw.text((x, y), f"{rng.integers(2, 20)} {unit}".strip(), fill=255, font=font, anchor=anchor)

    shape = rng.integers(0, 4)
    if shape == 0:  # rectangle
        draw.rectangle([ox, oy, ox + w, oy + h], outline=255, width=width)
        label(ox + w / 2, oy - size * 0.3, "ms")
        label(ox + w + size * 0.3, oy + h / 2, "lm")
    elif shape == 1:  # right triangle, with the right-angle mark
        pts = [(ox, oy), (ox, oy + h), (ox + w, oy + h)]
        draw.polygon(pts, outline=255, width=width)
        m = size * 0.6
        draw.line([(ox, oy + h - m), (ox + m, oy + h - m), (ox + m, oy + h)], fill=255, width=width)
        label(ox - size * 0.3, oy + h / 2, "rm")
        label(ox + w / 2, oy + h + size * 0.3, "mt")
    elif shape == 2:  # circle with a radius
        r = min(w, h) / 2
        cx, cy = ox + r + size, oy + r
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
        draw.line([(cx, cy), (cx + r, cy)], fill=255, width=width)
        draw.text(
            (cx + r / 2, cy - size * 0.2), f"r = {rng.integers(2, 15)}", fill=255, font=font, anchor="ms"
        )
    else:  # scalene triangle with an angle
        apex = ox + float(rng.uniform(0.2, 0.8)) * w
        draw.polygon([(ox, oy + h), (ox + w, oy + h), (apex, oy)], outline=255, width=width)
        label(ox + w / 2, oy + h + size * 0.3, "mt")
        draw.text(
            (ox + size * 1.2, oy + h - size * 0.2),
            f"{rng.integers(30, 80)}°",
            fill=255,
            font=font,
            anchor="ls",
        )
    if rng.random() < 0.4:
        question = str(rng.choice(["Area = ?", "Perimeter = ?", "Find x"]))
        draw.text((ox, oy + h + size * 2.0), question, fill=255, font=font, anchor="ls")
    box = image.getbbox()
    assert box is not None
    return image.crop(box)


_DRAWERS: dict[str, Callable[[Rng], Image.Image]] = {
    "addition": _arithmetic("+", 10, 999),
    "subtraction": _arithmetic(MINUS, 10, 999),
    "multiplication": _arithmetic(TIMES, 2, 99),
    "division": _division,
    "fractions": _fractions,
    "decimals": _decimals,
    "exponents": _exponents,
    "square_roots": _square_roots,
    "equations": _equations,
    "geometry": _geometry,
}
assert set(_DRAWERS) == set(DEFAULT_TOPICS), "every default topic needs a drawer"


def render_ink(topic: str, rng: Rng) -> Image.Image:
    """The problem itself as a tight "L" mask (255 = ink), before any photo effects."""
    try:
        drawer = _DRAWERS[topic]
    except KeyError:
        raise ValueError(f"unknown topic {topic!r}; known topics: {', '.join(DEFAULT_TOPICS)}") from None
    return drawer(rng)


def _paper(rng: Rng, width: int, height: int) -> np.ndarray:
    """Tinted paper under uneven light, sometimes ruled or squared: float32 HxWx3 in 0..255."""
    tint = (np.array([245, 243, 236]) + rng.uniform(-22, 10, size=3)) * rng.uniform(0.7, 1.0)
    xx = np.arange(width, dtype=np.float32)[None, :] / width
    yy = np.arange(height, dtype=np.float32)[:, None] / height
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + np.float32(rng.uniform(0.0, 0.25)) * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
    paper = light[:, :, None] * tint.astype(np.float32)
    ruling = rng.integers(0, 3)  # 0 plain, 1 ruled, 2 squared
    if ruling:
        step = int(rng.integers(14, 26))
        line_colour = (np.array([150, 180, 220]) + rng.uniform(-20, 20, size=3)).astype(np.float32)
        rows = (np.arange(height) + int(rng.integers(0, step))) % step == 0
        paper[rows] = paper[rows] * 0.6 + line_colour * 0.4
        if ruling == 2:
            columns = np.arange(width) % step == 0
            paper[:, columns] = paper[:, columns] * 0.6 + line_colour * 0.4
    return paper


def _photograph(ink: Image.Image, rng: Rng, size: tuple[int, int]) -> Image.Image:
    """Places the ink on paper the way a hand-held phone would capture it."""
    width, height = size
    angle = float(rng.uniform(-7, 7))
    fill = rng.uniform(0.7, 0.95)  # a photo of one problem is framed around it
    # Scale first (the rotated bounding box is a little larger), then rotate the small image.
    scale = min(width * fill / ink.width, height * fill / ink.height) * 0.95
    ink = ink.resize(
        (max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.Resampling.BILINEAR
    )
    ink = ink.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    ink = ink.crop((0, 0, min(ink.width, width), min(ink.height, height)))
    mask = Image.new("L", size, 0)
    mask.paste(
        ink, (int(rng.integers(0, width - ink.width + 1)), int(rng.integers(0, height - ink.height + 1)))
    )
    blur = rng.uniform(0, 1.1)
    if blur > 0.3:
        # Defocus blurs the ink edges; blurring the one-channel mask is a third of the work of
        # blurring the photo, and plain paper looks the same either way.
        mask = mask.filter(ImageFilter.GaussianBlur(blur))

    # Pencil, black or blue ballpoint, printed toner: dark, a little see-through.
    inks = np.array([[30, 30, 35], [25, 35, 110], [80, 80, 85], [40, 40, 40]], dtype=np.float32)
    ink_colour = inks[rng.integers(0, len(inks))] + rng.uniform(-15, 15, size=3).astype(np.float32)
    alpha = np.asarray(mask, dtype=np.float32)[:, :, None] * np.float32(rng.uniform(0.75, 1.0) / 255)
    photo = _paper(rng, width, height)
    photo += alpha * (ink_colour - photo)
    # Sensor noise, mostly luminance (one draw per pixel: the model sees greyscale anyway).
    photo += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(0, 7))
    image = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8), "RGB")
    return _jpeg_round_trip(image, int(rng.integers(35, 92)))


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def render_topic(topic: str, rng: Rng, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB "phone photo" of one problem of the topic; size (w, h) is random when None."""
    ink = render_ink(topic, rng)
    if size is None:
        side = int(rng.integers(*PHOTO_SIDE_RANGE))
        size = (side, int(side * rng.uniform(0.75, 1.0)))
    return _photograph(ink, rng, size)


def sample_photo(topic: str, seed: int = 0, size: tuple[int, int] = SAMPLE_PHOTO_SIZE) -> Image.Image:
    """An RGB "photo" of the topic, as a client would take it; same seed -> same pixels."""
    if topic not in DEFAULT_TOPICS:
        raise ValueError(f"unknown topic {topic!r}; known topics: {', '.join(DEFAULT_TOPICS)}")
    # A stream of its own (the leading tag), so samples are never copies of training images.
    rng = np.random.default_rng([_SAMPLE_STREAM, seed, DEFAULT_TOPICS.index(topic)])
    return render_topic(topic, rng, size)


def sample_image_bytes(topic: str, seed: int = 0, size: tuple[int, int] = SAMPLE_PHOTO_SIZE) -> bytes:
    """sample_photo as the JPEG a client would upload; same seed -> same bytes."""
    image = sample_photo(topic, seed, size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_dataset(
    n_per_class: int,
    seed: int,
    size: tuple[int, int] = (64, 64),
    channels: int = 1,
    topics: tuple[str, ...] = DEFAULT_TOPICS,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rendered photos as model pixels: uint8 [N, H, W, C] and int64 labels (index into topics).

    size is (h, w) like a model's input_size. Pixels go through the serving decoder's own
    resize, so the model trains on exactly what it will see. Every image has its own seed
    derived from (seed, class, index): a sample does not change when n_per_class does.
    """
    images = np.empty((n_per_class * len(topics), size[0], size[1], channels), dtype=np.uint8)
    labels = np.empty(n_per_class * len(topics), dtype=np.int64)
    with tqdm(
        total=len(labels), desc="rendering", unit="photo", disable=not progress, file=sys.stderr
    ) as bar:
        for label, topic in enumerate(topics):
            for index in range(n_per_class):
                rng = np.random.default_rng([seed, label, index])
                row = label * n_per_class + index
                images[row] = to_model_pixels(render_topic(topic, rng), channels, size)
                labels[row] = label
                bar.update()
    return images, labels


def write_samples(out: Path, per_topic: int, seed: int = 0) -> list[Path]:
    """out/<topic>/<i>.png for every topic, i = 0..per_topic-1 (sample_photo with seed + i)."""
    if per_topic < 0:
        raise ValueError(f"per_topic must be >= 0, got {per_topic}")
    written = []
    for topic in DEFAULT_TOPICS:
        folder = out / topic
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_topic):
            path = folder / f"{index}.png"
            sample_photo(topic, seed + index).save(path, format="PNG")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snaplearn_vision.worksheets",
        description="Write sample worksheet photos: OUT/<topic>/<i>.png for every topic.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (created)")
    parser.add_argument("--per-topic", type=int, required=True, help="photos per topic")
    parser.add_argument("--seed", type=int, default=0, help="photo i of a topic is drawn with seed + i")
    args = parser.parse_args(argv)
    if args.per_topic < 0:
        parser.error(f"--per-topic must be >= 0, got {args.per_topic}")
    written = write_samples(args.out, args.per_topic, args.seed)
    print(f"{len(written)} photos ({args.per_topic} per topic) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
