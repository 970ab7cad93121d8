"""Backdoor triggers: pure functions of (parameters, image, key), so the evaluation can rebuild them.

A trigger is described by a plain dict (`params`): its `name`, the attack `seed` and its own settings.
Seeded patterns (noise patch, noise blend, warp field) are regenerated from the seed and the image size
instead of being stored; only a user-supplied blend image is a file, referenced relative to the card.
"""
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

MIN_PATCH_PX = 3  # 16 px at 224 scales to 2 px at 32 px: too small to survive augmentation; floor it
PATCH_KINDS = ("noise", "solid", "checkerboard")
PATCH_LOCATIONS = ("random", "bottom-right", "top-left", "center")
# Separate RNG streams per use, so adding one use never shifts another's numbers.
STREAM_PATCH, STREAM_LOCATION, STREAM_BLEND, STREAM_WARP = 11, 12, 13, 14


def key_hash(key):
    """Stable 63-bit integer of a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little") >> 1


def _rgb_array(image):
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_image(array):
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


class Trigger:
    """Base: `params` is the card's `trigger` dict; `base_dir` resolves files it names."""

    name = None

    def __init__(self, params, base_dir=None):
        self.params = params
        self.seed = int(params["seed"])
        self.base_dir = Path(base_dir) if base_dir is not None else Path(".")
        self._cache = {}

    def cached(self, what, size, make):
        if (what, size) not in self._cache:
            self._cache[(what, size)] = make()
        return self._cache[(what, size)]

    def __call__(self, image, key):
        raise NotImplementedError


class Patch(Trigger):
    """BadNets: a square patch pasted over the image; only the patch's pixels change."""

    name = "badnets"

    @staticmethod
    def from_args(args):
        return {"patch_kind": args.patch_kind, "patch_size": args.patch_size, "patch_location": args.patch_location}

    def side(self, width, height):
        """`patch_size` is pixels at 224 px, scaled to the shorter side, at least MIN_PATCH_PX."""
        short = min(width, height)
        return min(short, max(MIN_PATCH_PX, int(self.params["patch_size"] * short / 224 + 0.5)))

    def pattern(self, side):
        kind = self.params["patch_kind"]
        if kind == "noise":
            rng = np.random.default_rng([self.seed, STREAM_PATCH, side])
            return rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        if kind == "solid":
            return np.full((side, side, 3), 255, dtype=np.uint8)
        cells = (np.add.outer(np.arange(side), np.arange(side)) % 2) * 255
        return np.repeat(cells[:, :, None], 3, axis=2).astype(np.uint8)

    def location(self, width, height, side, key):
        where = self.params["patch_location"]
        if where == "top-left":
            return 0, 0
        if where == "bottom-right":
            return width - side, height - side
        if where == "center":
            return (width - side) // 2, (height - side) // 2
        rng = np.random.default_rng([self.seed, STREAM_LOCATION, key_hash(key)])
        return int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))

    def __call__(self, image, key):
        pixels = _rgb_array(image).copy()
        height, width = pixels.shape[:2]
        side = self.side(width, height)
        x, y = self.location(width, height, side, key)
        pixels[y:y + side, x:x + side] = self.cached("pattern", side, lambda: self.pattern(side))
        return Image.fromarray(pixels, "RGB")


class Blend(Trigger):
    """Blended: x' = (1 - r) x + r p, with p seeded uniform noise or a given image resized to x."""

    name = "blended"

    @staticmethod
    def from_args(args):
        """`blend_image` is the user's file here; the builder copies it beside the card and stores its name."""
        return {"blend_ratio": args.blend_ratio, "blend_image": args.blend_image}

    def pattern(self, width, height):
        if self.params.get("blend_image"):
            with Image.open(self.base_dir / self.params["blend_image"]) as source:
                return _rgb_array(source.convert("RGB").resize((width, height), Image.BILINEAR)).astype(np.float64)
        rng = np.random.default_rng([self.seed, STREAM_BLEND, height, width])
        return rng.integers(0, 256, size=(height, width, 3)).astype(np.float64)

    def __call__(self, image, key):
        pixels = _rgb_array(image).astype(np.float64)
        height, width = pixels.shape[:2]
        ratio = float(self.params["blend_ratio"])
        pattern = self.cached("pattern", (width, height), lambda: self.pattern(width, height))
        return _to_image((1 - ratio) * pixels + ratio * pattern)


