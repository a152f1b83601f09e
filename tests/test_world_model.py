"""The embedded world model's claims, measured on its shipped weights with the world's pixel judge (world_parse):
a few held-out prompts each, at the report's settings (25 DDIM steps, guidance 5). Every threshold is also shown to
fail for a broken adapter: a zeroed copy of the default one (it generates what the text alone gives) and, for
image + text, the paper's recipe (ip-adapter_global.safetensors, which keeps the prompt image's background).
The full measurement is benchmarks/world_report.py's (README, "The embedded world model")."""

from __future__ import annotations

import pytest
import torch

import ipadapter
from ipadapter.core.checkpoint import read_checkpoint, write_checkpoint
from ipadapter.core.errors import IPAdapterError
from ipadapter.evaluation.evaluate import EvalSettings, evaluate
from ipadapter.world.judge import FAMILIES, WorldJudge, contradiction_pairs, layout_fidelity, world_pairs

pytestmark = pytest.mark.slow  # ~30 generations per adapter on the world model: about 10-20 s each on 2 cores

PROMPTS = 8  # per measurement
IMAGE_ONLY_FLOOR = 7 / 8  # each attribute (these prompts: 8/8 each); zeroed: 1, 1, 2 of 8 (the text alone)
IMAGE_TEXT_FLOOR = 6 / 8  # "all three as wanted" in each family at the README's scale (these prompts: 8, 7, 8
#                           of 8; the report: 97, 89, 98%, the target 9/10 missed by two images in the shape
#                           colour family); zeroed: 1, 0, 0, the paper's recipe: 0, 6, 5 of 8
IMAGE_TEXT_SCALE = 0.8  # benchmarks/world_report.py IMAGE_TEXT_SCALE
SETTINGS = dict(samples=1, steps=25, guidance=5.0, batch_size=PROMPTS)


def _member(name: str):
    try:
        model, default = ipadapter.embedded_model(name)
    except IPAdapterError:
        pytest.skip(f"the embedded model {name} is not installed")
    return ipadapter.load_pipeline(name, dtype=torch.float32), model, default


@pytest.fixture(scope="module")
def world():
    return _member("world")


@pytest.fixture(scope="module")
def world_sd3():
    return _member("world-sd3")


def zeroed_copy(adapter, path):
    """The adapter file with every tensor zero (same kind and shapes): what the text alone gives."""
    cfg, tensors = read_checkpoint(adapter)
    write_checkpoint(path, cfg, {k: torch.zeros_like(v) for k, v in tensors.items()})
    return path


@pytest.fixture(scope="module")
def zeroed(world, tmp_path_factory):
    return zeroed_copy(world[2], tmp_path_factory.mktemp("zeroed") / "zeroed.safetensors")


def image_only(pipe, adapter) -> dict:
    ip = ipadapter.load(pipe, adapter)
    try:
        return evaluate(ip, world_pairs(PROMPTS), None, EvalSettings(scale=1.0, **SETTINGS), judge=WorldJudge()).metrics
    finally:
        ip.detach()


def image_text(pipe, adapter) -> dict[str, float]:
    ip = ipadapter.load(pipe, adapter)
    try:
        return {f: evaluate(ip, contradiction_pairs(f, PROMPTS), None, EvalSettings(scale=IMAGE_TEXT_SCALE, **SETTINGS),
                            judge=WorldJudge()).metrics["all"] for f in FAMILIES}
    finally:
        ip.detach()


def meets_image_only(m: dict) -> bool:
    return all(m[k] >= IMAGE_ONLY_FLOOR for k in ("background", "colour", "shape"))


def meets_image_text(m: dict) -> bool:
    return all(v >= IMAGE_TEXT_FLOOR for v in m.values())


def test_the_default_adapter_reproduces_held_out_prompt_images(world):
    pipe, _, default = world
    m = image_only(pipe, default)
    assert meets_image_only(m), m


def test_the_default_adapter_lets_the_text_decide_what_it_names_in_every_family(world):
    pipe, _, default = world
    m = image_text(pipe, default)
    assert meets_image_text(m), m


