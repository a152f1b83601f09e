"""``ipadapter ui``: a local web page for image prompting (Gradio), and the HTTP API that comes with it.

    ipadapter ui                                    # the embedded world model on http://127.0.0.1:7860
    ipadapter ui --model DIR --adapter FILE --port 8000

    from ipadapter.ui import launch                 # or from Python
    launch(port=8000, model="DIR", adapter="FILE")

A model is loaded once and kept (the last two asked for). Generations go through Gradio's queue one at a time:
one accelerator runs one denoising loop at a time anyway, and each browser's results live in its own session
state, so several browsers can queue without crashing the app or mixing their results. Bad input becomes the
one-line :class:`IPAdapterError` message on the page (``gr.Error``), never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import IPAdapterError, shown_as
from ..generation.controls import COMBINE_MODES

MAX_IMAGES = 4  # prompt-image slots on the page (each with a weight and a region mask)
MAX_HISTORY = 48  # results kept per browser session
MAX_MODELS = 2  # pipelines kept in memory; the oldest is dropped when a third is asked for

# (label, value for ImagePrompt.blocks); the dropdown also takes free text such as "up_blocks.1=1,*=0.3"
BLOCK_CHOICES = [("all blocks", ""), ("style", "style"), ("composition", "composition"),
                 ("style + composition", "style,composition")]

TITLE = "IP-Adapter"
INTRO = (
    "Prompt a diffusion model with **images**: drop one or more pictures, add a text prompt if you like, and "
    "generate. Each image has a weight and an optional region mask (white = where it applies). Results keep "
    "their parameters inside the PNG; select one to see them, download it or reuse them."
)

CSS = """
.gradio-container { max-width: 1280px !important; margin: auto; }
#ipa-header h1 { margin-bottom: 0.2em; }
#ipa-header p { color: var(--body-text-color-subdued); margin-top: 0; }
#ipa-generate { min-height: 3.2em; font-size: 1.1em; }
#ipa-params textarea { font-family: var(--font-mono); font-size: 0.85em; }
"""


# ------------------------------------------------------------------------------------------------ the form
@dataclass
class Form:
    """Everything the page asks for, as plain values (file paths for images). One generation = one Form."""

    images: list[str | None] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    masks: list[str | None] = field(default_factory=list)
    prompt: str = ""
    negative_prompt: str = ""
    scale: float = 1.0
    steps: int = 30
    guidance: float | None = None  # None: the model's (7.5 on UNets and SD3, 3.5 distilled guidance on Flux)
    seed: int = 0
    random_seed: bool = True
    width: int = 512
    height: int = 512
    num_images: int = 1
    model: str = ""
    adapter: str = ""
    combine: str = "concat"
    blocks: str = ""
    start: float = 0.0
    end: float = 1.0
    curve: str = "constant"
    negative_image: str | None = None
    init_image: str | None = None
    strength: float = 0.6
    inpaint_mask: str | None = None
    controlnet: str = ""
    control_image: str | None = None
    control_scale: float = 1.0
    comfy: dict = field(default_factory=dict)  # ComfyUI_IPAdapter_plus's controls: COMFY_CONTROLS name -> value
    true_cfg: float | None = None  # Flux's true CFG (true_cfg_scale, with the negative prompt); None or 1: off

    def prompt_images(self) -> list[tuple[str, float, str | None]]:
        """(image, weight, mask) of the filled slots, in slot order."""
        return [(img, float(w), m) for img, w, m in zip(self.images, self.weights, self.masks) if img]

    def files(self) -> list[str]:
        singles = (self.negative_image, self.init_image, self.inpaint_mask, self.control_image,
                   *(self.comfy.get(k) for k in COMFY_IMAGES))
        return [p for p in (*self.images, *self.masks, *singles) if p]


# ComfyUI_IPAdapter_plus's controls on the page: (ImagePrompt field, neutral value); the images are paths
COMFY_CONTROLS: tuple[tuple[str, Any], ...] = (
    ("weight_type", None), ("composition_weight", None), ("boost", None), ("embeds_scaling", "v"), ("crop", None),
    ("interpolation", "lanczos"), ("sharpen", 0.0), ("tiles", False), ("enhance_tiles", 1), ("enhance_ratio", 1.0),
    ("unfold_batch", False), ("encode_batch_size", 0), ("negative_noise", None), ("noise_strength", 1.0),
    ("noise_blur", 0), ("noise_seed", 0), ("composition_image", None), ("face_image", None),
)
COMFY_IMAGES = ("composition_image", "face_image")


def comfy_options(values: dict) -> dict:
    """The page's ComfyUI controls -> ImagePrompt keywords (neutral values left out)."""
    out: dict[str, Any] = {}
    for name, neutral in COMFY_CONTROLS:
        value = values.get(name, neutral)
        if value in (None, "") or value == neutral:
            continue
        if name in COMFY_IMAGES:
            out[f"{name}s"] = [_read_image(value, name.replace("_", " "))]
        elif name in ("enhance_tiles", "encode_batch_size", "noise_blur", "noise_seed"):
            out[name] = int(value)
        else:
            out[name] = value
    return out


