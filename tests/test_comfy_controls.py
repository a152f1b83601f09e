"""ComfyUI_IPAdapter_plus's controls: each against ComfyUI's definition written out here by hand.

The weight-type tables below are transcribed from ComfyUI_IPAdapter_plus's IPAdapterPlus.py (ipadapter_execute:
{transformer_index: weight} dicts) and CrossAttentionPatch.py (the ramps, the precise types' branch swap), in
ComfyUI's own form, independently of the string tables in ipadapter.generation.weight_types.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from conftest import make_adapter, random_image, unet_inputs
from ipadapter.bases import unet_layers
from ipadapter.bases.unet import IPAttnProcessor
from ipadapter.core.attention import AdapterState, IPLayer, Runtime
from ipadapter.core.encoders import ImageEncoder, Prep, enhancer_pieces, merge_pieces, tile_reference
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation import controls, weight_types
from ipadapter.generation.pipeline import ImagePrompt, IPAdapter
from ipadapter.testing import tiny_unet
from test_cli import files  # noqa: F401 - the CLI fixture (a saved tiny model and adapters)

# ComfyUI's transformer_index order: the attention blocks as the UNet runs them (input, middle, output)
ORDER = {
    "sd1": [f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)] + ["mid_block.attentions.0"]
    + [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in range(3)],
    "sdxl": [f"down_blocks.{i}.attentions.{j}" for i in (1, 2) for j in range(2)] + ["mid_block.attentions.0"]
    + [f"up_blocks.{i}.attentions.{j}" for i in (0, 1) for j in range(3)],
}
W, C, B = 0.7, 0.4, 1.3  # weight, weight_composition, style_boost / composition_boost


def comfy_table(weight_type: str, sdxl: bool) -> dict[int, float]:
    """ComfyUI's dict for a table weight type (IPAdapterPlus.py, ipadapter_execute), with W, C, B."""
    w, wc = W, C
    if weight_type == "style-transfer":
        return {6: w} if sdxl else {i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
    if weight_type == "composition":
        return {3: w} if sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong-style-transfer":
        return {i: w for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)} if sdxl else \
            {i: w for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}
    if weight_type == "style-and-composition":
        return {3: wc, 6: w} if sdxl else {**{i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
                                           4: wc * 0.25, 5: wc}
    if weight_type == "strong-style-and-composition":
        return {**{i: w for i in range(11)}, 3: wc} if sdxl else {**{i: w for i in range(16)}, 4: wc, 5: wc}
    if weight_type == "style-transfer-precise":
        wc = B
        return {3: wc, 6: w} if sdxl else {**{i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
                                           4: wc * 0.25, 5: wc}
    if weight_type == "composition-precise":
        wc, w = W, B
        if sdxl:
            return {**{i: w * 0.1 for i in range(11)}, 3: wc, 6: w}
        return {0: w, 1: w, 2: w, 3: w, 4: wc * 0.25, 5: wc, 6: w * .1, 7: w * .1, 8: w * .1,
                **{i: w for i in range(9, 16)}}
    raise KeyError(weight_type)


def comfy_swapped(weight_type: str, t: int, sdxl: bool) -> bool:
    """CrossAttentionPatch.py: where the precise types swap cond and uncond (layers = 11 or 16)."""
    comp = (t == 3) if sdxl else (t in (4, 5))
    return (weight_type == "style-transfer-precise" and comp) or (weight_type == "composition-precise" and not comp)


def comfy_ramp(weight_type: str, t: int, part: str, layers: int) -> float:
    """CrossAttentionPatch.py's ramps (weight 1)."""
    if weight_type == "ease-in":
        return 0.05 + 0.95 * (1 - t / layers)
    if weight_type == "ease-out":
        return 0.05 + 0.95 * (t / layers)
    if weight_type == "ease-in-out":
        return 0.05 + 0.95 * (1 - abs(t - (layers / 2)) / (layers / 2))
    if weight_type == "reverse-in-out":
        return 0.05 + 0.95 * (abs(t - (layers / 2)) / (layers / 2))
    weak = {"weak-input": ("input",), "weak-middle": ("middle",), "weak-output": ("output",),
            "strong-middle": ("input", "output")}.get(weight_type, ())
    return 0.2 if part in weak else 1.0


@pytest.fixture(scope="module")
def layers():
    return {"sd1": unet_layers(tiny_unet("sd15", 32)), "sdxl": unet_layers(tiny_unet("sdxl", 64))}


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3] if parts[0] == "mid_block" else parts[:4])


