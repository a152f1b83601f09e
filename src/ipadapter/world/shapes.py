"""The synthetic shapes world: 64x64 images of one coloured shape on a solid background.

Everything here is pure and seeded: the same ``random.Random`` seed gives the same samples, captions and
files. The world is small enough that a base text-to-image family can be trained on it from scratch
(``world_build``) and exact enough that generated images can be judged by reading them back
(``world_parse``, which shares no code with this module on purpose).

Captions name three attributes: the shape's colour, the shape kind and the background colour,
e.g. "a red circle on a black background". Partial captions leave some of them out.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 18, 44  # side of the shape's bounding box, in pixels

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "cyan": (40, 200, 210),
    "magenta": (200, 50, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Held-out convention: training data and training-time sampling draw from TRAIN_SEED (and seeds derived
# from it), evaluation draws from EVAL_SEED. The two streams never share a seed.
TRAIN_SEED = 1234
EVAL_SEED = 987654

# Every word a caption can hold, in a fixed order (the world tokenizer's vocabulary is built from it).
CAPTION_WORDS: tuple[str, ...] = ("a", "on", "background", "shape", *COLOURS, *SHAPES)


@dataclass(frozen=True)
class Sample:
    """One world image. (x, y) is the top-left corner of the shape's size x size bounding box."""

    background: str
    colour: str
    shape: str
    size: int
    x: int
    y: int


def random_sample(rng: random.Random) -> Sample:
    """Draw a sample: background and shape colour differ, the shape lies fully inside the image."""
    background = rng.choice(COLOURS)
    colour = rng.choice([c for c in COLOURS if c != background])
    shape = rng.choice(SHAPES)
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    x = rng.randint(0, IMAGE_SIZE - size)
    y = rng.randint(0, IMAGE_SIZE - size)
    return Sample(background, colour, shape, size, x, y)