def comfy_widgets(gr, image_sources) -> dict:
    """The ComfyUI controls' widgets (inside the Advanced section), by COMFY_CONTROLS name."""
    from ..core.encoders import CROPS, INTERPOLATIONS
    from ..generation.controls import NOISES
    from ..generation.weight_types import WEIGHT_TYPES

    w: dict = {}
    with gr.Accordion("ComfyUI controls: weight type, embeds scaling, image prep, tiles, noise, FaceID photo",
                      open=False):
        with gr.Row():
            w["weight_type"] = gr.Dropdown(["", *WEIGHT_TYPES], value="", label="Weight type",
                                           elem_id="ipa-weight-type")
            w["composition_weight"] = gr.Number(None, label="Composition weight", elem_id="ipa-composition-weight")
            w["boost"] = gr.Number(None, label="Boost (precise types)", elem_id="ipa-boost")
            w["embeds_scaling"] = gr.Dropdown(["v", "kv", "kv-penalty", "k-mean-v-penalty"], value="v",
                                              label="Embeds scaling", elem_id="ipa-embeds-scaling")
        with gr.Row():
            w["crop"] = gr.Dropdown(["", *CROPS], value="", label="Crop for the encoder", elem_id="ipa-crop")
            w["interpolation"] = gr.Dropdown(list(INTERPOLATIONS), value="lanczos", label="Interpolation",
                                             elem_id="ipa-interpolation")
            w["sharpen"] = gr.Slider(0, 1, value=0, step=0.05, label="Sharpening", elem_id="ipa-sharpen")
            w["tiles"] = gr.Checkbox(False, label="Tiled references", elem_id="ipa-tiles")
        with gr.Row():
            w["enhance_tiles"] = gr.Slider(1, 16, value=1, step=1, label="Enhancer tiles", elem_id="ipa-enhance-tiles")
            w["enhance_ratio"] = gr.Slider(0, 1, value=1, step=0.05, label="Enhancer ratio",
                                           elem_id="ipa-enhance-ratio")
            w["unfold_batch"] = gr.Checkbox(False, label="Unfold batch (image k -> result k)",
                                            elem_id="ipa-unfold-batch")
            w["encode_batch_size"] = gr.Number(0, precision=0, minimum=0, label="Encode batch size",
                                               elem_id="ipa-encode-batch-size")
        with gr.Row():
            w["negative_noise"] = gr.Dropdown(["", *NOISES], value="", label="Negative from noise",
                                              elem_id="ipa-negative-noise")
            w["noise_strength"] = gr.Slider(0, 1, value=1, step=0.05, label="Noise strength",
                                            elem_id="ipa-noise-strength")
            w["noise_blur"] = gr.Slider(0, 32, value=0, step=1, label="Noise blur", elem_id="ipa-noise-blur")
            w["noise_seed"] = gr.Number(0, precision=0, label="Noise seed", elem_id="ipa-noise-seed")
        with gr.Row():
            w["composition_image"] = gr.Image(label="Composition image", type="filepath", height=140,
                                              sources=image_sources, elem_id="ipa-composition-image")
            w["face_image"] = gr.Image(label="Face photo (FaceID)", type="filepath", height=140,
                                       sources=image_sources, elem_id="ipa-face-image")
    return w


def generation_request(form: Form) -> tuple[list, dict]:
    """Form -> (``prompts`` for :meth:`IPAdapter.generate`, its other keyword arguments).

    The one place where the page's controls meet the library: a new generation control is wired here.
    Controls left at their neutral value are not passed, so the library's defaults apply.
    """
    import torch

    from ..generation.pipeline import ImagePrompt

    slots = form.prompt_images()
    if not slots and not form.prompt.strip():
        raise IPAdapterError('add a prompt image (drop a PNG, JPEG or WebP on "Image 1") or a text prompt')
    if not slots:  # text only: the adapter sits it out, the base model runs
        prompts = [ImagePrompt(scale=float(form.scale))]
        return prompts, _generate_kwargs(form)
    images = [_read_image(path, "prompt image") for path, _, _ in slots]
    options: dict[str, Any] = {"combine": form.combine}
    weights = [w for _, w, _ in slots]
    if any(w != 1.0 for w in weights):
        options["weights"] = weights
    masks = [m for _, _, m in slots]
    if any(masks):
        if form.combine == "concat":  # one mask per image: an image without one acts everywhere
            everywhere = torch.ones(int(form.height), int(form.width))
            options["masks"] = [_read_image(m, "region mask", "L") if m else everywhere for m in masks]
        elif sum(1 for m in masks if m) > 1:
            raise IPAdapterError(f"combine {form.combine}: the images become one prompt, so give one region mask")
        else:
            options["masks"] = [_read_image(next(m for m in masks if m), "region mask", "L")]
    if form.negative_image:
        options["negative_images"] = [_read_image(form.negative_image, "negative image")]
    if form.blocks.strip():
        options["blocks"] = form.blocks.strip()
    if (form.start, form.end, form.curve) != (0.0, 1.0, "constant"):
        options.update(start=float(form.start), end=float(form.end), curve=form.curve)
    options.update(comfy_options(form.comfy))
    prompts = [ImagePrompt(images=images, scale=float(form.scale), **options)]
    return prompts, _generate_kwargs(form)


