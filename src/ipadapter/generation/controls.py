"""Per-generation controls over image prompts, as small pure functions (no pipeline in sight).

- combine: several images' encoder features -> what reaches one adapter. ``concat`` keeps every image's tokens
  side by side (the reference behaviour); the others are ComfyUI's combine_embeds on the weighted embeddings
  (add, subtract, average, norm-average, max, min: see :func:`combine`), on the encoder features, before the
  projection, as ComfyUI does.
- image weights in ``concat`` mode: the images share one attention, and image i's tokens get log(w_i) added to
  their attention logits, so a weight of k counts the image exactly as if it were given k times (a weight of 0
  leaves it out). With region masks each image attends on its own and its weight multiplies its output (what
  diffusers' per-image scales do).
- schedules: the fraction of the denoising where an adapter acts (``start``/``end``, like ComfyUI's start_at /
  end_at, measured on the model's timesteps: progress = 1 - t / num_train_timesteps) and a weight curve across
  that window.
- block scales: presets ("style", "composition") and free per-block maps -> {processor index: multiplier}.
- masks: grayscale region masks (any mode, 0..255 -> 0..1) and the resizing of every side image to the output
  size, each resize reported as an :class:`IPAdapterNote`.
- embeddings files: encoder features of prompt images with their negative, written as ``.safetensors``.
- The presets' blocks are the base family's (``bases/unet.py`` explains the UNet's: InstantStyle's choice).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..core.errors import IPAdapterError, IPAdapterNote, note, param  # noqa: F401 - IPAdapterNote re-exported
from ..core.files import atomic_write

COMBINE_MODES: tuple[str, ...] = ("concat", "add", "subtract", "average", "norm-average", "max", "min")
CURVES: tuple[str, ...] = ("constant", "linear", "ease-in", "ease-out")
PRESETS: tuple[str, ...] = ("style", "composition")


# ------------------------------------------------------------------------------------------------- combine
def check_combine(mode: str, source: str = param("combine")) -> str:
    """Our hyphenated name for ours or ComfyUI's ("norm average" -> "norm-average")."""
    key = "-".join(str(mode).strip().lower().split())
    if key not in COMBINE_MODES:
        raise IPAdapterError(f"{source} {mode!r}: unknown mode; use one of {', '.join(COMBINE_MODES)}")
    return key


def check_weights(weights: Sequence[float] | None, count: int, source: str = param("weights")) -> list[float] | None:
    """Per-image weights: None (all 1), or one finite number >= 0 per image, not all zero."""
    if weights is None or len(weights) == 0:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise IPAdapterError(f"{len(weights)} {source} value(s) for {count} image(s); give one per image or none")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise IPAdapterError(f"{source} {w}: must be a finite number >= 0")
    if not any(weights):
        raise IPAdapterError(f"{source}: all weights are 0; give at least one image a weight > 0 "
                             f"(or {param('scale')} 0)")
    return weights


