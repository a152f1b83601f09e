"""Image prompts -> encoder features: safe image loading, CLIP preprocessing, and the unconditional branch.

Global kinds read the projected embedding (``image_embeds``); patch kinds read the penultimate hidden states
(all patch tokens + CLS). The unconditional branch is built as the reference builds it: a zero embedding for
global/FaceID kinds, the encoder run on an all-zero ``pixel_values`` tensor (zeros after normalisation, not a
black picture) for patch kinds. The SD3.5 (time-plus) kind reads a SigLIP encoder's penultimate hidden states
(``SiglipVisionModel``, no CLS token) and its unconditional branch is zeros of those features, as diffusers'.

Preparation for the encoder happens here and only here (:class:`Prep`, :func:`tile_reference`,
:meth:`ImageEncoder.encode`'s enhancer): without a :class:`Prep` an image goes through the encoder's own
processor (shortest side to the encoder size, centre crop), as before; with one (ComfyUI's
PrepImageForClipVision) it is cropped to a square at the given position, or padded to one with black, resized
to the encoder size with the given filter, optionally sharpened (contrast-adaptive sharpening), and only then
normalised by the processor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import AdapterConfig
from .errors import IPAdapterError, note

MAX_PIXELS = 50_000_000


class _NoBackendFallbackNotice(logging.Filter):
    """transformers 5 logs "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" the first time anything looks the name up, diffusers' pipeline modules included
    (at import). The PIL backend is what this library means to use without torchvision, so the notice tells
    a user nothing to act on: it is dropped, and nothing else from that logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoBackendFallbackNotice())


def clip_processor_class():
    """``CLIPImageProcessor``, or its PIL backend where torchvision is missing (what transformers would fall back
    to, looked up by that name so that no fallback notice is logged)."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


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
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1:
                note(f"{path}: {'an animated' if img.format in ('GIF', 'PNG', 'WEBP') else 'a multi-frame'} "
                     f"image ({frames} frames); the first frame is used")
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
    does not fit a 336 px encoder, nor a tiny test one). ``model``: the encoder, or its input size."""
    crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None)  # SigLIP: no crop, a size
    height = crop.get("height") if hasattr(crop, "get") else crop
    size = model if isinstance(model, int) else model.config.image_size
    return height is not None and int(height) == int(size)


def default_processor(image_size: int, siglip: bool = False):
    """CLIP's preprocessing (shortest side, centre crop, CLIP mean/std) at the encoder's input size; with
    ``siglip``, SigLIP's (resize to a square, mean/std 0.5)."""
    CLIPImageProcessor = clip_processor_class()  # noqa: N806 - the class transformers would pick

    size = int(image_size)
    if siglip:
        return siglip_processor_class()(size={"height": size, "width": size})
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def encoder_processor(path: str | os.PathLike, image_size: int | None = None, fallback=None):
    """The preprocessing of the encoder folder ``path``, for generation and training alike: the folder's own
    preprocessor config, else the model folder's ``feature_extractor/`` beside it or ``fallback`` (a pipeline's
    or model folder's feature extractor) when sized for this encoder, else CLIP's defaults at its input size.
    ``image_size``: the encoder's input size (default: read from its config.json)."""
    CLIPImageProcessor = clip_processor_class()  # noqa: N806 - the class transformers would pick

    path = Path(path)
    if (path / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(path))
    if image_size is None:
        from transformers import CLIPVisionConfig

        image_size = int(CLIPVisionConfig.from_pretrained(str(path)).image_size)
    sibling = path.parent / "feature_extractor"
    guesses = [CLIPImageProcessor.from_pretrained(str(sibling))] if (sibling / "preprocessor_config.json").is_file() \
        else []
    return next((p for p in [*guesses, fallback] if p is not None and sized_for(p, image_size)),
                None) or default_processor(image_size)


CROPS: tuple[str, ...] = ("center", "top", "bottom", "left", "right", "pad")
INTERPOLATIONS: tuple[str, ...] = ("lanczos", "bicubic", "hamming", "bilinear", "box", "nearest")
TILE = 256  # ComfyUI's tile size: the encoder's processor brings each tile to its own size


