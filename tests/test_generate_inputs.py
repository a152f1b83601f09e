"""Text-only generation (the base model, adapters idle) from the CLI and the Python API, equal bit for bit to
``--scale 0``; and ``--init-image`` without ``--width/--height`` keeping the init image's size, as diffusers does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import GEN, generator, random_image
from ipadapter.cli import main
from ipadapter.generation.pipeline import ImagePrompt, load

TINY = ["--steps", "2", "--guidance", "5", "--seed", "3"]


@pytest.fixture(scope="module")
def model(sd15_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    sd15_pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    random_image(0).save(root / "ref.png")
    return root


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _cli(*argv) -> None:
    assert main(["generate", *argv]) == 0


def test_text_only_from_the_api_is_the_base_model_and_equals_scale_zero(sd15_pipe, adapter_file):
    base = sd15_pipe(**GEN, generator=generator(0)).images
    ip = load(sd15_pipe, adapter_file("sd15", "global"))
    try:
        text_only = ip.generate(prompt=GEN["prompt"], num_inference_steps=2, guidance_scale=5.0, seed=0,
                                width=32, height=32, output_type="np")
        zero = ip.generate(images=[random_image(0)], scale=0.0, prompt=GEN["prompt"], num_inference_steps=2,
                           guidance_scale=5.0, seed=0, width=32, height=32, output_type="np")
        one = ip.generate(prompts=[ImagePrompt(images=[random_image(0)], scale=1.0)], prompt=GEN["prompt"],
                          num_inference_steps=2, guidance_scale=5.0, seed=0, width=32, height=32, output_type="np")
    finally:
        ip.detach()
    assert np.array_equal(text_only, base) and np.array_equal(zero, base)
    assert np.abs(one - base).max() > 1e-3  # the adapter is attached and would act


def test_text_only_from_the_cli_equals_scale_zero_bit_for_bit(capsys, model, adapter_file, tmp_path):
    common = ["--model", str(model / "model"), "--adapter", str(adapter_file("sd15", "global")), "--prompt",
              GEN["prompt"], "--width", "32", "--height", "32", *TINY]
    _cli(*common, "-o", str(tmp_path / "text.png"))
    _cli(*common, "--image", str(model / "ref.png"), "--scale", "0", "-o", str(tmp_path / "zero.png"))
    _cli(*common, "--image", str(model / "ref.png"), "--scale", "1", "-o", str(tmp_path / "one.png"))
    assert np.array_equal(_pixels(tmp_path / "text.png"), _pixels(tmp_path / "zero.png"))
    assert not np.array_equal(_pixels(tmp_path / "text.png"), _pixels(tmp_path / "one.png"))


@pytest.mark.slow
@pytest.mark.parametrize("member", [None, "world-sd3"])
def test_text_only_on_the_embedded_model_equals_scale_zero_bit_for_bit(capsys, model, tmp_path, member):
    """Both embedded members (the default UNet one, ``--model world-sd3`` the transformer one): text only is the
    base model as diffusers runs it with the member's call settings, and ``--scale 0`` equals it bit for bit."""
    import torch

    from ipadapter.core.errors import IPAdapterError
    from ipadapter.generation.pipeline import EMBEDDED_CALL, embedded_model

    try:
        embedded_model(member)
    except IPAdapterError:
        pytest.skip(f"the embedded model {member or 'world'} is not installed")
    prompt = "a red circle on a white background"
    common = ["--prompt", prompt, *TINY, *(["--model", member] if member else [])]
    _cli(*common, "-o", str(tmp_path / "text.png"))
    assert "ip-adapter_pairs" not in capsys.readouterr().err  # that note is about image + text
    _cli(*common, "--image", str(model / "ref.png"), "--scale", "0", "-o", str(tmp_path / "zero.png"))
    _cli(*common, "--image", str(model / "ref.png"), "--scale", "1", "-o", str(tmp_path / "one.png"))
    assert np.array_equal(_pixels(tmp_path / "text.png"), _pixels(tmp_path / "zero.png"))
    assert not np.array_equal(_pixels(tmp_path / "text.png"), _pixels(tmp_path / "one.png"))
    if member:  # the oracle: diffusers' own pipeline on the folder (no T5: passed as None, 16 zero rows)
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(embedded_model(member)[0]), text_encoder_3=None,
                                                        tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, **EMBEDDED_CALL[member],
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
        assert EMBEDDED_CALL[member] == {"max_sequence_length": 16}
        assert np.array_equal(_pixels(tmp_path / "text.png"), np.asarray(want.convert("RGB")))


def test_no_image_and_no_text_is_still_refused(capsys, model, adapter_file, tmp_path):
    rc = main(["generate", "--model", str(model / "model"), "--adapter", str(adapter_file("sd15", "global")),
               *TINY, "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt TEXT alone for text only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_init_image_without_a_size_keeps_its_size_rounded_to_the_vae_multiple(capsys, model, adapter_file, tmp_path):
    random_image(5, size=(49, 40)).save(tmp_path / "init.png")  # the tiny VAE's multiple is 2: 48x40
    _cli("--model", str(model / "model"), "--adapter", str(adapter_file("sd15", "global")), "--image",
         str(model / "ref.png"), "--init-image", str(tmp_path / "init.png"), "--strength", "1", *TINY, "-o",
         str(tmp_path / "out.png"))
    assert Image.open(tmp_path / "out.png").size == (48, 40)
    _cli("--model", str(model / "model"), "--adapter", str(adapter_file("sd15", "global")), "--image",
         str(model / "ref.png"), "--init-image", str(tmp_path / "init.png"), "--strength", "1", "--width", "32",
         *TINY, "-o", str(tmp_path / "wide.png"))
    assert Image.open(tmp_path / "wide.png").size == (32, 40)  # a size given wins; the other stays the image's