def combine(x: torch.Tensor, weights: Sequence[float] | None, mode: str) -> torch.Tensor:
    """Embeddings of n images ``[n, ...]`` -> ``[1, ...]`` (ComfyUI's combine_embeds) or unchanged (``concat``).

    The weights scale each image's embedding first (as ComfyUI's IPAdapterEncoder weight), then: ``add`` the sum,
    ``subtract`` the first minus the mean of the others, ``average`` the mean, ``norm-average`` the mean of
    e_i / ||e||, the norm taken per feature across the images (torch.norm over dim 0, as ComfyUI computes it),
    ``max`` / ``min`` elementwise.
    """
    mode = check_combine(mode)
    if mode == "concat":
        return x
    if mode == "subtract" and x.shape[0] < 2:
        raise IPAdapterError("--combine subtract: give at least two images (the first minus the mean of the others)")
    w = torch.ones(x.shape[0]) if weights is None else torch.tensor([float(v) for v in weights])
    e = x.double() * w.to(x.device, torch.float64).view(-1, *([1] * (x.ndim - 1)))
    if mode == "add":
        out = e.sum(0, keepdim=True)
    elif mode == "subtract":
        out = e[:1] - e[1:].mean(0, keepdim=True)
    elif mode == "average":
        out = e.mean(0, keepdim=True)
    elif mode == "norm-average":
        out = (e / torch.linalg.vector_norm(e, dim=0, keepdim=True)).nan_to_num(0.0).mean(0, keepdim=True)
    elif mode == "max":
        out = e.max(0, keepdim=True).values
    else:
        out = e.min(0, keepdim=True).values
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class Schedule:
    """progress in [0, 1] -> weight multiplier: 0 outside [start, end], the curve inside.

    Curves fade the weight across the window, u = (progress - start) / (end - start): ``constant`` 1,
    ``linear`` 1 - u, ``ease-in`` 1 - u^2 (slow at first, then fast), ``ease-out`` (1 - u)^2 (fast at first).
    """

    start: float = 0.0
    end: float = 1.0
    curve: str = "constant"

    def __call__(self, progress: float | torch.Tensor) -> float | torch.Tensor:
        if torch.is_tensor(progress):  # under torch.compile (see core.attention.call_progress): no value is read
            inside = (progress >= self.start) & (progress <= self.end)
            u = (progress - self.start) / (self.end - self.start)
            return torch.where(inside, self._curve(u) * torch.ones_like(u), torch.zeros_like(u))
        if progress < self.start or progress > self.end:
            return 0.0
        return self._curve((progress - self.start) / (self.end - self.start))

    def _curve(self, u):
        if self.curve == "linear":
            return 1.0 - u
        if self.curve == "ease-in":
            return 1.0 - u * u
        if self.curve == "ease-out":
            return (1.0 - u) ** 2
        return 1.0


def schedule(start: float = 0.0, end: float = 1.0, curve: str = "constant") -> Schedule | None:
    """The schedule for a window and curve; None when the adapter acts fully throughout (nothing to do)."""
    start, end = float(start), float(end)
    for name, value in (("start", start), ("end", end)):
        if not (0.0 <= value <= 1.0):
            raise IPAdapterError(f"{param(name)} {value}: must be a fraction of the denoising between 0 and 1")
    if start >= end:
        raise IPAdapterError(f"{param('start')} {start} must be below {param('end')} {end} "
                             "(the adapter acts between the two)")
    if curve not in CURVES:
        raise IPAdapterError(f"{param('curve')} {curve!r}: unknown curve; use one of {', '.join(CURVES)}")
    if start == 0.0 and end == 1.0 and curve == "constant":
        return None
    return Schedule(start, end, curve)


# -------------------------------------------------------------------------------------------- block scales
def _cross_layers(layers: Sequence) -> list:
    return [layer for layer in layers if getattr(layer, "cross_dim", None) is not None]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")




def _from_diffusers(spec: Mapping) -> dict[str, float]:
    """diffusers' nested form {"down": {"block_2": [0.0, 1.0]}, "up": ..., "mid": s} -> flat prefixes."""
    flat: dict[str, float] = {}
    for side in ("down", "up"):
        value = spec.get(side)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            flat[f"{side}_blocks"] = float(value)
            continue
        for block, scales in value.items():
            if not str(block).startswith("block_"):
                raise IPAdapterError(f"block scales: {side}.{block}: expected block_<i> keys, as diffusers")
            stage = f"{side}_blocks.{str(block)[len('block_'):]}"
            if isinstance(scales, (list, tuple)):
                for j, s in enumerate(scales):
                    flat[f"{stage}.attentions.{j}"] = float(s)
            else:
                flat[stage] = float(scales)
    if spec.get("mid") is not None:
        mid = spec["mid"]
        flat["mid_block"] = float(mid[0] if isinstance(mid, (list, tuple)) else mid)
    return flat


