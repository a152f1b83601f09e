"""The generation parameters an image carries: one text format, written by the CLI and the page, read back by
``ipadapter generate --reuse-parameters``.

The layout is the one other Stable Diffusion tools write (A1111): the prompt, ``Negative prompt: ...``, then a
line of ``key: value`` pairs; after it one line per adapter and per ControlNet, in the order of the CLI's groups::

    a red circle
    Negative prompt: blurry
    Steps: 30, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: sd15, Init image: a.png
    IP-Adapter: ip-adapter_sd15.safetensors, scale: 0.5, image: cat.png, image weight: 1, blocks: "down_blocks.2=1,*=0"
    ControlNet: cn-depth, control image: depth.png, control scale: 1

(each on one line; img2img adds ``Denoising strength``, inpainting ``Inpaint mask`` to the third line; several
images repeat ``image: ..., image weight: ...``, then ``image mask`` and ``negative image`` entries follow).

A value holding ``,``, ``:`` or ``"`` (or empty, or with spaces at its ends) is written as a JSON string. PNGs keep
the text in a ``parameters`` text chunk, JPEG and WebP in the EXIF UserComment (``UNICODE`` + UTF-16-BE, as
A1111 writes it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..core.errors import IPAdapterError
from ..core.files import atomic_write

#: image formats an output name may end in, and the PIL format each is written as
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE = b"UNICODE\0"


@dataclass
class AdapterParameters:
    """One adapter's inputs (file names as given; empty strings stand for a missing per-image mask)."""

    adapter: str
    scale: float = 1.0
    images: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # one per image
    masks: list[str] = field(default_factory=list)
    negative_images: list[str] = field(default_factory=list)
    embeds: str = ""
    face_embeds: str = ""
    combine: str = "concat"
    start: float = 0.0
    end: float = 1.0
    curve: str = "constant"
    blocks: str = ""
    # further controls (ComfyUI's: weight_type, boost, ...) as written, and their image lists
    options: dict[str, str] = field(default_factory=dict)
    option_images: dict[str, list[str]] = field(default_factory=dict)  # composition_images, face_images


@dataclass
class ControlNetParameters:
    controlnet: str
    image: str
    scale: float = 1.0


@dataclass
class Parameters:
    """Everything needed to make one image again (its own seed: image k of a batch has seed S+k)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 30
    sampler: str = ""
    guidance: float = 7.5
    true_cfg: float | None = None  # Flux's true classifier-free guidance (FluxPipeline's true_cfg_scale)
    seed: int = 0
    width: int = 0
    height: int = 0
    model: str = ""
    adapters: list[AdapterParameters] = field(default_factory=list)
    init_image: str = ""
    strength: float | None = None
    inpaint_mask: str = ""
    controlnets: list[ControlNetParameters] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ writing
def _number(x: float) -> str:
    short = f"{float(x):g}"
    return short if float(short) == float(x) else repr(float(x))


def _value(text: str) -> str:
    text = str(text)
    if not text or text != text.strip() or any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _pairs(items: list[tuple[str, object]]) -> str:
    return ", ".join(f"{k}: {_value(v)}" for k, v in items)


def format_parameters(p: Parameters) -> str:
    """The text an image carries (see the module docstring)."""
    main: list[tuple[str, object]] = [
        ("Steps", str(p.steps)), ("Sampler", p.sampler), ("CFG scale", _number(p.guidance)),
        *([("True CFG scale", _number(p.true_cfg))] if p.true_cfg is not None else []),
        ("Seed", str(p.seed)), ("Size", f"{p.width}x{p.height}"), ("Model", p.model),
    ]
    if p.init_image:
        if p.strength is not None:
            main.append(("Denoising strength", _number(p.strength)))
        main.append(("Init image", p.init_image))
        if p.inpaint_mask:
            main.append(("Inpaint mask", p.inpaint_mask))
    lines = [p.prompt, f"Negative prompt: {p.negative_prompt}", _pairs(main)]
    for a in p.adapters:
        items: list[tuple[str, object]] = [("IP-Adapter", a.adapter), ("scale", _number(a.scale))]
        weights = list(a.weights) or [1.0] * len(a.images)
        for image, weight in zip(a.images, weights):
            items += [("image", image), ("image weight", _number(weight))]
        items += [("image mask", m) for m in a.masks]
        items += [("negative image", n) for n in a.negative_images]
        for key, value, neutral in (("embeds", a.embeds, ""), ("face embeds", a.face_embeds, ""),
                                    ("combine", a.combine, "concat"), ("start", a.start, 0.0),
                                    ("end", a.end, 1.0), ("curve", a.curve, "constant"), ("blocks", a.blocks, "")):
            if value != neutral:
                items.append((key, _number(value) if isinstance(value, float) else value))
        for key, names in a.option_images.items():
            items += [(key.replace("_", " ").removesuffix("s"), name) for name in names]
        items += list(a.options.items())  # ComfyUI names as they are: weight_type, boost ...
        lines.append(_pairs(items))
    for c in p.controlnets:
        lines.append(_pairs([("ControlNet", c.controlnet), ("control image", c.image),
                             ("control scale", _number(c.scale))]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ reading
def _split(line: str, where: str) -> list[tuple[str, str]]:
    """``key: value, key: value`` -> [(key, value)], values as written (JSON strings decoded)."""
    pairs, i, n = [], 0, len(line)
    decoder = json.JSONDecoder()
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            raise IPAdapterError(f"{where}: expected 'key: value' in {line[i:][:60]!r}")
        key = line[i:colon].strip()
        i = colon + 1
        while i < n and line[i] == " ":
            i += 1
        if i < n and line[i] == '"':
            try:
                value, i = decoder.raw_decode(line, i)
            except ValueError:
                raise IPAdapterError(f"{where}: a quoted value of {key!r} is not closed") from None
            comma = line.find(",", i)
            i = n if comma < 0 else comma + 1
        else:
            comma = line.find(",", i)
            end = n if comma < 0 else comma
            value, i = line[i:end].strip(), end + 1
        pairs.append((key, str(value)))
    return pairs


def _float(value: str, key: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise IPAdapterError(f"{where}: {key} {value!r} is not a number") from None


def _int(value: str, key: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise IPAdapterError(f"{where}: {key} {value!r} is not a whole number") from None


def parse_parameters(text: str, where: str = "parameters") -> Parameters:
    """:func:`format_parameters`'s text -> :class:`Parameters` (one-line errors naming ``where``)."""
    lines = text.split("\n")
    main_at = next((i for i, line in enumerate(lines) if line.startswith("Steps: ")), None)
    if main_at is None:
        raise IPAdapterError(f"{where}: no 'Steps: ...' line; not generation parameters this tool can read")
    head = lines[:main_at]
    neg_at = next((i for i, line in enumerate(head) if line.startswith("Negative prompt:")), len(head))
    p = Parameters(prompt="\n".join(head[:neg_at]))
    if neg_at < len(head):
        p.negative_prompt = "\n".join([head[neg_at][len("Negative prompt:"):].lstrip(" "), *head[neg_at + 1:]])
    _read_main(p, _split(lines[main_at], where), where)
    for line in lines[main_at + 1:]:
        if not line.strip():
            continue
        pairs = _split(line, where)
        if pairs[0][0] == "IP-Adapter":
            p.adapters.append(_read_adapter(pairs, where))
        elif pairs[0][0] == "ControlNet":
            values = dict(pairs)
            p.controlnets.append(ControlNetParameters(values["ControlNet"], values.get("control image", ""),
                                                      _float(values.get("control scale", "1"), "control scale",
                                                             where)))
        # other tools' lines are left alone
    return p


