"""ipadapter.generation.controls: combine modes, weights, schedules, block scales, masks, embeddings files, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from ipadapter.bases import unet_layers
from ipadapter.core.encoders import Features
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation import controls
from ipadapter.generation.controls import IPAdapterNote
from ipadapter.testing import tiny_unet


@pytest.fixture(scope="module")
def layers():
    return {shape: unet_layers(tiny_unet(shape, 32 if shape == "sd15" else 64)) for shape in ("sd15", "sdxl")}


def names(layers, scales, value=1.0):
    by_index = {layer.index: layer.name for layer in layers}
    return sorted(by_index[i].rsplit(".transformer_blocks", 1)[0] for i, s in scales.items() if s == value)


# ------------------------------------------------------------------------------------------------- combine
def test_concat_keeps_every_image():
    x = torch.randn(3, 5)
    assert controls.combine(x, [1, 2, 3], "concat") is x


def test_average_and_norm_average():
    x = torch.randn(3, 4, 6)
    w = [1.0, 2.0, 0.5]
    e = torch.stack([wi * xi for wi, xi in zip(w, x)])
    expected_avg = e.sum(0) / 3
    expected_norm = (e / e.norm(dim=0, keepdim=True)).mean(0)  # ComfyUI's norm average: norm across the images
    assert torch.allclose(controls.combine(x, w, "average")[0], expected_avg, atol=1e-6)
    assert torch.allclose(controls.combine(x, w, "norm-average")[0], expected_norm, atol=1e-6)
    assert controls.combine(x, w, "average").shape == (1, 4, 6)
    assert torch.allclose(controls.combine(x, None, "average"), x.mean(0, keepdim=True), atol=1e-6)


def test_norm_average_ignores_a_common_scale():
    x = torch.randn(2, 8)
    assert torch.allclose(controls.combine(x, [3.0, 3.0], "norm-average"), controls.combine(x, None, "norm-average"))


@pytest.mark.parametrize("weights, count, fragment", [
    ([1.0], 2, "1 weights value(s) for 2 image(s)"),
    ([1.0, -1.0], 2, "finite number >= 0"),
    ([1.0, math.nan], 2, "finite number >= 0"),
    ([0.0, 0.0], 2, "all weights are 0"),
])
def test_bad_weights(weights, count, fragment):
    with pytest.raises(IPAdapterError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        controls.check_weights(weights, count)


def test_unknown_combine_mode():
    with pytest.raises(IPAdapterError, match="concat, add, subtract, average, norm-average, max, min"):
        controls.check_combine("blend")
    assert controls.check_combine("norm average") == "norm-average"  # ComfyUI's spelling


# ------------------------------------------------------------------------------------------------ schedule
def test_full_window_constant_is_no_schedule():
    assert controls.schedule() is None


def test_window_and_curves():
    s = controls.schedule(0.25, 0.75)
    assert [s(p) for p in (0.0, 0.24, 0.25, 0.5, 0.75, 0.76, 1.0)] == [0, 0, 1, 1, 1, 0, 0]
    lin = controls.schedule(0.0, 1.0, "linear")
    ease_in = controls.schedule(0.0, 1.0, "ease-in")
    ease_out = controls.schedule(0.0, 1.0, "ease-out")
    for curve in (lin, ease_in, ease_out):
        assert curve(0.0) == pytest.approx(1.0) and curve(1.0) == pytest.approx(0.0)
    assert lin(0.5) == pytest.approx(0.5)
    assert ease_in(0.5) == pytest.approx(0.75)  # slow at first
    assert ease_out(0.5) == pytest.approx(0.25)  # fast at first
    half = controls.schedule(0.5, 1.0, "linear")
    assert half(0.4) == 0 and half(0.75) == pytest.approx(0.5)


@pytest.mark.parametrize("start, end, curve, fragment", [
    (0.6, 0.4, "constant", "start 0.6 must be below end 0.4"),
    (0.5, 0.5, "constant", "must be below"),
    (-0.1, 1.0, "constant", "start -0.1"),
    (0.0, 1.5, "constant", "end 1.5"),
    (0.0, 1.0, "cosine", "curve 'cosine'"),
])
def test_bad_schedule(start, end, curve, fragment):
    with pytest.raises(IPAdapterError, match=fragment):
        controls.schedule(start, end, curve)


# -------------------------------------------------------------------------------------------- block scales
def test_presets_sdxl_are_instantstyle_layers(layers):
    sdxl = layers["sdxl"]
    assert set(names(sdxl, controls.block_scales(sdxl, "style"))) == {"up_blocks.0.attentions.1"}
    assert set(names(sdxl, controls.block_scales(sdxl, "composition"))) == {"down_blocks.2.attentions.1"}
    both = controls.block_scales(sdxl, "style,composition=0.5")
    assert set(names(sdxl, both)) == {"up_blocks.0.attentions.1"}
    assert set(names(sdxl, both, 0.5)) == {"down_blocks.2.attentions.1"}
    # every cross-attention layer has an entry; the others are 0
    cross = [layer for layer in sdxl if layer.cross_dim is not None]
    assert set(both) == {layer.index for layer in cross}
    assert sum(1 for s in both.values() if s == 0) == len(cross) - 20  # two 10-layer attentions named


def test_presets_sd15_are_whole_stages(layers):
    sd15 = layers["sd15"]
    style = names(sd15, controls.block_scales(sd15, "style"))
    composition = names(sd15, controls.block_scales(sd15, "composition"))
    assert style == [f"up_blocks.1.attentions.{j}" for j in range(3)]
    assert composition == [f"down_blocks.2.attentions.{j}" for j in range(2)]


def test_most_specific_entry_wins_and_star_is_the_default(layers):
    sd15 = layers["sd15"]
    scales = controls.block_scales(sd15, "*=0.2,down_blocks.2=0.5,down_blocks.2.attentions.1=1,mid=0")
    by_name = {layer.name.rsplit(".transformer_blocks", 1)[0]: scales[layer.index]
               for layer in sd15 if layer.cross_dim is not None}
    assert by_name["down_blocks.2.attentions.1"] == 1
    assert by_name["down_blocks.2.attentions.0"] == 0.5
    assert by_name["mid_block.attentions.0"] == 0
    assert by_name["up_blocks.3.attentions.2"] == 0.2


@pytest.mark.parametrize("shape, spec", [
    ("sdxl", {"up": {"block_0": [0.0, 1.0, 0.0]}}),
    ("sdxl", {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}),
    ("sdxl", {"down": 0.5, "mid": 0.3, "up": {"block_1": 0.7}}),
    ("sd15", {"up": {"block_1": [1.0, 0.5, 0.0]}, "mid": [0.25]}),
])
def test_diffusers_nested_dicts_mean_what_diffusers_means(layers, shape, spec):
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales  # the oracle (tests only)

    unet = tiny_unet(shape, 32 if shape == "sd15" else 64)
    expanded = _maybe_expand_lora_scales(unet, [spec], default_scale=0.0)[0]
    ours = controls.block_scales(layers[shape], spec)
    for layer in layers[shape]:
        if layer.cross_dim is None:
            continue
        want = next(s for k, s in expanded.items() if layer.name.startswith(k))
        assert ours[layer.index] == pytest.approx(want), layer.name


def test_unknown_block_lists_the_known_ones(layers):
    with pytest.raises(IPAdapterError, match=r"^blocks 'up_blocks\.0'.*up_blocks\.1\.attentions\.0"):
        controls.block_scales(layers["sd15"], "up_blocks.0")  # SD 1.5's up_blocks.0 has no attention


@pytest.mark.parametrize("spec, fragment", [("style=abc", "not a number"), (" , ", "empty"),
                                            ("style=inf", "finite"), ("sparkle", "'sparkle'")])
def test_bad_block_specs(layers, spec, fragment):
    with pytest.raises(IPAdapterError, match=fragment):
        controls.block_scales(layers["sd15"], spec)


# ------------------------------------------------------------------------------------------------- masks
def test_grayscale_mask_keeps_its_levels(tmp_path):
    img = Image.new("L", (8, 4), 0)
    img.paste(128, (0, 0, 4, 4))
    path = tmp_path / "m.png"
    img.save(path)
    mask = controls.load_mask(path)
    assert mask.shape == (4, 8)
    assert mask[0, 0].item() == pytest.approx(128 / 255) and mask[0, 7].item() == 0


def test_mask_of_another_size_is_resized_with_a_note(tmp_path):
    path = tmp_path / "m.png"
    Image.new("RGB", (16, 16), (255, 255, 255)).save(path)
    with pytest.warns(IPAdapterNote, match=r"m\.png: 16x16 resized to 32x24"):
        mask = controls.load_mask(path, (32, 24), "--image-mask")
    assert mask.shape == (24, 32) and torch.all(mask == 1)


def test_mask_tensor_checks():
    assert controls.load_mask(torch.full((1, 4, 4), 0.5)).shape == (4, 4)
    with pytest.raises(IPAdapterError, match=r"\[0, 1\]"):
        controls.load_mask(torch.full((4, 4), 2.0))


def test_fit_image_notes_only_when_resizing(recwarn):
    img = Image.new("RGB", (32, 32))
    assert controls.fit_image(img, (32, 32), "--init-image x.png") is img
    assert not [w for w in recwarn if issubclass(w.category, IPAdapterNote)]
    with pytest.warns(IPAdapterNote, match="--init-image x.png: 32x32 resized to 64x48"):
        assert controls.fit_image(img, (64, 48), "--init-image x.png").size == (64, 48)


# --------------------------------------------------------------------------------------- embeddings files
def test_embeds_round_trip(tmp_path):
    cond, uncond = Features(image_embeds=torch.randn(2, 6)), Features(image_embeds=torch.zeros(2, 6))
    path = controls.save_embeds(tmp_path / "e.safetensors", cond, uncond, {"images": "a.png, b.png"})
    c, u, meta = controls.load_embeds(path)
    assert torch.equal(c.image_embeds, cond.image_embeds) and torch.equal(u.image_embeds, uncond.image_embeds)
    assert c.penultimate is None and meta["images"] == "a.png, b.png"


def test_embeds_bad_files(tmp_path):
    with pytest.raises(IPAdapterError, match="ending in .safetensors"):
        controls.save_embeds(tmp_path / "e.pt", Features(image_embeds=torch.ones(1, 2)),
                             Features(image_embeds=torch.ones(1, 2)))
    with pytest.raises(IPAdapterError, match="no such embeddings file"):
        controls.load_embeds(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(IPAdapterError, match="not a readable embeddings file"):
        controls.load_embeds(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.ones(2)}, str(other))
    with pytest.raises(IPAdapterError, match="not an embeddings file"):
        controls.load_embeds(other)
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------- seeds
def test_seeds_per_image():
    assert controls.seeds_for(5, 3) == [5, 6, 7]
    assert controls.seeds_for([3, 9], 2) == [3, 9]
    assert controls.seeds_for(None, 2) is None
    with pytest.raises(IPAdapterError, match="3 seed"):
        controls.seeds_for([1, 2, 3], 2)