def parse_blocks(text: str) -> dict[str, float]:
    """``"style"``, ``"style=1,composition=0.5"``, ``"up_blocks.0.attentions.1=1,*=0.2"`` -> {name: scale}."""
    out: dict[str, float] = {}
    for entry in str(text).split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, _, value = entry.partition("=")
        name = name.strip()
        try:
            scale = float(value) if value.strip() else 1.0
        except ValueError:
            raise IPAdapterError(f"{param('blocks')} {entry!r}: {value.strip()!r} is not a number "
                                 "(NAME=SCALE)") from None
        if not math.isfinite(scale):
            raise IPAdapterError(f"{param('blocks')} {entry!r}: the scale must be finite")
        out[name] = scale
    if not out:
        raise IPAdapterError(f"{param('blocks')}: empty; give a preset (style, composition) or BLOCK=SCALE entries")
    return out


def _number_list(spec) -> list[float] | None:
    """A list of scales ([1, 0.5] or "1,0.5"), else None."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            return None
        try:
            spec = [float(p) for p in parts]
        except ValueError:
            return None
    if not isinstance(spec, (list, tuple)):
        return None
    try:
        out = [float(s) for s in spec]
    except (TypeError, ValueError):
        raise IPAdapterError(f"--blocks: {list(spec)!r} is not a list of numbers") from None
    if any(not math.isfinite(s) or s < 0 for s in out):
        raise IPAdapterError("--blocks: scales must be finite numbers >= 0")
    return out


def block_scales(layers: Sequence, spec: str | Mapping | Sequence | None, family=None) -> dict[int, float]:
    """Per-layer multipliers {processor index: scale} for every cross-attention layer of a UNet.

    ``layers``: :func:`ipadapter.adapter.unet_layers` of the UNet. ``spec``: a string for :func:`parse_blocks`,
    a flat {block prefix or preset: scale} map, or diffusers' nested dict. Each layer takes the scale of the
    most specific entry naming it (a preset counts as the blocks it stands for; ``*`` is the least specific);
    layers no entry names get 0, as in diffusers and InstantStyle, where naming blocks means "only these".
    ``family``: the base family whose presets the names mean (default: the UNet family).
    """
    from ..bases.unet import UNET

    family = family or UNET
    cross = _cross_layers(layers)
    if spec is None:
        return {}
    numbers = _number_list(spec)
    if numbers is not None:  # one scale per layer in order (Flux: per double block, as diffusers' scale lists)
        if not numbers or len(numbers) > len(cross):
            raise IPAdapterError(f"--blocks: {len(numbers)} scales for {len(cross)} layers; give at most one per "
                                 "layer, in order (Flux: one per double block)")
        return {layer.index: (numbers[i] if i < len(numbers) else 1.0) for i, layer in enumerate(cross)}
    if isinstance(spec, str):
        flat = parse_blocks(spec)
    elif isinstance(spec, Mapping) and set(spec) <= {"down", "up", "mid"}:
        flat = _from_diffusers(spec)
    elif isinstance(spec, Mapping):
        flat = {str(k): float(v) for k, v in spec.items()}
    else:
        raise IPAdapterError(f"block scales: expected a string or a dict, got {type(spec).__name__}")
    entries: list[tuple[str, float]] = []  # (prefix, scale); later ones win at equal specificity
    for name, scale in flat.items():
        alias = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}.get(name, name)
        if alias in PRESETS:
            entries += [(prefix, scale) for prefix in family.preset_blocks(cross, alias)]
        elif alias == "*":
            entries.append(("*", scale))
        elif any(_matches(layer.name, alias) for layer in cross):
            entries.append((alias, scale))
        else:
            known = sorted({".".join(layer.name.split(".")[:4]) if not layer.name.startswith("mid") else
                            "mid_block" for layer in cross})
            raise IPAdapterError(
                f"{param('blocks')} {name!r}: no cross-attention layer of this UNet is in that block; use a preset "
                f"({', '.join(PRESETS)}) or one of: {', '.join(known)}"
            )
    scales: dict[int, float] = {}
    for layer in cross:
        best, depth = 0.0, -2
        for prefix, scale in entries:
            d = -1 if prefix == "*" else (prefix.count(".") + 1 if _matches(layer.name, prefix) else -2)
            if d > -2 and d >= depth:
                best, depth = scale, d
        scales[layer.index] = best
    return scales


# ------------------------------------------------------------------------------------------------- images
def fit_image(image: Image.Image, size: tuple[int, int], what: str, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """``image`` at ``size`` (width, height); a resize is reported as a note naming ``what``."""
    if image.size != tuple(size):
        note(f"{what}: {image.width}x{image.height} resized to {size[0]}x{size[1]} (the output size)")
        image = image.resize(tuple(size), resample)
    return image


def load_mask(source, size: tuple[int, int] | None = None, what: str = "mask") -> torch.Tensor:
    """A grayscale mask [H, W] in [0, 1] from a file, a PIL image or a tensor; resized (with a note) to ``size``."""
    from ..core.encoders import load_image

    if torch.is_tensor(source):
        t = source.detach().float()
        if t.ndim == 3:
            t = t[0] if t.shape[0] == 1 else t.mean(0)
        if t.ndim != 2:
            raise IPAdapterError(f"{what}: a mask tensor must be [H, W], got shape {list(source.shape)}")
        if t.min() < 0 or t.max() > 1:
            raise IPAdapterError(f"{what}: mask values must lie in [0, 1]")
        if size is not None and (t.shape[1], t.shape[0]) != tuple(size):
            note(f"{what}: {t.shape[1]}x{t.shape[0]} resized to {size[0]}x{size[1]} (the output size)")
            t = torch.nn.functional.interpolate(t[None, None], size=(size[1], size[0]), mode="bilinear",
                                                align_corners=False)[0, 0]
        return t.clamp(0, 1)
    name = str(source) if isinstance(source, (str, os.PathLike)) else what
    img = load_image(source).convert("L")
    if size is not None:
        img = fit_image(img, size, f"{what} {name}" if name != what else what, Image.Resampling.BILINEAR)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width).float() / 255.0


# ------------------------------------------------------------------------------------------ noise negatives
NOISES: tuple[str, ...] = ("fade", "dissolve", "gaussian", "shuffle")


def _blur(x: torch.Tensor, kernel: int, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] with reflect padding; sigma defaults to torchvision's rule for a
    kernel size (0.3 ((k - 1) / 2 - 1) + 0.8)."""
    kernel += 1 - kernel % 2
    sigma = sigma if sigma is not None else 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = torch.arange(kernel, dtype=x.dtype) - (kernel - 1) / 2
    g = torch.exp(-(r / sigma) ** 2 / 2)
    g = g / g.sum()
    pad = kernel // 2
    y = torch.nn.functional.pad(x[None], (pad, pad, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, g.view(1, 1, 1, -1).expand(x.shape[0], 1, 1, -1), groups=x.shape[0])
    y = torch.nn.functional.pad(y, (0, 0, pad, pad), mode="reflect")
    return torch.nn.functional.conv2d(y, g.view(1, 1, -1, 1).expand(x.shape[0], 1, -1, 1), groups=x.shape[0])[0]


def _elastic(x: torch.Tensor, alpha: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """An elastic warp (as torchvision's ElasticTransform): a uniform random displacement field, blurred by
    sigma, of alpha pixels at most, sampled bilinearly."""
    _, h, w = x.shape
    field = torch.rand(2, h, w, generator=gen) * 2 - 1
    if sigma > 0:
        field = _blur(field, int(8 * sigma + 1), sigma)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs + field[0] * alpha / w, ys + field[1] * alpha / h], dim=-1)[None]
    return torch.nn.functional.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=True)[0]


