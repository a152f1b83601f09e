"""Read a shapes-world image back into its attributes, from the pixels alone.

Shares nothing with the generator (``world.py``) on purpose: its own palette table, its own geometry.
Used to judge generated images: exact on clean world images, tolerant of blur and noise.

- background: nearest palette colour of the median of the border pixels;
- shape colour: the most frequent nearest-palette colour among the pixels far from the background;
- shape kind: geometry of the foreground mask (fill ratio of its bounding box: square ~1, circle ~pi/4,
  upright triangle ~1/2), with the mask cleaned of speckles and the box read robustly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "cyan": (40, 200, 210),
    "magenta": (200, 50, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
_NAMES = list(_PALETTE)
_RGB = np.array([_PALETTE[n] for n in _NAMES], dtype=np.float32)

MIN_PIXELS = 24  # fewer foreground pixels than this: no shape
_FG_DIST = 60.0  # a pixel this far (RGB distance) from the background colour may be foreground


def nearest_colour(rgb) -> str:
    """Name of the palette colour nearest to an RGB triple."""
    d = ((_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)
    return _NAMES[int(d.argmin())]


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
    if a.max() <= 1.0 + 1e-6 and a.dtype != np.uint8:  # float images in [0, 1]
        a = a * 255.0
    return a


def _majority3(mask: np.ndarray) -> np.ndarray:
    """3x3 majority filter: removes isolated speckles and fills pinholes."""
    p = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    s = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3))
    return s >= 5


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 4-connected component (plain flood fill: images are 64x64)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_n, cur = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask), strict=True):
        if labels[sy, sx]:
            continue
        cur += 1
        stack, n = [(sy, sx)], 0
        labels[sy, sx] = cur
        while stack:
            y, x = stack.pop()
            n += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = cur
                    stack.append((ny, nx))
        if n > best_n:
            best, best_n = cur, n
    return labels == best if best else mask


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Geometry of a foreground mask: fill ratio of its bounding box, aspect, and top/bottom widths."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    rows = box.sum(1).astype(np.float32)
    cols = box.sum(0).astype(np.float32)
    k = max(1, h // 5)

    def at(prof: np.ndarray, q: float) -> float:
        return float(prof[min(len(prof) - 1, int(round(q * (len(prof) - 1))))])

    # widths at 15% / 85% of the box relative to the widest: a circle's chords there are ~0.71 of its
    # diameter, a square's sides stay ~1 even when blur rounds its corners
    shoulder = (at(cols, 0.15) + at(cols, 0.85)) / (2.0 * max(cols.max(), 1.0))
    shoulder = min(shoulder, (at(rows, 0.15) + at(rows, 0.85)) / (2.0 * max(rows.max(), 1.0)))
    return {
        "fill": float(mask.sum()) / float(h * w),
        "aspect": float(min(h, w)) / float(max(h, w)),
        # width of the top fifth vs the bottom fifth: ~0.2 for a triangle, ~0.7 for a circle, 1 for a square
        "taper": float(rows[:k].mean() / max(rows[-k:].mean(), 1.0)),
        "shoulder": shoulder,
        "height": float(h),
        "width": float(w),
    }


def classify_shape(f: dict[str, float]) -> str:
    if f["fill"] < 0.64 or f["taper"] < 0.45:
        return "triangle"
    if f["fill"] > 0.89 or f["shoulder"] > 0.86:
        return "square"
    return "circle"


def _read(a: np.ndarray) -> tuple[dict[str, str | None], np.ndarray | None]:
    """The attributes and the shape's mask (None when no foreground is found)."""
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    out: dict[str, str | None] = {"background": background, "colour": None, "shape": None}

    bg_ref = _RGB[_NAMES.index(background)]
    dist = np.sqrt(((a - bg_ref) ** 2).sum(-1))
    cand = _majority3(dist > _FG_DIST)
    if cand.sum() < MIN_PIXELS:
        return out, None
    # Shape colour: vote of the nearest palette colour of each candidate pixel (the background excluded).
    px = a[cand]
    d = ((px[:, None, :] - _RGB[None]) ** 2).sum(-1)
    d[:, _NAMES.index(background)] = np.inf
    votes = np.bincount(d.argmin(1), minlength=len(_NAMES))
    colour = _NAMES[int(votes.argmax())]
    out["colour"] = colour

    # Mask: pixels past halfway from the background to the shape colour (projection on that segment).
    fg_ref = _RGB[_NAMES.index(colour)]
    axis = fg_ref - bg_ref
    t = ((a - bg_ref) @ axis) / float(axis @ axis)
    mask = _largest_component(_majority3(t > 0.5))
    if mask.sum() < MIN_PIXELS:
        out["colour"] = None
        return out, None
    out["shape"] = classify_shape(shape_features(mask))
    return out, mask


def parse(image) -> dict[str, str | None]:
    """Attributes of a world image (PIL image or HxWx3 array, uint8 or float in [0, 1]).

    Returns ``{"background": ..., "colour": ..., "shape": ...}``; colour and shape are None when no
    foreground is found.
    """
    return _read(_to_array(image))[0]


def layout(image) -> dict[str, float] | None:
    """Where the shape is and how big, from the same mask ``parse`` reads the shape kind from: the centre of its
    bounding box (``x``, ``y``, pixels) and the box's longer side (``size``); None when no shape is found.
    The world's captions never name these, so only the prompt image can carry them."""
    mask = _read(_to_array(image))[1]
    if mask is None:
        return None
    ys, xs = np.nonzero(mask)
    return {"x": (xs.min() + xs.max()) / 2.0, "y": (ys.min() + ys.max()) / 2.0,
            "size": float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)}
