"""`ipadapter ui`: the Gradio page driven by a real headless Chromium (Playwright), its HTTP API, its wiring.

The browser is Debian's ``chromium`` (/usr/bin/chromium; the README's test command installs it), never a downloaded
one; the browser tests skip, saying why, only when it or the ``playwright`` package is missing. Each test gets its own
browser context, i.e. its own Gradio session. A screenshot of the page with a result is written to
test-artifacts/ui.png.
"""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ipadapter.core.errors import IPAdapterError
from ipadapter.testing import random_adapter, tiny_image_encoder, tiny_unet
from ipadapter.ui import app as ui

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000
FAST = dict(steps=2, size=32)  # tiny random model: enough to run every stage of a generation


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drawn(path: Path, background: tuple, colour: tuple, shape: str = "circle", size: int = 64) -> Path:
    """A prompt image drawn here: one shape on a solid background (the world model's kind of picture)."""
    img = Image.new("RGB", (size, size), background)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    img.save(path)
    return path


def parameters_of(png: Path) -> str:
    with Image.open(png) as img:
        return img.text.get("parameters", "")


def pixels(png) -> np.ndarray:
    with Image.open(png) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, sd15_pipe, adapter_file) -> tuple[Path, Path]:
    """(model folder, adapter file): the session's tiny random SD 1.5 pipeline, saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("ui-model") / "sd15"
    sd15_pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder, adapter_file("sd15", "global")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The app on a free loopback port, served from this process (as `ipadapter ui` serves it)."""
    model, adapter = tiny_model
    out = tmp_path_factory.mktemp("ui-out")
    app, url = ui.launch("127.0.0.1", free_port(), model, adapter, block=False, preload=True, output_dir=out)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def library(tiny_model):
    """The same model loaded by the library directly: what the page's results must equal."""
    from ipadapter.generation.pipeline import load, load_pipeline

    model, adapter = tiny_model
    ip = load(load_pipeline(model), adapter)
    lock = threading.Lock()

    def expected(image: Path, seed: int, steps: int = FAST["steps"], size: int = FAST["size"], **kw) -> np.ndarray:
        with lock:
            out = ip.generate(images=[Image.open(image).convert("RGB")], scale=1.0, seed=seed,
                              num_inference_steps=steps, width=size, height=size, guidance_scale=7.5, **kw)[0]
        return np.asarray(out, dtype=np.int16)

    return expected


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); the UI browser tests need it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(pip install playwright; no `playwright install`: Debian's chromium is used)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page_at(browser):
    """url -> a fresh page (own context, so its own Gradio session) on the app; checks nothing left loopback."""
    contexts, outside = [], []

    def open_page(url: str):
        context = browser.new_context(viewport={"width": 1360, "height": 1000}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        page.goto(url)
        page.wait_for_selector("#ipa-generate")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not outside, f"the page fetched from outside this machine: {outside[:5]}"


def fill(page, image: Path | None, seed: int, steps: int = FAST["steps"], size: int = FAST["size"]) -> None:
    if image is not None:
        page.locator("#ipa-image-1 input[type=file]").set_input_files(str(image))
        page.wait_for_selector("#ipa-image-1 img")
    page.locator("#ipa-random-seed input").uncheck()
    for elem, value in (("#ipa-seed", seed), ("#ipa-steps", steps), ("#ipa-width", size), ("#ipa-height", size)):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(str(value))
        box.press("Enter")


def wait_result(page) -> str:
    """Wait for the gallery's first result; return the parameters shown for it."""
    page.wait_for_selector("#ipa-gallery img", timeout=TIMEOUT_MS)
    params = page.locator("#ipa-params textarea")
    page.wait_for_function("() => document.querySelector('#ipa-params textarea').value.includes('Seed:')")
    return params.input_value()


def download(page, dest: Path) -> Path:
    page.wait_for_selector("#ipa-download:not([disabled])")
    with page.expect_download() as info:
        page.locator("#ipa-download").click()
    info.value.save_as(str(dest))
    return dest


# ------------------------------------------------------------------------------------------------ browser
def test_page_generates_what_the_library_generates(server, page_at, library, tmp_path):
    _, url = server
    prompt = drawn(tmp_path / "red-on-blue.png", (40, 80, 220), (220, 40, 40))
    page = page_at(url)
    fill(page, prompt, seed=5)
    page.locator("#ipa-generate").click()
    shown = wait_result(page)
    assert "Seed: 5" in shown and "Steps: 2" in shown and "red-on-blue.png" in shown, shown

    png = download(page, tmp_path / "result.png")
    assert parameters_of(png) == shown  # the PNG carries the parameters the page shows
    got = pixels(png)
    assert got.shape == (32, 32, 3)
    assert np.abs(got - library(prompt, seed=5)).max() <= 1  # same model, inputs and seed: the same image

    ARTIFACTS.mkdir(exist_ok=True)
    page.mouse.move(0, 0)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

    # "Reuse these parameters" puts the result's seed back (and turns the random seed off)
    page.locator("#ipa-seed input").fill("99")
    page.locator("#ipa-random-seed input").check()
    page.locator("#ipa-reuse").click()
    page.wait_for_function("() => document.querySelector('#ipa-seed input').value === '5'")
    assert not page.locator("#ipa-random-seed input").is_checked()


def test_non_image_upload_shows_a_message_not_a_traceback(server, page_at, tmp_path):
    _, url = server
    page = page_at(url)
    # a text file: the page refuses it by its type
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    page.locator("#ipa-image-1 input[type=file]").set_input_files(str(notes))
    page.get_by_text("notes.txt").first.wait_for(state="visible")
    # a text file named .png gets past the type check: the server reads it, and says what is wrong
    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture either\n")
    page.locator("#ipa-image-1 input[type=file]").set_input_files(str(fake))
    message = page.get_by_text("holiday.png: not a readable image").first
    message.wait_for(state="visible")
    assert "use PNG, JPEG or WebP" in message.inner_text()
    page.locator("#ipa-generate").click()  # generating with it says so too
    page.get_by_text("prompt image holiday.png: not a readable image").first.wait_for(state="visible")
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "/tmp/gradio" not in body, body[-2000:]
    assert page.locator("#ipa-gallery img").count() == 0


def test_two_browsers_at_once_each_get_their_own_result(server, page_at, library, tmp_path):
    _, url = server
    a_img = drawn(tmp_path / "a-yellow.png", (240, 210, 40), (40, 80, 220), "square")
    b_img = drawn(tmp_path / "b-green.png", (40, 170, 70), (200, 50, 200), "circle")
    a, b = page_at(url), page_at(url)
    fill(a, a_img, seed=11, steps=6)
    fill(b, b_img, seed=12, steps=6)
    a.locator("#ipa-generate").click()
    b.locator("#ipa-generate").click()  # queued behind a's while a's runs
    shown_a, shown_b = wait_result(a), wait_result(b)
    assert "Seed: 11" in shown_a and "a-yellow.png" in shown_a, shown_a
    assert "Seed: 12" in shown_b and "b-green.png" in shown_b, shown_b
    assert a.locator("#ipa-gallery img").count() == 1 and b.locator("#ipa-gallery img").count() == 1
    got_a, got_b = pixels(download(a, tmp_path / "a.png")), pixels(download(b, tmp_path / "b.png"))
    assert np.abs(got_a - library(a_img, seed=11, steps=6)).max() <= 1
    assert np.abs(got_b - library(b_img, seed=12, steps=6)).max() <= 1


def test_world_model_result_follows_the_prompt_colours(page_at, tmp_path):
    """On the embedded world model the image prompt alone carries the colours into the result."""
    from ipadapter.generation.pipeline import embedded_model
    from ipadapter.world.parse import parse
    from ipadapter.world.shapes import PALETTE

    try:
        embedded_model()
    except IPAdapterError as e:
        pytest.skip(f"the embedded world model is not built yet: {e}")
    app, url = ui.launch("127.0.0.1", free_port(), block=False, preload=True, output_dir=tmp_path / "out")
    try:
        prompt = drawn(tmp_path / "yellow-circle-on-blue.png", PALETTE["blue"], PALETTE["yellow"])
        page = page_at(url)
        fill(page, prompt, seed=0, steps=25, size=64)
        for elem, value in (("#ipa-num-images", 2), ("#ipa-guidance", 5)):  # the world model's sampling guidance
            page.locator(f"{elem} input[type=number]").fill(str(value))
            page.locator(f"{elem} input[type=number]").press("Enter")
        page.locator("#ipa-generate").click()
        wait_result(page)
        page.wait_for_function("() => document.querySelectorAll('#ipa-gallery img').length >= 2")
        outputs = sorted((tmp_path / "out").glob("*.png"))
        assert len(outputs) == 2
        found = [parse(Image.open(p)) for p in outputs]
        assert all(f["background"] == "blue" for f in found), found
        assert sum(f["colour"] == "yellow" for f in found) >= 1, found
    finally:
        app.close()


# ------------------------------------------------------------------------------------------------ HTTP API
def test_http_api_with_gradio_client(server, library, tmp_path):
    """The README's gradio_client example, run against the app."""
    from gradio_client import Client, handle_file

    _, url = server
    prompt = drawn(tmp_path / "cyan-on-black.png", (25, 25, 25), (40, 200, 210))
    client = Client(url, verbose=False)
    gallery, parameters, png = client.predict(
        image_1=handle_file(str(prompt)), seed=3, random_seed=False, steps=2, width=32, height=32,
        api_name="/generate",
    )
    assert len(gallery) == 1 and "Seed: 3" in parameters and "cyan-on-black.png" in parameters
    assert parameters_of(png) == parameters
    assert np.abs(pixels(png) - library(prompt, seed=3)).max() <= 1


def test_http_api_errors_are_one_line_messages(server, tmp_path):
    from gradio_client import Client, handle_file

    _, url = server
    torch.manual_seed(0)
    wrong = tmp_path / "for-another-unet.safetensors"  # cross-attention width 64: not this model's 32
    random_adapter(tiny_unet("sd15", cross_dim=64), "global", encoder=tiny_image_encoder()).save(wrong)
    prompt = drawn(tmp_path / "p.png", (25, 25, 25), (40, 200, 210))
    client = Client(url, verbose=False)
    with pytest.raises(Exception) as bad_adapter:
        client.predict(image_1=handle_file(str(prompt)), adapter=str(wrong), steps=2, width=32, height=32,
                       api_name="/generate")
    message = str(bad_adapter.value)
    assert "for-another-unet.safetensors" in message and "\n" not in message.strip(), message
    assert "Traceback" not in message
    with pytest.raises(Exception) as no_image:
        client.predict(image_1=None, api_name="/generate")
    assert "prompt image" in str(no_image.value)
    # the app still serves after both
    gallery, parameters, _ = client.predict(image_1=handle_file(str(prompt)), seed=1, random_seed=False, steps=2,
                                            width=32, height=32, api_name="/generate")
    assert "Seed: 1" in parameters


# ------------------------------------------------------------------------------------------------ wiring
def test_advanced_controls_reach_the_library(server, library, tmp_path):
    """Weights, a region mask, blocks, start/end and img2img go through the one wiring function into generate()."""
    app, _ = server
    a = drawn(tmp_path / "a.png", (40, 80, 220), (220, 40, 40))
    b = drawn(tmp_path / "b.png", (240, 210, 40), (40, 170, 70), "square")
    mask = tmp_path / "left.png"
    m = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(m).rectangle([0, 0, 15, 31], fill=255)
    m.save(mask)
    form = ui.Form(images=[str(a), str(b), None, None], weights=[1.0, 0.5, 1.0, 1.0], masks=[str(mask), None, None,
                   None], seed=4, random_seed=False, steps=2, width=32, height=32, blocks="style", start=0.0, end=0.6,
                   negative_image=str(b), init_image=str(a), strength=0.8)
    prompts, kwargs = ui.generation_request(form)
    p = prompts[0]
    assert p.weights == [1.0, 0.5] and p.blocks == "style" and (p.start, p.end) == (0.0, 0.6)
    assert len(p.masks) == 2 and torch.is_tensor(p.masks[1]) and bool((p.masks[1] == 1).all())
    assert len(p.negative_images) == 1
    assert kwargs["strength"] == 0.8 and kwargs["init_image"].size == (64, 64)

    entries, _ = app.ipadapter_generator.run(form)
    text = entries[0]["text"]
    for part in ("image: b.png, image weight: 0.5", "image mask: left.png", "blocks: style", "end: 0.6",
                 "Denoising strength: 0.8", "negative image: b.png"):
        assert part in text, text
    plain = ui.Form(images=[str(a), None, None, None], weights=[1.0] * 4, masks=[None] * 4, seed=4,
                    random_seed=False, steps=2, width=32, height=32)
    plain_entries, _ = app.ipadapter_generator.run(plain)
    assert np.abs(pixels(plain_entries[0]["path"]) - library(a, seed=4)).max() <= 1
    assert np.abs(pixels(entries[0]["path"]) - pixels(plain_entries[0]["path"])).max() > 0  # the controls acted


def test_bad_controls_and_missing_images_are_refused_with_one_line(tmp_path):
    with pytest.raises(IPAdapterError, match="add a prompt image .* or a text prompt"):
        ui.generation_request(ui.Form(images=[None] * 4, weights=[1.0] * 4, masks=[None] * 4))
    text_only, _ = ui.generation_request(ui.Form(images=[None] * 4, weights=[1.0] * 4, masks=[None] * 4,
                                                 prompt="a red circle"))
    assert not text_only[0].images and text_only[0].embeds is None  # the adapter sits it out: the base model
    img = drawn(tmp_path / "p.png", (0, 0, 0), (255, 255, 255))
    with pytest.raises(IPAdapterError, match="both a ControlNet model folder and a control image"):
        ui.generation_request(ui.Form(images=[str(img)], weights=[1.0], masks=[None], controlnet="somewhere"))
    _, kwargs = ui.generation_request(ui.Form(images=[str(img)], weights=[1.0], masks=[None], controlnet="cn",
                                              control_image=str(img), control_scale=0.7))
    assert kwargs["controlnets"] == ["cn"] and kwargs["control_scales"] == [0.7]
    assert [im.size for im in kwargs["control_images"]] == [(64, 64)]
    with pytest.raises(IPAdapterError, match="inpaint mask needs an img2img image"):
        ui.generation_request(ui.Form(images=[str(img)], weights=[1.0], masks=[None], inpaint_mask=str(img)))
    assert ui.page_message("--image-mask /tmp/gradio/abc/m.png: bad",
                           ui.Form(masks=["/tmp/gradio/abc/m.png"])) == "region mask m.png: bad"


def test_cli_binds_loopback_without_share_link_by_default(server):
    from ipadapter.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.share, args.model, args.adapter) == ("127.0.0.1", 7860, False, None, None)
    app, url = server
    assert url.startswith("http://127.0.0.1:") and app.share_url is None
    assert ui._is_loopback("127.0.0.1") and ui._is_loopback("::1") and not ui._is_loopback("0.0.0.0")


def test_a_server_open_to_the_network_keeps_its_model(tiny_model, tmp_path):
    model, adapter = tiny_model
    gen = ui.Generator(ui.ModelCache(), str(model), str(adapter), tmp_path, allow_model_change=False)
    form = ui.Form(images=[str(drawn(tmp_path / "p.png", (0, 0, 0), (255, 255, 255)))], weights=[1.0], masks=[None],
                   adapter=str(tmp_path / "other.safetensors"))
    with pytest.raises(IPAdapterError, match="does not let the page choose model files"):
        gen.run(form)


def test_resolve_model_finds_an_adapter_name_in_the_model_folder(tmp_path):
    from ipadapter.generation.pipeline import EMBEDDED_MODEL

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.safetensors").write_bytes(b"x")
    model = tmp_path / "m"
    assert ui.resolve_model(model, "a.safetensors") == (str(model), str(model / "a.safetensors"))
    assert ui.resolve_model(tmp_path / "m", "b.safetensors")[1] == "b.safetensors"  # left as given: load says why
    if (EMBEDDED_MODEL / "ip-adapter_pairs.safetensors").is_file():
        pairs = EMBEDDED_MODEL / "ip-adapter_pairs.safetensors"
        assert ui.resolve_model(None, "ip-adapter_pairs.safetensors")[1] == str(pairs)
        assert ui.resolve_model(None, None)[1] == str(EMBEDDED_MODEL / "ip-adapter.safetensors")