def noise_image(kind: str, strength: float = 1.0, blur: int = 0, seed: int = 0, base=None,
                size: int = 224) -> Image.Image:
    """A negative image from noise (ComfyUI's IPAdapterNoise), reproducible from ``seed``.

    ``base``: the image the noise is laid on (centre-cropped to a square, resized to ``size``), black if None.
    ``fade`` base (1 - s) + uniform s; ``dissolve`` a fraction s of the pixels replaced by uniform noise;
    ``gaussian`` base + N(0, 1) s; ``shuffle`` the base elastically warped (alpha 75, sigma (1 - s) 3.5) and
    flipped both ways, then n = N(0, 1) 0.75 s and base (1 - n) + n. Clamped to [0, 1], then a Gaussian blur of
    kernel ``blur`` (odd; 0 = none).
    """
    from ..core.encoders import load_image, square, to_tensor

    if kind not in NOISES:
        raise IPAdapterError(f"--negative-noise {kind!r}: use one of {', '.join(NOISES)}")
    strength = float(strength)
    if not (0.0 <= strength <= 1.0):
        raise IPAdapterError(f"--noise-strength {strength}: must be between 0 and 1")
    if int(blur) < 0 or int(blur) > 32:
        raise IPAdapterError(f"--noise-blur {blur}: must be a whole number from 0 to 32")
    if base is None:
        image = torch.zeros(3, size, size)
    else:
        image = to_tensor(square(load_image(base)).resize((size, size), Image.Resampling.BICUBIC))
    gen = torch.Generator("cpu").manual_seed(int(seed))
    if kind == "fade":
        out = image * (1 - strength) + torch.rand(image.shape, generator=gen) * strength
    elif kind == "dissolve":
        mask = (torch.rand(image.shape, generator=gen) < strength).float()
        out = image * (1 - mask) + torch.rand(image.shape, generator=gen) * mask
    elif kind == "gaussian":
        out = image + torch.randn(image.shape, generator=gen) * strength
    else:
        image = _elastic(image, 75.0, (1 - strength) * 3.5, gen).flip(-1).flip(-2)
        n = torch.randn(image.shape, generator=gen) * (strength * 0.75)
        out = image * (1 - n) + n
    out = out.clamp(0, 1)
    if int(blur) > 0:
        out = _blur(out, int(blur))
    arr = (out.permute(1, 2, 0) * 255.0 + 0.5).clamp(0, 255).byte().numpy()
    return Image.fromarray(arr, "RGB")


