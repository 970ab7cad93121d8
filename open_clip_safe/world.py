"""A generated image-caption world for the demo and the tests.

Twenty object classes, each a distinct glyph, drawn with random colour, size, position, rotation and
background; captions from many templates name the class and some of the attributes. Every sample is
drawn from its own RNG seeded by (seed, split, index), so the world is the same for a seed however it
is streamed, and it is written to disk shard by shard (nothing is held in memory).

Two styles: `glyphs` (the demo's: twenty outline shapes on plain backgrounds) and `tiles` (a world
of its own to check that settings tuned on glyphs transfer: twenty other class words, each a pattern
of cells on a 3 x 3 grid, on gradient backgrounds).

    python -m open_clip_safe.world --out DIR [--num-train 8000] [--num-test 1000] [--seed 0] [--style tiles]
"""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from open_clip_safe import cli
from open_clip_safe.cli import Parser, UsageError, check_out_dir, guarded
from open_clip_safe.files import png_bytes

CLASSES = (
    "banana", "umbrella", "mushroom", "candle", "pizza", "balloon", "pillow", "necklace", "desk",
    "palace", "television", "baseball", "mountain", "beach", "plate", "orange", "suit", "chair",
    "lamp", "kite",
)
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
    "purple": (140, 60, 190), "cyan": (40, 210, 220), "pink": (245, 130, 190), "brown": (140, 90, 40),
}
# Plain backgrounds and glyphs of at least a quarter of the image: with noisy backgrounds and
# smaller glyphs the tiny demo model learns too slowly for a 15-minute demo to train both CLIP and
# SafeCLIP (docs/world.md has the figures).
BACKGROUNDS = {"dark": 35, "light": 215, "gray": 120}
SIZES = {"small": (0.28, 0.34), "large": (0.36, 0.44)}
# Most captions name only the class: when every caption also spelled out colour, size and
# background, a model could match captions within a batch by those alone and never learn the class.
CAPTION_TEMPLATES = (
    "a photo of {a_cls}.",
    "there is {a_cls} in the picture.",
    "a drawing of {a_cls}.",
    "a simple {cls} icon.",
    "look at this {cls}!",
    "an image showing {a_cls}.",
    "{a_cls}.",
    "this is {a_cls}.",
    "a picture of the {cls}.",
    "my favourite {cls}.",
    "a photo of a {color} {cls}.",
    "a {size} {cls}.",
    "{a_cls} on a {bg} background.",
    "the {cls} is {color}.",
    "a close-up of a {color} {cls} against a {bg} backdrop.",
    "a {size} {color} {cls} on a {bg} background.",
)
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a picture of the {}.", "a simple {} icon.")
SPLIT_IDS = {"train": 1, "test": 2}
SUPERSAMPLE = 4
MAX_ROTATION = 0.1  # radians; small enough that no glyph turns into another


def _regular_polygon(n, phase=0.0, inner=None):
    """Unit-radius polygon vertices; with `inner`, a star alternating outer and inner radii."""
    count = 2 * n if inner else n
    radii = [1.0 if (i % 2 == 0 or not inner) else inner for i in range(count)]
    return [(r * math.cos(phase + 2 * math.pi * i / count), r * math.sin(phase + 2 * math.pi * i / count))
            for i, r in enumerate(radii)]


def _rects(*boxes):
    """Unit-square rectangles (x0, y0, x1, y1) in [-1, 1] as closed polygons."""
    return [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)] for x0, y0, x1, y1 in boxes]


