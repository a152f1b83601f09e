"""ComfyUI_IPAdapter_plus's weight types: a weight per attention block of the denoiser, as data.

ComfyUI counts the denoiser's attention blocks (``transformer_index``: one per diffusers ``attentions.j`` /
spatial transformer, whatever its depth) in the order they run: the down blocks, the middle block, the up
blocks. SD 1.x/2.x have 16 (6 down, 1 middle, 9 up), SDXL 11 (4 down, 1 middle, 6 up). A weight type gives
each block a weight; every layer of a block takes it.

- Ramps (any block list, so also the transformer families later): with t the block's index and L the number of
  blocks, ``ease-in`` 0.05 + 0.95 (1 - t/L), ``ease-out`` 0.05 + 0.95 t/L, ``ease-in-out``
  0.05 + 0.95 (1 - |t - L/2| / (L/2)), ``reverse-in-out`` 0.05 + 0.95 |t - L/2| / (L/2); ``weak-input`` /
  ``weak-middle`` / ``weak-output`` multiply that part by 0.2, ``strong-middle`` multiplies the down and up
  parts by 0.2; ``linear`` is 1 everywhere (ComfyUI's name for "no ramp").
- Tables (:data:`TABLES`, SD 1.x and SDXL, transcribed from ComfyUI's definitions): each block is off
  (``-``) or ``F*source`` with source ``w`` (the weight), ``c`` (the composition weight: ComfyUI's
  weight_composition) or ``b`` (the boost: ComfyUI's style_boost / composition_boost, default the weight); a
  leading ``~`` swaps the branches there (the "precise" types: the unconditional branch gets the image, the
  conditional one zero tokens, so guidance pushes away from what that block would take from the image).
  Blocks sourced from ``c`` take the composition image's tokens when one is given (style and composition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import IPAdapterError

RAMPS: tuple[str, ...] = ("linear", "ease-in", "ease-out", "ease-in-out", "reverse-in-out", "weak-input",
                          "weak-output", "weak-middle", "strong-middle")

_W7 = ("w",) * 7
TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    # SD 1.x order: down_blocks.0-2 (2 each), mid_block, up_blocks.1-3 (3 each)
    "style-transfer": {"sd1": ("w", "w", "w", "w", "-", "-", "-", "-", "-", *_W7),
                       "sdxl": ("-", "-", "-", "-", "-", "-", "w", "-", "-", "-", "-")},
    "composition": {"sd1": ("-", "-", "-", "-", ".25w", "w", "-", "-", "-", *("-",) * 7),
                    "sdxl": ("-", "-", "-", "w", "-", "-", "-", "-", "-", "-", "-")},
    "strong-style-transfer": {"sd1": ("w", "w", "w", "w", "-", "-", "w", "w", "w", *_W7),
                              "sdxl": ("w", "w", "w", "-", "w", "w", "w", "w", "w", "w", "w")},
    "style-and-composition": {"sd1": ("w", "w", "w", "w", ".25c", "c", "-", "-", "-", *_W7),
                              "sdxl": ("-", "-", "-", "c", "-", "-", "w", "-", "-", "-", "-")},
    "strong-style-and-composition": {"sd1": ("w", "w", "w", "w", "c", "c", "w", "w", "w", *_W7),
                                     "sdxl": ("w", "w", "w", "c", "w", "w", "w", "w", "w", "w", "w")},
    "style-transfer-precise": {"sd1": ("w", "w", "w", "w", "~.25b", "~b", "-", "-", "-", *_W7),
                               "sdxl": ("-", "-", "-", "~b", "-", "-", "w", "-", "-", "-", "-")},
    "composition-precise": {"sd1": ("~b", "~b", "~b", "~b", ".25w", "w", "~.1b", "~.1b", "~.1b", *("~b",) * 7),
                            "sdxl": ("~.1b", "~.1b", "~.1b", "w", "~.1b", "~.1b", "~b", "~.1b", "~.1b", "~.1b",
                                     "~.1b")},
}
WEIGHT_TYPES: tuple[str, ...] = RAMPS + tuple(TABLES)
# the block layouts the tables are written for, in ComfyUI's order (diffusers names)
LAYOUTS: dict[str, tuple[str, ...]] = {
    "sd1": tuple(f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)) + ("mid_block.attentions.0",)
    + tuple(f"up_blocks.{i}.attentions.{j}" for i in range(1, 4) for j in range(3)),
    "sdxl": tuple(f"down_blocks.{i}.attentions.{j}" for i in (1, 2) for j in range(2)) + ("mid_block.attentions.0",)
    + tuple(f"up_blocks.{i}.attentions.{j}" for i in range(2) for j in range(3)),
}


def canonical(name: str, source: str = "--weight-type") -> str:
    """Our hyphenated name for ours or ComfyUI's ("ease in-out" -> "ease-in-out")."""
    key = "-".join(str(name).strip().lower().split())
    if key not in WEIGHT_TYPES:
        raise IPAdapterError(f"{source} {name!r}: unknown weight type; use one of {', '.join(WEIGHT_TYPES)}")
    return key


@dataclass(frozen=True)
class Block:
    """One attention block: its name, its part of the denoiser (input/middle/output) and its layers' indices."""

    name: str
    part: str
    layers: tuple[int, ...]