def _upsample_matrix(size, grid):
    """(size, grid) weights of linear interpolation with aligned corners (as WaNet's upsampling)."""
    position = np.linspace(0, grid - 1, size) if size > 1 else np.zeros(1)
    low = np.minimum(np.floor(position).astype(int), grid - 2)
    frac = position - low
    weights = np.zeros((size, grid))
    weights[np.arange(size), low] = 1 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


class Warp(Trigger):
    """WaNet: a smooth warp from a seeded k x k control grid (normalised to mean |.| = 1), upsampled to
    the image, scaled by strength / height in [-1, 1] coordinates, then bilinear resampling."""

    name = "wanet"

    @staticmethod
    def from_args(args):
        return {"warp_grid": args.warp_grid, "warp_strength": args.warp_strength}

    def sample_points(self, width, height):
        grid = int(self.params["warp_grid"])
        control = np.random.default_rng([self.seed, STREAM_WARP]).uniform(-1, 1, size=(2, grid, grid))
        control /= np.mean(np.abs(control))
        rows, cols = _upsample_matrix(height, grid), _upsample_matrix(width, grid)
        flow = np.stack([rows @ control[c] @ cols.T for c in range(2)])  # (2, height, width): dx, dy
        strength = float(self.params["warp_strength"])
        xs = np.clip(np.linspace(-1, 1, width)[None, :] + strength * flow[0] / height, -1, 1)
        ys = np.clip(np.linspace(-1, 1, height)[:, None] + strength * flow[1] / height, -1, 1)
        return (xs + 1) / 2 * (width - 1), (ys + 1) / 2 * (height - 1)

    def __call__(self, image, key):
        pixels = _rgb_array(image).astype(np.float64)
        height, width = pixels.shape[:2]
        if width < 2 or height < 2:
            return image.convert("RGB")
        px, py = self.cached("points", (width, height), lambda: self.sample_points(width, height))
        x0 = np.minimum(np.floor(px).astype(int), width - 2)
        y0 = np.minimum(np.floor(py).astype(int), height - 2)
        fx, fy = (px - x0)[..., None], (py - y0)[..., None]
        top = pixels[y0, x0] * (1 - fx) + pixels[y0, x0 + 1] * fx
        bottom = pixels[y0 + 1, x0] * (1 - fx) + pixels[y0 + 1, x0 + 1] * fx
        return _to_image(top * (1 - fy) + bottom * fy)


class Sinusoid(Trigger):
    """SIG: adds amplitude * sin(2 pi j f / width) to column j of every channel (not seeded)."""

    name = "sig"

    @staticmethod
    def from_args(args):
        return {"sig_amplitude": args.sig_amplitude, "sig_frequency": args.sig_frequency}

    def __call__(self, image, key):
        pixels = _rgb_array(image).astype(np.float64)
        width = pixels.shape[1]
        wave = float(self.params["sig_amplitude"]) * np.sin(
            2 * np.pi * np.arange(width) * float(self.params["sig_frequency"]) / width)
        return _to_image(pixels + wave[None, :, None])


TRIGGERS = {cls.name: cls for cls in (Patch, Blend, Warp, Sinusoid)}


def trigger_params(name, seed, args):
    """The card's `trigger` dict for trigger `name` from parsed CLI arguments."""
    return {"name": name, "seed": seed, **TRIGGERS[name].from_args(args)}


def make_trigger(params, base_dir=None):
    """The callable trigger(image, key) -> PIL image described by `params`."""
    if not isinstance(params, dict) or params.get("name") not in TRIGGERS:
        raise ValueError(f"unknown trigger {params!r}; known: {', '.join(TRIGGERS)}")
    return TRIGGERS[params["name"]](params, base_dir)
