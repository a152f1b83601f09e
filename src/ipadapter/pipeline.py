"""Generation: a small object around any diffusers SD 1.x / SDXL pipeline with adapters attached.

    pipe = ipadapter.load_pipeline("path/to/sd15")           # or any diffusers pipeline you built
    ip = ipadapter.load(pipe, "ip-adapter_sd15.safetensors")  # image encoder: model's or beside the file
    images = ip.generate(images=["cat.png"], prompt="", seed=0)

    ip.set_images(["cat.png"], scale=0.6)                    # or drive the pipeline yourself
    pipe(prompt="a cat on a beach", generator=torch.Generator("cpu").manual_seed(0))

The image features, projection and every layer's image keys/values are computed once per generation; the
pipeline's own IP-Adapter path is never used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .adapter import Adapter, attach, detach, runtime_of
from .encoders import Features, ImageEncoder, load_face_embeddings
from .errors import IPAdapterError


# ------------------------------------------------------------------------------------------ model loading
def is_sdxl(pipe_or_dir) -> bool:
    if isinstance(pipe_or_dir, (str, os.PathLike)):
        index = Path(pipe_or_dir) / "model_index.json"
        return index.is_file() and "XL" in index.read_text()
    return hasattr(pipe_or_dir, "text_encoder_2")


def load_pipeline(model: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """A diffusers text-to-image pipeline from a local folder or a hub id (SD 1.x/2.x or SDXL, detected)."""
    from diffusers import DiffusionPipeline

    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    path = Path(model)
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise IPAdapterError(f"{path}: not a diffusers model folder (no model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
        except Exception as e:  # noqa: BLE001 - a broken folder is bad input
            raise IPAdapterError(f"{path}: cannot load the model ({' '.join(str(e).split())[:160]})") from None
    else:
        pipe = _from_hub(str(model), kwargs)
    if not hasattr(pipe, "unet"):
        raise IPAdapterError(f"{model}: not a UNet text-to-image model (IP-Adapter needs SD 1.x, 2.x or SDXL)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_hub(model_id: str, kwargs: dict):
    from diffusers import DiffusionPipeline

    if model_id.count("/") != 1 or model_id.startswith((".", "/")):
        raise IPAdapterError(f"{model_id}: no such model folder, and not a hub id (owner/name)")
    try:
        return DiffusionPipeline.from_pretrained(model_id, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached: try the hub
        pass
    try:
        return DiffusionPipeline.from_pretrained(model_id, **kwargs)
    except Exception:  # noqa: BLE001
        raise IPAdapterError(
            f"{model_id}: not in the local Hugging Face cache and the hub cannot be reached; download it where "
            "you have internet (huggingface-cli download) or pass a local folder with --model DIR"
        ) from None


def find_image_encoder(adapter_path: str | os.PathLike | None, model_dir: str | os.PathLike | None = None,
                       explicit: str | os.PathLike | None = None) -> Path:
    """--image-encoder, else the model's image_encoder/, else image_encoder/ beside the adapter file."""
    if explicit is not None:
        return Path(explicit)
    candidates = []
    if model_dir is not None:
        candidates.append(Path(model_dir) / "image_encoder")
    if adapter_path is not None:
        here = Path(adapter_path).parent
        candidates += [here / "image_encoder", here.parent / "image_encoder"]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise IPAdapterError(f"no image encoder found (looked in {looked}); pass --image-encoder DIR")


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class ImagePrompt:
    """What one adapter gets for a generation."""

    images: Sequence = ()  # paths or PIL images
    scale: float = 1.0
    negative_images: Sequence = ()  # replace the zero/uncond branch
    face_embeds: torch.Tensor | str | None = None  # FaceID: [n, 512] or a file
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # precomputed (negative, positive) tokens' features
    extra: dict = field(default_factory=dict)


def check_scale(scale: float) -> float:
    scale = float(scale)
    if scale != scale or scale < 0 or scale == float("inf"):
        raise IPAdapterError(f"scale {scale}: must be a finite number >= 0 (1.0 = image only, ~0.5 with text)")
    return scale