def _generate_kwargs(form) -> dict[str, Any]:
    """The keyword arguments of :meth:`IPAdapter.generate` besides the image prompts."""
    kwargs: dict[str, Any] = dict(
        prompt=form.prompt, negative_prompt=form.negative_prompt or None, num_inference_steps=int(form.steps),
        guidance_scale=None if form.guidance is None else float(form.guidance), seed=int(form.seed),
        width=int(form.width), height=int(form.height), num_images=int(form.num_images),
    )
    if form.true_cfg is not None and float(form.true_cfg) != 1.0:
        if not form.negative_prompt:
            raise IPAdapterError("True CFG needs a negative prompt (it runs an unconditional pass with it)")
        kwargs["true_cfg_scale"] = float(form.true_cfg)
    if form.init_image:
        kwargs.update(init_image=_read_image(form.init_image, "img2img image"), strength=float(form.strength))
        if form.inpaint_mask:
            kwargs["mask_image"] = _read_image(form.inpaint_mask, "inpaint mask", "L")
    elif form.inpaint_mask:
        raise IPAdapterError("an inpaint mask needs an img2img image to paint into")
    if form.controlnet or form.control_image:
        if not (form.controlnet and form.control_image):
            raise IPAdapterError("ControlNet needs both a ControlNet model folder and a control image")
        kwargs.update(controlnets=[form.controlnet], control_images=[_read_image(form.control_image, "control image")],
                      control_scales=[float(form.control_scale)])
    return kwargs


def _read_image(path: str, what: str, mode: str = "RGB"):
    """Load an upload with the library's safe loader; name it by its file name, not Gradio's cache path."""
    from ..core.encoders import load_image

    try:
        image = load_image(path)
    except IPAdapterError as e:
        raise IPAdapterError(f"{what} " + str(e).replace(str(path), Path(path).name)) from None
    return image.convert(mode) if mode != "RGB" else image


# Messages that name CLI flags; on the page the same things are labelled controls.
_FLAG_LABELS = (
    ("--image-weight", "image weight"), ("--image-mask", "region mask"), ("--init-image", "img2img image"),
    ("--inpaint-mask", "inpaint mask"), ("--control-image", "control image"), ("--control-scale", "ControlNet scale"),
    ("--controlnet", "ControlNet"), ("--strength", "strength"), ("--combine", "combine"), ("--blocks", "blocks"),
    ("--start", "start"), ("--end", "end"), ("--curve", "curve"), ("--scale", "scale"), ("--image", "prompt image"),
    ("--true-cfg", "True CFG"), ("--guidance", "guidance"),
)


#: the library's parameters as the page labels them (errors name parameters: ``core.errors.param``)
_PARAM_LABELS = {
    "images": "prompt image", "weights": "image weight", "masks": "region mask", "negative_images": "negative image",
    "init_image": "img2img image", "mask_image": "inpaint mask", "control_images": "control image",
    "control_scales": "ControlNet scale", "controlnets": "ControlNet", "num_inference_steps": "steps",
}


def page_message(message: str | BaseException, form: Form | None = None) -> str:
    """A library message as the page says it: control names for parameters and CLI flags, file names for
    upload-cache paths."""
    message = shown_as(message, _PARAM_LABELS)
    for path in form.files() if form is not None else ():
        message = message.replace(str(path), Path(path).name)
    for flag, label in _FLAG_LABELS:
        message = message.replace(flag, label)
    return message


# ------------------------------------------------------------------------------------------------ models
def resolve_model(model: str | os.PathLike | None, adapter: str | os.PathLike | None) -> tuple[str, str]:
    """(model, adapter) as given, or the embedded world model's; an adapter is required with a model. An adapter
    name that is not a file is looked up in the model folder (``--adapter ip-adapter_pairs.safetensors``)."""
    from ..generation.pipeline import adapter_in_model, embedded_model, embedded_name

    name = embedded_name(model or None)
    if name and (not model or not Path(str(model)).exists()):
        default_model, default_adapter = embedded_model(name)
        return str(default_model), str(adapter_in_model(adapter, default_model) or default_adapter)
    if not adapter:
        raise IPAdapterError(f"{model}: give its adapter file too (--adapter FILE)")
    return str(model), str(adapter_in_model(adapter, model))


def default_size(model: str | os.PathLike) -> int:
    """The model's native image side, read from its folder's configs (no weights loaded); 512 if unknown. Flux
    transformers have no sample size: FluxPipeline's default, 128 latent pixels."""
    try:
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if (Path(model) / "unet" / "config.json").is_file():
            return int(json.loads((Path(model) / "unet" / "config.json").read_text())["sample_size"]) * factor
        transformer = json.loads((Path(model) / "transformer" / "config.json").read_text())
        return int(transformer.get("sample_size") or 128) * factor
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def default_guidance(model: str | os.PathLike) -> float:
    """The guidance the model's family uses by default (7.5; Flux's distilled guidance 3.5), from the folder's
    ``model_index.json``; 7.5 when unknown (a hub id, a single file)."""
    from ..bases import family_for_index

    try:
        family = family_for_index(json.loads((Path(model) / "model_index.json").read_text()))
    except (OSError, ValueError):
        family = None
    return float(family.default_guidance) if family is not None else 7.5