# Each glyph is a list of (polygons to fill, polygons to cut out); coordinates in [-1, 1].
# Glyphs differ in structure, not in outline alone: look-alike outlines (square, diamond, pentagon,
# hexagon beside the disk) are confused at 32 px, and a model far from saturation leaves SafeCLIP,
# whose CLIP loss sees only its safe samples, far behind plain CLIP (docs/world.md).
GLYPHS = (
    ([_regular_polygon(40)], []),                                               # disk
    ([[(dx + 0.38 * x, dy + 0.38 * y) for x, y in _regular_polygon(24)]
      for dx in (-0.55, 0.55) for dy in (-0.55, 0.55)], []),                    # four dots
    ([_regular_polygon(3, -math.pi / 2)], []),                                  # triangle
    (_rects((-0.9, -0.9, -0.45, 0.9), (0.45, -0.9, 0.9, 0.9), (-0.9, -0.22, 0.9, 0.22)), []),  # H
    ([[(-1, -0.8), (0, 0), (-1, 0.8)], [(1, -0.8), (0, 0), (1, 0.8)]], []),      # bowtie
    (_rects((-0.9, -0.9, -0.45, 0.9), (0.45, -0.9, 0.9, 0.9), (-0.9, 0.45, 0.9, 0.9)), []),  # U
    ([_regular_polygon(5, -math.pi / 2, inner=0.42)], []),                      # star
    ([_regular_polygon(40)], [[(0.55 * x, 0.55 * y) for x, y in _regular_polygon(40)]]),  # ring
    (_rects((-0.25, -1, 0.25, 1), (-1, -0.25, 1, 0.25)), []),                   # plus
    ([[(-1, -0.7), (-0.7, -1), (1, 0.7), (0.7, 1)], [(1, -0.7), (0.7, -1), (-1, 0.7), (-0.7, 1)]], []),  # x
    (_rects((-1, -1, 1, -0.6), (-1, -0.2, 1, 0.2), (-1, 0.6, 1, 1)), []),       # horizontal bars
    (_rects((-1, -1, -0.6, 1), (-0.2, -1, 0.2, 1), (0.6, -1, 1, 1)), []),       # vertical bars
    (_rects((-1, -1, 0, 0), (0, 0, 1, 1)), []),                                 # checker
    ([_regular_polygon(40)], [[(0.45 + x * 0.85, -0.2 + y * 0.85) for x, y in _regular_polygon(40)]]),  # crescent
    ([[(0, -1), (0.9, 0), (0.35, 0), (0.35, 1), (-0.35, 1), (-0.35, 0), (-0.9, 0)]], []),  # arrow
    (_rects((-1, -1, 1, -0.5), (-0.25, -0.5, 0.25, 1)), []),                    # T
    (_rects((-0.8, -1, -0.3, 1), (-0.3, 0.5, 0.9, 1)), []),                     # L
    (_rects((-0.9, -0.9, 0.9, 0.9)), _rects((-0.5, -0.5, 0.5, 0.5))),           # frame
    ([[(math.cos(a), -math.sin(a)) for a in np.linspace(0, math.pi, 30)]], []),  # half disk
    ([[(-0.5 + 0.45 * x, 0.45 * y) for x, y in _regular_polygon(30)],
      [(0.5 + 0.45 * x, 0.45 * y) for x, y in _regular_polygon(30)]], []),      # two dots
)
assert len(GLYPHS) == len(CLASSES)


# The tiles style: other class words (none shared with CLASSES), each a pattern of filled cells on a
# 3 x 3 grid (rows top to bottom), on backgrounds that fade from one grey to another.
TILE_CLASSES = (
    "anchor", "bicycle", "cactus", "drum", "feather", "guitar", "hammer", "igloo", "jacket", "key",
    "ladder", "magnet", "nest", "owl", "parrot", "rocket", "saddle", "tent", "violin", "whale",
)
TILE_PATTERNS = (
    "111/101/111", "010/111/010", "101/010/101", "111/000/111", "100/100/111", "111/010/010", "110/011/001",
    "001/011/111", "101/101/101", "111/100/111", "011/110/011", "110/110/000", "100/010/001", "000/111/111",
    "010/101/010", "101/000/101", "110/101/011", "001/001/111", "111/001/001", "010/010/111",
)
GRADIENTS = {"rising": (1, 0), "falling": (-1, 0), "sideways": (0, 1)}
TILE_SIZES = {"small": (0.25, 0.31), "large": (0.33, 0.40)}
assert len(TILE_PATTERNS) == len(set(TILE_PATTERNS)) == len(TILE_CLASSES)


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def draw_glyph(rng, label, canvas):
    """The glyphs style's picture and its caption attributes (the RNG draws in the order the demo's
    worlds were made with)."""
    color = str(rng.choice(list(COLORS)))
    bg = str(rng.choice(list(BACKGROUNDS)))
    size = str(rng.choice(list(SIZES)))
    tint = rng.integers(-20, 21, size=3)
    image = Image.new("RGB", (canvas, canvas), tuple(int(np.clip(BACKGROUNDS[bg] + t, 0, 255)) for t in tint))
    radius = rng.uniform(*SIZES[size]) * canvas
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, canvas - margin, size=2)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def place(polygon):
        return [(cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a)) for x, y in polygon]

    fills, holes = GLYPHS[label]
    shade = np.clip(np.array(COLORS[color]) + rng.integers(-25, 26, size=3), 0, 255)
    draw = ImageDraw.Draw(image)
    for polygon in fills:
        draw.polygon(place(polygon), fill=tuple(int(c) for c in shade))
    if holes:
        background = image.getpixel((0, 0))
        for polygon in holes:
            draw.polygon(place(polygon), fill=background)
    return image, {"color": color, "size": size, "background": bg}