class IPAdapter:
    """A diffusers pipeline with one or more adapters attached to its UNet."""

    def __init__(self, pipe, adapters: Sequence[Adapter], image_encoder: ImageEncoder | None = None):
        self.pipe = pipe
        self.adapters = list(adapters)
        self.image_encoder = image_encoder
        for adapter in self.adapters:
            if image_encoder is not None and not adapter.config.uses_face_id:
                adapter.check_encoder(image_encoder.model)
            attach(pipe.unet, adapter)
        runtime = runtime_of(pipe.unet)
        runtime.num_train_timesteps = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
        runtime.cfg_hint = lambda: bool(getattr(pipe, "do_classifier_free_guidance", True))

    # -------------------------------------------------------------------------------------------- tokens
    @torch.no_grad()
    def features(self, adapter: Adapter, prompt: ImagePrompt) -> tuple[Features, Features]:
        """(cond, uncond) encoder features for one adapter's prompt."""
        cfg = adapter.config
        if cfg.uses_face_id:
            faces = prompt.face_embeds
            if faces is None:
                raise IPAdapterError(f"{cfg.kind} adapter: give face-ID embeddings (.npy/.safetensors)")
            face = load_face_embeddings(faces) if isinstance(faces, (str, os.PathLike)) else faces.float()
            cond, uncond = Features(face_id=face), Features(face_id=torch.zeros_like(face))
            if cfg.uses_patch_features:
                clip_c, clip_u = self._encoder().encode(cfg, prompt.images)
                if clip_c.penultimate.shape[0] != face.shape[0]:
                    raise IPAdapterError(
                        f"{cfg.kind}: {face.shape[0]} face embedding(s) but {clip_c.penultimate.shape[0]} face image(s)"
                    )
                cond.penultimate, uncond.penultimate = clip_c.penultimate, clip_u.penultimate
            return cond, uncond
        if not prompt.images:
            raise IPAdapterError(f"{cfg.kind} adapter: no prompt image given")
        cond, uncond = self._encoder().encode(cfg, prompt.images)
        if prompt.negative_images:
            neg, _ = self._encoder().encode(cfg, prompt.negative_images)
            uncond = _broadcast_features(neg, cond)
        return cond, uncond

    def _encoder(self) -> ImageEncoder:
        if self.image_encoder is None:
            raise IPAdapterError("no image encoder loaded; pass one (or precomputed embeddings)")
        return self.image_encoder

    @torch.no_grad()
    def set_images(self, images: Sequence | None = None, scale: float = 1.0, adapter: int = 0,
                   prompt: ImagePrompt | None = None) -> None:
        """Condition the next ``pipe(...)`` calls on these prompt images (tokens concatenated)."""
        prompt = prompt or ImagePrompt(images=list(images or []), scale=scale)
        target = self.adapters[adapter]
        target.state.scale = check_scale(prompt.scale)
        cond, uncond = self.features(target, prompt)
        self.set_tokens(target, target.project(cond), target.project(uncond))

    @staticmethod
    def set_tokens(adapter: Adapter, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """Tokens of n images ([n, T, C]) -> one prompt of n images, stacked as [uncond; cond]."""
        adapter.state.set_tokens(cond[None], uncond[None])

    def clear(self) -> None:
        for adapter in self.adapters:
            adapter.state.set_tokens(None)

    def detach(self) -> None:
        self.clear()
        for adapter in self.adapters:
            detach(self.pipe.unet, adapter)
        self.adapters = []

    # -------------------------------------------------------------------------------------------- generate
    def generate(self, images: Sequence | None = None, prompt: str | Sequence[str] = "",
                 negative_prompt: str | None = None, scale: float | None = None,
                 prompts: Sequence[ImagePrompt] | None = None, num_inference_steps: int = 30,
                 guidance_scale: float = 7.5, seed: int | None = None, generator=None,
                 width: int | None = None, height: int | None = None, num_images: int = 1,
                 output_type: str = "pil", **pipe_kwargs):
        """Generate with image prompts. ``images``/``scale`` serve a single adapter; ``prompts`` one per adapter."""
        if prompts is None:
            if len(self.adapters) != 1:
                raise IPAdapterError(f"{len(self.adapters)} adapters attached: give one ImagePrompt per adapter")
            default = 1.0 if not prompt else 0.5
            prompts = [ImagePrompt(images=list(images or []), scale=default if scale is None else scale)]
        if len(prompts) != len(self.adapters):
            raise IPAdapterError(f"{len(prompts)} image prompt(s) for {len(self.adapters)} adapter(s)")
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        try:
            for i, p in enumerate(prompts):
                self.set_images(adapter=i, prompt=p)
            return self.pipe(
                prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, generator=generator, width=width, height=height,
                num_images_per_prompt=num_images, output_type=output_type, **pipe_kwargs,
            ).images
        finally:
            self.clear()


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
         model_dir: str | os.PathLike | None = None) -> IPAdapter:
    """Attach adapter file(s) to ``pipe``; the image encoder defaults to the pipeline's or the one beside the file.

    ``image_encoder``: an :class:`ImageEncoder`, a folder, or None (then ``pipe.image_encoder`` if the pipeline
    has one, else ``model_dir/image_encoder``, else ``image_encoder/`` beside the first adapter file).
    """
    items = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    loaded = [a if isinstance(a, Adapter) else Adapter.from_file(a) for a in items]
    for item, adapter in zip(items, loaded):
        adapter.check_unet(pipe.unet, source=str(item) if not isinstance(item, Adapter) else "adapter")
    needs_encoder = any(not a.config.uses_face_id or a.config.uses_patch_features for a in loaded)
    encoder = None
    if isinstance(image_encoder, ImageEncoder):
        encoder = image_encoder
    elif image_encoder is not None:
        encoder = ImageEncoder.from_pretrained(image_encoder)
    elif getattr(pipe, "image_encoder", None) is not None:
        encoder = ImageEncoder(pipe.image_encoder, getattr(pipe, "feature_extractor", None))
    elif needs_encoder:
        first = next((i for i in items if not isinstance(i, Adapter)), None)
        encoder = ImageEncoder.from_pretrained(find_image_encoder(first, model_dir))
    if encoder is not None:
        unet_param = next(pipe.unet.parameters())
        encoder.model.to(unet_param.device)
        for item, adapter in zip(items, loaded):
            if not adapter.config.uses_face_id:
                adapter.check_encoder(encoder.model, source=str(item) if not isinstance(item, Adapter) else "adapter")
    return IPAdapter(pipe, loaded, encoder)


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG with the generation parameters as a "parameters" text chunk, atomically."""
    from PIL import PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


EMBEDDED_MODEL = Path(__file__).parent / "world_model"


def embedded_model() -> tuple[Path, Path]:
    """(model folder, global adapter file) of the tiny world model shipped in the package."""
    adapter = EMBEDDED_MODEL / "ip-adapter_global.safetensors"
    if not (EMBEDDED_MODEL / "model_index.json").is_file() or not adapter.is_file():
        raise IPAdapterError(
            f"the embedded world model is not in this install ({EMBEDDED_MODEL}); pass --model DIR and --adapter FILE"
        )
    return EMBEDDED_MODEL, adapter