@dataclass(frozen=True)
class Prep:
    """How an image is brought to the encoder's square input (ComfyUI's PrepImageForClipVision)."""

    crop: str = "center"  # center | top | bottom | left | right | pad (black bars to a square)
    interpolation: str = "lanczos"  # the PIL filter of the resize
    sharpen: float = 0.0  # contrast-adaptive sharpening amount in [0, 1]

    def __post_init__(self):
        if self.crop not in CROPS:
            raise IPAdapterError(f"--crop {self.crop!r}: use one of {', '.join(CROPS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise IPAdapterError(f"--interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        if not (0.0 <= float(self.sharpen) <= 1.0):
            raise IPAdapterError(f"--sharpen {self.sharpen}: must be between 0 and 1")


def _filter(name: str):
    return getattr(Image.Resampling, name.upper())


def square(image: Image.Image, crop: str = "center") -> Image.Image:
    """The largest square at ``crop`` (top/bottom/left/right/center), or the image padded to a square with black
    (``pad``, centred); any PIL mode."""
    w, h = image.size
    if crop == "pad":
        side = max(w, h)
        out = Image.new(image.mode, (side, side), 0)
        out.paste(image, ((side - w) // 2, (side - h) // 2))
        return out
    side = min(w, h)
    x, y = (w - side) // 2, (h - side) // 2
    if crop == "top":
        y = 0
    elif crop == "bottom":
        y = h - side
    elif crop == "left":
        x = 0
    elif crop == "right":
        x = w - side
    return image.crop((x, y, x + side, y + side))


def sharpen(pixels: torch.Tensor, amount: float) -> torch.Tensor:
    """Contrast-adaptive sharpening (AMD FidelityFX CAS, ComfyUI's formula) of [..., C, H, W] in [0, 1].

    Per pixel, from its 3x3 neighbourhood (zero padded): m = min(cross) + min(diagonals), M = max(cross) +
    max(diagonals) (cross minima clamped at 0, maxima at 1), amp = sqrt(min(m, 2 - M) / M),
    w = -amp (amount (1/5 - 1/8) + 1/8), out = (w (up + left + right + down) + centre) / (1 + 4 w), in [0, 1].
    """
    if amount <= 0:
        return pixels
    p = torch.nn.functional.pad(pixels, (1, 1, 1, 1))
    n = {(dy, dx): p[..., 1 + dy:p.shape[-2] - 1 + dy, 1 + dx:p.shape[-1] - 1 + dx]
         for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    cross = torch.stack([n[(-1, 0)], n[(0, -1)], n[(0, 0)], n[(0, 1)], n[(1, 0)]])
    diag = torch.stack([n[(-1, -1)], n[(-1, 1)], n[(1, -1)], n[(1, 1)]])
    low = cross.min(0).values.clamp(min=0) + diag.min(0).values.clamp(min=0)
    high = cross.max(0).values.clamp(max=1) + diag.max(0).values.clamp(max=1)
    amp = torch.sqrt(torch.minimum(low, 2 - high) / high)
    w = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    out = ((n[(-1, 0)] + n[(0, -1)] + n[(0, 1)] + n[(1, 0)]) * w + n[(0, 0)]) / (1 + 4 * w)
    return torch.nan_to_num(out).clamp(0, 1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def prepare(image: Image.Image, size: int, prep: Prep) -> torch.Tensor:
    """One image as the encoder sees it under ``prep``: [3, size, size] in [0, 1], before normalisation."""
    img = square(load_image(image), prep.crop).resize((size, size), _filter(prep.interpolation))
    return sharpen(to_tensor(img), float(prep.sharpen))


def tile_reference(image: Image.Image, mask: Image.Image | None = None, sharpening: float = 0.0,
                   tile: int = TILE) -> tuple[list[Image.Image], torch.Tensor]:
    """ComfyUI's tiled IP-Adapter: a reference cut into ``tile``-sized squares, each with its region mask.

    Nearly square references (aspect 0.75..1.33) are centre-cropped to a square and resized to 2x2 tiles;
    others get their short side resized to one tile (the long side in proportion, centre-cropped to at most four
    tiles). Tiles overlap evenly to cover the long side. Returns the tiles and their masks [n, H, W] on the
    resized reference: 1 (or ``mask``'s value) inside the tile, 0 elsewhere.
    """
    image = load_image(image)
    w, h = image.size
    mask = (mask.convert("L") if mask is not None else Image.new("L", (w, h), 255)).resize((w, h),
                                                                                             Image.Resampling.BICUBIC)
    if 0.75 < h / w < 1.33:
        image, mask = square(image), square(mask)
        size = (2 * tile, 2 * tile)
    else:
        size = (int(tile * w / h), tile) if h < w else (tile, int(tile * h / w))
    image, mask = image.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.BICUBIC)
    if h / w > 4 or h / w < 0.25:
        cw, ch = (4 * tile, tile) if h < w else (tile, 4 * tile)
        box = ((size[0] - cw) // 2, (size[1] - ch) // 2)
        image = image.crop((*box, box[0] + cw, box[1] + ch))
        mask = mask.crop((*box, box[0] + cw, box[1] + ch))
    pixels = sharpen(to_tensor(image), sharpening)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    ow, oh = image.size
    nx, ny = math.ceil(ow / tile), math.ceil(oh / tile)
    over_x = max(0.0, (nx * tile - ow) / (nx - 1 if nx > 1 else 1))
    over_y = max(0.0, (ny * tile - oh) / (ny - 1 if ny > 1 else 1))
    tiles, masks = [], []
    for y in range(ny):
        for x in range(nx):
            x0, y0 = int(x * (tile - over_x)), int(y * (tile - over_y))
            piece = (pixels[:, y0:y0 + tile, x0:x0 + tile] * 255.0 + 0.5).clamp(0, 255).byte()
            tiles.append(Image.fromarray(piece.permute(1, 2, 0).numpy(), "RGB"))
            region = torch.zeros_like(m)
            region[y0:y0 + tile, x0:x0 + tile] = m[y0:y0 + tile, x0:x0 + tile]
            masks.append(region)
    return tiles, torch.stack(masks)


def enhancer_pieces(image: Image.Image, tiles: int) -> list[Image.Image]:
    """ComfyUI's ClipVision enhancer split: a ``tiles`` x ``tiles`` grid of (H // tiles) x (W // tiles) pieces,
    row by row (each then prepared like any image)."""
    image = load_image(image)
    h, w = image.height // tiles, image.width // tiles
    return [image.crop((j * w, i * h, (j + 1) * w, (i + 1) * h)) for i in range(tiles) for j in range(tiles)]


def merge_pieces(features: torch.Tensor, tiles: int) -> torch.Tensor:
    """Encoder features of the tiles x tiles pieces of one image -> one image's worth.

    Patch features [tiles^2, 1 + g^2, H]: the class tokens averaged, the patch grids laid side by side (a
    tiles*g square) and area-pooled back to g x g (ComfyUI's merge). Embeddings [tiles^2, E]: their mean (ComfyUI
    lays the E numbers out as a square map and pools it, which only fits square widths; the mean is what that
    pooling approximates and fits every width).
    """
    if features.ndim == 2:
        return features.mean(0, keepdim=True)
    cls, patches = features[:, :1], features[:, 1:]
    g = math.isqrt(patches.shape[1])
    grid = patches.reshape(tiles, tiles, g, g, -1).permute(0, 2, 1, 3, 4).reshape(tiles * g, tiles * g, -1)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid.permute(2, 0, 1)[None], (g, g))[0]
    return torch.cat([cls.mean(0, keepdim=True), pooled.flatten(1).T[None]], dim=1)

def _is_siglip(path: Path) -> bool:
    import json

    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", "")).startswith("siglip")
    except (OSError, ValueError):
        return False


@dataclass
class Features:
    """Encoder outputs for n images: whichever of the three feature kinds the adapter reads."""

    image_embeds: torch.Tensor | None = None  # [n, E]
    penultimate: torch.Tensor | None = None  # [n, S, H]
    face_id: torch.Tensor | None = None  # [n, 512]

    def to(self, *args, **kwargs) -> Features:
        return Features(*(t.to(*args, **kwargs) if t is not None else None
                          for t in (self.image_embeds, self.penultimate, self.face_id)))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_siglip(model) -> bool:
    return "siglip" in str(getattr(model.config, "model_type", ""))


def siglip_processor_class():
    try:  # transformers 5 without torchvision: the PIL backend, named so to avoid a warning on every load
        from transformers import SiglipImageProcessorPil as processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import SiglipImageProcessor as processor
    return processor


class ImageEncoder:
    """A frozen ``CLIPVisionModelWithProjection`` (or, for SD3.5 adapters, ``SiglipVisionModel``) with its
    preprocessing."""

    def __init__(self, model, processor=None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor if processor is not None else default_processor(model.config.image_size,
                                                                                      siglip=is_siglip(model))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, processor=None, fallback=None, **kwargs) -> ImageEncoder:
        """Load an encoder folder. Preprocessing: ``processor``, else :func:`encoder_processor`'s rule (the
        folder's own config, else a sized ``feature_extractor/`` beside it or ``fallback``, else CLIP's defaults);
        a SigLIP folder (SD3.5 adapters): its own config, else a sized ``fallback``, else SigLIP's defaults."""
        from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise IPAdapterError(
                f"{path}: not an image-encoder folder (no config.json); give a CLIPVisionModelWithProjection "
                "(or, for SD3.5 adapters, SiglipVisionModel) folder"
            )
        siglip = "siglip" in str(_read_json(path / "config.json").get("model_type", ""))
        model_class = SiglipVisionModel if siglip else CLIPVisionModelWithProjection
        try:
            model = model_class.from_pretrained(str(path), **kwargs)
        except Exception as e:  # noqa: BLE001
            raise IPAdapterError(f"{path}: cannot load the image encoder ({' '.join(str(e).split())[:140]})") from None
        if processor is None and siglip:
            size = int(model.config.image_size)
            if (path / "preprocessor_config.json").is_file():
                processor = siglip_processor_class().from_pretrained(str(path))
            else:
                sized = fallback is not None and sized_for(fallback, size)
                processor = fallback if sized else default_processor(size, siglip=True)
        if processor is None:
            processor = encoder_processor(path, int(model.config.image_size), fallback)
        return cls(model, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixels(self, images: list[Image.Image], prep: Prep | None = None) -> torch.Tensor:
        """Normalised pixel values [n, 3, S, S]: the processor's own resize and crop, or ``prep``'s."""
        if prep is None:
            images = [load_image(im) for im in images]
            values = self.processor(images=images, return_tensors="pt").pixel_values
        else:
            size = int(self.model.config.image_size)
            arrays = [prepare(im, size, prep).permute(1, 2, 0).numpy() for im in images]
            values = self.processor(images=arrays, return_tensors="pt", do_resize=False, do_center_crop=False,
                                    do_rescale=False).pixel_values
        return values.to(self.device, self.dtype)

    def _features(self, pixel_values: torch.Tensor, field: str, batch_size: int = 0) -> torch.Tensor:
        chunks = pixel_values.split(batch_size) if batch_size > 0 else (pixel_values,)
        if field == "image_embeds":  # CLIP's projected embedding; SigLIP's pooled output (InstantX FLUX reads it)
            outs = [self.model(c) for c in chunks]
            return torch.cat([o.image_embeds if getattr(o, "image_embeds", None) is not None else o.pooler_output
                              for o in outs])
        return torch.cat([self.model(c, output_hidden_states=True).hidden_states[-2] for c in chunks])

    @torch.no_grad()
    def encode(self, config: AdapterConfig, images: list[Image.Image] | None = None,
               pixel_values: torch.Tensor | None = None, prep: Prep | None = None, batch_size: int = 0,
               enhance_tiles: int = 1, enhance_ratio: float = 1.0) -> tuple[Features, Features]:
        """(cond, uncond) features of the images, as ``config.kind`` reads them.

        ``batch_size`` > 0 runs the encoder on that many images at a time (ComfyUI's encode_batch_size).
        ``enhance_tiles`` > 1 is ComfyUI's ClipVision enhancer: each image's pieces (:func:`enhancer_pieces`) are
        encoded too and merged (:func:`merge_pieces`); one image gives two feature rows, the whole image's times
        ``enhance_ratio`` and the merged pieces', several give ratio x whole + (1 - ratio) x merged each.
        """
        if config.encoder_feature != "image_embeds" and not config.uses_patch_features:
            raise IPAdapterError(f"{config.kind} adapters read face-ID embeddings, not images alone")
        field = "image_embeds" if config.encoder_feature == "image_embeds" else "penultimate"
        if pixel_values is None:
            pixel_values = self.pixels(images or [], prep)
        feats = self._features(pixel_values, field, batch_size)
        if enhance_tiles > 1:
            merged = torch.cat([merge_pieces(self._features(self.pixels(enhancer_pieces(im, enhance_tiles), prep),
                                                            field, batch_size), enhance_tiles) for im in images])
            r = float(enhance_ratio)
            feats = torch.cat([feats * r, merged]) if feats.shape[0] == 1 else feats * r + merged * (1 - r)
        if field == "image_embeds":
            return Features(image_embeds=feats), Features(image_embeds=torch.zeros_like(feats))
        if config.time_conditioned:  # SD3.5: the negative is zeros of the SigLIP features, as diffusers'
            return Features(penultimate=feats), Features(penultimate=torch.zeros_like(feats))
        zero = self.model(torch.zeros_like(pixel_values[:1]), output_hidden_states=True).hidden_states[-2]
        return Features(penultimate=feats), Features(penultimate=zero.expand_as(feats).clone())
