"""One parameters format: written by the CLI and the page into PNG/JPEG/WebP, read back by
``generate --reuse-parameters`` (the same pixels again)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from ipadapter.cli import main
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation.parameters import (
    AdapterParameters,
    ControlNetParameters,
    Parameters,
    format_parameters,
    parse_parameters,
    read_parameters,
    save_image,
)
from ipadapter.generation.pipeline import EMBEDDED_ADAPTER


def _full() -> Parameters:
    return Parameters(
        prompt="a red, circle: big\nsecond line", negative_prompt='blurry, "bad"', steps=7, sampler="DDIMScheduler",
        guidance=5.5, seed=12, width=48, height=32, model="C:\\models\\sd15",
        adapters=[AdapterParameters("ip-adapter_plus.safetensors", 0.6, ["a.png", "b, c.png"], [1.0, 0.123456789],
                                    ["left.png", "right.png"], ["blur.png"], combine="average", start=0.2, end=0.9,
                                    curve="ease-in", blocks="down_blocks.2=0.5,*=1",
                                    options={"weight_type": "style-transfer", "boost": "0.5"},
                                    option_images={"composition_images": ["comp.png"]}),
                  AdapterParameters("face.safetensors", 1.0, embeds="e.safetensors", face_embeds="f.npy")],
        init_image="photo.png", strength=0.6, inpaint_mask="hole.png",
        controlnets=[ControlNetParameters("cn-depth", "depth.png", 0.8)],
    )


def test_format_then_parse_gives_every_value_back():
    p = _full()
    text = format_parameters(p)
    assert text.splitlines()[3].startswith("Steps: 7, Sampler: DDIMScheduler, CFG scale: 5.5, Seed: 12, Size: 48x32")
    assert parse_parameters(text) == p
    plain = Parameters(prompt="", steps=30, seed=0, width=64, height=64, model="m",
                       adapters=[AdapterParameters("a.safetensors", 1.0, ["x.png"], [1.0])])
    assert parse_parameters(format_parameters(plain)) == plain
    with pytest.raises(IPAdapterError, match="no 'Steps: ...' line"):
        parse_parameters("just a caption")


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8"), (".jpeg", b"\xff\xd8"),
                                           (".webp", b"RIFF")])
def test_the_suffix_decides_the_format_and_the_parameters_go_inside(tmp_path, suffix, magic):
    text = format_parameters(_full())
    path = save_image(random_image(0), tmp_path / f"out{suffix}", text)
    assert path.read_bytes()[:4].startswith(magic)
    assert read_parameters(path) == text
    if suffix != ".png":  # the EXIF UserComment as A1111 writes it: "UNICODE\0" + UTF-16-BE
        with Image.open(path) as img:
            comment = img.getexif().get_ifd(0x8769)[0x9286]
        assert comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    with pytest.raises(IPAdapterError, match="unknown image suffix '.gif'"):
        save_image(random_image(0), tmp_path / "out.gif", text)


def _run(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def _pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_generate_writes_the_named_format_and_reuse_parameters_remakes_the_same_pixels(capsys, tmp_path):
    random_image(3, size=(64, 64)).save(tmp_path / "ref.png")
    random_image(4, size=(64, 64)).save(tmp_path / "other.png")
    first = tmp_path / "first.webp"
    argv = ["generate", "--image", str(tmp_path / "ref.png"), "--image", str(tmp_path / "other.png"),
            "--image-weight", "1", "--image-weight", "0.5", "--scale", "0.8", "--start", "0.1", "--prompt", "a circle",
            "--steps", "3", "--guidance", "4", "--seed", "7", "-o", str(first)]
    assert _run(capsys, argv).strip() == str(first)
    assert first.is_file() and first.read_bytes()[8:12] == b"WEBP"
    stored = parse_parameters(read_parameters(first))
    assert (stored.prompt, stored.steps, stored.guidance, stored.seed) == ("a circle", 3, 4.0, 7)
    assert stored.adapters[0].adapter == EMBEDDED_ADAPTER  # the default, inside the model folder: its name
    assert stored.adapters[0].weights == [1.0, 0.5] and stored.adapters[0].start == 0.1

    again = tmp_path / "again.png"
    _run(capsys, ["generate", "--reuse-parameters", str(first), "-o", str(again)])
    assert read_parameters(again) == read_parameters(first)
    png = tmp_path / "first.png"  # the same generation, losslessly: the reuse is pixel-exact
    _run(capsys, argv[:-1] + [str(png)])
    assert np.array_equal(_pixels(again), _pixels(png))

    other_seed = tmp_path / "seed8.png"  # a flag given overrides the stored value
    _run(capsys, ["generate", "--reuse-parameters", str(again), "--seed", "8", "-o", str(other_seed)])
    assert "Seed: 8" in read_parameters(other_seed)
    assert not np.array_equal(_pixels(other_seed), _pixels(again))


def test_the_page_writes_the_same_format(tmp_path):
    from ipadapter.ui import app as ui

    form = ui.Form(images=[str(tmp_path / "a.png"), str(tmp_path / "b.png"), None, None], weights=[1.0, 0.5, 1, 1],
                   masks=[None] * 4, prompt="a cat", scale=0.7, steps=12, guidance=6.0, seed=3, model=str(tmp_path),
                   adapter=str(tmp_path / "ip-adapter_global.safetensors"), blocks="style", end=0.6)
    p = parse_parameters(ui.parameters_text(form, (64, 48), "DDIMScheduler"))
    assert (p.prompt, p.steps, p.guidance, p.seed, p.width, p.height) == ("a cat", 12, 6.0, 3, 64, 48)
    a = p.adapters[0]
    assert (a.adapter, a.scale, a.images, a.weights) == ("ip-adapter_global.safetensors", 0.7, ["a.png", "b.png"],
                                                         [1.0, 0.5])
    assert (a.blocks, a.end) == ("style", 0.6)