def test_the_thresholds_fail_for_a_zeroed_adapter_and_the_papers_recipe(world, zeroed):
    pipe, model, _ = world
    assert not meets_image_only(image_only(pipe, zeroed))
    assert not meets_image_text(image_text(pipe, zeroed))
    assert not meets_image_text(image_text(pipe, model / "ip-adapter_global.safetensors"))


SIZE_PROMPTS = 32  # the size correlation needs more prompts than an accuracy
SIZE_R_FLOOR = 0.6  # these prompts: plus 0.86, global 0.18 (the default -0.08), a zeroed plus -0.02; the report's
#                     256 images: plus 0.67, global 0.10


def size_r(pipe, adapter) -> float:
    pairs = world_pairs(SIZE_PROMPTS)
    ip = ipadapter.load(pipe, adapter)
    try:
        r = evaluate(ip, pairs, None, EvalSettings(scale=1.0, **{**SETTINGS, "batch_size": SIZE_PROMPTS}),
                     keep_images=True)
    finally:
        ip.detach()
    return layout_fidelity([p.image for p in pairs], r.images)["size_r"]


def test_the_plus_adapter_keeps_the_prompt_images_size_which_global_drops(world, tmp_path):
    """The fine-grained kind's point (the paper's "plus"): it reads patch features, so it keeps detail the global
    embedding drops; here the shape's size, which no caption names. A zeroed plus adapter fails the floor."""
    pipe, model, _ = world
    plus = model / "ip-adapter_plus.safetensors"
    zeroed = zeroed_copy(plus, tmp_path / "zeroed_plus.safetensors")
    got = {name: size_r(pipe, f) for name, f in (("plus", plus), ("global", model / "ip-adapter_global.safetensors"),
                                                  ("zeroed", zeroed))}
    assert got["plus"] >= SIZE_R_FLOOR > max(got["global"], got["zeroed"]), got


def test_the_default_adapter_is_the_build_recipes_default():
    from ipadapter.generation.pipeline import EMBEDDED_ADAPTER
    from ipadapter.world.family import ADAPTERS, DEFAULT_ADAPTER

    assert EMBEDDED_ADAPTER == DEFAULT_ADAPTER and DEFAULT_ADAPTER in ADAPTERS


def test_the_transformer_members_base_follows_held_out_captions(world_sd3):
    """The SD3.5-shaped member (text only, the caption as the prompt, the member's 16 zero T5 rows): each attribute
    >= 7/8 (these prompts: 8/8 each); the same pipeline with an empty prompt (the text does nothing) fails it."""
    pipe, _, _ = world_sd3
    target = pipe
    caption = evaluate(target, world_pairs(PROMPTS), None, EvalSettings(text_only=True, prompt_from_caption=True,
                                                                         **SETTINGS), judge=WorldJudge()).metrics
    assert meets_image_only(caption), caption
    empty = evaluate(target, world_pairs(PROMPTS), None, EvalSettings(text_only=True, **SETTINGS),
                     judge=WorldJudge()).metrics
    assert not meets_image_only(empty), empty


SD3_IMAGE_ONLY_FLOOR = 4 / 8  # background and shape colour each (see the README: the member's adapters carry the
#                               prompt's colours, not its shape yet); these prompts: 6/8 and 5/8 (shape 1/8);
#                               zeroed: 2/8 and 3/8


def test_the_transformer_members_adapter_carries_the_prompt_images_colours(world_sd3, tmp_path):
    """Image-only on the SD3.5-shaped member with its default adapter: background and shape colour each
    >= SD3_IMAGE_ONLY_FLOOR; a zeroed copy (it generates what the empty text gives) fails it."""
    pipe, _, default = world_sd3
    cfg, tensors = read_checkpoint(default)
    zeroed = write_checkpoint(tmp_path / "zeroed.safetensors", cfg,
                              {k: torch.zeros_like(v) for k, v in tensors.items()})

    def meets(m: dict) -> bool:
        return m["background"] >= SD3_IMAGE_ONLY_FLOOR and m["colour"] >= SD3_IMAGE_ONLY_FLOOR

    m = image_only(pipe, default)
    assert meets(m), m
    z = image_only(pipe, zeroed)
    assert not meets(z), z
