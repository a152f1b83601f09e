import json
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ipadapter.world import shapes as world
from ipadapter.world.judge import layout_fidelity
from ipadapter.world.parse import layout, parse


def truth(s: world.Sample) -> dict:
    return {"background": s.background, "colour": s.colour, "shape": s.shape}


def test_palette_and_seeds():
    assert world.PALETTE["red"] == (220, 40, 40) and world.PALETTE["black"] == (25, 25, 25)
    assert len(world.PALETTE) == 8 and world.SHAPES == ("circle", "square", "triangle")
    assert world.TRAIN_SEED != world.EVAL_SEED


def test_samples_are_valid_and_deterministic():
    a, b = world.samples(200, 7), world.samples(200, 7)
    assert a == b
    assert a != world.samples(200, 8)
    for s in a:
        assert s.background != s.colour
        assert world.MIN_SIZE <= s.size <= world.MAX_SIZE
        assert 0 <= s.x <= world.IMAGE_SIZE - s.size and 0 <= s.y <= world.IMAGE_SIZE - s.size
    im = world.draw(a[0])
    assert im.size == (64, 64) and im.mode == "RGB"
    assert np.array_equal(np.asarray(im), np.asarray(world.draw(a[0])))
    assert tuple(np.asarray(im)[0, 0]) in world.PALETTE.values()


def test_captions_full_and_partial():
    s = world.Sample("black", "red", "circle", 20, 3, 4)
    assert world.caption(s) == "a red circle on a black background"
    rng = random.Random(0)
    seen = {world.caption(s, rng, partial=True) for _ in range(400)}
    assert seen == {
        "a red circle on a black background", "a red circle", "a circle on a black background",
        "a red shape on a black background", "a circle", "a red shape", "on a black background", "",
    }
    known = set(world.all_captions())
    assert seen <= known and len(world.all_captions(partial=False)) == 8 * 7 * 3
    for text in seen:  # every caption reads back to the attributes it names
        attrs = world.caption_attributes(text)
        for k, v in attrs.items():
            assert v is None or v == truth(s)[k]
        assert set(text.split()) <= set(world.CAPTION_WORDS)
    assert world.caption_attributes("on a black background") == {"background": "black", "colour": None,
                                                                  "shape": None}


def test_write_dataset_format_and_determinism(tmp_path):
    p1 = world.write_dataset(tmp_path / "a", 24, seed=3, progress=False)
    p2 = world.write_dataset(tmp_path / "b", 24, seed=3, progress=False)
    p3 = world.write_dataset(tmp_path / "c", 24, seed=4, progress=False)
    data = json.loads(p1.read_text())
    assert p1.name == "data.json" and isinstance(data, list) and len(data) == 24
    for rec in data:
        assert set(rec) == {"image_file", "text"}
        assert not rec["image_file"].startswith("/")
        im = Image.open(p1.parent / rec["image_file"])
        assert im.size == (64, 64)
    assert p1.read_bytes() == p2.read_bytes()
    assert all((p1.parent / r["image_file"]).read_bytes() == (p2.parent / r["image_file"]).read_bytes()
               for r in data)
    assert p1.read_bytes() != p3.read_bytes()
    # the stored truth matches what the parser reads from the files
    truths = json.loads((p1.parent / "samples.json").read_text())
    for t in truths:
        assert parse(Image.open(p1.parent / t["image_file"])) == {k: t[k] for k in ("background", "colour",
                                                                                     "shape")}


def test_parser_exact_on_clean_images():
    smp = world.samples(500, world.EVAL_SEED)
    wrong = [s for s in smp if parse(world.draw(s)) != truth(s)]
    assert not wrong, wrong[:5]


def test_parser_robust_to_blur_and_noise():
    smp = world.samples(500, world.EVAL_SEED + 1)
    rng = np.random.default_rng(0)
    right = 0
    for s in smp:
        im = world.draw(s).filter(ImageFilter.GaussianBlur(1.0))
        a = np.asarray(im, dtype=np.float32) + rng.normal(0, 10, (64, 64, 3))
        right += parse(np.clip(a, 0, 255).astype(np.uint8)) == truth(s)
    assert right / len(smp) >= 0.95


def test_parser_inputs_and_empty_image():
    s = world.Sample("white", "blue", "triangle", 30, 10, 20)
    a = np.asarray(world.draw(s)).astype(np.float32) / 255.0  # float in [0, 1]
    assert parse(a) == truth(s)
    blank = Image.new("RGB", (64, 64), world.PALETTE["green"])
    assert parse(blank) == {"background": "green", "colour": None, "shape": None}
    with pytest.raises(ValueError):
        parse(np.zeros((64, 64)))


