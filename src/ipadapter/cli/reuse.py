"""``generate --reuse-parameters IMAGE``: an image's parameters become the defaults of ``generate``'s flags.

Flags given on the command line win: a plain flag replaces the stored value, a per-adapter (per-ControlNet) flag
replaces that key of the same group (``--scale 0.6`` changes the first adapter's scale; ``--image new.png``
replaces its images, and with them their stored weights and masks). Files named in the parameters are looked
up as written, then beside the image.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import IPAdapterError
from ..generation.parameters import Parameters, parse_parameters, read_parameters

#: generate's plain flags (argparse dest) and their defaults when neither the command line nor an image sets them
# guidance None: the base family's default (7.5 CFG on UNets, 3.5 distilled guidance on Flux)
DEFAULTS = {"prompt": "", "negative_prompt": None, "steps": 30, "guidance": None, "seed": [0], "width": None,
            "height": None, "num_images": 1, "model": None, "init_image": None, "strength": None,
            "inpaint_mask": None}


def apply(args) -> None:
    """Fill ``args``' unset flags from ``--reuse-parameters`` (if given), then from :data:`DEFAULTS`."""
    source = getattr(args, "reuse_parameters", None)
    if source:
        stored = parse_parameters(read_parameters(source), where=f"--reuse-parameters {source}")
        _merge(args, stored, Path(source).parent)
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _merge(args, p: Parameters, folder: Path) -> None:
    def find(name: str) -> str:
        if not name or Path(name).exists():
            return name
        beside = folder / Path(name).name
        return str(beside) if beside.exists() else name

    plain = {"prompt": p.prompt, "negative_prompt": p.negative_prompt or None, "steps": p.steps,
             "guidance": p.guidance, "seed": [p.seed], "width": p.width or None, "height": p.height or None,
             "model": p.model or None, "init_image": find(p.init_image) or None, "strength": p.strength,
             "inpaint_mask": find(p.inpaint_mask) or None, "true_cfg": p.true_cfg}
    for key, value in plain.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    stored = []
    for k, a in enumerate(p.adapters, 1):
        if any(not m for m in a.masks):
            raise IPAdapterError(f"--reuse-parameters: adapter {k} has an image without its region mask (made on "
                                 "the page); give --image-mask for every --image")
        group = {"adapter": find(a.adapter), "scale": a.scale, "images": [find(i) for i in a.images],
                 "weights": list(a.weights), "masks": [find(m) for m in a.masks],
                 "negative_images": [find(n) for n in a.negative_images], "combine": a.combine, "start": a.start,
                 "end": a.end, "curve": a.curve}
        group.update({key: find(value) for key, value in (("embeds", a.embeds), ("face_embeds", a.face_embeds))
                      if value})
        if a.blocks:
            group["blocks"] = a.blocks
        group.update({key: [find(n) for n in names] for key, names in a.option_images.items()})
        group.update({key: _typed(value) for key, value in a.options.items()})
        stored.append({k: v for k, v in group.items() if v != []})
    args.adapter_groups = _merge_groups(stored, getattr(args, "adapter_groups", None) or [], replaces={
        "images": ("weights", "masks", "negative_images")})
    controls = [{"dir": c.controlnet, "image": find(c.image), "scale": c.scale} for c in p.controlnets]
    args.controlnet_groups = _merge_groups(controls, getattr(args, "controlnet_groups", None) or [], replaces={})


def _merge_groups(stored: list[dict], given: list[dict], replaces: dict[str, tuple[str, ...]]) -> list[dict]:
    """Group k of the command line overrides group k of the image key by key; extra groups are appended."""
    merged = []
    for k in range(max(len(stored), len(given))):
        base = dict(stored[k]) if k < len(stored) else {}
        over = given[k] if k < len(given) else {}
        for key, dependants in replaces.items():
            if key in over:
                for d in dependants:
                    if d not in over:
                        base.pop(d, None)
        merged.append({**base, **over})
    return merged


def _typed(text: str):
    """A stored control's value as the flag parser gave it: a bool, a whole number, a number, else the text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
