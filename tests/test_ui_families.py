"""The page on Flux and SD3 model folders: its HTTP ``/generate`` endpoint (what the Generate button calls) makes
the library's image; Flux's controls (the distilled guidance by default, true CFG) reach the pipeline. Driven with
gradio_client against a served app, no browser (tests/test_ui.py has the browser tests)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ipadapter.generation.loading import load_model
from ipadapter.generation.pipeline import load
from ipadapter.testing import random_flux_adapter, random_time_plus_adapter, tiny_flux_pipeline, tiny_sd3_pipeline
from ipadapter.ui import app as ui
from test_ui import drawn, free_port, parameters_of, pixels

SIZE, STEPS = 32, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """family -> (model folder, adapter file): tiny Flux + XLabs adapter, tiny SD3 + InstantX SD3.5 adapter."""
    root = tmp_path_factory.mktemp("ui-families")
    flux = tiny_flux_pipeline(root / "flux")
    random_flux_adapter(flux.transformer, "xlabs", embed_dim=48).save(root / "xlabs.safetensors")
    sd3 = tiny_sd3_pipeline(root / "sd3")
    random_time_plus_adapter(sd3.transformer, sd3.image_encoder).save(root / "sd35.safetensors")
    return {"flux": (root / "flux", root / "xlabs.safetensors"), "sd3": (root / "sd3", root / "sd35.safetensors")}


@pytest.fixture(scope="module")
def served(folders, tmp_path_factory):
    """family -> the URL of the app serving that model (started on first use, closed at the end)."""
    apps: dict = {}

    def get(family: str) -> str:
        if family not in apps:
            model, adapter = folders[family]
            apps[family] = ui.launch("127.0.0.1", free_port(), model, adapter, block=False, preload=True,
                                     output_dir=tmp_path_factory.mktemp(f"ui-out-{family}"))
        return apps[family][1]

    yield get
    for app, _ in apps.values():
        app.close()


def test_the_page_defaults_follow_the_model_family(folders):
    flux, sd3 = folders["flux"][0], folders["sd3"][0]
    assert ui.default_guidance(flux) == 3.5 and ui.default_guidance(sd3) == 7.5  # Flux: the distilled guidance
    # native sides from the configs: Flux 128 latent pixels (FluxPipeline's default), SD3 its sample_size; VAE x2
    assert ui.default_size(flux) == 256 and ui.default_size(sd3) == 32


@pytest.mark.parametrize("family, api, call, shown", [
    ("flux", dict(negative_prompt="blurry", true_cfg=2.0), dict(negative_prompt="blurry", true_cfg_scale=2.0),
     ("CFG scale: 3.5", "True CFG scale: 2")),
    ("sd3", dict(), dict(), ("CFG scale: 7.5",)),
])
def test_generate_endpoint_on_flux_and_sd3_makes_the_librarys_image(folders, served, tmp_path, family, api, call,
                                                                    shown):
    from gradio_client import Client, handle_file

    prompt = drawn(tmp_path / "prompt.png", (25, 25, 25), (40, 200, 210))
    client = Client(served(family), verbose=False)
    gallery, parameters, png = client.predict(image_1=handle_file(str(prompt)), seed=3, random_seed=False,
                                              steps=STEPS, width=SIZE, height=SIZE, api_name="/generate", **api)
    assert len(gallery) == 1 and parameters_of(png) == parameters
    for part in shown:
        assert part in parameters, parameters
    model, adapter = folders[family]
    ip = load(load_model(model), adapter)
    want = ip.generate(images=[Image.open(prompt).convert("RGB")], seed=3, num_inference_steps=STEPS, width=SIZE,
                       height=SIZE, **call)[0]
    assert np.abs(pixels(png) - np.asarray(want, dtype=np.int16)).max() <= 1
    if call:  # true CFG acted
        plain = ip.generate(images=[Image.open(prompt).convert("RGB")], seed=3, num_inference_steps=STEPS,
                            width=SIZE, height=SIZE)[0]
        assert np.abs(pixels(png) - np.asarray(plain, dtype=np.int16)).max() > 1


def test_true_cfg_without_a_negative_prompt_or_on_a_unet_is_one_line(served, tmp_path):
    from gradio_client import Client, handle_file

    prompt = drawn(tmp_path / "prompt.png", (25, 25, 25), (40, 200, 210))
    client = Client(served("flux"), verbose=False)
    with pytest.raises(Exception) as missing:
        client.predict(image_1=handle_file(str(prompt)), true_cfg=2.0, steps=STEPS, width=SIZE, height=SIZE,
                       api_name="/generate")
    message = str(missing.value)
    assert "True CFG needs a negative prompt" in message and "Traceback" not in message, message
    form = ui.Form(images=[str(prompt), None, None, None], weights=[1.0] * 4, masks=[None] * 4, true_cfg=2.0,
                   negative_prompt="blurry")
    _, kwargs = ui.generation_request(form)
    assert kwargs["true_cfg_scale"] == 2.0 and kwargs["guidance_scale"] is None  # None: the model's default
    assert ui.page_message("--true-cfg: StableDiffusionPipeline has no true CFG; use --guidance") == \
        "True CFG: StableDiffusionPipeline has no true CFG; use guidance"
