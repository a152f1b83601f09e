"""Image loading (modes, sizes, bad files), face embeddings, CLIP features and the unconditional branch."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import make_adapter, random_image
from ipadapter.core.config import AdapterConfig
from ipadapter.core.encoders import ImageEncoder, load_face_embeddings, load_image
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation.pipeline import load
from ipadapter.testing import tiny_feature_extractor, tiny_image_encoder


def _png(path, width, height, bit_depth, color_type, raw_rows: bytes | None = None) -> None:
    """A PNG written by hand: 16-bit RGB (which PIL cannot write) or a header claiming a huge size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = zlib.compress(raw_rows if raw_rows is not None else b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------- images
def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red, transparent everywhere...
    arr[0, 0, 3] = 255  # ...but one opaque pixel
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (200, 0, 0)
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency_grayscale_and_la(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (10, 20, 30)

    Image.fromarray(np.full((3, 3), 77, np.uint8), "L").save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    Image.fromarray(np.dstack([np.full((3, 3), 77, np.uint8), np.full((3, 3), 255, np.uint8)]), "LA").save(
        tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((2, 2)) == (77, 77, 77)


def test_16_bit_grayscale_and_rgb_become_8_bit(tmp_path):
    gray = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]

    rgb = np.array([[[65535, 0, 32768], [256, 65535, 0]]], dtype=">u2")  # 1 x 2 pixels, big-endian 16-bit
    _png(tmp_path / "rgb16.png", 2, 1, 16, 2, b"\x00" + rgb.tobytes())
    img = load_image(tmp_path / "rgb16.png")
    assert img.mode == "RGB" and img.size == (2, 1)
    assert img.getpixel((0, 0)) == (255, 0, 128) and img.getpixel((1, 0)) == (1, 255, 0)


@pytest.mark.parametrize(("width", "height"), [(10000, 5001), (20000, 10000)])
def test_images_over_50_megapixels_are_refused_without_decoding(tmp_path, width, height, recwarn):
    path = tmp_path / "huge.png"
    _png(path, width, height, 8, 0)  # the header claims the size; no pixel data worth the name
    with pytest.raises(IPAdapterError, match="over 50 megapixels") as info:
        load_image(path)
    assert str(info.value).startswith(str(path))
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_pil_images_over_50_megapixels_are_refused():
    with pytest.raises(IPAdapterError, match="over 50 megapixels"):
        load_image(Image.new("L", (10000, 5001)))


@pytest.mark.parametrize("content", [b"this is not an image", b"truncated"])
def test_unreadable_images(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == b"truncated":
        random_image(0, (64, 64)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(IPAdapterError, match="not a readable image") as info:
        load_image(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(IPAdapterError, match="no such image file"):
        load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------- face embeddings
def test_face_embeddings_from_npy_and_safetensors(tmp_path):
    faces = np.random.RandomState(0).randn(3, 512).astype(np.float32)
    np.save(tmp_path / "one.npy", faces[0])
    np.save(tmp_path / "batch.npy", faces[None])  # [1, n, 512] as insightface loops often stack them
    save_file({"face_embeds": torch.from_numpy(faces)}, str(tmp_path / "f.safetensors"))
    assert load_face_embeddings(tmp_path / "one.npy").shape == (1, 512)
    assert torch.equal(load_face_embeddings(tmp_path / "batch.npy"), torch.from_numpy(faces))
    assert torch.equal(load_face_embeddings(tmp_path / "f.safetensors"), torch.from_numpy(faces))


def test_bad_face_embeddings(tmp_path):
    np.save(tmp_path / "narrow.npy", np.zeros((2, 128), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "f.txt").write_text("1 2 3")
    with pytest.raises(IPAdapterError, match="512 wide"):
        load_face_embeddings(tmp_path / "narrow.npy")
    with pytest.raises(IPAdapterError, match="not readable face embeddings"):
        load_face_embeddings(tmp_path / "objects.npy")
    with pytest.raises(IPAdapterError, match=r"\.npy or \.safetensors"):
        load_face_embeddings(tmp_path / "f.txt")
    with pytest.raises(IPAdapterError, match="no such face-embedding file"):
        load_face_embeddings(tmp_path / "none.npy")


# ------------------------------------------------------------------------------------------ CLIP features
@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    return ImageEncoder(tiny_image_encoder(), tiny_feature_extractor())


def test_global_reads_the_projected_embedding_and_a_zero_uncond(encoder):
    images = [random_image(0), random_image(1)]
    cond, uncond = encoder.encode(AdapterConfig(kind="global"), images)
    pixels = encoder.pixels(images)
    with torch.no_grad():
        want = encoder.model(pixels).image_embeds
    assert torch.equal(cond.image_embeds, want)
    assert torch.count_nonzero(uncond.image_embeds) == 0 and uncond.image_embeds.shape == want.shape
    assert cond.penultimate is None


@pytest.mark.parametrize("kind", ["plus", "full"])
def test_patch_kinds_read_penultimate_states_and_encode_zero_pixels_as_uncond(encoder, kind):
    images = [random_image(0), random_image(1)]
    cond, uncond = encoder.encode(AdapterConfig(kind=kind), images)
    pixels = encoder.pixels(images)
    with torch.no_grad():
        hidden = encoder.model(pixels, output_hidden_states=True).hidden_states
        zero = encoder.model(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
        black = encoder.model(encoder.pixels([Image.new("RGB", (32, 32))]), output_hidden_states=True)
    assert torch.equal(cond.penultimate, hidden[-2])
    assert not torch.equal(cond.penultimate, hidden[-1])
    assert cond.penultimate.shape == (2, 17, 64)  # CLS + 4x4 patches
    assert torch.equal(uncond.penultimate, zero.expand(2, -1, -1))
    assert not torch.allclose(uncond.penultimate[:1], black.hidden_states[-2])  # zeros after normalisation


def test_processor_sized_to_the_encoder_when_none_is_given():
    model = tiny_image_encoder(image_size=48)
    encoder = ImageEncoder(model)
    assert encoder.pixels([random_image(0, (100, 60))]).shape == (1, 3, 48, 48)


def _save_encoder(folder, model, processor=None):
    model.save_pretrained(str(folder))
    if processor is not None:
        processor.save_pretrained(str(folder))


def _marked_processor(size=32):
    proc = tiny_feature_extractor(size)
    proc.image_mean = [0.0, 0.0, 0.0]  # recognisable: pixels come out >= 0
    proc.image_std = [1.0, 1.0, 1.0]
    return proc


def test_preprocessing_source_order(tmp_path):
    model = tiny_image_encoder()
    image = [random_image(0)]
    own = tmp_path / "own" / "image_encoder"
    _save_encoder(own, model, _marked_processor())
    assert ImageEncoder.from_pretrained(own).pixels(image).min() >= 0

    model_dir = tmp_path / "model"
    _save_encoder(model_dir / "image_encoder", model)
    _marked_processor().save_pretrained(str(model_dir / "feature_extractor"))
    assert ImageEncoder.from_pretrained(model_dir / "image_encoder").pixels(image).min() >= 0

    bare = tmp_path / "bare"
    _save_encoder(bare, model)
    assert ImageEncoder.from_pretrained(bare).pixels(image).min() < 0  # CLIP mean/std, sized to the encoder
    assert ImageEncoder.from_pretrained(bare, fallback=_marked_processor()).pixels(image).min() >= 0
    # a fallback sized for another encoder (e.g. a 224 px safety-checker extractor) is not used
    wrong = ImageEncoder.from_pretrained(bare, fallback=_marked_processor(24))
    assert wrong.pixels(image).shape[-1] == 32 and wrong.pixels(image).min() < 0


def test_bad_encoder_folders(tmp_path):
    with pytest.raises(IPAdapterError, match="not an image-encoder folder"):
        ImageEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(IPAdapterError, match="cannot load the image encoder"):
        ImageEncoder.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ encoder/adapter fit
@pytest.mark.parametrize(("kind", "encoder_kwargs", "message"), [
    ("global", {"projection": 40}, "projected embedding width 48; this encoder has 40"),
    ("plus", {"hidden": 80}, "hidden width (penultimate features) 64; this encoder has 80"),
    ("full", {"hidden": 80}, "hidden width (penultimate features) 64; this encoder has 80"),
    ("faceid-plus", {"hidden": 80}, "hidden width (penultimate features) 64; this encoder has 80"),
])
def test_encoder_width_mismatch_is_refused_before_touching_the_unet(tmp_path, sd15_pipe, kind, encoder_kwargs,
                                                                    message):
    unet = sd15_pipe.unet
    adapter = make_adapter(unet, kind, encoder=sd15_pipe.image_encoder)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    before = dict(unet.attn_processors)
    wrong = ImageEncoder(tiny_image_encoder(**encoder_kwargs), tiny_feature_extractor())
    with pytest.raises(IPAdapterError, match=re.escape(message)) as info:
        load(sd15_pipe, path, image_encoder=wrong)
    assert str(info.value).startswith(str(path))
    assert getattr(unet, "_ipadapter", None) is None
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


def test_an_animated_image_is_noted_as_its_first_frame(tmp_path, recwarn):
    from ipadapter.core.errors import IPAdapterNote

    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(IPAdapterNote, match=r"anim.gif: an animated image \(3 frames\); the first frame is used"):
        img = load_image(tmp_path / "anim.gif")
    assert img.getpixel((8, 8)) == (255, 0, 0)
    frames[0].save(tmp_path / "still.gif")
    recwarn.clear()
    load_image(tmp_path / "still.gif")
    assert not [w for w in recwarn if issubclass(w.category, IPAdapterNote)]


def test_the_library_triggers_no_torchvision_fallback_notice(tmp_path):
    """transformers 5 logs "`CLIPImageProcessor` requires torchvision ... falling back" once per process, on the
    first look-up of the name (diffusers' pipeline modules do it at import). Without torchvision installed, the
    library must not make it appear (a fresh interpreter: the notice is logged once per process)."""
    import subprocess
    import sys

    script = ("import ipadapter\n"
              "from ipadapter.core.encoders import ImageEncoder\n"
              "from ipadapter.testing import tiny_image_encoder\n"
              "ImageEncoder(tiny_image_encoder())\n"
              "pipe = ipadapter.load_pipeline(ipadapter.embedded_model()[0])\n"
              "ipadapter.load(pipe, ipadapter.embedded_model()[1])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "requires torchvision" not in proc.stderr and "falling back" not in proc.stderr, proc.stderr
