"""Image prompts -> encoder features: safe image loading, CLIP preprocessing, and the unconditional branch.

Global kinds read the projected embedding (``image_embeds``); patch kinds read the penultimate hidden states
(all patch tokens + CLS). The unconditional branch is built as the reference builds it: a zero embedding for
global/FaceID kinds, the encoder run on an all-zero ``pixel_values`` tensor (zeros after normalisation, not a
black picture) for patch kinds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import AdapterConfig
from .errors import IPAdapterError

MAX_PIXELS = 50_000_000


def load_image(path: str | os.PathLike | Image.Image) -> Image.Image:
    """Open an image as 8-bit RGB: RGBA/LA composited on white, palette/grayscale/16-bit converted.

    Refuses unreadable files and images over 50 megapixels with a one-line :class:`IPAdapterError`.
    """
    if isinstance(path, Image.Image):
        return to_rgb(path, "image")
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():  # PIL warns on huge images before we can refuse them ourselves
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise IPAdapterError(
                    f"{path}: {img.width}x{img.height} is over 50 megapixels; resize it first (prompt images are "
                    "seen at the encoder's resolution, 224 px for CLIP)"
                )
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img, str(path))
    except IPAdapterError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses on its own past ~179 megapixels
        reason = " ".join(str(e).split())[:80]
        raise IPAdapterError(f"{path}: over 50 megapixels ({reason}); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = " ".join(str(e).split())[:120]
        raise IPAdapterError(f"{path}: not a readable image ({reason}); use PNG, JPEG or WebP") from None


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    if img.width * img.height > MAX_PIXELS:
        raise IPAdapterError(f"{name}: {img.width}x{img.height} is over 50 megapixels; resize it first")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_face_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """Face-ID embeddings from ``.npy`` / ``.safetensors`` (insightface ``normed_embedding``): [n, 512]."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"{path}: no such face-embedding file")
    try:
        if path.suffix == ".npy":
            t = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            t = tensors.get("face_embeds", next(iter(tensors.values()))).float()
        else:
            raise IPAdapterError(f"{path}: face embeddings must be .npy or .safetensors")
    except IPAdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
        raise IPAdapterError(f"{path}: not readable face embeddings ({' '.join(str(e).split())[:100]})") from None
    t = t.reshape(-1, t.shape[-1])
    if t.shape[-1] != 512:
        raise IPAdapterError(f"{path}: face embeddings should be 512 wide (insightface buffalo_l), got {t.shape[-1]}")
    return t


def sized_for(processor, model) -> bool:
    """Whether ``processor`` makes pictures of the encoder's input size (a safety checker's 224 px extractor
    does not fit a 336 px encoder, nor a tiny test one)."""
    crop = getattr(processor, "crop_size", None)
    height = crop.get("height") if hasattr(crop, "get") else crop
    return height is not None and int(height) == int(model.config.image_size)


@dataclass
class Features:
    """Encoder outputs for n images: whichever of the three feature kinds the adapter reads."""

    image_embeds: torch.Tensor | None = None  # [n, E]
    penultimate: torch.Tensor | None = None  # [n, S, H]
    face_id: torch.Tensor | None = None  # [n, 512]

    def to(self, *args, **kwargs) -> Features:
        return Features(*(t.to(*args, **kwargs) if t is not None else None
                          for t in (self.image_embeds, self.penultimate, self.face_id)))


class ImageEncoder:
    """A frozen ``CLIPVisionModelWithProjection`` with its preprocessing."""

    def __init__(self, model, processor=None):
        from transformers import CLIPImageProcessor

        self.model = model.eval().requires_grad_(False)
        if processor is None:
            size = int(model.config.image_size)
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, processor=None, fallback=None, **kwargs) -> ImageEncoder:
        """Load an encoder folder. Preprocessing: ``processor``, else the folder's own preprocessor config, else
        the model folder's ``feature_extractor/`` beside it or ``fallback`` (a pipeline's feature extractor) when
        sized for this encoder, else a CLIPImageProcessor sized to the encoder."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = Path(path)
        if not (path / "config.json").is_file():
            raise IPAdapterError(
                f"{path}: not an image-encoder folder (no config.json); give a CLIPVisionModelWithProjection folder"
            )
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(str(path), **kwargs)
        except Exception as e:  # noqa: BLE001
            raise IPAdapterError(f"{path}: cannot load the image encoder ({' '.join(str(e).split())[:140]})") from None
        if processor is None and (path / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(str(path))
        if processor is None:
            sibling = path.parent / "feature_extractor"
            guesses = []
            if (sibling / "preprocessor_config.json").is_file():
                guesses.append(CLIPImageProcessor.from_pretrained(str(sibling)))
            processor = next((p for p in [*guesses, fallback] if p is not None and sized_for(p, model)), None)
        return cls(model, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        images = [load_image(im) for im in images]
        return self.processor(images=images, return_tensors="pt").pixel_values.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, config: AdapterConfig, images: list[Image.Image] | None = None,
               pixel_values: torch.Tensor | None = None) -> tuple[Features, Features]:
        """(cond, uncond) features of the images, as ``config.kind`` reads them."""
        if pixel_values is None:
            pixel_values = self.pixels(images or [])
        if config.kind == "global":
            embeds = self.model(pixel_values).image_embeds
            return Features(image_embeds=embeds), Features(image_embeds=torch.zeros_like(embeds))
        if config.uses_patch_features:
            hidden = self.model(pixel_values, output_hidden_states=True).hidden_states[-2]
            zero = self.model(torch.zeros_like(pixel_values[:1]), output_hidden_states=True).hidden_states[-2]
            return Features(penultimate=hidden), Features(penultimate=zero.expand_as(hidden).clone())
        raise IPAdapterError(f"{config.kind} adapters read face-ID embeddings, not images alone")