class ModelCache:
    """Loaded ``IPAdapter`` objects by (model, adapter, encoder), the last ``size`` used; each with its own lock."""

    def __init__(self, device: str | None = None, image_encoder: str | None = None, size: int = MAX_MODELS,
                 options: dict | None = None):
        self.device, self.image_encoder, self.size = device, image_encoder, size
        self.options = dict(options or {})  # model_config, loras, dtype (see generation.loading)
        self._items: OrderedDict[tuple, tuple[Any, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str, adapter: str) -> tuple[Any, threading.Lock]:
        key = (model, adapter, self.image_encoder)
        with self._lock:  # one load at a time: two sessions asking for the same model load it once
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.size:
                self._items.popitem(last=False)
            item = (self._load(model, adapter), threading.Lock())
            self._items[key] = item
            return item

    def _load(self, model: str, adapter: str):
        from ..generation.loading import apply_loras, config_folder, load_model, resolve_device, resolve_dtype
        from ..generation.pipeline import load

        if not Path(adapter).is_file():
            raise IPAdapterError(f"{adapter}: no such adapter file")
        device = resolve_device(self.device)
        config = self.options.get("model_config")
        pipe = load_model(model, config, device=device, dtype=resolve_dtype(self.options.get("dtype"), device))
        apply_loras(pipe, self.options.get("loras") or ())
        return load(pipe, adapter, image_encoder=self.image_encoder, model_dir=config_folder(model, config))


# ------------------------------------------------------------------------------------------------ generation
class Generator:
    """Form -> saved PNGs with their parameters: what the page's Generate button runs."""

    def __init__(self, models: ModelCache, model: str, adapter: str, output_dir: str | os.PathLike,
                 allow_model_change: bool = True):
        self.models, self.model, self.adapter = models, model, adapter
        self.output_dir = Path(output_dir)
        self.allow_model_change = allow_model_change
        self._count = 0
        self._count_lock = threading.Lock()

    def run(self, form: Form, on_step: Callable[[int, int], None] | None = None) -> tuple[list[dict], list[str]]:
        """Generate. Returns (one entry per image: path, caption, parameters text, its form; the library's notes)."""
        import warnings

        from ..generation.controls import IPAdapterNote

        model, adapter = (form.model or self.model), (form.adapter or self.adapter)
        if not self.allow_model_change and (model, adapter) != (self.model, self.adapter):
            raise IPAdapterError("this server does not let the page choose model files (it listens beyond this "
                                 "machine); restart it with --model/--adapter")
        if form.random_seed:
            form.seed = random.SystemRandom().randrange(2**31)
        form.model, form.adapter = model, adapter
        ip, lock = self.models.get(model, adapter)
        if form.guidance is None:  # the model's own default, written into the parameters as used
            form.guidance = ip.family.default_guidance
        with lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IPAdapterNote)
            prompts, kwargs = generation_request(form)  # inside: its notes (an animated image ...) are shown too
            if on_step is not None:
                def callback(pipe, step, timestep, tensors):
                    on_step(step + 1, int(getattr(pipe, "num_timesteps", None) or form.steps))
                    return tensors

                kwargs["callback_on_step_end"] = callback
            images = ip.generate(prompts=prompts, **kwargs)
        notes = [page_message(w.message) for w in caught if issubclass(w.category, IPAdapterNote)]
        sampler = type(ip.pipe.scheduler).__name__
        entries = []
        for k, image in enumerate(images):
            # image k was made with seed S+k (the library's rule): its own form remakes it alone
            own = Form(**{**asdict(form), "seed": form.seed + k, "num_images": 1, "random_seed": False})
            text = parameters_text(own, image.size, sampler)
            path = self._save(image, text, own.seed)
            entries.append({"path": str(path), "caption": f"seed {own.seed}", "text": text, "form": asdict(own)})
        return entries, notes

    def _save(self, image, text: str, seed: int) -> Path:
        from ..generation.pipeline import save_png

        with self._count_lock:  # unique names even for two sessions in the same second
            self._count += 1
            n = self._count
        name = f"ipadapter-{time.strftime('%Y%m%d-%H%M%S')}-{n:04d}-seed{seed}.png"
        return save_png(image, self.output_dir / name, text)


def parameters_text(form: Form, size: tuple[int, int], sampler: str) -> str:
    """The PNG's "parameters" text, in the one format the CLI writes too (:mod:`ipadapter.generation.parameters`);
    uploads by their file names (Gradio's cache paths mean nothing elsewhere)."""
    from ..generation.parameters import AdapterParameters, ControlNetParameters, Parameters, format_parameters

    def name(path: str | None) -> str:
        return Path(path).name if path else ""

    slots = form.prompt_images()
    masks = [name(m) for _, _, m in slots]
    adapter = AdapterParameters(
        adapter=Path(form.adapter).name if Path(form.adapter).parent == Path(form.model) else form.adapter,
        scale=float(form.scale), images=[name(p) for p, _, _ in slots], weights=[w for _, w, _ in slots],
        masks=masks if any(masks) else [], negative_images=[name(form.negative_image)] if form.negative_image else [],
        combine=form.combine, start=float(form.start), end=float(form.end), curve=form.curve, blocks=form.blocks,
        options={n: str(form.comfy[n]) for n, neutral in COMFY_CONTROLS if n not in COMFY_IMAGES
                 and form.comfy.get(n, neutral) not in (None, "", neutral)},
        option_images={n if n.endswith("s") else n + "s": [name(form.comfy[n])] for n in COMFY_IMAGES
                       if form.comfy.get(n)})
    return format_parameters(Parameters(
        prompt=form.prompt, negative_prompt=form.negative_prompt, steps=int(form.steps), sampler=sampler,
        guidance=float(form.guidance), seed=int(form.seed), width=size[0], height=size[1], model=form.model,
        true_cfg=float(form.true_cfg) if form.true_cfg is not None and float(form.true_cfg) != 1.0 else None,
        adapters=[adapter], init_image=name(form.init_image),
        strength=float(form.strength) if form.init_image else None,
        inpaint_mask=name(form.inpaint_mask) if form.init_image else "",
        controlnets=[ControlNetParameters(form.controlnet, name(form.control_image), float(form.control_scale))]
        if form.controlnet else []))