# ---------------------------------------------------------------------------------------------- weight types
@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("weight_type", list(weight_types.TABLES))
def test_table_weight_types_match_comfyui(layers, layout, weight_type):
    sdxl = layout == "sdxl"
    plan = weight_types.resolve(layers[layout], weight_type.replace("-", " "), W, C, B)  # ComfyUI's spelling
    expected = comfy_table(weight_type, sdxl)
    cross = [la for la in layers[layout] if la.cross_dim is not None]
    for layer in cross:
        t = ORDER[layout].index(_block_of(layer.name))
        assert plan.weights[layer.index] == pytest.approx(expected.get(t, 0.0)), (layer.name, t)
        assert (layer.index in plan.swap) == (comfy_swapped(weight_type, t, sdxl) and t in expected), layer.name
    assert len(cross) == (16 if layout == "sd1" else 70)


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("weight_type", weight_types.RAMPS)
def test_ramps_match_comfyui(layers, layout, weight_type):
    plan = weight_types.resolve(layers[layout], weight_type, 0.5)
    count = len(ORDER[layout])
    for layer in (la for la in layers[layout] if la.cross_dim is not None):
        t = ORDER[layout].index(_block_of(layer.name))
        part = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}[layer.name.split(".")[0]]
        assert plan.weights[layer.index] == pytest.approx(0.5 * comfy_ramp(weight_type, t, part, count))
    assert not plan.swap


def test_style_and_composition_blocks(layers):
    sd1 = weight_types.resolve(layers["sd1"], "style-and-composition", W, C)
    names = {la.index: _block_of(la.name) for la in layers["sd1"]}
    assert sorted({names[i] for i in sd1.composition}) == ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1"]
    xl = weight_types.resolve(layers["sdxl"], "style and composition", W, C)
    names = {la.index: _block_of(la.name) for la in layers["sdxl"]}
    assert {names[i] for i in xl.composition} == {"down_blocks.2.attentions.1"}


def test_table_types_refuse_other_layouts():
    world_like = tiny_unet("sd15", 32)
    layers = [la for la in unet_layers(world_like) if not la.name.startswith("down_blocks.0")]
    with pytest.raises(IPAdapterError, match="SD 1.x .16 attention blocks. and SDXL .11.*use a ramp"):
        weight_types.resolve(layers, "style-transfer")
    assert weight_types.resolve(layers, "ease-in").weights  # ramps fit any block list
    with pytest.raises(IPAdapterError, match="unknown weight type"):
        weight_types.resolve(layers, "styles")


# -------------------------------------------------------------------------------------------- combine modes
def test_combine_modes_match_comfyui():
    x = torch.randn(3, 4, 6)
    w = [1.0, 2.0, 0.5]
    e = torch.stack([wi * xi for wi, xi in zip(w, x)]).double()
    expected = {
        "add": e.sum(0),
        "subtract": e[0] - e[1:].mean(0),
        "average": e.mean(0),
        "norm-average": (e / torch.norm(e, dim=0, keepdim=True)).mean(0),  # ComfyUI: the norm over dim 0
        "max": e.max(0).values,
        "min": e.min(0).values,
    }
    for mode, want in expected.items():
        got = controls.combine(x, w, mode.replace("-", " "))
        assert got.shape == (1, 4, 6)
        assert torch.allclose(got[0].double(), want, atol=1e-6), mode
    assert controls.combine(x, w, "concat") is x
    with pytest.raises(IPAdapterError, match="at least two images"):
        controls.combine(x[:1], None, "subtract")


# ------------------------------------------------------------------------------------------- embeds scaling
WIDTH, CROSS, HEADS = 32, 24, 2


def _sdpa(q, k, v):
    d = WIDTH // HEADS

    def split(t):
        return t.reshape(t.shape[0], -1, HEADS, d).transpose(1, 2)

    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (a @ split(v)).transpose(1, 2).reshape(q.shape[0], -1, WIDTH)


def _lin(x, layer):
    return x @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)