def _read_main(p: Parameters, pairs: list[tuple[str, str]], where: str) -> None:
    for key, value in pairs:
        if key == "Steps":
            p.steps = _int(value, key, where)
        elif key == "Sampler":
            p.sampler = value
        elif key == "CFG scale":
            p.guidance = _float(value, key, where)
        elif key == "True CFG scale":
            p.true_cfg = _float(value, key, where)
        elif key == "Seed":
            p.seed = _int(value, key, where)
        elif key == "Size":
            w, sep, h = value.partition("x")
            if not sep:
                raise IPAdapterError(f"{where}: Size {value!r} is not WIDTHxHEIGHT")
            p.width, p.height = _int(w, key, where), _int(h, key, where)
        elif key == "Model":
            p.model = value
        elif key == "Denoising strength":
            p.strength = _float(value, key, where)
        elif key == "Init image":
            p.init_image = value
        elif key == "Inpaint mask":
            p.inpaint_mask = value


def _read_adapter(pairs: list[tuple[str, str]], where: str) -> AdapterParameters:
    a = AdapterParameters(adapter=pairs[0][1])
    lists = {"image": a.images, "image weight": a.weights, "image mask": a.masks, "negative image": a.negative_images}
    for key, value in pairs[1:]:
        if key in lists:
            lists[key].append(_float(value, key, where) if key == "image weight" else value)
        elif key in ("scale", "start", "end"):
            setattr(a, key, _float(value, key, where))
        elif key in ("embeds", "combine", "curve", "blocks"):
            setattr(a, key, value)
        elif key == "face embeds":
            a.face_embeds = value
        elif key in ("composition image", "face image"):
            a.option_images.setdefault(key.replace(" ", "_") + "s", []).append(value)
        else:
            a.options[key.replace(" ", "_")] = value
    return a


# ------------------------------------------------------------------------------------------------ files
def image_format(path: str | os.PathLike) -> str:
    """The PIL format an output name asks for; one-line error for another suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise IPAdapterError(f"{path}: unknown image suffix {suffix!r}; give a name ending in "
                             f"{', '.join(FORMATS)}, or a folder name without suffix")
    return FORMATS[suffix]


def save_image(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write ``image`` in the format its suffix names, with ``parameters`` inside, atomically (temporary name,
    then rename): PNG as a ``parameters`` text chunk, JPEG/WebP (quality 95) in the EXIF UserComment."""
    from PIL import PngImagePlugin

    path = Path(path)
    fmt = image_format(path)
    options: dict = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        options["pnginfo"] = info
    else:
        exif = Image.Exif()
        exif.endian = ">"  # big-endian, as A1111's piexif writes: UTF-16-BE text in a big-endian file
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + parameters.encode("utf-16-be")
        options.update(exif=exif, quality=95)
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options))


def read_parameters(path: str | os.PathLike) -> str:
    """The parameters text inside an image file written by :func:`save_image` (or by A1111)."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            text = img.info.get("parameters")
            if text is None:
                comment = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
                text = _decode_comment(comment) if comment else None
    except (OSError, ValueError, SyntaxError) as e:
        raise IPAdapterError(f"{path}: not a readable image ({' '.join(str(e).split())[:100]})") from None
    if not text:
        raise IPAdapterError(f"{path}: holds no generation parameters (no PNG 'parameters' text, no EXIF "
                             "UserComment)")
    return str(text)


def _decode_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE:
        return body.decode("utf-16-be", errors="replace")
    return body.decode("utf-8", errors="replace") if prefix.startswith(b"ASCII") else raw.decode("utf-8", "replace")
