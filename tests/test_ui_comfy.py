"""The page's ComfyUI controls: set in a real browser and over the HTTP API, they give the library call's PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ipadapter.generation.pipeline import ImagePrompt
from ipadapter.ui import app as ui
from test_ui import browser, download, fill, library, page_at, pixels, server, tiny_model, wait_result  # noqa: F401 - the fixtures, shared


def wide_image(path) -> str:
    """A non-square prompt image whose top and bottom differ, so that the crop position matters."""
    arr = np.zeros((40, 64, 3), dtype=np.uint8)
    arr[:20] = (220, 40, 40)
    arr[20:] = (40, 80, 220)
    arr[:, 40:] = (240, 210, 40)
    Image.fromarray(arr).save(path)
    return str(path)


def choose(page, elem: str, value: str) -> None:
    box = page.locator(f"{elem} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()


def test_every_comfy_control_is_on_the_page():
    names = {name for name, _ in ui.COMFY_CONTROLS}
    fields = {f for f in ImagePrompt.__dataclass_fields__}
    assert {n if n not in ui.COMFY_IMAGES else n + "s" for n in names} == fields & {
        "weight_type", "composition_weight", "boost", "composition_images", "embeds_scaling", "crop", "interpolation",
        "sharpen", "tiles", "enhance_tiles", "enhance_ratio", "unfold_batch", "encode_batch_size", "negative_noise",
        "noise_strength", "noise_blur", "noise_seed", "face_images"}
    form = ui.Form(images=["x.png", None, None, None], weights=[1.0] * 4, masks=[None] * 4,
                   comfy=dict(weight_type="ease-in", crop="top", embeds_scaling="kv", tiles=True, noise_seed=3.0,
                              negative_noise="", sharpen=0.0))
    assert ui.comfy_options(form.comfy) == dict(weight_type="ease-in", crop="top", embeds_scaling="kv", tiles=True,
                                                noise_seed=3)


def test_weight_type_and_crop_set_in_the_browser_match_the_library(server, page_at, library, tmp_path):  # noqa: F811
    _, url = server
    prompt = wide_image(tmp_path / "wide.png")
    page = page_at(url)
    fill(page, prompt, seed=6)
    page.get_by_text("Advanced: blocks").click()
    page.get_by_text("ComfyUI controls").click()
    choose(page, "#ipa-weight-type", "style-transfer")
    choose(page, "#ipa-crop", "top")
    page.locator("#ipa-generate").click()
    shown = wait_result(page)
    assert "weight_type: style-transfer" in shown and "crop: top" in shown, shown
    got = pixels(download(page, tmp_path / "result.png"))
    want = library(prompt, seed=6, weight_type="style-transfer", crop="top")
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - library(prompt, seed=6)).max() > 1  # the controls acted


def test_comfy_controls_over_the_http_api(server, library, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    _, url = server
    prompt = wide_image(tmp_path / "wide.png")
    client = Client(url, verbose=False)
    _, parameters, png = client.predict(image_1=handle_file(prompt), seed=2, random_seed=False, steps=2, width=32,
                                        height=32, weight_type="ease-out", crop="bottom", embeds_scaling="kv-penalty",
                                        negative_noise="fade", noise_strength=0.5, api_name="/generate")
    assert "weight_type: ease-out" in parameters and "negative_noise: fade" in parameters
    want = library(prompt, seed=2, weight_type="ease-out", crop="bottom", embeds_scaling="kv-penalty",
                   negative_noise="fade", noise_strength=0.5)
    assert np.abs(pixels(png) - want).max() <= 1


@pytest.mark.parametrize("bad, fragment", [
    (dict(weight_type="styles"), "unknown weight type"),
    (dict(crop="middle"), "--crop"),
])
def test_bad_comfy_values_are_one_line(bad, fragment):
    from ipadapter.core.errors import IPAdapterError

    with pytest.raises(IPAdapterError, match=fragment):
        from ipadapter.bases import unet_layers
        from ipadapter.generation.pipeline import _check_comfy, _prep
        from ipadapter.testing import tiny_unet

        p = ImagePrompt(images=["x"], **{k: v for k, v in ui.comfy_options(bad).items()})
        _prep(p)
        _check_comfy(p, "concat", unet_layers(tiny_unet("sd15")))