@pytest.mark.parametrize("mode", ["v", "kv", "kv-penalty", "k-mean-v-penalty"])
def test_embeds_scaling_matches_comfyui(mode):
    torch.manual_seed(0)
    attn = Attention(query_dim=WIDTH, cross_attention_dim=CROSS, heads=HEADS, dim_head=WIDTH // HEADS,
                     out_bias=True).eval()
    layer = IPLayer(WIDTH, CROSS)
    with torch.no_grad():
        for p in [*attn.parameters(), *layer.parameters()]:
            p.copy_(torch.randn_like(p) * 0.3)
    state = AdapterState({1: layer})
    proc = IPAttnProcessor(1, Runtime())
    proc.add(layer, state)
    attn.set_processor(proc)
    x, text = torch.randn(2, 10, WIDTH), torch.randn(2, 7, CROSS)
    uncond, cond = torch.randn(1, 2, 3, CROSS), torch.randn(1, 2, 3, CROSS)
    state.set_tokens(cond, uncond)
    state.scale, state.kv_scaling = 0.6, mode
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=text).double()
        xd, td = x.double(), text.double()
        q = _lin(xd, attn.to_q)
        z = _sdpa(q, _lin(td, attn.to_k), _lin(td, attn.to_v))
        tokens = torch.cat([uncond, cond]).flatten(1, 2).double()  # ComfyUI: all images' tokens in one attention
        k, v = tokens @ layer.to_k_ip.weight.double().T, tokens @ layer.to_v_ip.weight.double().T
        w = 0.6
        if mode == "v":
            ip = w * _sdpa(q, k, v)
        elif mode == "kv":
            ip = _sdpa(q, k * w, v * w)
        elif mode == "kv-penalty":
            ip = _sdpa(q, k * w * WIDTH / 1280, v * w * WIDTH / 1280)
        else:
            wp = w * WIDTH / 1280
            mean = v.mean(1, keepdim=True)
            ip = _sdpa(q, k * wp, (v - mean) + mean * wp)
        want = _lin(z + ip, attn.to_out[0])
    assert torch.allclose(got, want, atol=1e-5)


def test_precise_swap_gives_the_image_to_the_unconditional_rows():
    layer = IPLayer(WIDTH, CROSS)
    state = AdapterState({1: layer})
    cond, uncond = torch.randn(1, 1, 3, CROSS), torch.zeros(1, 1, 3, CROSS)
    state.set_tokens(cond, uncond)
    k_cond = state.kv[1][0][1:].clone()
    state.swap_branches([1])
    k, v = state.kv[1]
    assert torch.equal(k[:1], k_cond) and not k[1:].any() and not v[1:].any()


# ------------------------------------------------------------------------------------------ tiles, enhancer
def _lanczos(image, size):
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