# ------------------------------------------------------------------------------------------------ the page
def _path(payload) -> str | None:
    """A file path from an un-preprocessed Gradio file payload (Gradio has checked it lies in its upload cache)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return str(payload)


def _page_error(e: BaseException, form: Form | None = None):
    """Any failure -> a gr.Error of one line: ours as written, anything else named but without its traceback."""
    import gradio as gr

    if isinstance(e, gr.Error):
        return e
    if isinstance(e, IPAdapterError):
        return gr.Error(page_message(e, form), title="Cannot generate", print_exception=False)
    traceback.print_exc()  # unexpected: the server's log gets the details, the page one line
    return gr.Error(page_message(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}", form),
                    title="Generation failed", print_exception=False)


def _is_embedded(model: str) -> bool:
    from ..generation.pipeline import EMBEDDED_MODEL

    return Path(model).resolve() == EMBEDDED_MODEL.resolve()


def build_app(model: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
              image_encoder: str | os.PathLike | None = None, device: str | None = None,
              output_dir: str | os.PathLike | None = None, allow_model_change: bool = True,
              preload: bool = False, model_options: dict | None = None):
    """The Gradio Blocks app, not launched (see :func:`launch`). ``model``/``adapter``: the embedded world model's
    by default. ``preload`` loads the model now, so that a bad model fails here and the first click is fast.
    ``model_options``: ``model_config`` (for a single-file model), ``loras`` [(file, weight)], ``dtype``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no telemetry calls
    import gradio as gr

    model, adapter = resolve_model(model, adapter)
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="ipadapter-ui-"))
    models = ModelCache(device, str(image_encoder) if image_encoder else None, options=model_options)
    generator = Generator(models, model, adapter, output_dir, allow_model_change)
    if preload:
        models.get(model, adapter)
    side, guidance = default_size(model), default_guidance(model)
    model_label = "the embedded world model (64x64 coloured shapes)" if _is_embedded(model) else f"`{model}`"
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                           font=["ui-sans-serif", "system-ui", "sans-serif"],  # system fonts: nothing fetched
                           font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        page = _layout(gr, model, adapter, model_label, side, allow_model_change, guidance)
        _wire(gr, page, generator, side)
    app.queue(default_concurrency_limit=1, max_size=64)
    # for launch(): Gradio 6 takes the theme and CSS at launch time; the PNGs are served from output_dir
    app.ipadapter_launch_kwargs = dict(theme=theme, css=CSS, allowed_paths=[str(output_dir)])
    app.ipadapter_generator = generator
    return app


def _layout(gr, model: str, adapter: str, model_label: str, side: int, allow_model_change: bool,
            guidance: float = 7.5) -> dict:
    """The page's components, by name (the header, the form's columns, the results)."""
    page: dict = {"history": gr.State([]), "selected": gr.State(0), "shown": gr.State(1)}  # newest first; slots
    with gr.Column(elem_id="ipa-header"):
        gr.Markdown(f"# {TITLE}\n{INTRO} Model: {model_label}.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=360):
            page.update(_prompt_slots(gr))
            page.update(_main_controls(gr, side, guidance))
            page.update(_advanced_controls(gr))
            page.update(_model_controls(gr, model, adapter, allow_model_change))
        with gr.Column(scale=6, min_width=360):
            page.update(_results(gr))
    return page


IMAGE_SOURCES = ["upload", "clipboard"]


def _prompt_slots(gr) -> dict:
    """Up to MAX_IMAGES prompt images, each with a weight and a region mask; one shown at first."""
    image_sources = IMAGE_SOURCES
    slot_columns, slot_images, slot_weights, slot_masks = [], [], [], []
    with gr.Row():
        for i in range(MAX_IMAGES):
            with gr.Column(visible=i == 0, min_width=150) as col:
                img = gr.Image(label=f"Image {i + 1}", type="filepath", sources=image_sources,
                               height=200, elem_id=f"ipa-image-{i + 1}")
                w = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight", elem_id=f"ipa-weight-{i + 1}")
                with gr.Accordion("Region mask", open=False):
                    m = gr.Image(label="Mask (white = here)", type="filepath", image_mode="L",
                                 sources=image_sources, height=120, elem_id=f"ipa-mask-{i + 1}")
            slot_columns.append(col)
            slot_images.append(img)
            slot_weights.append(w)
            slot_masks.append(m)
    add_slot = gr.Button(f"+ Add another image (up to {MAX_IMAGES})", size="sm", variant="secondary")
    return dict(slot_columns=slot_columns, slot_images=slot_images, slot_weights=slot_weights,
                slot_masks=slot_masks, add_slot=add_slot)


def _main_controls(gr, side: int, guidance_default: float = 7.5) -> dict:
    defaults = Form(width=side, height=side, guidance=guidance_default)
    prompt = gr.Textbox(label="Text prompt (optional)", lines=2, elem_id="ipa-prompt",
                        placeholder="e.g. a red circle on a blue background; empty = image only")
    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="ipa-negative")
    run = gr.Button("Generate", variant="primary", elem_id="ipa-generate")
    with gr.Row():
        scale = gr.Slider(0, 2, value=defaults.scale, step=0.05, label="Image prompt scale",
                          info="1 = image only; ~0.5 with text", elem_id="ipa-scale")
        num_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="ipa-num-images")
    with gr.Row():
        steps = gr.Slider(1, 150, value=defaults.steps, step=1, label="Steps", elem_id="ipa-steps")
        guidance = gr.Slider(1, 20, value=defaults.guidance, step=0.5, label="Guidance",
                             info="Flux: the distilled guidance (3.5)", elem_id="ipa-guidance")
    with gr.Row():
        width = gr.Slider(8, 2048, value=side, step=8, label="Width", elem_id="ipa-width")
        height = gr.Slider(8, 2048, value=side, step=8, label="Height", elem_id="ipa-height")
    with gr.Row(equal_height=True):
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="ipa-seed")
        random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="ipa-random-seed")
    return dict(prompt=prompt, negative=negative, run=run, scale=scale, num_images=num_images, steps=steps,
                guidance=guidance, width=width, height=height, seed=seed, random_seed=random_seed)