# --------------------------------------------------------------------------------------- embeddings files
EMBEDS_FORMAT = "ipadapter.embeds"
FEATURE_FIELDS: tuple[str, ...] = ("image_embeds", "penultimate", "face_id")


def save_embeds(path: str | os.PathLike, cond, uncond, metadata: Mapping[str, str] | None = None) -> Path:
    """Write encoder features (:class:`~ipadapter.encoders.Features`) and their negative, atomically.

    Keys: "<field>" and "negative.<field>" for each feature present ([n_images, ...]).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise IPAdapterError(f"{path}: embeddings are written as .safetensors; give a name ending in .safetensors")
    tensors = {}
    for field in FEATURE_FIELDS:
        c, u = getattr(cond, field), getattr(uncond, field)
        if c is not None:
            tensors[field] = c.detach().float().cpu().contiguous()
            tensors[f"negative.{field}"] = u.detach().float().cpu().contiguous()
    if not tensors:
        raise IPAdapterError("no image features to write")
    meta = {"format": EMBEDS_FORMAT, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_embeds(path: str | os.PathLike):
    """(cond, uncond, metadata) from a file written by :func:`save_embeds` (``ipadapter embed``)."""
    from safetensors import safe_open

    from ..core.encoders import Features

    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"{path}: no such embeddings file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
        raise IPAdapterError(f"{path}: not a readable embeddings file ({' '.join(str(e).split())[:100]})") from None
    if meta.get("format") != EMBEDS_FORMAT or not any(f in tensors for f in FEATURE_FIELDS):
        raise IPAdapterError(f"{path}: not an embeddings file written by `ipadapter embed`")
    cond = Features(**{f: tensors.get(f) for f in FEATURE_FIELDS})
    uncond = Features(**{f: tensors.get(f"negative.{f}") for f in FEATURE_FIELDS})
    return cond, uncond, meta


# ----------------------------------------------------------------------------------------------- seeds
def seeds_for(seed: int | Sequence[int] | None, count: int) -> list[int] | None:
    """One seed per image: S gives S, S+1, ... (image k alone is ``seed=S+k``); a list must hold ``count``."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return [seed + k for k in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise IPAdapterError(f"{len(seeds)} seed(s) for {count} image(s); give one seed, or one per image")
    return seeds