@pytest.mark.parametrize("size, resized, starts", [
    ((300, 280), (512, 512), [(0, 0), (256, 0), (0, 256), (256, 256)]),  # near square: cropped, 2 x 2 tiles
    ((500, 256), (500, 256), [(0, 0), (244, 0)]),  # wide: 2 tiles overlapping by 12 px
    ((256, 768), (256, 768), [(0, 0), (0, 256), (0, 512)]),  # tall: 3 tiles
])
def test_tiles_match_a_hand_cut_reference(size, resized, starts):
    image = random_image(3, size)
    tiles, masks = tile_reference(image)
    w, h = size
    ref = image if not 0.75 < h / w < 1.33 else image.crop(((w - min(w, h)) // 2, (h - min(w, h)) // 2,
                                                           (w - min(w, h)) // 2 + min(w, h),
                                                           (h - min(w, h)) // 2 + min(w, h)))
    ref = _lanczos(ref, resized)
    assert len(tiles) == len(starts) and masks.shape == (len(starts), resized[1], resized[0])
    for tile, mask, (x0, y0) in zip(tiles, masks, starts):
        assert np.array_equal(np.asarray(tile), ref[y0:y0 + 256, x0:x0 + 256])
        want = torch.zeros(resized[1], resized[0])
        want[y0:y0 + 256, x0:x0 + 256] = 1
        assert torch.allclose(mask, want, atol=1e-6)


def test_very_long_references_keep_four_tiles():
    tiles, masks = tile_reference(random_image(4, (1000, 100)))
    assert len(tiles) == 4 and masks.shape == (4, 256, 1024)


def test_enhancer_merge_is_the_pooled_grid():
    tiles, g, width = 2, 2, 5
    features = torch.randn(tiles * tiles, 1 + g * g, width)
    merged = merge_pieces(features, tiles)
    # each pooled patch of the 4 x 4 grid averages one piece's 2 x 2 patches (piece (p, q) sits at (p, q))
    want = torch.stack([features[i, 1:].mean(0) for i in range(4)])
    assert torch.allclose(merged[0, 0], features[:, 0].mean(0), atol=1e-6)
    assert torch.allclose(merged[0, 1:], want, atol=1e-6)
    emb = torch.randn(4, 7)
    assert torch.allclose(merge_pieces(emb, 2), emb.mean(0, keepdim=True))


def test_enhancer_mixes_whole_and_pieces(sd15_pipe):
    enc = ImageEncoder(sd15_pipe.image_encoder, sd15_pipe.feature_extractor)
    cfg = SimpleNamespace(kind="plus", uses_patch_features=True, encoder_feature="penultimate",
                          time_conditioned=False)
    image = random_image(5, (64, 48))
    got, _ = enc.encode(cfg, [image], enhance_tiles=2, enhance_ratio=0.3)
    whole, _ = enc.encode(cfg, [image])
    pieces, _ = enc.encode(cfg, enhancer_pieces(image, 2))
    assert [p.size for p in enhancer_pieces(image, 2)] == [(32, 24)] * 4
    assert got.penultimate.shape[0] == 2  # one image: the whole (times the ratio) and the merged pieces
    assert torch.allclose(got.penultimate[0], whole.penultimate[0] * 0.3, atol=1e-5)
    assert torch.allclose(got.penultimate[1], merge_pieces(pieces.penultimate, 2)[0], atol=1e-5)
    two, _ = enc.encode(cfg, [image, image], enhance_tiles=2, enhance_ratio=0.3)
    assert torch.allclose(two.penultimate[0], whole.penultimate[0] * 0.3 + merge_pieces(pieces.penultimate, 2)[0]
                          * 0.7, atol=1e-5)


def test_prep_crops_pads_and_sharpens(sd15_pipe):
    enc = ImageEncoder(sd15_pipe.image_encoder, sd15_pipe.feature_extractor)
    image = random_image(6, (60, 30))
    size = enc.model.config.image_size
    proc = enc.processor
    for crop, box in [("left", (0, 0, 30, 30)), ("right", (30, 0, 60, 30)), ("center", (15, 0, 45, 30))]:
        want = proc(images=[image.crop(box).resize((size, size), Image.Resampling.BICUBIC)],
                    return_tensors="pt").pixel_values
        got = enc.pixels([image], Prep(crop, "bicubic"))
        assert torch.allclose(got, want, atol=1e-5), crop
    padded = enc.pixels([image], Prep("pad", "nearest"))
    black = (0 - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    assert torch.allclose(padded[0, :, 0, 0], black.float(), atol=1e-5)  # a black bar at the top
    assert not torch.equal(enc.pixels([image], Prep(sharpen=1.0)), enc.pixels([image], Prep()))
    with pytest.raises(IPAdapterError, match="--crop"):
        Prep("middle")


# ------------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("kind", controls.NOISES)
def test_noise_negatives_are_seeded(kind):
    base = random_image(7, (50, 40))
    a = np.asarray(controls.noise_image(kind, 0.6, 3, seed=1, base=base, size=32))
    b = np.asarray(controls.noise_image(kind, 0.6, 3, seed=1, base=base, size=32))
    c = np.asarray(controls.noise_image(kind, 0.6, 3, seed=2, base=base, size=32))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_fade_noise_is_comfyuis_formula():
    base = random_image(8, (40, 40))
    got = np.asarray(controls.noise_image("fade", 0.25, 0, seed=3, base=base, size=40)).astype(np.float64)
    img = np.asarray(base.resize((40, 40), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    noise = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(3)).permute(1, 2, 0).double().numpy()
    want = np.clip(img * 0.75 + noise * 0.25, 0, 1) * 255
    assert np.abs(got - want).max() <= 0.5 + 1e-6


# ------------------------------------------------------------------------------------------- unfold batch
def test_unfold_batch_gives_item_k_reference_k_alone(sd15_pipe, prompt_images):
    adapter = make_adapter(sd15_pipe.unet, "global", sd15_pipe.image_encoder)
    ip = IPAdapter(sd15_pipe, [adapter], ImageEncoder(sd15_pipe.image_encoder, sd15_pipe.feature_extractor))
    a, b, c = prompt_images
    inputs = unet_inputs(sd15_pipe, batch=4)
    try:
        with torch.no_grad():
            ip.set_images(prompt=ImagePrompt(images=[a, b], unfold_batch=True, encode_batch_size=1))
            ab = sd15_pipe.unet(**inputs).sample
            ip.set_images(prompt=ImagePrompt(images=[a, c], unfold_batch=True))
            ac = sd15_pipe.unet(**inputs).sample
            ip.set_images(prompt=ImagePrompt(images=[a]))  # a alone, for both items
            aa = sd15_pipe.unet(**inputs).sample
    finally:
        ip.detach()
    # UNet rows: [uncond 0, uncond 1, cond 0, cond 1]; swapping reference 1 changes item 1's rows only
    # (equal up to float rounding: the encoder ran on batches of 1 for ab, of 2 for ac)
    assert torch.allclose(ab[[0, 2]], ac[[0, 2]], atol=1e-5)
    assert (ab[[1, 3]] - ac[[1, 3]]).abs().max() > 1e-2
    assert torch.allclose(ab[[0, 2]], aa[[0, 2]], atol=1e-5)  # item 0 is as with reference a alone
    assert (ab[[1, 3]] - aa[[1, 3]]).abs().max() > 1e-2


def test_unfold_batch_needs_one_reference_per_image(sd15_pipe, prompt_images):
    ip = IPAdapter(sd15_pipe, [make_adapter(sd15_pipe.unet, "global", sd15_pipe.image_encoder)],
                   ImageEncoder(sd15_pipe.image_encoder, sd15_pipe.feature_extractor))
    try:
        with pytest.raises(IPAdapterError, match="2 reference image.s. for a batch of 3"):
            ip.generate(images=prompt_images[:2], unfold_batch=True, num_images=3, num_inference_steps=1,
                        width=32, height=32, output_type="np")
        with pytest.raises(IPAdapterError, match="--unfold-batch"):
            ip.set_images(prompt=ImagePrompt(images=prompt_images[:2], unfold_batch=True, combine="average"))
    finally:
        ip.detach()


# ------------------------------------------------------------------------------------------------ FaceID
class StubDetector:
    """insightface FaceAnalysis's interface: get(bgr) -> faces; finds the face only at 448 px or below."""

    def __init__(self, kps, embedding):
        self.det_model = SimpleNamespace(input_size=(640, 640))
        self.kps, self.embedding, self.calls = np.asarray(kps), embedding, []

    def get(self, bgr):
        self.calls.append(self.det_model.input_size)
        if self.det_model.input_size[0] > 448:
            return []
        return [SimpleNamespace(normed_embedding=self.embedding, kps=self.kps, bbox=np.array([0, 0, 10, 10]))]


def test_faceid_from_a_photo_uses_the_detector(sd15_pipe):
    from ipadapter.core.faces import ARCFACE, align_face

    adapter = make_adapter(sd15_pipe.unet, "faceid-plus", sd15_pipe.image_encoder)
    photo = random_image(9, (224, 224))
    embedding = np.random.RandomState(0).randn(512).astype(np.float32)
    stub = StubDetector(ARCFACE * 2, embedding)  # landmarks exactly on the 224 px template: the crop is the photo
    ip = IPAdapter(sd15_pipe, [adapter], ImageEncoder(sd15_pipe.image_encoder, sd15_pipe.feature_extractor))
    ip.face_analysis = stub
    try:
        cond, _ = ip.features(adapter, ImagePrompt(face_images=[photo]))
        want, _ = ip.features(adapter, ImagePrompt(face_embeds=torch.from_numpy(embedding)[None],
                                                   images=[align_face(photo, stub.kps, 224)]))
    finally:
        ip.detach()
    assert stub.calls == [(640, 640), (576, 576), (512, 512), (448, 448)]  # ComfyUI's retries at smaller sizes
    assert torch.equal(cond.face_id, want.face_id) and torch.equal(cond.penultimate, want.penultimate)
    crop = np.asarray(align_face(photo, ARCFACE * 2, 224), dtype=np.int16)
    assert np.abs(crop - np.asarray(photo, dtype=np.int16))[2:-2, 2:-2].mean() < 1.0


def test_faceid_photo_without_insightface_is_one_clear_line(sd15_pipe):
    try:
        import insightface  # noqa: F401
        pytest.skip("insightface is installed here")
    except ImportError:
        pass
    adapter = make_adapter(sd15_pipe.unet, "faceid")
    ip = IPAdapter(sd15_pipe, [adapter], None)
    try:
        with pytest.raises(IPAdapterError, match=r"needs insightface: pip install 'ipadapter\[faceid\]'"):
            ip.set_images(prompt=ImagePrompt(face_images=[random_image(1)]))
    finally:
        ip.detach()


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_exposes_every_comfy_control():
    from ipadapter.cli import build_parser
    from ipadapter.cli.generate import COMFY_KEYS

    argv = ["generate", "--image", "a.png", "--weight-type", "style transfer precise", "--composition-image", "c.png",
            "--composition-weight", "0.5", "--boost", "1.5", "--embeds-scaling", "k-mean-v-penalty", "--crop", "pad",
            "--interpolation", "nearest", "--sharpen", "0.3", "--tiles", "--enhance-tiles", "2", "--enhance-ratio",
            "0.4", "--unfold-batch", "--encode-batch-size", "3", "--negative-noise", "dissolve", "--noise-strength",
            "0.2", "--noise-blur", "5", "--noise-seed", "7", "--face-image", "f.png", "--combine", "norm average",
            "-o", "x.png"]
    group = build_parser().parse_args(argv).adapter_groups[0]
    assert set(COMFY_KEYS) <= set(group)
    assert group["weight_type"] == "style-transfer-precise" and group["tiles"] is True
    assert group["combine"] == "norm-average" and group["face_images"] == ["f.png"]
    fields = set(ImagePrompt.__dataclass_fields__)
    assert set(COMFY_KEYS) <= fields


def test_cli_weight_type_and_crop_give_the_library_image(capsys, sd15_pipe, files, tmp_path):  # noqa: F811
    from ipadapter.cli import main
    from ipadapter.generation.pipeline import load, load_pipeline

    out = tmp_path / "out.png"
    wide = random_image(11, (64, 40))
    wide.save(tmp_path / "wide.png")
    argv = ["generate", "--model", str(files["model"]), "--adapter", str(files["global"]), "--image",
            str(tmp_path / "wide.png"), "--steps", "2", "--seed", "1", "--width", "32", "--height", "32",
            "--weight-type", "composition-precise", "--boost", "0.5", "--crop", "right", "--embeds-scaling", "kv",
            "-o", str(out)]
    assert main(argv) == 0
    ip = load(load_pipeline(files["model"]), files["global"])
    want = ip.generate(images=[wide], seed=1, num_inference_steps=2, width=32, height=32,
                       weight_type="composition-precise", boost=0.5, crop="right", embeds_scaling="kv")[0]
    with Image.open(out) as got:
        assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1
        assert "weight_type: composition-precise" in got.text["parameters"]


def test_cli_face_image_without_insightface_is_one_line(capsys, files, tmp_path):  # noqa: F811
    from ipadapter.cli import main

    try:
        import insightface  # noqa: F401
        pytest.skip("insightface is installed here")
    except ImportError:
        pass
    photo = tmp_path / "face.png"
    random_image(12, (64, 64)).save(photo)
    rc = main(["generate", "--model", str(files["model"]), "--adapter", str(files["faceid"]), "--face-image",
               str(photo), "--steps", "1", "--width", "32", "--height", "32", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'ipadapter[faceid]'" in err[0], (rc, err)
    assert not (tmp_path / "o.png").exists()


def test_ramps_apply_to_a_block_list_of_any_family():
    layers = [SimpleNamespace(name=f"transformer_blocks.{i}.attn", index=i, cross_dim=8) for i in range(19)]
    plan = weight_types.resolve(layers, "ease-out", 1.0)
    assert [plan.weights[i] for i in range(19)] == pytest.approx([comfy_ramp("ease-out", t, "", 19) for t in range(19)])
    with pytest.raises(IPAdapterError, match="no input/middle/output parts"):
        weight_types.resolve(layers, "weak-input")
    with pytest.raises(IPAdapterError, match="ComfyUI defines it for SD 1.x"):
        weight_types.resolve(layers, "style-transfer")