def _advanced_controls(gr) -> dict:
    defaults, image_sources = Form(), IMAGE_SOURCES
    with gr.Accordion("Advanced: blocks, start/end, combine, negative image, img2img, ControlNet",
                      open=False):
        with gr.Row():
            blocks = gr.Dropdown(BLOCK_CHOICES, value="", allow_custom_value=True, elem_id="ipa-blocks",
                                 label="Blocks",
                                 info="where the image prompt acts: InstantStyle presets or "
                                      "BLOCK=SCALE,... (e.g. up_blocks.1=1,*=0.3)")
            combine = gr.Dropdown(list(COMBINE_MODES), value="concat",
                                  label="Combine images", info="concat keeps each image's tokens",
                                  elem_id="ipa-combine")
        with gr.Row():
            start = gr.Slider(0, 1, value=0, step=0.05, label="Start", info="fraction of the steps",
                              elem_id="ipa-start")
            end = gr.Slider(0, 1, value=1, step=0.05, label="End", info="fraction of the steps",
                            elem_id="ipa-end")
            curve = gr.Dropdown(["constant", "linear", "ease-in", "ease-out"], value="constant",
                                label="Weight curve", elem_id="ipa-curve")
        with gr.Row():
            negative_image = gr.Image(label="Negative image", type="filepath", height=160,
                                      sources=image_sources, elem_id="ipa-negative-image")
            gr.Markdown("A **negative image** takes the place of the empty image in the unconditional "
                        "branch of guidance: results move away from it (e.g. a blurry or noisy picture).")
        with gr.Row():
            init_image = gr.Image(label="img2img image", type="filepath", height=160,
                                  sources=image_sources, elem_id="ipa-init-image")
            inpaint_mask = gr.Image(label="Inpaint mask", type="filepath",
                                    image_mode="L", height=160, sources=image_sources,
                                    elem_id="ipa-inpaint-mask")
        strength = gr.Slider(0.05, 1, value=defaults.strength, step=0.05, label="img2img strength",
                             info="how much of the img2img image to repaint (inpaint mask: white = "
                                  "repaint)", elem_id="ipa-strength")
        with gr.Row():
            control_image = gr.Image(label="Control image", type="filepath", height=160,
                                     sources=image_sources, elem_id="ipa-control-image")
            with gr.Column():
                controlnet = gr.Textbox(label="ControlNet model folder", elem_id="ipa-controlnet")
                control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet scale",
                                          elem_id="ipa-control-scale")
        true_cfg = gr.Number(1.0, minimum=1.0, label="True CFG (Flux)", elem_id="ipa-true-cfg",
                             info="above 1: an unconditional pass per step with the negative prompt and image")
        comfy = comfy_widgets(gr, image_sources)
    return dict(blocks=blocks, combine=combine, start=start, end=end, curve=curve, negative_image=negative_image,
                init_image=init_image, inpaint_mask=inpaint_mask, strength=strength, control_image=control_image,
                controlnet=controlnet, control_scale=control_scale, comfy=comfy, true_cfg=true_cfg)


def _model_controls(gr, model: str, adapter: str, allow_model_change: bool) -> dict:
    with gr.Accordion("Model", open=False):
        model_box = gr.Textbox(value=model, label="Model folder (diffusers layout: SD, SDXL, Flux, SD3), hub id or "
                                                  "single .safetensors file",
                               interactive=allow_model_change, elem_id="ipa-model")
        adapter_box = gr.Textbox(value=adapter, label="Adapter file (.safetensors / .bin)",
                                 interactive=allow_model_change, elem_id="ipa-adapter")
    return dict(model_box=model_box, adapter_box=adapter_box)