def draw_tiles(rng, label, canvas):
    """The tiles style's picture: the class's cell pattern in one colour on a grey gradient."""
    color = str(rng.choice(list(COLORS)))
    bg = str(rng.choice(list(GRADIENTS)))
    size = str(rng.choice(list(TILE_SIZES)))
    low, high = sorted(rng.integers(20, 236, size=2))
    high = max(high, low + 60)
    vertical, horizontal = GRADIENTS[bg]
    ramp = np.linspace(0.0, 1.0, canvas)
    along = ramp[:, None] * vertical + ramp[None, :] * horizontal
    along = along - along.min()
    grey = low + (min(high, 255) - low) * along / max(along.max(), 1e-9)
    pixels = np.clip(grey[..., None] + rng.integers(-15, 16, size=3), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    radius = rng.uniform(*TILE_SIZES[size]) * canvas
    margin = radius * 1.12  # turned by up to MAX_ROTATION, the grid reaches about 1.1 radius
    cx, cy = rng.uniform(margin, canvas - margin, size=2)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    shade = tuple(int(c) for c in np.clip(np.array(COLORS[color]) + rng.integers(-25, 26, size=3), 0, 255))
    cell, half = 2 / 3, 0.42 * 2 / 3
    draw = ImageDraw.Draw(image)
    for row, cells in enumerate(TILE_PATTERNS[label].split("/")):
        for column, filled in enumerate(cells):
            if filled == "1":
                x, y = -1 + cell * (column + 0.5), -1 + cell * (row + 0.5)
                corners = [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
                draw.polygon([(cx + radius * (u * cos_a - v * sin_a), cy + radius * (u * sin_a + v * cos_a))
                              for u, v in corners], fill=shade)
    return image, {"color": color, "size": size, "background": bg}


STYLES = {"glyphs": (CLASSES, draw_glyph), "tiles": (TILE_CLASSES, draw_tiles)}


def sample_rng(seed, split, index):
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def draw_sample(seed, split, index, image_size=32, style="glyphs"):
    """One (image, caption, metadata) triple, fully determined by its arguments."""
    classes, draw = STYLES[style]
    rng = sample_rng(seed, split, index)
    label = int(rng.integers(len(classes)))
    image, attributes = draw(rng, label, image_size * SUPERSAMPLE)
    image = image.resize((image_size, image_size), Image.LANCZOS)
    cls = classes[label]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(cls=cls, a_cls=article(cls), color=attributes["color"], size=attributes["size"],
                              bg=attributes["background"])
    meta = {"label": label, "class": cls, **attributes}
    return image, caption, meta


def sample_key(split, index):
    return f"{split}_{index:07d}"


def write_split(out_dir, split, num_samples, seed, image_size, shard_size, formats, progress=True, style="glyphs"):
    """Stream one split to webdataset shards and/or a CSV with PNG files; returns its card entry."""
    out_dir = Path(out_dir)
    entry = {"num_samples": num_samples}
    num_shards = math.ceil(num_samples / shard_size)
    shard_dir, image_dir = out_dir / split, out_dir / "images" / split
    csv_file = csv_writer = writer = None
    sizes = {}
    if "wds" in formats:
        shard_dir.mkdir(parents=True, exist_ok=True)
        entry["shards"] = str(shard_dir / f"{{000000..{num_shards - 1:06d}}}.tar")
    if "csv" in formats:
        image_dir.mkdir(parents=True, exist_ok=True)
        entry["csv"] = str(out_dir / f"{split}.csv")
        csv_file = open(entry["csv"], "w", newline="")
        csv_writer = csv.writer(csv_file, delimiter="\t")
        csv_writer.writerow(["filepath", "title", "label"])
    try:
        for index in cli.progress(range(num_samples), enabled=progress, desc=f"world {split}", unit="img"):
            image, caption, meta = draw_sample(seed, split, index, image_size, style)
            key = sample_key(split, index)
            data = png_bytes(image)
            if writer is None and "wds" in formats:
                shard_name = f"{index // shard_size:06d}.tar"
                writer = wds.TarWriter(str(shard_dir / shard_name))
                sizes[shard_name] = 0
            if writer is not None:
                writer.write({"__key__": key, "png": data, "txt": caption, "cls": str(meta["label"]),
                              "json": json.dumps({"key": key, **meta})})
                sizes[shard_name] += 1
                if sizes[shard_name] == shard_size:
                    writer.close()
                    writer = None
            if csv_writer is not None:
                path = image_dir / f"{key}.png"
                path.write_bytes(data)
                csv_writer.writerow([str(path), caption, meta["label"]])
    finally:
        if writer is not None:
            writer.close()
        if csv_file is not None:
            csv_file.close()
    if sizes:
        (shard_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return entry


def generate_world(out_dir, num_train=8000, num_test=1000, seed=0, image_size=32, shard_size=1000,
                   formats=("wds", "csv"), progress=True, style="glyphs"):
    """Write the world under `out_dir` and return its card (also saved as world.json)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    card = {
        "seed": seed,
        "image_size": image_size,
        "style": style,
        "classes": list(STYLES[style][0]),
        "templates": list(ZERO_SHOT_TEMPLATES),
        "splits": {},
    }
    for split, count in (("train", num_train), ("test", num_test)):
        card["splits"][split] = write_split(out_dir, split, count, seed, image_size, shard_size, formats, progress,
                                            style)
    (out_dir / "classnames.txt").write_text("\n".join(card["classes"]) + "\n")
    (out_dir / "world.json").write_text(json.dumps(card, indent=2))
    return card


def load_card(world_dir):
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no world card; generate one with python -m open_clip_safe.world")
    return json.loads(path.read_text())


def parse_args(argv):
    parser = Parser("world", __doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Output folder (must be empty or absent, unless --overwrite).")
    parser.add_argument("--num-train", type=int, default=8000, help="Training samples.")
    parser.add_argument("--num-test", type=int, default=1000, help="Labelled test samples.")
    parser.add_argument("--seed", type=int, default=0, help="World seed: same seed, same bytes.")
    parser.add_argument("--image-size", type=int, default=32, help="Image side in pixels.")
    parser.add_argument("--shard-size", type=int, default=1000, help="Samples per webdataset shard.")
    parser.add_argument("--format", choices=("wds", "csv", "both"), default="both",
                        help="Write webdataset shards, a CSV with PNG files, or both.")
    parser.add_argument("--style", choices=tuple(STYLES), default="glyphs",
                        help="glyphs: outline shapes on plain backgrounds (the demo's); tiles: other classes, each a "
                             "pattern of cells on a 3 x 3 grid, on gradient backgrounds.")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty --out.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_test < 1:
        parser.error("--num-train and --num-test must be at least 1")
    if args.image_size < 16:
        parser.error(f"--image-size must be at least 16, got {args.image_size}")
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    check_out_dir(args.out, args.overwrite)
    return args


def run(argv):
    args = parse_args(argv)
    formats = ("wds", "csv") if args.format == "both" else (args.format,)
    try:
        card = generate_world(args.out, args.num_train, args.num_test, args.seed, args.image_size,
                              args.shard_size, formats, progress=not args.quiet, style=args.style)
    except OSError as error:
        raise UsageError(f"cannot write the world under {args.out}: {error}") from None
    print(json.dumps({split: entry for split, entry in card["splits"].items()}, indent=2))


def main(argv=None):
    return guarded("world", run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
