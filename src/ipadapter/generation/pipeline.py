"""Generation: a small object around any diffusers SD 1.x / SDXL pipeline with adapters attached.

    pipe = ipadapter.load_pipeline("path/to/sd15")           # or any diffusers pipeline you built
    ip = ipadapter.load(pipe, "ip-adapter_sd15.safetensors")  # image encoder: model's or beside the file
    images = ip.generate(images=["cat.png"], prompt="", seed=0)

    ip.set_images(["cat.png"], scale=0.6)                    # or drive the pipeline yourself
    pipe(prompt="a cat on a beach", generator=torch.Generator("cpu").manual_seed(0))

Every control is a keyword of ``generate`` (one adapter) or a field of :class:`ImagePrompt` (one per adapter):

    ip.generate(images=["a.png", "b.png"], weights=[1, 2], combine="concat",   # or average / norm-average
                masks=["left.png", "right.png"], negative_images=["blur.png"],
                start=0.2, end=1.0, curve="linear", blocks="style",           # or {"up": {"block_0": [0, 1, 0]}}
                init_image="photo.png", strength=0.6, mask_image="hole.png",  # img2img / inpainting
                controlnets=["cn-depth/"], control_images=["depth.png"], control_scales=[0.8],
                seed=0, num_images=4)                                          # image k: seed 0 + k
    ip = ipadapter.load(pipe, ["plus.safetensors", "plus-face.safetensors"])
    ip.generate(prompts=[ImagePrompt(images=["style.png"], blocks="style"),
                         ImagePrompt(images=["face.png"], scale=0.6, start=0.3)])
    ip.set_images(prompt=ImagePrompt(...)); ip.pipeline_for("img2img")(prompt="...", image=init)

The image features, projection and every layer's image keys/values are computed once per generation; the
pipeline's own IP-Adapter path is never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from ..bases import attach, attached, check, denoiser_of, detach, execution_device, family_of, runtime_of
from ..bases.base import saved_without
from ..bases.unet import is_sdxl  # noqa: F401 - kept importable here
from ..core.adapter import Adapter
from ..core.config import FLAVOURS
from ..core.encoders import Features, ImageEncoder, load_face_embeddings, load_image
from ..core.errors import IPAdapterError, param
from ..core.rows import markers
from . import controls, limits


# ------------------------------------------------------------------------------------------ model loading
def load_pipeline(model: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
                  image_encoder: bool = True):
    """A diffusers text-to-image pipeline from a local folder or a hub id (SD 1.x/2.x or SDXL, detected).

    ``image_encoder=False`` leaves out the model's image encoder (precomputed embeddings need none).
    """
    from diffusers import DiffusionPipeline

    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    path = Path(resolve_model(model)[0])
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    kwargs[_dtype_keyword()] = dtype
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise IPAdapterError(f"{path}: not a diffusers model folder (no model_index.json)")
        try:
            with _without_image_encoder(path) if not image_encoder else contextlib.nullcontext(path) as folder:
                pipe = DiffusionPipeline.from_pretrained(str(folder), **{**saved_without(path), **kwargs})
            pipe.register_to_config(_name_or_path=str(path))  # the folder itself, not the view without the encoder
        except Exception as e:  # noqa: BLE001 - a broken folder is bad input
            raise IPAdapterError(f"{path}: cannot load the model ({' '.join(str(e).split())[:160]})") from None
    else:
        pipe = _from_hub(str(model), kwargs)
    try:
        family_of(pipe)  # a one-line error for a model no base family serves
    except IPAdapterError as e:
        raise IPAdapterError(f"{model}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def _without_image_encoder(path: Path):
    """The model folder as seen without its image encoder: diffusers loads an optional component listed in
    model_index.json even when ``image_encoder=None`` is passed, so point it at a view (links to every other
    entry, and an index that lists none) for the time of the load."""
    index = json.loads((path / "model_index.json").read_text())
    if "image_encoder" not in index:
        yield path
        return
    index["image_encoder"] = [None, None]
    with tempfile.TemporaryDirectory(prefix="ipadapter-model-") as tmp:
        view = Path(tmp)
        for entry in path.iterdir():
            if entry.name not in ("model_index.json", "image_encoder"):
                (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        (view / "model_index.json").write_text(json.dumps(index))
        yield view


def _dtype_keyword() -> str:
    """Recent diffusers (0.42) take ``dtype=`` and warn on ``torch_dtype=``; older releases only know the latter."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - present where dtype= works
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _from_hub(model_id: str, kwargs: dict):
    from diffusers import DiffusionPipeline

    if model_id.count("/") != 1 or model_id.startswith((".", "/")):
        raise IPAdapterError(f"{model_id}: no such model folder, and not a hub id (owner/name)")
    try:
        return DiffusionPipeline.from_pretrained(model_id, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached: try the hub
        pass
    offline = (f"{model_id}: not in the local Hugging Face cache and the hub cannot be reached ({{why}}); download "
               f"it where you have internet (hf download {model_id} --local-dir DIR) or pass a local folder with "
               "--model DIR")
    why = hub_unreachable()
    if why:
        raise IPAdapterError(offline.format(why=why))
    try:
        return DiffusionPipeline.from_pretrained(model_id, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise IPAdapterError(offline.format(why=" ".join(str(e).split())[:120])) from None


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, found in at most ``timeout`` seconds; None when it answers.

    ``HF_HUB_OFFLINE`` says so at once; otherwise one TCP connection to the endpoint's port, so that an offline
    machine does not wait through the HTTP client's retries and long timeouts.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: dict = {}

    def probe() -> None:  # in a thread: the name lookup itself is not bounded by the socket's timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="ipadapter-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if "ok" in outcome:
        return None
    if "error" in outcome:
        e = outcome["error"]
        return f"no connection to {host}:{port}: {e.strerror or type(e).__name__}"
    return f"no answer from {host}:{port} within {timeout:g} s"


def find_image_encoder(adapter_path: str | os.PathLike | None, model_dir: str | os.PathLike | None = None,
                       explicit: str | os.PathLike | None = None) -> Path:
    """``explicit``, else the first folder with a ``config.json`` of: the model's ``image_encoder/``, then beside
    the adapter file ``image_encoder/`` and ``models/image_encoder/``, then the same one folder up (the official
    release keeps ``models/image_encoder`` beside ``models/*.safetensors``; ``sdxl_models/*vit-h*`` use it too)."""
    if explicit is not None:
        return Path(explicit)
    candidates = []
    if model_dir is not None:
        candidates.append(Path(model_dir) / "image_encoder")
    if adapter_path is not None:
        here = Path(adapter_path).parent
        for folder in (here, here.parent):
            candidates += [folder / "image_encoder", folder / "models" / "image_encoder"]
    tried: list[Path] = []
    for c in candidates:
        if any(os.path.abspath(c) == os.path.abspath(t) for t in tried):
            continue
        tried.append(c)
        if (c / "config.json").is_file():
            return c
    looked = ", ".join(str(c) for c in tried) or "nowhere (no model folder or adapter file given)"
    raise IPAdapterError(f"no image encoder found (looked in {looked}; the official IP-Adapter release keeps it in "
                         f"models/image_encoder beside the adapter files); pass {param('image_encoder')} DIR")


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class ImagePrompt:
    """What one adapter gets for a generation (:mod:`ipadapter.controls` says what each control does)."""

    images: Sequence = ()  # paths or PIL images; or one list per text prompt (several prompts in one call)
    scale: float = 1.0
    negative_images: Sequence = ()  # replace the zero/uncond branch: one for all images, or one per image
    face_embeds: torch.Tensor | str | None = None  # FaceID: [n, 512] or a file
    # precomputed encoder features instead of images: an `ipadapter embed` file, or (negative, positive)
    # as Features or as tensors of the feature this adapter reads
    embeds: str | os.PathLike | tuple | None = None
    extra: dict = field(default_factory=dict)
    weights: Sequence[float] | None = None  # one per image (None: all 1)
    combine: str = "concat"  # concat | average | norm-average
    masks: Sequence | None = None  # grayscale region masks: one per image (concat), or one (average modes)
    start: float = 0.0  # fraction of the denoising where the adapter starts acting ...
    end: float = 1.0  # ... and stops
    curve: str = "constant"  # constant | linear | ease-in | ease-out, across [start, end]
    blocks: str | Mapping | None = None  # "style", "composition", "down_blocks.2=0.5,*=1", or diffusers' dict
    # ComfyUI_IPAdapter_plus's controls (docs/controls.md has the table of names)
    weight_type: str | None = None  # generation.weight_types: "ease-in", "style-transfer", ... (ComfyUI's names too)
    composition_weight: float | None = None  # weight_composition: the "c" blocks of the weight type (default 1)
    boost: float | None = None  # style_boost / composition_boost of the precise types (default: scale)
    composition_images: Sequence = ()  # style and composition: the image for the composition blocks
    embeds_scaling: str = "v"  # v | kv | kv-penalty | k-mean-v-penalty (ComfyUI: V only, K+V, ...)
    crop: str | None = None  # encoder prep: center | top | bottom | left | right | pad (None: the processor's)
    interpolation: str = "lanczos"  # encoder prep resize filter (with crop or sharpen)
    sharpen: float = 0.0  # encoder prep contrast-adaptive sharpening, 0..1
    tiles: bool = False  # tiled IP-Adapter: each reference cut into 256 px tiles, each on its own region
    enhance_tiles: int = 1  # ClipVision enhancer: a tiles x tiles grid of pieces merged with the whole image
    enhance_ratio: float = 1.0  # ... the whole image's share
    unfold_batch: bool = False  # image k of the batch gets reference k only (a video: frame k; the last held)
    frame_starts: Sequence[int] | None = None  # with unfold_batch on a video: reference k from frame frame_starts[k]
    encode_batch_size: int = 0  # images per encoder call (0: all at once)
    negative_noise: str | None = None  # fade | dissolve | gaussian | shuffle: a negative image from noise
    noise_strength: float = 1.0
    noise_blur: int = 0
    noise_seed: int = 0
    face_images: Sequence = ()  # FaceID: face photos (insightface finds the face; several for Portrait)


PROMPT_OPTIONS = frozenset(f.name for f in fields(ImagePrompt)) - {"images", "scale"}


def is_idle(prompt: ImagePrompt) -> bool:
    """No image, embeddings, face embeddings or face photos: the adapter sits this generation out (text-only, the
    base model)."""
    return (not prompt.images and prompt.embeds is None and prompt.face_embeds is None and not prompt.face_images
            and not prompt.composition_images)


MODES: tuple[str, ...] = ("txt2img", "img2img", "inpaint")


def check_scale(scale: float) -> float:
    scale = float(scale)
    if scale != scale or scale < 0 or scale == float("inf"):
        raise IPAdapterError(f"scale {scale}: must be a finite number >= 0 (1.0 = image only, ~0.5 with text)")
    return scale


def encode_prompt(config, encoder: ImageEncoder, images: Sequence,
                  negative_images: Sequence = (), **options) -> tuple[Features, Features]:
    """(cond, uncond) encoder features of prompt images as an adapter of ``config`` reads them.

    The unconditional branch is the reference's (zero embedding / zero pixels) unless negative images are
    given: one for all the images, or one per image. ``options`` go to :meth:`ImageEncoder.encode` for the
    prompt images (prep, batch_size, enhance_tiles, enhance_ratio).
    """
    if not images:
        raise IPAdapterError(f"{config.kind} adapter: no prompt image given")
    cond, uncond = encoder.encode(config, list(images), **options)
    if not negative_images and FLAVOURS[config.flavour]["negative"] == "black":
        negative_images = [Image.new("RGB", (64, 64))]  # Flux: a black picture, as diffusers' Flux pipelines encode
    if negative_images:
        neg, _ = encoder.encode(config, list(negative_images), batch_size=options.get("batch_size", 0))
        uncond = _broadcast_features(neg, cond)
    return cond, uncond


def _feature_field(config) -> str:
    return {"global": "image_embeds", "mlp": "image_embeds", "plus": "penultimate", "full": "penultimate",
            "time-plus": "penultimate"}.get(config.kind, "face_id")


def _count(features: Features) -> int:
    return next(t.shape[0] for t in (features.image_embeds, features.penultimate, features.face_id) if t is not None)


def _combine_features(features: Features, weights, mode: str, groups: int = 1) -> Features:
    """Combine the images of each of ``groups`` equal consecutive runs (one per text prompt)."""
    def each(t):
        return torch.cat([controls.combine(g, weights, mode) for g in t.chunk(groups)]) if groups > 1 else \
            controls.combine(t, weights, mode)

    return Features(*(each(t) if t is not None else None
                      for t in (features.image_embeds, features.penultimate, features.face_id)))


def _combine_uncond(features: Features) -> Features:
    """The unconditional rows of combined images: the first row when all are the same (the zero embedding, one
    negative image: ComfyUI takes the first), else their mean (one negative per image)."""
    return Features(*(_first_or_mean(t) if t is not None else None
                      for t in (features.image_embeds, features.penultimate, features.face_id)))


def _first_or_mean(t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] == 1:
        return t
    return t[:1].clone() if bool((t == t[:1]).all()) else t.mean(0, keepdim=True)


def image_sets(images) -> list[list] | None:
    """``images`` as one list per text prompt (all as long), or None for one flat list of images."""
    items = list(images or [])
    if not items or not all(isinstance(i, (list, tuple)) for i in items):
        if any(isinstance(i, (list, tuple)) for i in items):
            raise IPAdapterError("images: give a list of images, or one list of images per text prompt, not a mix")
        return None
    sizes = {len(i) for i in items}
    if len(sizes) != 1 or 0 in sizes:
        raise IPAdapterError(f"images: one list per text prompt, each as long (got {sorted(sizes)} images)")
    return [list(i) for i in items]


def _flattened(prompt: ImagePrompt, sets: list[list]) -> ImagePrompt:
    """One prompt of every set's images in a row (encoded as one batch); a negative per image repeats per set."""
    if prompt.embeds is not None or prompt.face_embeds is not None or prompt.unfold_batch:
        raise IPAdapterError("images as one list per text prompt: give images, not embeds, face_embeds or "
                             "unfold_batch")
    negatives = list(prompt.negative_images or [])
    if len(negatives) == len(sets[0]) > 1:
        negatives = negatives * len(sets)
    return dataclasses.replace(prompt, images=[im for s in sets for im in s], negative_images=negatives)


def _reset(state) -> None:
    state.set_tokens(None)
    state.scale, state.layer_scales, state.schedule = 1.0, {}, None
    state.masks, state.image_weights = None, None
    state.kv_scaling = "v"
    state.step_sets = None


def _check_comfy(prompt: ImagePrompt, mode: str, layers):
    """Check the ComfyUI controls that go together; the weight type's plan (or None)."""
    from . import weight_types

    if prompt.unfold_batch and (mode != "concat" or prompt.weights or prompt.masks or prompt.tiles
                                or prompt.composition_images):
        raise IPAdapterError("--unfold-batch gives image k to batch item k alone: it takes no --combine, "
                             "--image-weight, --image-mask, --tiles or --composition-image")
    _check_frame_starts(prompt)
    if prompt.tiles and (mode != "concat" or prompt.weights or int(prompt.enhance_tiles) > 1):
        raise IPAdapterError("--tiles gives each tile its own tokens and region: it takes no --combine, "
                             "--image-weight or --enhance-tiles")
    if int(prompt.enhance_tiles) < 1 or int(prompt.enhance_tiles) > 16:
        raise IPAdapterError(f"--enhance-tiles {prompt.enhance_tiles}: must be from 1 to 16")
    if not (0.0 <= float(prompt.enhance_ratio) <= 1.0):
        raise IPAdapterError(f"--enhance-ratio {prompt.enhance_ratio}: must be between 0 and 1")
    if int(prompt.encode_batch_size) < 0:
        raise IPAdapterError(f"--encode-batch-size {prompt.encode_batch_size}: must be >= 0 (0: all at once)")
    if prompt.weight_type is None:
        if prompt.composition_images or prompt.composition_weight is not None or prompt.boost is not None:
            raise IPAdapterError("--composition-image, --composition-weight and --boost go with a --weight-type "
                                 "(style-and-composition, the precise types)")
        return None
    plan = weight_types.resolve(layers, prompt.weight_type, float(prompt.scale), prompt.composition_weight,
                                prompt.boost)
    if prompt.composition_images and not plan.composition:
        raise IPAdapterError(f"--composition-image: --weight-type {prompt.weight_type} has no composition blocks; "
                             "use style-and-composition or strong-style-and-composition")
    if prompt.composition_images and (prompt.weights or prompt.masks):
        raise IPAdapterError("--composition-image takes no --image-weight or --image-mask")
    return plan


def _check_frame_starts(prompt: ImagePrompt) -> None:
    starts = prompt.frame_starts
    if starts is None:
        return
    name = param("frame_starts")
    if not prompt.unfold_batch:
        raise IPAdapterError(f"{name} places one reference per span of frames: it goes with {param('unfold_batch')}")
    try:
        values = [int(v) for v in starts]
    except (TypeError, ValueError):
        raise IPAdapterError(f"{name} {starts!r}: give whole frame numbers, one per image") from None
    if any(v != float(f) for v, f in zip(values, starts)) or any(v < 0 for v in values) or \
            any(b <= a for a, b in zip(values, values[1:])):
        raise IPAdapterError(f"{name} {list(starts)}: give increasing whole frame numbers >= 0, one per image")
    count = len(list(prompt.images or []))
    if count and len(values) != count:
        raise IPAdapterError(f"{len(values)} {name} for {count} image(s): give one first frame per image")


def _plan_scales(plan, scale: float, block_scales: dict) -> tuple[float, dict]:
    """(state.scale, state.layer_scales) for a weight type's absolute per-layer weights (times any --blocks)."""
    base = scale if scale != 0 else 1.0  # scale 0: the weight's blocks are 0, a composition weight still acts
    return base, {i: w / base * block_scales.get(i, 1.0) for i, w in plan.weights.items()}


def _tiled(prompt: ImagePrompt):
    """(prompt with its images cut into tiles, their region masks [n, H, W]) or (prompt, None) without tiles."""
    from ..core.encoders import tile_reference

    if not prompt.tiles:
        return prompt, None
    if not prompt.images:
        raise IPAdapterError("--tiles cuts the --image references into tiles; give at least one")
    masks = list(prompt.masks or [])
    if masks and len(masks) != len(prompt.images):
        raise IPAdapterError(f"{len(masks)} --image-mask for {len(prompt.images)} --image with --tiles: one per image")
    tiles, regions = [], []
    for k, image in enumerate(prompt.images):
        mask = None
        if masks and torch.is_tensor(masks[k]):
            mask = Image.fromarray((controls.load_mask(masks[k]) * 255 + 0.5).byte().numpy(), "L")
        elif masks:
            mask = load_image(masks[k]).convert("L")
        t, m = tile_reference(image, mask, float(prompt.sharpen))
        tiles += t
        regions.append(m)
    shape = regions[0].shape[1:]
    regions = [torch.nn.functional.interpolate(r[:, None], size=shape, mode="bilinear")[:, 0]
               if r.shape[1:] != shape else r for r in regions]
    return dataclasses.replace(prompt, images=tiles, masks=None, sharpen=0.0), torch.cat(regions)


def _prep(prompt: ImagePrompt):
    from ..core.encoders import Prep

    if prompt.crop is None and not prompt.sharpen and prompt.interpolation == "lanczos":
        return None
    return Prep(prompt.crop or "center", prompt.interpolation, float(prompt.sharpen))


def _kv_scaling(mode: str) -> str:
    from ..core.attention import KV_SCALINGS

    key = {"v only": "v", "k+v": "kv", "k+v w/ c penalty": "kv-penalty",
           "k+mean(v) w/ c penalty": "k-mean-v-penalty"}.get(" ".join(str(mode).lower().split()), str(mode))
    if key not in KV_SCALINGS:
        raise IPAdapterError(f"--embeds-scaling {mode!r}: use one of {', '.join(KV_SCALINGS)} (ComfyUI's V only, "
                             "K+V, K+V w/ C penalty, K+mean(V) w/ C penalty)")
    return key


#: pipelines whose ``__call__`` hands the denoiser no ``ip_adapter_image_embeds`` (diffusers 0.42.1), with the
#: branch (0 unconditional, 1 conditional image tokens) of each group of their batch, transcribed from their code
DROPPED_LAYOUTS: dict[str, tuple[int, ...]] = {
    # [text + image; image only; neither]: added_cond_kwargs only for ip_adapter_image, as [pos; neg; neg]
    "StableDiffusionInstructPix2PixPipeline": (1, 0, 0),
    # [unconditional; conditional; safety concept] under safety guidance; takes no ip_adapter_image_embeds, its
    # ip_adapter_image goes in as [neg; pos; pos]
    "StableDiffusionPipelineSafe": (0, 1, 1),
}


def _guides(pipe) -> bool:
    """Whether the pipeline's current call guides (its own flag; Panorama's ``do_classifier_free_guidance`` property
    is always False while its loop guides when ``guidance_scale > 1``)."""
    if type(pipe).__name__ == "StableDiffusionPanoramaPipeline":
        return float(getattr(pipe, "guidance_scale", 1.0)) > 1.0
    return bool(getattr(pipe, "do_classifier_free_guidance", True))


class IPAdapter:
    """A diffusers pipeline with one or more adapters attached to its UNet.

    img2img, inpainting and ControlNet run on pipelines built from the same components (:meth:`pipeline_for`):
    they share the UNet, so the adapter acts there too, and a ControlNet only ever sees the text embeddings.
    """

    def __init__(self, pipe, adapters: Sequence[Adapter], image_encoder: ImageEncoder | None = None):
        self.pipe = pipe
        self.family = family_of(pipe)
        self.denoiser = getattr(pipe, self.family.denoiser_attr)
        self.adapters = list(adapters)
        self.image_encoder = image_encoder
        self._variants: dict[tuple, object] = {}
        self._controlnets: dict[str, object] = {}
        self.face_analysis = None  # insightface FaceAnalysis (or anything with its interface), loaded on first use
        self.insightface_root: str | os.PathLike | None = None  # where its model pack lives (default ~/.insightface)
        # adapter -> (cond, uncond) features, and the number of image sets (one per text prompt) or None
        self._step_features: dict[int, tuple[torch.Tensor, torch.Tensor, int | None]] = {}
        for adapter in self.adapters:
            if image_encoder is not None:  # FaceID-Plus reads CLIP features too; check_encoder knows each kind
                adapter.check_encoder(image_encoder.model)
            attach(self.denoiser, adapter)
        runtime = runtime_of(self.denoiser)
        if runtime is not None:  # no adapters (a text-only baseline): the pipeline as it is
            runtime.num_train_timesteps = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
        self._follow(pipe)

    def _follow(self, pipe) -> None:
        """The adapter reads whether guidance is on from the pipeline that runs (see :meth:`pipeline_for`)."""
        runtime = runtime_of(self.denoiser)
        if runtime is not None:
            # read eagerly: under torch.compile, dynamo tracing the pipeline's attributes fails
            runtime.cfg_hint = torch.compiler.disable(lambda: _guides(pipe))
        self._followed = pipe

    # -------------------------------------------------------------------------------------------- tokens
    @torch.no_grad()
    def features(self, adapter: Adapter, prompt: ImagePrompt) -> tuple[Features, Features]:
        """(cond, uncond) encoder features for one adapter's prompt (per image, not yet combined)."""
        cfg = adapter.config
        if prompt.embeds is not None:
            return self._embeds(adapter, prompt)
        options = dict(prep=_prep(prompt), batch_size=int(prompt.encode_batch_size),
                       enhance_tiles=int(prompt.enhance_tiles), enhance_ratio=float(prompt.enhance_ratio))
        if cfg.uses_face_id:
            return self._face_features(cfg, prompt, options)
        if prompt.face_images:
            raise IPAdapterError(f"--face-image is for FaceID adapters; this one is {cfg.kind} (give --image)")
        if not prompt.images:
            raise IPAdapterError(f"{cfg.kind} adapter: no prompt image given")
        return encode_prompt(cfg, self._encoder(), prompt.images, self._negatives(prompt), **options)

    def _negatives(self, prompt: ImagePrompt) -> list:
        """The negative images, or one made from noise on the (first) negative image or on black."""
        if prompt.negative_noise is None:
            return list(prompt.negative_images)
        if len(prompt.negative_images) > 1:
            raise IPAdapterError("--negative-noise lays noise on one --negative-image (or on black); give one or none")
        base = prompt.negative_images[0] if prompt.negative_images else None
        size = int(self._encoder().model.config.image_size) if self.image_encoder is not None else 224
        return [controls.noise_image(prompt.negative_noise, prompt.noise_strength, prompt.noise_blur,
                                     prompt.noise_seed, base, size)]

    def _face_features(self, cfg, prompt: ImagePrompt, options: dict) -> tuple[Features, Features]:
        faces, crops = prompt.face_embeds, list(prompt.images)
        if prompt.face_images:
            if faces is not None:
                raise IPAdapterError("--face-image finds the face embeddings itself; give it or --face-embeds")
            from ..core.faces import analyse_faces, load_face_analysis

            if self.face_analysis is None:
                self.face_analysis = load_face_analysis(self.insightface_root)
            face, aligned = analyse_faces(prompt.face_images, self.face_analysis, 256 if is_sdxl(self.pipe) else 224)
            crops = crops or aligned
        elif faces is None:
            raise IPAdapterError(f"{cfg.kind} adapter: give a face photo (--face-image) or face-ID embeddings "
                                 "(--face-embeds .npy/.safetensors)")
        else:
            face = load_face_embeddings(faces) if isinstance(faces, (str, os.PathLike)) else faces.float()
        cond, uncond = Features(face_id=face), Features(face_id=torch.zeros_like(face))
        if cfg.uses_patch_features:
            clip_c, clip_u = self._encoder().encode(cfg, crops, prep=options["prep"], batch_size=options["batch_size"])
            if clip_c.penultimate.shape[0] != face.shape[0]:
                raise IPAdapterError(
                    f"{cfg.kind}: {face.shape[0]} face embedding(s) but {clip_c.penultimate.shape[0]} face image(s)"
                )
            cond.penultimate, uncond.penultimate = clip_c.penultimate, clip_u.penultimate
        return cond, uncond

    def _embeds(self, adapter: Adapter, prompt: ImagePrompt) -> tuple[Features, Features]:
        cfg, source = adapter.config, prompt.embeds
        if prompt.images or prompt.negative_images:
            raise IPAdapterError(f"{param('embeds')} replaces {param('images')} and {param('negative_images')} "
                                 "(the file holds both); give one")
        if cfg.uses_face_id:
            raise IPAdapterError(f"{cfg.kind} adapter: FaceID reads {param('face_embeds')}, not image embeddings")
        name = _feature_field(cfg)
        if isinstance(source, (str, os.PathLike)):
            cond, uncond, _ = controls.load_embeds(source)
            where = str(source)
        else:
            negative, positive = source
            if torch.is_tensor(positive):
                positive, negative = Features(**{name: positive}), Features(**{name: negative})
            cond, uncond, where = positive, negative, "embeds"
        c, u = getattr(cond, name), getattr(uncond, name)
        if c is None or u is None:
            held = [f for f in controls.FEATURE_FIELDS if getattr(cond, f) is not None]
            raise IPAdapterError(f"{where}: holds {', '.join(held) or 'nothing'}; this {cfg.kind} adapter reads {name}")
        if c.shape[-1] != cfg.embed_dim or c.shape != u.shape:
            raise IPAdapterError(
                f"{where}: {name} of width {c.shape[-1]}; this {cfg.kind} adapter reads width {cfg.embed_dim} "
                "(embeddings made with another image encoder?)"
            )
        return Features(**{name: c}), Features(**{name: u})

    def _encoder(self) -> ImageEncoder:
        if self.image_encoder is None:
            raise IPAdapterError("no image encoder loaded; pass one (or precomputed embeddings)")
        return self.image_encoder

    @torch.no_grad()
    def embed(self, images: Sequence, negative_images: Sequence = (), adapter: int = 0) -> tuple[Features, Features]:
        """(cond, uncond) features to save with :func:`ipadapter.controls.save_embeds` (``ipadapter embed``)."""
        return encode_prompt(self.adapters[adapter].config, self._encoder(), images, negative_images)

    @torch.no_grad()
    def set_images(self, images: Sequence | None = None, scale: float = 1.0, adapter: int = 0,
                   prompt: ImagePrompt | None = None, size: tuple[int, int] | None = None) -> None:
        """Condition the next ``pipe(...)`` calls on these prompt images, with every control of ``prompt``.

        ``size`` (width, height): the output size region masks are fitted to (default: the first mask's).
        ``prompt.images`` as one list per text prompt (each as long) conditions a pipeline call of as many text
        prompts, prompt i on set i; weights and masks then apply to every set alike.
        Everything is checked before anything is set, so bad input leaves the adapter as it was.
        """
        prompt = prompt or ImagePrompt(images=list(images or []), scale=scale)
        target = self.adapters[adapter]
        scale = check_scale(prompt.scale)
        mode = controls.check_combine(prompt.combine)
        sched = controls.schedule(prompt.start, prompt.end, prompt.curve)
        layers = self.family.layers(self.denoiser)
        layer_scales = controls.block_scales(layers, prompt.blocks, self.family) if prompt.blocks else {}
        kv_scaling = _kv_scaling(prompt.embeds_scaling)
        plan = _check_comfy(prompt, mode, layers)
        prompt, tile_masks = _tiled(prompt)
        sets = image_sets(prompt.images)
        if sets is not None:
            prompt = _flattened(prompt, sets)
        cond, uncond = self.features(target, prompt)
        n = _count(cond) if sets is None else len(sets[0])
        weights = controls.check_weights(prompt.weights, n)
        masks = tile_masks if tile_masks is not None else self._masks(prompt.masks, n, mode, size)
        if mode != "concat" and not prompt.unfold_batch:
            groups = len(sets) if sets is not None else 1
            cond = _combine_features(cond, weights, mode, groups)
            uncond = Features(*(torch.cat([_first_or_mean(g) for g in t.chunk(groups)]) if t is not None else None
                                for t in (uncond.image_embeds, uncond.penultimate, uncond.face_id)))
        image_weights = None
        if mode == "concat" and weights is not None and any(w != 1 for w in weights):
            image_weights = torch.tensor(weights, dtype=torch.float32)
        state = target.state
        self._expect_rows(None)
        if target.config.time_conditioned:  # SD3.5: tokens are made at every step from what the pipeline hands
            _check_step_controls(masks, image_weights)
            state.scale, state.layer_scales, state.schedule = scale, layer_scales, sched
            self._step_features[adapter] = (cond.penultimate, uncond.penultimate, len(sets) if sets else None)
            return
        if sets is None:
            tokens = self.family.project(target, cond, uncond)
        else:  # [sets x images, T, C] -> [sets, images, T, C]; cond and uncond each projected as one batch
            tokens = tuple(t.unflatten(0, (len(sets), -1)) for t in (target.project(cond), target.project(uncond)))
        composition = None
        if plan is not None and plan.composition and prompt.composition_images:
            comp = dataclasses.replace(prompt, images=list(prompt.composition_images), negative_images=(),
                                       negative_noise=None, enhance_tiles=1)
            c_cond, c_uncond = self.features(target, comp)
            if _count(c_cond) > 1:
                c_cond = _combine_features(c_cond, None, "average" if mode == "concat" else mode)
            # ComfyUI: the composition image's tokens in the conditional rows, the prompt's own unconditional ones
            composition = (target.project_pair(c_cond, _combine_uncond(c_uncond))[0], tokens[1][:1])
        state.scale, state.layer_scales, state.schedule = scale, layer_scales, sched
        if plan is not None:
            state.scale, state.layer_scales = _plan_scales(plan, scale, layer_scales)
        state.masks, state.image_weights, state.kv_scaling = masks, image_weights, kv_scaling
        if prompt.unfold_batch:  # one reference per batch item (a video's frame), the last held
            state.set_tokens(tokens[0][:, None], tokens[1][:, None])
            state.row_map = "hold"
            state.frame_starts = tuple(int(v) for v in prompt.frame_starts) if prompt.frame_starts else None
        elif sets is not None:  # one image set per text prompt
            state.set_tokens(*tokens)
        else:
            self.set_tokens(target, *tokens)
        if composition is not None:
            state.set_layer_tokens(plan.composition, composition[0][None], composition[1][None])
        if plan is not None and plan.swap:
            state.swap_branches(plan.swap)

    def pipeline_inputs(self, guidance_scale: float) -> dict:
        """What the next pipeline call needs besides the prompt for adapters whose tokens depend on the timestep
        (SD3.5): the image features as ``ip_adapter_image_embeds``, [negative; positive] when the pipeline guides
        (SD3 pipelines guide when ``guidance_scale > 1``), [rows, n_images, S, H] for several images. The pipeline
        repeats them for its batch and the transformer hands them to the adapter at every step. Empty otherwise:
        ``ip.set_images([...]); pipe(prompt=..., **ip.pipeline_inputs(7.0))``.

        With one image set per text prompt every row carries all sets' features (the pipeline tiles what it is
        given over its whole batch); the adapter's state learns the layout, and at each step every row reads its
        own prompt's set (:class:`~ipadapter.bases.sd3.StepTokens`)."""
        inputs: dict = {}
        for adapter, (cond, uncond, sets) in self._step_features.items():
            branches = 2 if guidance_scale > 1 else 1
            embeds = torch.stack([uncond, cond] if branches == 2 else [cond])  # [rows, n, S, H]
            self.adapters[adapter].state.step_sets = (sets, branches) if sets else None
            inputs["ip_adapter_image_embeds"] = embeds[:, 0] if embeds.shape[1] == 1 else embeds
        return inputs

    @staticmethod
    def _masks(masks, n: int, mode: str, size: tuple[int, int] | None) -> torch.Tensor | None:
        if not masks:
            return None
        masks = list(masks)
        want = n if mode == "concat" else 1
        if len(masks) != want:
            per = f"one per image of {param('images')}" if mode == "concat" else f"one for the {mode} of the images"
            raise IPAdapterError(f"{len(masks)} {param('masks')} for {n} image(s) with {param('combine')} {mode}: "
                                 f"give {per}")
        loaded = [controls.load_mask(masks[0], size, param("masks"))]
        size = size or (loaded[0].shape[1], loaded[0].shape[0])
        loaded += [controls.load_mask(m, size, param("masks")) for m in masks[1:]]
        return torch.stack(loaded)

    @staticmethod
    def set_tokens(adapter: Adapter, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """Tokens of n images ([n, T, C]) -> one prompt of n images, stacked as [uncond; cond]."""
        adapter.state.set_tokens(cond[None], uncond[None])

    def pipeline_kwargs(self, pipe=None) -> dict:
        """What to hand a pipeline you call yourself so the adapters follow its own batch layout:
        ``pipe(prompt=..., **ip.pipeline_kwargs())`` after :meth:`set_images` (``pipe``: the pipeline you call,
        default the one the adapter follows, see :meth:`pipeline_for`).

        The pipeline lays out tiny row markers (``ip_adapter_image_embeds``, one per adapter, see
        :mod:`ipadapter.core.rows`) for its batch as it would lay out image embeddings: PAG's perturbed branch,
        SAG's degraded pass, a video's frames. Pipelines that hand the denoiser no ``ip_adapter_image_embeds``
        (:data:`DROPPED_LAYOUTS`: InstructPix2Pix, safe latent diffusion) get the layout transcribed from their
        code instead, until the next :meth:`set_images`. Without either the batch is taken as [unconditional;
        conditional] rows, and a batch that does not fit that is an error.
        """
        pipe = pipe if pipe is not None else self._followed
        if not attached(self.denoiser):  # no adapter (the text-only baseline): nothing to lay out
            return {}
        n = len(attached(self.denoiser))
        layout = DROPPED_LAYOUTS.get(type(pipe).__name__)
        self._expect_rows([torch.tensor(layout, dtype=torch.long)] * n if layout else None)
        if "ip_adapter_image_embeds" not in inspect.signature(type(pipe).__call__).parameters:
            return {}
        weight = next(self.denoiser.parameters())  # its dtype; the device: where it computes (offloading: not meta)
        handed = markers(n, device=execution_device(self.denoiser), dtype=weight.dtype)
        return {"ip_adapter_image_embeds": self._in_pipeline_order(pipe, handed)}

    def _expect_rows(self, rows: list | None) -> None:
        runtime = runtime_of(self.denoiser)
        if runtime is not None:
            runtime.expected_rows = rows

    @staticmethod
    def _in_pipeline_order(pipe, handed: list) -> list:
        """The markers in the order the pipeline's own ``prepare_ip_adapter_image_embeds`` reads them under
        guidance: [negative; positive] for most; InstructPix2Pix reads [positive; negative; negative] (it splits
        in three), which its method tells by refusing two."""
        prepare = getattr(pipe, "prepare_ip_adapter_image_embeds", None)
        if prepare is None:
            return handed
        try:
            prepare(None, [handed[0][:2]], handed[0].device, 1, True)
        except ValueError:
            return [torch.cat([m[1:2], m[0:1], m[0:1]]) for m in handed]
        return handed

    def clear(self) -> None:
        """Forget the prompt images and every control: the next ``pipe(...)`` runs the base model."""
        self._step_features.clear()
        self._expect_rows(None)
        for adapter in self.adapters:
            _reset(adapter.state)

    def detach(self) -> None:
        self.clear()
        for adapter in self.adapters:
            detach(self.denoiser, adapter)
        self.adapters = []

    # ------------------------------------------------------------------------------------------ pipelines
    def pipeline_for(self, mode: str = "txt2img", controlnets: Sequence | None = None):
        """The diffusers pipeline for ``mode`` (txt2img, img2img, inpaint), with ControlNet(s) if given.

        Built once from the same components (``from_pipe``): it shares the UNet with the adapter attached.
        The pipeline returned is also the one whose guidance flag the adapter follows, so call it next:
        ``ip.set_images([...]); ip.pipeline_for("img2img")(prompt=..., image=init)``.
        """
        if mode not in MODES:
            raise IPAdapterError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        nets = [self.controlnet(c) for c in (controlnets or [])]
        key = (mode, tuple(id(c) for c in nets))
        pipe = self._variants.get(key)
        if pipe is None:
            pipe = self._build(mode, nets)
            self._variants[key] = pipe
        self._follow(pipe)
        return pipe

    def _build(self, mode: str, nets: list):
        cls = self.family.pipeline_class(self.pipe, mode, bool(nets))
        if type(self.pipe) is cls and not nets:
            return self.pipe
        extra = {"controlnet": nets[0] if len(nets) == 1 else nets} if nets else {}
        pipe = cls.from_pipe(self.pipe, **extra)
        pipe.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {"disable": True}))
        return pipe

    def controlnet(self, source):
        """A ControlNetModel (loaded once per folder) checked against this UNet."""
        if not isinstance(source, (str, os.PathLike)):
            return load_controlnet(source, self.pipe.unet)
        key = str(Path(source).resolve())
        if key not in self._controlnets:
            self._controlnets[key] = load_controlnet(source, self.pipe.unet)
        return self._controlnets[key]

    def output_size(self, width: int | None = None, height: int | None = None,
                    init_image=None) -> tuple[int, int]:
        """(width, height): as given, else the init image's (rounded down to the VAE's multiple, as diffusers'
        img2img does), else the model's default."""
        factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        if init_image is not None and (width is None or height is None):
            w, h = load_image(init_image).size
            if min(w, h) < factor:
                raise IPAdapterError(f"--init-image {_name(init_image)}: {w}x{h} is smaller than the VAE's {factor} "
                                     "pixels; give a larger image or --width/--height")
            return int(width or w - w % factor), int(height or h - h % factor)
        default = self.family.default_size(self.pipe)
        return int(width or default), int(height or default)

    def _max_steps(self) -> int:
        return int(getattr(self.pipe.scheduler.config, "num_train_timesteps", limits.MAX_STEPS))

    # -------------------------------------------------------------------------------------------- generate
    def generate(self, images: Sequence | None = None, prompt: str | Sequence[str] = "",
                 negative_prompt: str | None = None, scale: float | None = None,
                 prompts: Sequence[ImagePrompt] | None = None, num_inference_steps: int = 30,
                 guidance_scale: float | None = None, seed: int | Sequence[int] | None = None, generator=None,
                 width: int | None = None, height: int | None = None, num_images: int = 1,
                 output_type: str = "pil", init_image=None, strength: float | None = None, mask_image=None,
                 controlnets: Sequence | None = None, control_images: Sequence | None = None,
                 control_scales: float | Sequence[float] | None = None, **pipe_kwargs):
        """Generate with image prompts.

        ``images``/``scale`` and any :class:`ImagePrompt` field as a keyword (``weights``, ``masks``,
        ``negative_images``, ``blocks``, ``start`` ...) serve a single adapter; ``prompts`` gives one
        ImagePrompt per adapter. ``init_image`` (+ ``strength``) makes it img2img, adding ``mask_image`` makes
        it inpainting; ``controlnets`` (models or folders) with one control image each add structure control.
        ``seed`` S gives image k the seed S+k (so it can be remade alone); a list gives one seed per image.
        Side images of another size than the output are resized, with an :class:`IPAdapterNote`.
        ``guidance_scale``: the pipeline's (default 7.5 CFG for UNets, 3.5 distilled guidance for Flux; Flux's
        true CFG is ``true_cfg_scale`` with a ``negative_prompt``, passed on to the pipeline).
        """
        if guidance_scale is None:
            guidance_scale = self.family.default_guidance
        options = {k: pipe_kwargs.pop(k) for k in list(pipe_kwargs) if k in PROMPT_OPTIONS}
        if prompts is None:
            if len(self.adapters) != 1:
                raise IPAdapterError(f"{len(self.adapters)} adapters attached: give one ImagePrompt per adapter")
            default = 1.0 if not prompt else 0.5
            prompts = [ImagePrompt(images=list(images or []), scale=default if scale is None else scale, **options)]
        elif images or options:
            raise IPAdapterError("with prompts=[ImagePrompt ...], give images and their options inside each one")
        if len(prompts) != len(self.adapters):
            raise IPAdapterError(f"{len(prompts)} image prompt(s) for {len(self.adapters)} adapter(s)")
        texts = 1 if isinstance(prompt, str) else len(prompt)
        for p in prompts:
            sets = image_sets(p.images)
            if sets is not None and len(sets) != texts:
                raise IPAdapterError(f"images: {len(sets)} image lists for {texts} text prompt(s); give one per prompt")
        size = self.output_size(width, height, init_image)
        guidance_scale = limits.check_request(guidance_scale, num_inference_steps, num_images, size,
                                              self.output_size(), self._max_steps())
        call, mode = self._side_inputs(size, init_image, strength, mask_image, controlnets, control_images,
                                       control_scales)
        batch = (1 if isinstance(prompt, str) else len(prompt)) * int(num_images)
        if generator is None and seed is not None:
            generator = [torch.Generator("cpu").manual_seed(s) for s in controls.seeds_for(seed, batch)]
        call.update(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=generator, width=size[0], height=size[1],
                    num_images_per_prompt=num_images, output_type=output_type, **pipe_kwargs)
        try:
            pipe = self.pipeline_for(mode, controlnets)
            accepted = inspect.signature(type(pipe).__call__).parameters
            if "true_cfg_scale" in call and "true_cfg_scale" not in accepted:
                raise IPAdapterError(f"--true-cfg: {type(pipe).__name__} has no true CFG (Flux pipelines have); "
                                     "use --guidance")
            for key in ("width", "height"):  # img2img pipelines take the size from the init image
                if key not in accepted:
                    call.pop(key)
            if mode != "txt2img":  # diffusers runs int(steps * strength) steps and fails obscurely on 0
                strength = call.get("strength", accepted["strength"].default)
                if int(num_inference_steps * strength) < 1:
                    raise IPAdapterError(
                        f"{param('strength')} {strength:g} with {param('num_inference_steps')} {num_inference_steps} "
                        f"leaves no denoising step (it runs int(steps x strength)); raise "
                        f"{param('num_inference_steps')} or {param('strength')}"
                    )
            for key, value in world_call(self.pipe).items():
                call.setdefault(key, value)
            family_kwargs = {k: v for k, v in self.family.call_kwargs(pipe).items() if k in accepted}
            call.update(family_kwargs)  # a family's own hand-over (Flux: its branch markers)
            for i, p in enumerate(prompts):
                if is_idle(p):  # text-only for this adapter: it stays idle, the base model runs
                    check_scale(p.scale)
                    _reset(self.adapters[i].state)
                    continue
                self.set_images(adapter=i, prompt=p, size=size)
                refs = self.adapters[i].state.rows // 2
                if p.unfold_batch and refs != batch:
                    raise IPAdapterError(f"--unfold-batch: {refs} reference image(s) for a batch of {batch} "
                                         "(prompts x --num-images); give one reference per image")
            step_inputs = self.pipeline_inputs(guidance_scale)  # timestep-dependent tokens (SD3.5): the features
            if step_inputs:
                call.update(step_inputs)
            elif not family_kwargs and "ip_adapter_image_embeds" in accepted and \
                    not any(a.config.time_conditioned for a in self.adapters):  # the pipeline's rows (image sets
                # and unfolded batches too: the markers name the branch, each adapter's state its rows)
                call.update(self.pipeline_kwargs())
            return pipe(**call).images
        finally:
            self.clear()
            self._follow(self.pipe)

    def _side_inputs(self, size, init_image, strength, mask_image, controlnets, control_images, control_scales):
        """Check and fit the init image, inpainting mask and control images: (pipeline kwargs, mode)."""
        call: dict = {}
        mode = "txt2img"
        if mask_image is not None and init_image is None:
            raise IPAdapterError(f"{param('mask_image')} needs {param('init_image')} (the image to paint into)")
        if strength is not None:
            if init_image is None:
                raise IPAdapterError(f"{param('strength')} needs {param('init_image')} "
                                     "(it is how far img2img moves from it)")
            strength = float(strength)
            if not (0.0 < strength <= 1.0):
                raise IPAdapterError(f"{param('strength')} {strength}: must be in (0, 1] (1 = ignore the init image)")
            call["strength"] = strength
        if init_image is not None:
            mode = "img2img"
            call["image"] = controls.fit_image(load_image(init_image), size,
                                               f"{param('init_image')} {_name(init_image)}")
        if mask_image is not None:
            mode = "inpaint"
            mask = load_image(mask_image).convert("L")
            call["mask_image"] = controls.fit_image(mask, size, f"{param('mask_image')} {_name(mask_image)}",
                                                    Image.Resampling.BILINEAR)
        nets = list(controlnets or [])
        images = list(control_images or [])
        if nets or images:
            if len(images) != len(nets):
                raise IPAdapterError(
                    f"{len(nets)} {param('controlnets')} for {len(images)} {param('control_images')}: give one "
                    "control image per ControlNet"
                )
            fitted = [controls.fit_image(load_image(im), size, f"{param('control_images')} {_name(im)}")
                      for im in images]
            scales = control_scales if control_scales is not None else 1.0
            scales = [float(scales)] * len(nets) if isinstance(scales, (int, float)) else [float(s) for s in scales]
            if len(scales) != len(nets):
                raise IPAdapterError(
                    f"{len(scales)} {param('control_scales')} for {len(nets)} {param('controlnets')}: give one per "
                    "ControlNet"
                )
            if any(not math.isfinite(s) for s in scales):
                raise IPAdapterError(f"{param('control_scales')}: must be finite numbers")
            call["image" if mode == "txt2img" else "control_image"] = fitted[0] if len(fitted) == 1 else fitted
            call["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
        return call, mode


def _check_step_controls(masks, image_weights) -> None:
    if masks is not None:
        raise IPAdapterError("--image-mask: region masks are not available for SD3.5 adapters (its image attention "
                             "spans the whole picture); leave them out")
    if image_weights is not None:
        raise IPAdapterError("--image-weight with --combine concat is not available for SD3.5 adapters; use "
                             "--combine average (weighted) instead")


def _name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "image"


def load_controlnet(source, unet, dtype: torch.dtype | None = None):
    """A ``ControlNetModel`` from a folder (or as given), on the UNet's device, checked to fit the UNet."""
    from diffusers import ControlNetModel

    weight = next(unet.parameters())
    if isinstance(source, torch.nn.Module):
        model, where = source, "controlnet"
    else:
        where = f"{param('controlnets')} {source}"
        path = Path(source)
        if not (path / "config.json").is_file():
            raise IPAdapterError(f"{where}: not a ControlNet folder (no config.json)")
        try:
            model = ControlNetModel.from_pretrained(str(path), **{_dtype_keyword(): dtype or weight.dtype})
        except Exception as e:  # noqa: BLE001 - a broken folder is bad input
            raise IPAdapterError(f"{where}: cannot load the ControlNet ({' '.join(str(e).split())[:140]})") from None
    mine, theirs = getattr(model.config, "cross_attention_dim", None), unet.config.cross_attention_dim
    kind_mine = getattr(model.config, "addition_embed_type", None)
    if mine != theirs or kind_mine != unet.config.addition_embed_type:
        raise IPAdapterError(
            f"{where}: made for a UNet of cross-attention width {mine} ({'SDXL' if kind_mine else 'SD 1.x/2.x'}); "
            f"this model's is {theirs} ({'SDXL' if unet.config.addition_embed_type else 'SD 1.x/2.x'})"
        )
    return model.to(weight.device, weight.dtype)

def _broadcast_features(neg: Features, like: Features) -> Features:
    def fit(t, ref):
        if t is None or ref is None:
            return t
        if t.shape[0] == ref.shape[0]:
            return t
        if t.shape[0] == 1:
            return t.expand_as(ref).clone()
        raise IPAdapterError(f"{t.shape[0]} negative images for {ref.shape[0]} prompt images; give 1 or as many")

    return Features(fit(neg.image_embeds, like.image_embeds), fit(neg.penultimate, like.penultimate),
                    fit(neg.face_id, like.face_id))


def load(pipe, adapters: str | os.PathLike | Adapter | Sequence, image_encoder=None,
         model_dir: str | os.PathLike | None = None, face_analysis=None,
         insightface_root: str | os.PathLike | None = None) -> IPAdapter:
    """Attach adapter file(s) to ``pipe``; the image encoder defaults to the pipeline's or the one beside the file.

    A bare file name that is not a file here is looked up in the pipeline's model folder (``model_dir``, default
    the folder ``pipe`` was loaded from): ``load(pipe, "ip-adapter_plus.safetensors")``.

    ``image_encoder``: an :class:`ImageEncoder`, a folder, or None (then ``pipe.image_encoder`` if the pipeline
    has one, else ``model_dir/image_encoder``, else ``image_encoder/`` beside the first adapter file), or False
    for none at all (every prompt then comes as precomputed embeddings). ``face_analysis``: an insightface
    ``FaceAnalysis`` (or an object with its interface) for FaceID prompts given as photos; by default it is
    loaded from ``insightface_root`` (default ``~/.insightface``) on first use.
    """
    denoiser = denoiser_of(pipe)
    model_dir = model_dir if model_dir is not None else model_folder(pipe)
    items = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    items = [adapter_in_model(a, model_dir or pipe) for a in items]
    loaded = [a if isinstance(a, Adapter) else Adapter.from_file(a) for a in items]
    for item, adapter in zip(items, loaded):
        check(adapter.config, denoiser, source=str(item) if not isinstance(item, Adapter) else "adapter")
    needs_encoder = any(not a.config.uses_face_id or a.config.uses_patch_features for a in loaded)
    encoder = None
    if image_encoder is False:
        pass
    elif isinstance(image_encoder, ImageEncoder):
        encoder = image_encoder
    elif image_encoder is not None:
        encoder = ImageEncoder.from_pretrained(image_encoder, fallback=getattr(pipe, "feature_extractor", None))
    elif getattr(pipe, "image_encoder", None) is not None:
        encoder = ImageEncoder(pipe.image_encoder, getattr(pipe, "feature_extractor", None))
    elif needs_encoder:
        first = next((i for i in items if not isinstance(i, Adapter)), None)
        encoder = ImageEncoder.from_pretrained(find_image_encoder(first, model_dir))
    if encoder is not None:
        param = next(denoiser.parameters())
        encoder.model.to(execution_device(denoiser), param.dtype)  # the encoder follows the pipeline
        for item, adapter in zip(items, loaded):  # FaceID-Plus reads CLIP features too; check_encoder knows each kind
            adapter.check_encoder(encoder.model, source=str(item) if not isinstance(item, Adapter) else "adapter")
    ip = IPAdapter(pipe, loaded, encoder)
    ip.face_analysis, ip.insightface_root = face_analysis, insightface_root
    return ip


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write an image with its parameters text, atomically (:func:`ipadapter.generation.parameters.save_image`:
    the format follows the suffix, PNG keeps the text in a "parameters" chunk)."""
    from .parameters import save_image

    return save_image(image, path, parameters)


EMBEDDED_MODEL = Path(__file__).parents[1] / "world" / "model"


EMBEDDED_ADAPTER = "ip-adapter.safetensors"  # world.family.DEFAULT_ADAPTER (generation does not import world)
# The embedded world's members, by the name ``--model`` / ``load_pipeline`` take: the SD 1.5-shaped UNet model
# (the default) and the SD3.5-shaped transformer on the same tokenizer, CLIP towers and VAE.
EMBEDDED_MEMBERS = {"world": EMBEDDED_MODEL, "world-sd3": EMBEDDED_MODEL.with_name("model_sd3")}
# What a member is called with beyond the pipeline's defaults: the SD3 member has no T5, and was trained with 16
# of the zero rows StableDiffusion3Pipeline puts in T5's place (its default is 256).
EMBEDDED_CALL = {"world-sd3": {"max_sequence_length": 16}}


def world_call(model) -> dict:
    """The pipeline-call settings a world member was trained for (:data:`EMBEDDED_CALL`): the shipped member's, or
    those a rebuilt or copied member's ``world_build.json`` records (its T5 zero rows); {} for any other model."""
    name = embedded_name(model)
    if name is not None:
        return dict(EMBEDDED_CALL.get(name, {}))
    folder = model_folder(model)
    record = folder / "world_build.json" if folder is not None else None
    if record is None or not record.is_file():
        return {}
    try:
        zeros = json.loads(record.read_text()).get("config", {}).get("t5_zero_tokens")
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {"max_sequence_length": int(zeros)} if isinstance(zeros, int) and zeros > 0 else {}


def embedded_model(name: str | None = None) -> tuple[Path, Path]:
    """(model folder, default adapter file) of a tiny world model shipped in the package (``name``: a key of
    :data:`EMBEDDED_MEMBERS`, default "world"). Its default adapter serves image-only prompts and image + text
    prompts (on "world" the paper's recipe is ``ip-adapter_global.safetensors``)."""
    name = name or "world"
    if name not in EMBEDDED_MEMBERS:
        raise IPAdapterError(f"{name}: not an embedded model; they are {', '.join(EMBEDDED_MEMBERS)}")
    folder = EMBEDDED_MEMBERS[name]
    adapter = folder / EMBEDDED_ADAPTER
    if not (folder / "model_index.json").is_file() or not adapter.is_file():
        raise IPAdapterError(
            f"the embedded model {name} is not in this install ({folder}); pass --model DIR and --adapter FILE"
        )
    return folder, adapter


def embedded_name(model) -> str | None:
    """The member name ``model`` stands for: None (the default) -> "world"; "world" / "world-sd3" when no file
    or folder of that name is here; a pipeline or folder of a member -> its name; else None."""
    if model is None:
        return "world"
    if isinstance(model, str) and model in EMBEDDED_MEMBERS and not Path(model).exists():
        return model
    folder = model_folder(model)
    for name, path in EMBEDDED_MEMBERS.items():
        if folder is not None and path.is_dir() and folder.resolve() == path.resolve():
            return name
    return None


def resolve_model(model, adapter=None) -> tuple:
    """(model, adapter) with an embedded member's name or None made its folder and, unless given, its default
    adapter; anything else as given. The one rule for ``--model`` in generate, embed, eval and the page."""
    name = embedded_name(model)
    if name is None or (model is not None and not isinstance(model, str)):
        return model, adapter
    if isinstance(model, str) and Path(model).exists():
        return model, adapter
    folder, default = embedded_model(name)
    return folder, adapter or default


def model_folder(pipe_or_model) -> Path | None:
    """The local folder a pipeline was loaded from (``name_or_path`` / ``config._name_or_path``), or a folder
    given as such; None for a hub id or a pipeline built in memory."""
    if isinstance(pipe_or_model, (str, os.PathLike)):
        source = pipe_or_model
    else:
        config = getattr(pipe_or_model, "config", None)
        source = getattr(pipe_or_model, "name_or_path", None) or (config or {}).get("_name_or_path")
    return Path(str(source)) if source and Path(str(source)).is_dir() else None


def adapter_in_model(adapter, model):
    """The one rule for adapter names, used by ``load``, the CLI, eval and the page: ``adapter`` as given, or
    ``MODEL/adapter`` when only that exists (adapter files shipped beside a model, as diffusers' ``weight_name``:
    ``--adapter ip-adapter_plus.safetensors`` on the embedded world model). ``model``: a folder, a hub id or a
    pipeline (its folder: :func:`model_folder`)."""
    if adapter is None or isinstance(adapter, Adapter) or Path(str(adapter)).exists() or model is None:
        return adapter
    folder = model_folder(model)
    if folder is None:
        return adapter
    inside = folder / str(adapter)
    return inside if inside.is_file() else adapter