def _results(gr) -> dict:
    gallery = gr.Gallery(label="Results", columns=3, height=520, object_fit="contain",
                         allow_preview=True, elem_id="ipa-gallery", interactive=False)
    params = gr.Textbox(label="Parameters of the selected result", lines=5, interactive=False,
                        buttons=["copy"], elem_id="ipa-params")
    with gr.Row():
        download = gr.DownloadButton("Download PNG (with parameters)", value=None, interactive=False,
                                     elem_id="ipa-download")
        reuse = gr.Button("Reuse these parameters", interactive=False, elem_id="ipa-reuse")
    return dict(gallery=gallery, params=params, download=download, reuse=reuse)


def _form_inputs(p: dict) -> list:
    """The form's components in the order of the ``generate`` endpoint's parameters (the HTTP API)."""
    return [*(c for i in range(MAX_IMAGES) for c in (p["slot_images"][i], p["slot_weights"][i], p["slot_masks"][i])),
            p["prompt"], p["negative"], p["scale"], p["steps"], p["guidance"], p["seed"], p["random_seed"],
            p["width"], p["height"], p["num_images"], p["model_box"], p["adapter_box"], p["combine"], p["blocks"],
            p["start"], p["end"], p["curve"], p["negative_image"], p["init_image"], p["strength"],
            p["inpaint_mask"], p["controlnet"], p["control_image"], p["control_scale"], *p["comfy"].values(),
            p["true_cfg"]]


def _wire(gr, p: dict, generator: Generator, side: int) -> None:
    """The page's events: generate, upload checks, more slots, selecting a result, reusing its parameters."""
    inputs = _form_inputs(p)
    history, selected, shown = p["history"], p["selected"], p["shown"]
    gallery, params, download, reuse = p["gallery"], p["params"], p["download"], p["reuse"]
    slot_columns, add_slot = p["slot_columns"], p["add_slot"]
    generate = _generate_endpoint(gr, generator, side)
    # preprocess=False: uploads arrive as paths (Gradio still checks that they lie in its upload cache), so an
    # unreadable file reaches the library's loader and its one-line message, not a decoder's traceback.
    p["run"].click(generate, inputs=[*inputs, history], outputs=[gallery, params, download, history, selected],
                   api_name="generate", preprocess=False, concurrency_limit=1, concurrency_id="generate",
                   ).success(lambda: (gr.DownloadButton(interactive=True), gr.Button(interactive=True)),
                             outputs=[download, reuse], queue=False, api_visibility="private")

    _wire_uploads(gr, [*p["slot_images"], *p["slot_masks"], p["negative_image"], p["init_image"], p["inpaint_mask"],
                       p["control_image"]])

    def show_more(n):
        n = min(int(n) + 1, MAX_IMAGES)
        return [n, *(gr.Column(visible=i < n) for i in range(MAX_IMAGES)), gr.Button(interactive=n < MAX_IMAGES)]

    add_slot.click(show_more, inputs=shown, outputs=[shown, *slot_columns, add_slot], queue=False,
                   api_visibility="private")

    def select(history, evt: gr.SelectData):
        if not history or evt.index is None or evt.index >= len(history):
            return "", gr.DownloadButton(value=None, interactive=False), gr.Button(interactive=False), 0
        entry = history[evt.index]
        return (entry["text"], gr.DownloadButton(value=entry["path"], interactive=True),
                gr.Button(interactive=True), evt.index)

    # Gradio finds the event-data argument by its annotation; postponed annotations make it a string here
    select.__annotations__["evt"] = gr.SelectData
    gallery.select(select, inputs=history, outputs=[params, download, reuse, selected], queue=False,
                   api_visibility="private")

    def reuse_parameters(history, index):
        if not history:
            raise gr.Error("generate something first", title="Nothing to reuse", print_exception=False)
        form = Form(**history[min(int(index or 0), len(history) - 1)]["form"])

        def still(path):  # uploads live in Gradio's cache for the server's lifetime
            return path if path and Path(path).is_file() else None

        n = max(1, max((i + 1 for i, p in enumerate(form.images) if p), default=1))
        values = [v for i in range(MAX_IMAGES) for v in (still(form.images[i]), form.weights[i],
                                                          still(form.masks[i]))]
        values += [form.prompt, form.negative_prompt, form.scale, form.steps, form.guidance, form.seed, False,
                   form.width, form.height, form.num_images, form.model, form.adapter, form.combine, form.blocks,
                   form.start, form.end, form.curve, still(form.negative_image), still(form.init_image),
                   form.strength,
                   still(form.inpaint_mask), form.controlnet, still(form.control_image), form.control_scale]
        values += [still(form.comfy.get(k)) if k in COMFY_IMAGES else form.comfy.get(k, v)
                   for k, v in COMFY_CONTROLS]
        values.append(1.0 if form.true_cfg is None else form.true_cfg)
        return [*values, n, *(gr.Column(visible=i < n) for i in range(MAX_IMAGES)),
                gr.Button(interactive=n < MAX_IMAGES)]

    reuse.click(reuse_parameters, inputs=[history, selected], outputs=[*inputs, shown, *slot_columns, add_slot],
                queue=False, api_visibility="private")