def test_layout_reads_the_shapes_box_from_the_pixels():
    """world_parse.layout: the centre and side of the shape's box, which no caption names (the report's size and
    place fidelity). Exact on clean circles and squares, within a pixel on triangles (their drawn rows round), two
    or three under blur and noise, None without a shape."""
    rng = np.random.default_rng(1)
    for s in world.samples(200, world.EVAL_SEED + 2):
        want = (s.x + (s.size - 1) / 2, s.y + (s.size - 1) / 2, s.size)
        got = layout(world.draw(s))
        off = np.abs(np.array([got["x"], got["y"], got["size"]]) - want).max()
        assert off == 0 if s.shape != "triangle" else off <= 1, s
        im = world.draw(s).filter(ImageFilter.GaussianBlur(1.0))
        a = np.clip(np.asarray(im, dtype=np.float32) + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
        got = layout(a)
        assert abs(got["x"] - want[0]) <= 2 and abs(got["y"] - want[1]) <= 2 and abs(got["size"] - s.size) <= 3, s
    assert layout(Image.new("RGB", (64, 64), world.PALETTE["green"])) is None


def test_layout_fidelity_follows_the_prompts_size_and_place():
    """judge.layout_fidelity: generations that copy the prompt's box score r 1 and zero errors; ones that keep one
    size and place whatever the prompt score r 0 and the distance; a blank generation counts as not found."""
    prompts = [world.Sample("white", "red", "square", size, x, 5) for size, x in ((20, 0), (30, 10), (40, 20))]
    images = [world.draw(s) for s in prompts]
    same = layout_fidelity(images, [[im, im] for im in images])
    assert same["size_r"] == pytest.approx(1.0) and same["size_error"] == 0 and same["centre_error"] == 0
    fixed = world.draw(world.Sample("white", "red", "square", 30, 30, 30))
    blank = Image.new("RGB", (64, 64), world.PALETTE["white"])
    other = layout_fidelity(images, [[fixed, blank] for _ in images])
    assert other["size_r"] == 0.0 and other["size_error"] == 10 and other["found"] == 0.5 and other["n"] == 6
    assert other["centre_error"] == pytest.approx(np.hypot(30 + 14.5 - (10 + 14.5), 30 - 5))


def test_caption_keep_probability():
    s = world.Sample("black", "red", "circle", 20, 3, 4)
    for keep, lo, hi in ((0.0, 0.0, 0.0), (0.25, 0.2, 0.3), (0.75, 0.7, 0.8), (1.0, 1.0, 1.0)):
        rng = random.Random(1)
        texts = [world.caption(s, rng, partial=True, keep=keep) for _ in range(2000)]
        named = sum(v is not None for t in texts for v in world.caption_attributes(t).values()) / (3 * len(texts))
        assert lo <= named <= hi, (keep, named)
    # the stream advances the same whatever keep is: the next draw after one caption matches
    a, b = random.Random(5), random.Random(5)
    world.caption(s, a, partial=True, keep=0.1), world.caption(s, b, partial=True, keep=0.9)
    assert a.random() == b.random()
    with pytest.raises(ValueError):
        world.caption(s, random.Random(0), partial=True, keep=1.5)


def test_contradicting_prompt_images_and_image_only_items(tmp_path):
    """prompt_swap: a prompt image differing in exactly what the caption names (so the text must win there);
    image_only: empty captions, own image. Neither shifts the images or the other items' captions."""
    paper = json.loads(world.write_dataset(tmp_path / "paper", 300, progress=False).read_text())
    contra_path = world.write_dataset(tmp_path / "contra", 300, progress=False, prompt_swap=1.0, image_only=0.25)
    contra = json.loads(contra_path.read_text())
    truth = json.loads((tmp_path / "contra" / "samples.json").read_text())
    assert [r["image_file"] for r in paper] == [r["image_file"] for r in contra]
    for r in paper[:20]:
        a, b = (tmp_path / d / r["image_file"] for d in ("paper", "contra"))
        assert a.read_bytes() == b.read_bytes()
    empty = [c for c in contra if c["text"] == ""]
    assert 0.25 <= len(empty) / len(contra) <= 0.45  # 1/4 drawn + the partial captions that name nothing
    assert all("prompt_image_file" not in c for c in empty)
    assert all(c["text"] in ("", p["text"]) for p, c in zip(paper, contra))
    for c, t in zip(contra, truth):
        named = world.caption_attributes(c["text"])
        assert ("prompt_image_file" in c) == any(named.values())  # swap 1: every item that names something
        if "prompt_image_file" in c:
            prompt = t["prompt"]
            assert all((prompt[k] != t[k]) == (named[k] is not None) for k in ("background", "colour", "shape"))
            assert prompt["background"] != prompt["colour"]
            assert parse(Image.open(tmp_path / "contra" / c["prompt_image_file"])) == {
                k: prompt[k] for k in ("background", "colour", "shape")}