def attention_blocks(layers: Sequence) -> list[Block]:
    """The cross-attention layers grouped into attention blocks, in the order they run.

    UNet layers (``down_blocks`` / ``mid_block`` / ``up_blocks``) group by their ``attentions.j`` entry, down,
    middle, up. Layers of other denoisers (the transformer families) are one block each, in the order given, with
    no part (the ramps apply to them; weak/strong input/middle/output and the tables do not).
    """
    groups: dict[str, list[int]] = {}
    others: list[Block] = []
    for layer in layers:
        if getattr(layer, "cross_dim", None) is None:
            continue
        parts = layer.name.split(".")
        if parts[0] not in ("down_blocks", "mid_block", "up_blocks"):
            others.append(Block(layer.name, "", (layer.index,)))
            continue
        name = ".".join(parts[:3] if parts[0] == "mid_block" else parts[:4])
        groups.setdefault(name, []).append(layer.index)

    def order(name: str) -> tuple:
        parts = name.split(".")
        side = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
        return (side, *(int(p) for p in parts[1:] if p.isdigit()))

    part = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}
    return [Block(n, part[n.split(".")[0]], tuple(groups[n])) for n in sorted(groups, key=order)] + others


def ramp(blocks: Sequence[Block], weight_type: str) -> list[float]:
    """Per-block multipliers of a ramp (:data:`RAMPS`), ComfyUI's formulas with L = the number of blocks."""
    count, half = len(blocks), len(blocks) / 2
    weak = {"weak-input": ("input",), "weak-output": ("output",), "weak-middle": ("middle",),
            "strong-middle": ("input", "output")}.get(weight_type, ())
    out = []
    for t, block in enumerate(blocks):
        if weight_type == "ease-in":
            value = 0.05 + 0.95 * (1 - t / count)
        elif weight_type == "ease-out":
            value = 0.05 + 0.95 * (t / count)
        elif weight_type == "ease-in-out":
            value = 0.05 + 0.95 * (1 - abs(t - half) / half)
        elif weight_type == "reverse-in-out":
            value = 0.05 + 0.95 * (abs(t - half) / half)
        else:
            value = 1.0
        out.append(value * 0.2 if block.part in weak else value)
    return out


@dataclass(frozen=True)
class Entry:
    factor: float  # 0: the block is off
    source: str  # "w", "c" or "b"
    swap: bool = False


def parse_entry(text: str) -> Entry:
    """``"-"`` -> off; ``"~.25b"`` -> 0.25 x boost with the branches swapped."""
    if text == "-":
        return Entry(0.0, "w")
    swap = text.startswith("~")
    body = text.lstrip("~")
    source, factor = body[-1], body[:-1]
    return Entry(float(factor) if factor else 1.0, source, swap)


def layout_of(blocks: Sequence[Block]) -> str | None:
    names = tuple(b.name for b in blocks)
    return next((key for key, layout in LAYOUTS.items() if layout == names), None)


@dataclass
class Plan:
    """A weight type resolved for one denoiser: absolute per-layer weights, swapped layers, composition layers."""

    weights: dict[int, float]
    swap: frozenset[int]
    composition: frozenset[int]


def resolve(layers: Sequence, weight_type: str, weight: float = 1.0, composition_weight: float | None = None,
            boost: float | None = None) -> Plan:
    """The per-layer weights (weight included) of ``weight_type`` for the layers of a denoiser.

    ``composition_weight`` (default 1, as ComfyUI's node) and ``boost`` (default ``weight``) feed the table
    types' ``c`` and ``b`` entries.
    """
    weight_type = canonical(weight_type)
    blocks = attention_blocks(layers)
    if not blocks:
        raise IPAdapterError("--weight-type: this denoiser has no cross-attention layer")
    if weight_type in RAMPS[5:] and not any(b.part for b in blocks):
        raise IPAdapterError(f"--weight-type {weight_type}: this denoiser's blocks have no input/middle/output parts; "
                             f"use {', '.join(RAMPS[:5])}")
    if weight_type in RAMPS:
        per_block = [(m * weight, False, False) for m in ramp(blocks, weight_type)]
    else:
        layout = layout_of(blocks)
        if layout is None:
            raise IPAdapterError(
                f"--weight-type {weight_type}: ComfyUI defines it for SD 1.x (16 attention blocks) and SDXL (11); "
                f"this UNet has {len(blocks)} ({', '.join(b.name for b in blocks)}); use a ramp "
                f"({', '.join(RAMPS)}) or --blocks"
            )
        sources = {"w": weight, "c": 1.0 if composition_weight is None else composition_weight,
                   "b": weight if boost is None else boost}
        per_block = []
        for text in TABLES[weight_type][layout]:
            e = parse_entry(text)
            per_block.append((e.factor * sources[e.source], e.swap, e.factor != 0 and e.source == "c"))
    weights, swap, comp = {}, set(), set()
    for block, (value, swapped, composition) in zip(blocks, per_block):
        for index in block.layers:
            weights[index] = float(value)
            if swapped and value != 0:
                swap.add(index)
            if composition:
                comp.add(index)
    return Plan(weights, frozenset(swap), frozenset(comp))