def _generate_endpoint(gr, generator: Generator, side: int):
    """The ``/generate`` endpoint: the page's controls by name -> (gallery, parameters, PNG, history, selected)."""
    # These parameter names are the HTTP API's; a default of None makes a parameter optional for clients.
    def generate(image_1, weight_1=1.0, mask_1=None, image_2=None, weight_2=1.0, mask_2=None, image_3=None,
                 weight_3=1.0, mask_3=None, image_4=None, weight_4=1.0, mask_4=None, prompt=None,
                 negative_prompt=None, scale=1.0, steps=30, guidance=None, seed=0, random_seed=True, width=None,
                 height=None, num_images=1, model=None, adapter=None, combine="concat", blocks=None, start=0.0,
                 end=1.0, curve="constant", negative_image=None, init_image=None, strength=0.6, inpaint_mask=None,
                 controlnet=None, control_image=None, control_scale=1.0, weight_type=None, composition_weight=None,
                 boost=None, embeds_scaling="v", crop=None, interpolation="lanczos", sharpen=0.0, tiles=False,
                 enhance_tiles=1, enhance_ratio=1.0, unfold_batch=False, encode_batch_size=0, negative_noise=None,
                 noise_strength=1.0, noise_blur=0, noise_seed=0, composition_image=None, face_image=None,
                 true_cfg=None, history=None, progress=gr.Progress()):
        """Generate images from image prompts (and an optional text prompt)."""
        form = Form(
            images=[_path(x) for x in (image_1, image_2, image_3, image_4)],
            weights=[float(1.0 if x is None else x) for x in (weight_1, weight_2, weight_3, weight_4)],
            masks=[_path(x) for x in (mask_1, mask_2, mask_3, mask_4)],
            prompt=prompt or "", negative_prompt=negative_prompt or "", scale=float(scale), steps=int(steps),
            guidance=None if guidance is None else float(guidance), seed=int(seed or 0), random_seed=bool(random_seed),
            width=int(width or side), height=int(height or side), num_images=int(num_images),
            model=(model or "").strip(), adapter=(adapter or "").strip(), combine=combine or "concat",
            blocks=(blocks or "").strip(), start=float(start), end=float(end), curve=curve or "constant",
            negative_image=_path(negative_image), init_image=_path(init_image), strength=float(strength),
            inpaint_mask=_path(inpaint_mask),
            controlnet=(controlnet or "").strip(), control_image=_path(control_image),
            control_scale=float(control_scale),
            comfy=dict(weight_type=weight_type, composition_weight=composition_weight, boost=boost,
                       embeds_scaling=embeds_scaling, crop=crop, interpolation=interpolation, sharpen=sharpen,
                       tiles=tiles, enhance_tiles=enhance_tiles, enhance_ratio=enhance_ratio,
                       unfold_batch=unfold_batch, encode_batch_size=encode_batch_size,
                       negative_noise=negative_noise, noise_strength=noise_strength, noise_blur=noise_blur,
                       noise_seed=noise_seed, composition_image=_path(composition_image),
                       face_image=_path(face_image)),
            true_cfg=None if true_cfg is None else float(true_cfg),
        )
        progress(0, desc="Preparing")  # loading the model, on first use
        try:
            entries, notes = generator.run(form, lambda i, n: progress((i, n), desc="Denoising", unit="steps"))
        except Exception as e:  # noqa: BLE001 - every failure becomes a message on the page
            raise _page_error(e, form) from None
        for text in notes:
            gr.Info(page_message(text, form), title="Note")
        history = (entries + list(history or []))[:MAX_HISTORY]
        first = entries[0]
        # plain values, so that API clients get a list of (PNG, caption), the parameters and the first PNG
        return [(h["path"], h["caption"]) for h in history], first["text"], first["path"], history, 0

    return generate


def _wire_uploads(gr, components: list) -> None:
    def upload_checker(what: str):
        """Check an upload at once, so that a bad file is reported where it was dropped."""
        def check(payload):
            path = _path(payload)
            if path:
                try:
                    _read_image(path, what)
                except IPAdapterError as e:
                    raise gr.Error(str(e), title="Not an image", print_exception=False) from None

        return check

    for component in components:
        what = {"Mask (white = here)": "region mask"}.get(component.label, component.label)
        component.upload(upload_checker(what), inputs=component, outputs=None, preprocess=False,
                         api_visibility="private")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(host: str = "127.0.0.1", port: int = 7860, model: str | os.PathLike | None = None,
           adapter: str | os.PathLike | None = None, share: bool = False, block: bool = True, **build_kwargs):
    """Build and serve the app on ``host:port`` (loopback unless told otherwise), never with a public share link
    unless ``share``. Returns (app, local URL); with ``block`` it serves until interrupted, then closes.

    A server that listens beyond this machine does not let the page choose model files: they would be read from
    this machine's disk (and ``.bin`` files unpickled) on a remote visitor's say-so.
    """
    build_kwargs.setdefault("allow_model_change", _is_loopback(host))
    app = build_app(model, adapter, **build_kwargs)
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                           footer_links=["api", "settings"], **app.ipadapter_launch_kwargs)
    print(f"ipadapter ui: {url}", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app, url
