"""The shapes world's judge, a plug-in of :func:`ipadapter.evaluation.evaluate.evaluate`.

    judge = WorldJudge()
    pairs = world_pairs(64)                        # held-out prompts, true attributes known
    result = evaluate(ip, pairs, clip, settings, judge=judge)

It reads background colour, shape colour and shape back from the pixels (:func:`ipadapter.world.parse.parse`)
and says what a generation should show: the prompt image's attributes, except those the text prompt names,
which the image is expected to follow instead ("on a black background" + an image of a magenta triangle on
yellow expects a magenta triangle on black). Prompt images' true attributes come from the world's
``samples.json`` beside the data, else from the pixels of clean world images.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import IPAdapterError
from ..evaluation.evaluate import Pair, attribute_hits, summarize_hits
from . import shapes as world
from .parse import layout, parse

ATTRIBUTES = ("background", "colour", "shape")


class WorldJudge:
    """Attributes of shapes-world images: read from pixels, expected from a prompt image and a text prompt."""

    attributes = ATTRIBUTES
    labels = {"background": "background colour", "colour": "shape colour", "shape": "shape", "all": "all three"}

    def __init__(self) -> None:
        self._truths: dict[str, dict[str, dict[str, str]]] = {}

    def read(self, image: Image.Image) -> dict[str, str | None]:
        return parse(image)

    def expected(self, truth: dict[str, str], text_prompt: str = "") -> dict[str, str | None]:
        return expected_attributes(truth, text_prompt)

    def truth(self, image: Image.Image, path: str | None = None, data: str | os.PathLike | None = None):
        """The prompt image's true attributes: from ``samples.json`` beside ``data``, else read from a clean
        world image (exact there), else None (not a world image: no attributes are scored)."""
        if path is not None and data is not None:
            key = str(data)
            if key not in self._truths:
                self._truths[key] = _samples_json(data)
            known = self._truths[key].get(os.path.abspath(path))
            if known is not None:
                return known
        return parse(image) if is_world_image(image) else None


def _samples_json(data: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{absolute image path: true attributes} from the world's samples.json beside the data, if any."""
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    path = folder / "samples.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())
        return {os.path.abspath(folder / r["image_file"]): {k: r[k] for k in ATTRIBUTES} for r in rows}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise IPAdapterError(f"{path}: not a world samples.json (image_file, background, colour, shape)") from None


def is_world_image(image: Image.Image) -> bool:
    """A clean shapes-world image: 64x64 and every pixel exactly one of the world's palette colours."""
    if image.size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        return False
    colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
    palette = {tuple(c) for c in world.PALETTE.values()}
    return len(colours) == 2 and all(tuple(int(v) for v in c) in palette for c in colours)


def world_pairs(n: int, seed: int | None = None) -> list[Pair]:
    """n held-out shapes-world prompts (drawn from ``world.EVAL_SEED``, never the training stream)."""
    samples = world.samples(n, world.EVAL_SEED if seed is None else seed)
    return [Pair(world.draw(s), world.caption(s), f"eval-{i:05d}", {k: getattr(s, k) for k in ATTRIBUTES})
            for i, s in enumerate(samples)]


FAMILIES = ("background", "colour", "shape")  # image + text: the attribute the text names (and contradicts)
TUNING_SEED = world.EVAL_SEED + 300  # image + text prompts to choose a scale on; the reported ones use others
REPORT_SEED = world.EVAL_SEED + 400


def contradiction_pairs(family: str, n: int, seed: int = REPORT_SEED) -> list[Pair]:
    """n held-out image + text prompts of one family: a world image (over the whole palette) and a text that
    names one attribute, ``family``, with another value than the image's ("on a green background", "a green
    shape", "a circle"). Wanted: that attribute from the text, the other two from the image; the caption is the
    wanted result in full (the CLIP-T reference), ``prompt`` the text. Each family draws its own stream."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")
    rng = random.Random(f"{seed}-{family}")  # str seeds hash deterministically (sha512), unlike hash()
    pairs = []
    for i in range(n):
        s = world.random_sample(rng)
        if family == "shape":
            value = rng.choice([x for x in world.SHAPES if x != s.shape])
        else:
            value = rng.choice([c for c in world.COLOURS if c not in (s.background, s.colour)])
        named = {k: (value if k == family else None) for k in ATTRIBUTES}
        wanted = {k: named[k] or getattr(s, k) for k in ATTRIBUTES}
        pairs.append(Pair(world.draw(s), world.caption_from_parts(wanted["background"], wanted["colour"],
                                                                   wanted["shape"]),
                          f"{family}-{i:04d}", {k: getattr(s, k) for k in ATTRIBUTES},
                          prompt=world.caption_from_parts(named["background"], named["colour"], named["shape"])))
    return pairs


def expected_attributes(truth: dict[str, str] | None, text_prompt: str = "") -> dict[str, str] | None:
    """What a world generation should show: the prompt image's attributes, except those the text names."""
    if truth is None:
        return None
    named = world.caption_attributes(text_prompt) if text_prompt else {}
    return {k: named.get(k) or truth[k] for k in ATTRIBUTES}


def attribute_accuracy(generated: Sequence, expected: Sequence[dict]) -> dict[str, float]:
    """Fraction of world images (PIL images or already-parsed dicts) showing each expected attribute.

    Returns {"background", "colour", "shape", "all", "n"}; "all" counts images right on every expected one.
    """
    if len(generated) != len(expected):
        raise ValueError(f"{len(generated)} generated images for {len(expected)} expectations")
    parsed = [g if isinstance(g, dict) else parse(g) for g in generated]
    return summarize_hits([attribute_hits(p, e) for p, e in zip(parsed, expected)], ATTRIBUTES)


def layout_fidelity(prompt_images, generated) -> dict:
    """How well generations keep what no caption names: the shape's size and place (:func:`parse.layout`).
    ``generated``: [prompt][sample]. size_r: correlation of the prompt's and the generation's bounding-box side;
    size_error / centre_error: median absolute difference of the side and median distance of the box centres,
    in pixels (of 64); over the generations where a shape is found (``found``)."""
    pairs = []
    for prompt, samples in zip(prompt_images, generated):
        want = layout(prompt)
        pairs += [(want, got) for got in map(layout, samples) if got is not None and want is not None]
    n = sum(len(s) for s in generated)
    if len(pairs) < 2:
        return {"size_r": None, "size_error": None, "centre_error": None, "found": len(pairs) / max(n, 1), "n": n}
    want = np.array([[w["x"], w["y"], w["size"]] for w, _ in pairs])
    got = np.array([[g["x"], g["y"], g["size"]] for _, g in pairs])
    r = np.corrcoef(want[:, 2], got[:, 2])[0, 1] if want[:, 2].std() and got[:, 2].std() else 0.0
    return {"size_r": float(r), "size_error": float(np.median(np.abs(want[:, 2] - got[:, 2]))),
            "centre_error": float(np.median(np.linalg.norm(want[:, :2] - got[:, :2], axis=1))),
            "found": len(pairs) / n, "n": n}