def draw(sample: Sample) -> Image.Image:
    """Render a sample with hard edges (no anti-aliasing)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PALETTE[sample.background])
    d = ImageDraw.Draw(img)
    fill = PALETTE[sample.colour]
    x0, y0 = sample.x, sample.y
    x1, y1 = x0 + sample.size - 1, y0 + sample.size - 1
    if sample.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif sample.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif sample.shape == "triangle":  # upright isosceles: apex at the top centre
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {sample.shape!r}")
    return img


def caption_from_parts(background: str | None, colour: str | None, shape: str | None) -> str:
    """The caption naming the given attributes; None leaves one out ("" when all are None)."""
    if colour is None and shape is None:
        head = ""
    else:
        head = f"a {colour + ' ' if colour else ''}{shape or 'shape'}"
    tail = f"on a {background} background" if background else ""
    return " ".join(p for p in (head, tail) if p)


def caption(sample: Sample, rng: random.Random | None = None, partial: bool = False, keep: float = 0.5) -> str:
    """Caption of a sample: "a {colour} {shape} on a {background} background".

    With ``partial=True`` each of the three attributes is kept independently with probability ``keep`` (1/2:
    all eight variants equally likely): "a red circle", "a triangle", "on a black background",
    "a red shape on a black background", "" ... ``rng`` (default: a fresh unseeded one) draws the choice;
    it always takes three draws, so ``keep`` changes the words but not the stream.
    """
    if not partial:
        return caption_from_parts(sample.background, sample.colour, sample.shape)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep={keep}: a probability in [0, 1]")
    rng = rng if rng is not None else random.Random()
    named = [rng.random() < keep for _ in range(3)]
    return caption_from_parts(
        sample.background if named[0] else None,
        sample.colour if named[1] else None,
        sample.shape if named[2] else None,
    )


def caption_attributes(text: str) -> dict[str, str | None]:
    """Read the attributes a caption names (the inverse of ``caption_from_parts``); None when left out."""
    words = text.lower().replace(",", " ").split()
    out: dict[str, str | None] = {"background": None, "colour": None, "shape": None}
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in PALETTE:
            out["background"] = words[i - 1]
        words = words[: max(i - 3, 0)]  # drop "on a <colour> background"
    for w in words:
        if w in SHAPES:
            out["shape"] = w
        elif w in PALETTE:
            out["colour"] = w
    return out


def all_captions(partial: bool = True) -> list[str]:
    """Every distinct caption the world can produce (full ones first), in a fixed order."""
    full = [caption_from_parts(b, c, s) for b in COLOURS for c in COLOURS if c != b for s in SHAPES]
    if not partial:
        return full
    seen = dict.fromkeys(full)
    for b in (None, *COLOURS):
        for c in (None, *COLOURS):
            for s in (None, *SHAPES):
                if b is not None and b == c:
                    continue
                seen.setdefault(caption_from_parts(b, c, s))
    return list(seen)


def contradicting_prompt(sample: Sample, text: str, rng: random.Random) -> Sample:
    """The sample with every attribute that ``text`` names changed to another value (same size and place).

    A prompt image for reference -> target training: the text then carries what it names and the image the
    rest, so an adapter learns to let the text decide what it says (see ``write_dataset(prompt_swap=...)``).
    """
    named = caption_attributes(text)
    background, colour, shape = sample.background, sample.colour, sample.shape
    if named["shape"] is not None:
        shape = rng.choice([s for s in SHAPES if s != sample.shape])
    if named["background"] is not None:
        background = rng.choice([c for c in COLOURS if c not in (sample.background, colour)])
    if named["colour"] is not None:
        colour = rng.choice([c for c in COLOURS if c not in (sample.colour, background)])
    return Sample(background, colour, shape, sample.size, sample.x, sample.y)


def samples(n: int, seed: int) -> list[Sample]:
    """n samples from one seeded stream."""
    rng = random.Random(seed)
    return [random_sample(rng) for _ in range(n)]


def write_dataset(out_dir: str | Path, n: int, seed: int = TRAIN_SEED, partial_captions: bool = True,
                  progress: bool = True, caption_keep: float = 0.5, prompt_swap: float = 0.0,
                  image_only: float = 0.0) -> Path:
    """Write n PNGs and ``data.json`` in the IP-Adapter JSON training format; return the JSON path.

    ``data.json`` is ``[{"image_file": "00000.png", "text": "..."}, ...]`` with image_file relative to
    out_dir. A ``samples.json`` beside it keeps every sample's true attributes (for evaluation).
    The same seed gives byte-identical files. ``caption_keep``: the chance that a partial caption names each
    attribute (the images do not depend on it). ``prompt_swap``: the chance that an item whose caption names
    something gets a separate prompt image (``"prompt_image_file"``) in which the named attributes differ
    (:func:`contradicting_prompt`); 0 (default) is the paper's data, every image its own prompt. ``image_only``:
    the chance that an item gets an empty caption (an image-only item, its own image the prompt) whatever it drew.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text_rng = random.Random(seed + 1)  # separate stream: captions do not shift the images
    swap_rng = random.Random(seed + 2)  # and prompt images shift neither
    only_rng = random.Random(seed + 3)  # nor image-only items
    width = max(5, len(str(n - 1)))
    records, truth = [], []
    for i in tqdm(range(n), desc="world images", disable=not progress):
        s = random_sample(rng)
        name = f"{i:0{width}d}.png"
        draw(s).save(out / name, format="PNG", optimize=False)
        record = {"image_file": name, "text": caption(s, text_rng, partial=partial_captions, keep=caption_keep)}
        if only_rng.random() < image_only:
            record["text"] = ""
        fact = {"image_file": name, **asdict(s)}
        if prompt_swap and swap_rng.random() < prompt_swap and any(caption_attributes(record["text"]).values()):
            prompt = contradicting_prompt(s, record["text"], swap_rng)
            record["prompt_image_file"] = fact["prompt_image_file"] = f"{i:0{width}d}-prompt.png"
            draw(prompt).save(out / record["prompt_image_file"], format="PNG", optimize=False)
            fact["prompt"] = asdict(prompt)
        records.append(record)
        truth.append(fact)
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    (out / "samples.json").write_text(json.dumps(truth, indent=1) + "\n")
    return path
