"""Checkpoint formats as pure functions: file -> (config, tensors) and back.

The canonical in-memory form is the official flat layout: ``{"image_proj.<name>": t, "ip_adapter.<i>.<name>": t}``
where ``i`` counts over all attention processors of the UNet in diffusers' order (so image K/V sit on odd ``i``).
Every readable layout is normalised to it: official ``.bin`` ({"image_proj": sd, "ip_adapter": sd}), flat
``.safetensors``, training-run layouts ("image_proj_model." / "adapter_modules.", possibly beside a whole UNet),
and diffusers' converted layout ("encoder_hid_proj.image_projection_layers.0." + named processors).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import flux_checkpoint
from .attention import ip_layers
from .config import AdapterConfig, guess_base_family
from .errors import IPAdapterError
from .files import atomic_write
from .projection import build_projection

Tensors = dict[str, torch.Tensor]

FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------- raw reading
def load_tensors(path: str | os.PathLike) -> Tensors:
    """Read a ``.bin``/``.pt``/``.safetensors`` file into a flat name -> tensor dict; clear errors otherwise."""
    path = resolve_file(path)
    if path.stat().st_size == 0:
        raise IPAdapterError(f"{path}: empty file, not a checkpoint")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise IPAdapterError(
                f"{path}: not a readable .safetensors file (truncated or corrupt: {_short(e)})"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's own refusal, and garbage it can tell from a pickle
        # weights_only refuses pickled classes by name ("Unsupported global: GLOBAL argparse.Namespace"); any
        # other unpickling failure (bad opcode, garbage bytes) means the file itself is damaged.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise IPAdapterError(_not_a_checkpoint(path, "not a torch file")) from None
        raise IPAdapterError(
            f"{path}: holds non-tensor Python objects ({found.group(1)}), refused for safety (weights_only load); "
            "convert it where you trust it, or use a .safetensors file"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise IPAdapterError(f"{path}: not a readable checkpoint (truncated or corrupt: {_short(e)})") from None
    except (IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        # a text or other non-pickle file read by the weights-only unpickler: "pop from empty list" (IndexError)
        # for most text, KeyError for a few bytes whose first one reads as an opcode
        raise IPAdapterError(_not_a_checkpoint(path, f"{type(e).__name__}: {_short(e)}")) from None
    return _flatten(obj, path)


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _not_a_checkpoint(path: Path, reason: str) -> str:
    what = "corrupt" if path.suffix.lower() in CHECKPOINT_SUFFIXES else f"a {path.suffix or 'suffix-less'} file"
    return (f"{path}: not a checkpoint ({what}: {reason}); an adapter is a .safetensors file, or a torch "
            ".bin/.pt/.ckpt file of tensors (e.g. ip-adapter_sd15.safetensors)")


def resolve_file(path: str | os.PathLike) -> Path:
    """The checkpoint file itself: ``path``, or the one adapter file inside a folder."""
    path = Path(path)
    if not path.exists():
        raise IPAdapterError(f"{path}: no such checkpoint file")
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(candidates) != 1:
            raise IPAdapterError(f"{path}: is a folder; give the adapter file inside it (.safetensors or .bin)")
        path = candidates[0]
    return path


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:160] + ("..." if len(text) > 160 else "")


def _flatten(obj: object, path: Path, prefix: str = "") -> Tensors:
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    if not isinstance(obj, Mapping):
        raise IPAdapterError(f"{path}: expected a dict of tensors, found {type(obj).__name__} at '{prefix or '/'}'")
    out: Tensors = {}
    for key, value in obj.items():
        if isinstance(value, (int, float, str)) or value is None:
            continue  # e.g. "step" or "epoch" entries of training checkpoints
        out.update(_flatten(value, path, f"{prefix}{key}."))
    return out


# ---------------------------------------------------------------------------------------- layout normalising
_PREFIXES = (("image_proj.", "ip_adapter."), ("image_proj_model.", "adapter_modules."))


def to_official(tensors: Tensors, source: str = "checkpoint") -> Tensors:
    """Normalise any supported layout to the official flat one ("image_proj." + "ip_adapter.")."""
    if flux_checkpoint.is_xlabs(tensors):
        return flux_checkpoint.xlabs_to_official(tensors, source)
    if flux_checkpoint.is_diffusers_flux(tensors):
        return flux_checkpoint.diffusers_flux_to_official(tensors, source)
    for proj_prefix, attn_prefix in _PREFIXES:
        for wrap in ("", "module.", "model."):
            pp, ap = wrap + proj_prefix, wrap + attn_prefix
            if any(k.startswith(pp) for k in tensors) and any(k.startswith(ap) for k in tensors):
                out = {"image_proj." + k[len(pp):]: v for k, v in tensors.items() if k.startswith(pp)}
                out.update({"ip_adapter." + k[len(ap):]: v for k, v in tensors.items() if k.startswith(ap)})
                return out
    if any(k.startswith("encoder_hid_proj.image_projection_layers.") for k in tensors) or any(
        ".processor.to_k_ip." in k for k in tensors
    ):
        return _from_diffusers(tensors, source)
    if any(k.startswith("image_proj.") for k in tensors):  # projection only: the "simple adapter" ablation
        return {k: v for k, v in tensors.items() if k.startswith("image_proj.")}
    if any(k.startswith("ip_adapter.") for k in tensors):  # K/V alone: infer_config names what is missing
        return {k: v for k, v in tensors.items() if k.startswith("ip_adapter.")}
    raise IPAdapterError(
        f"{source}: no IP-Adapter weights found (expected keys starting with 'image_proj.' and 'ip_adapter.', "
        "'image_proj_model.' and 'adapter_modules.', or diffusers' 'encoder_hid_proj.' layout)"
    )


_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def _processor_sort_key(name: str) -> tuple:
    parts = name.split(".")
    return (_BLOCK_ORDER.get(parts[0], 3), *[int(p) if p.isdigit() else p for p in parts[1:]])


def _from_diffusers(tensors: Tensors, source: str) -> Tensors:
    """diffusers' converted layout (a UNet saved after ``load_ip_adapter``) -> official layout (adapter 0)."""
    out: Tensors = {}
    proj_prefix = "encoder_hid_proj.image_projection_layers.0."
    proj = {k[len(proj_prefix):]: v for k, v in tensors.items() if k.startswith(proj_prefix)}
    if proj:  # without it infer_config says the projection is missing
        out.update({"image_proj." + k: v for k, v in _diffusers_proj_to_official(proj, source).items()})
    pattern = re.compile(r"^(.*)\.processor\.(to_[kv]_ip)\.0\.weight$")
    layers = sorted({m.group(1) for k in tensors if (m := pattern.match(k))}, key=_processor_sort_key)
    for position, name in enumerate(layers):
        # diffusers' transformer blocks hold attn1 (self) then attn2 (cross): cross layers sit on odd indices
        index = 2 * position + 1
        for which in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{index}.{which}.weight"] = tensors[f"{name}.processor.{which}.0.weight"]
    return out


def _diffusers_proj_to_official(proj: Tensors, source: str) -> Tensors:
    if "image_embeds.weight" in proj:  # global
        return {k.replace("image_embeds.", "proj."): v for k, v in proj.items()}
    if "ff.net.0.proj.weight" in proj and "norm.weight" in proj and "proj_in.weight" not in proj:
        if proj["norm.weight"].shape[0] == proj["ff.net.2.weight"].shape[0]:  # full: per-token MLP
            names = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2.", "norm.": "proj.3."}
        else:  # faceid
            names = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2.", "norm.": "norm."}
        return {_swap_prefix(k, names): v for k, v in proj.items()}
    if "latents" in proj:  # plus
        out: Tensors = {}
        for k, v in proj.items():
            m = re.match(r"^layers\.(\d+)\.(.*)$", k)
            if not m:
                out[k] = v
                continue
            layer, rest = m.groups()
            base = f"layers.{layer}."
            if rest.startswith("ln0."):
                out[base + "0.norm1." + rest[4:]] = v
            elif rest.startswith("ln1."):
                out[base + "0.norm2." + rest[4:]] = v
            elif rest == "attn.to_q.weight":
                out[base + "0.to_q.weight"] = v
            elif rest == "attn.to_k.weight":
                out[base + "0.to_kv.weight"] = torch.cat([v, proj[f"layers.{layer}.attn.to_v.weight"]], 0)
            elif rest == "attn.to_v.weight":
                continue
            elif rest == "attn.to_out.0.weight":
                out[base + "0.to_out.weight"] = v
            else:
                sub = {"ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
                out[base + _swap_prefix(rest, sub)] = v
        return out
    raise IPAdapterError(f"{source}: diffusers-layout image projection of an unsupported kind")


def _swap_prefix(key: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def split(official: Tensors) -> tuple[Tensors, Tensors]:
    """Official flat layout -> (image_proj state dict, ip_adapter state dict)."""
    proj = {k[len("image_proj."):]: v for k, v in official.items() if k.startswith("image_proj.")}
    attn = {k[len("ip_adapter."):]: v for k, v in official.items() if k.startswith("ip_adapter.")}
    return proj, attn


# ------------------------------------------------------------------------------------------ kind inference
def infer_config(
    official: Tensors, metadata: Mapping[str, str] | None = None, source: str = "checkpoint"
) -> AdapterConfig:
    """Recognise the kind and its hyperparameters from tensor names and shapes (and the image encoder family our
    own metadata records)."""
    config = _infer_config(official, metadata, source)
    encoder = _saved_config(metadata).get("encoder")
    return dataclasses.replace(config, encoder=encoder) if encoder in ("clip", "siglip") else config


def _infer_config(official: Tensors, metadata: Mapping[str, str] | None, source: str) -> AdapterConfig:
    proj, attn = split(official)
    if not proj:
        raise IPAdapterError(f"{source}: has IP-Adapter attention weights but no image projection ('image_proj.*')")
    saved = _saved_config(metadata)
    if "time_embedding.linear_1.weight" in proj:
        return _infer_time_plus(proj, attn, saved, source)
    if saved.get("attention") == "concat" and not attn:
        return AdapterConfig.from_dict(saved)  # "simple adapter": nothing to infer K/V widths from
    flux = flux_checkpoint.infer_flux_config(proj, attn, saved, source)
    if flux is not None:
        return flux

    layer_widths: dict[int, int] = {}
    lora_layers: dict[int, int] = {}
    cross_dims = set()
    for key, t in attn.items():
        m = re.match(r"^(\d+)\.(to_[kv]_ip|to_q_lora|to_k_lora|to_v_lora|to_out_lora)(?:\.(down|up))?\.weight$", key)
        if not m:
            raise IPAdapterError(f"{source}: unexpected attention key 'ip_adapter.{key}'")
        index, name = int(m.group(1)), m.group(2)
        if name in ("to_k_ip", "to_v_ip"):
            if t.ndim != 2:
                raise IPAdapterError(f"{source}: 'ip_adapter.{key}' should be 2-D, has shape {list(t.shape)}")
            layer_widths[index] = int(t.shape[0])
            cross_dims.add(int(t.shape[1]))
        elif m.group(3) == "down":
            lora_layers[index] = int(t.shape[0])
    if not layer_widths:
        raise IPAdapterError(f"{source}: no image key/value weights ('ip_adapter.<i>.to_k_ip.weight') found")
    if len(cross_dims) != 1:
        raise IPAdapterError(f"{source}: image key/value weights disagree on the token width ({sorted(cross_dims)})")
    for index in lora_layers:  # self-attention LoRA takes its width from the block's cross-attention beside it
        if index not in layer_widths and index + 1 not in layer_widths and index - 1 not in layer_widths:
            raise IPAdapterError(f"{source}: LoRA on attention layer {index}, next to no layer with image weights")
    for index in layer_widths:
        for which in ("to_k_ip", "to_v_ip"):
            if f"{index}.{which}.weight" not in attn:
                raise IPAdapterError(f"{source}: layer {index} has no '{which}' weight (file incomplete?)")
    width = cross_dims.pop()

    common = dict(layer_widths=layer_widths, lora_layers=lora_layers, cross_attention_dim=width)
    if "proj.weight" in proj and "norm.weight" in proj:
        rows, embed = proj["proj.weight"].shape
        if rows % width:
            raise IPAdapterError(f"{source}: projection rows {rows} are not a multiple of the token width {width}")
        cfg = AdapterConfig(kind="global", num_tokens=rows // width, embed_dim=int(embed), **common)
    elif "proj.3.weight" in proj:
        cfg = AdapterConfig(kind="full", num_tokens=int(saved.get("num_tokens", 257)),
                            embed_dim=int(proj["proj.0.weight"].shape[1]), **common)
    elif "latents" in proj:
        depth, heads, dim_head = _resampler_shape(proj, "", saved)
        q = proj["latents"]
        cfg = AdapterConfig(kind="plus", num_tokens=int(q.shape[1]), embed_dim=int(proj["proj_in.weight"].shape[1]),
                            resampler_dim=int(q.shape[2]), resampler_depth=depth, resampler_heads=heads,
                            resampler_dim_head=dim_head, resampler_ff_mult=_ff_mult(proj, ""), **common)
    elif "proj.0.weight" in proj and "proj.2.weight" in proj and "norm.weight" in proj:
        hidden, id_dim = proj["proj.0.weight"].shape
        tokens = int(proj["proj.2.weight"].shape[0]) // width
        face = dict(id_embed_dim=int(id_dim), id_hidden_dim=int(hidden), num_tokens=tokens)
        if "perceiver_resampler.proj_in.weight" in proj:
            depth, heads, dim_head = _resampler_shape(proj, "perceiver_resampler.", saved)
            cfg = AdapterConfig(kind="faceid-plus", embed_dim=int(proj["perceiver_resampler.proj_in.weight"].shape[1]),
                                resampler_dim=width, resampler_depth=depth, resampler_heads=heads,
                                resampler_dim_head=dim_head, resampler_ff_mult=_ff_mult(proj, "perceiver_resampler."),
                                **face, **common)
        else:
            kind = "faceid" if lora_layers or tokens == 4 else "faceid-portrait"
            cfg = AdapterConfig(kind=kind, embed_dim=int(id_dim), **face, **common)
    else:
        names = ", ".join(sorted(proj)[:6])
        raise IPAdapterError(f"{source}: image projection of an unknown kind (keys: {names}...)")
    cfg.base_family = saved.get("base_family") or guess_base_family(width, len(layer_widths))
    if cfg.kind == "faceid-plus":  # PlusV2 differs from Plus only by these, which no tensor shows
        cfg.shortcut, cfg.s_scale = bool(saved.get("shortcut", False)), float(saved.get("s_scale", 1.0))
    return cfg


_JOINT_KEY = re.compile(r"^(\d+)\.(norm_ip\.linear\.weight|norm_ip\.linear\.bias|to_k_ip\.weight|to_v_ip\.weight|"
                        r"norm_q\.weight|norm_k\.weight|norm_ip_k\.weight)$")


def _infer_time_plus(proj: Tensors, attn: Tensors, saved: Mapping, source: str) -> AdapterConfig:
    """InstantX SD3.5: the time-conditioned resampler and, per joint block, AdaLN + image K/V + QK RMSNorms."""
    indices = set()
    for key in attn:
        m = _JOINT_KEY.match(key)
        if not m:
            raise IPAdapterError(f"{source}: unexpected attention key 'ip_adapter.{key}' for an SD3.5 (time-plus) "
                                 "adapter")
        indices.add(int(m.group(1)))
    if not indices:
        raise IPAdapterError(f"{source}: has an SD3.5 image projection but no per-block weights ('ip_adapter.<i>.*')")
    for index in sorted(indices):
        for name in ("to_k_ip.weight", "norm_q.weight", "norm_ip.linear.weight"):
            if f"{index}.{name}" not in attn:
                raise IPAdapterError(f"{source}: joint block {index} has no '{name}' weight (file incomplete?)")
    first = min(indices)
    token_dims = {int(attn[f"{i}.to_k_ip.weight"].shape[1]) for i in indices}
    width = int(proj["proj_out.weight"].shape[0]) if "proj_out.weight" in proj else 0
    if token_dims != {width}:
        raise IPAdapterError(f"{source}: image projection makes tokens of width {width}, the blocks' image K/V read "
                             f"{sorted(token_dims)} (damaged or mixed file)")
    for name in ("latents", "proj_in.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"):
        if name not in proj:
            raise IPAdapterError(f"{source}: SD3.5 image projection has no '{name}' (file incomplete?)")
    depth, heads, dim_head = _resampler_shape(proj, "", saved)
    q = proj["latents"]
    return AdapterConfig(
        kind="time-plus", num_tokens=int(q.shape[1]), cross_attention_dim=width,
        embed_dim=int(proj["proj_in.weight"].shape[1]),
        layer_widths={i: int(attn[f"{i}.to_k_ip.weight"].shape[0]) for i in indices},
        resampler_dim=int(q.shape[2]), resampler_depth=depth, resampler_heads=heads, resampler_dim_head=dim_head,
        resampler_ff_mult=_ff_mult(proj, ""), time_embed_dim=int(proj["time_embedding.linear_1.weight"].shape[1]),
        head_dim=int(attn[f"{first}.norm_q.weight"].shape[0]), base_family="sd3",
    )


def _saved_config(metadata: Mapping[str, str] | None) -> dict:
    """Our own metadata (written by :func:`write_checkpoint`); other tools' or damaged metadata is ignored."""
    try:
        saved = json.loads((metadata or {}).get("ipadapter_config") or "{}")
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) else {}


def _resampler_shape(proj: Tensors, prefix: str, saved: Mapping) -> tuple[int, int, int]:
    layers = {int(m.group(1)) for k in proj if (m := re.match(rf"^{re.escape(prefix)}layers\.(\d+)\.", k))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise IPAdapterError(f"resampler layers are missing or not numbered 0..n-1 (found {sorted(layers)})")
    inner = int(proj[f"{prefix}layers.0.0.to_q.weight"].shape[0])
    dim_head = int(saved.get("resampler_dim_head", 64))
    if inner % dim_head:
        dim_head = inner  # one head when the inner width is no multiple of 64 (only tiny test models)
    return len(layers), inner // dim_head, dim_head


def _ff_mult(proj: Tensors, prefix: str) -> int:
    up = proj[f"{prefix}layers.0.1.1.weight"]
    return int(up.shape[0]) // int(up.shape[1])


# ------------------------------------------------------------------------------------------------- public
def read_checkpoint(path: str | os.PathLike) -> tuple[AdapterConfig, Tensors]:
    """Any readable layout -> (config, official flat tensors)."""
    tensors = load_tensors(path)
    official = to_official(tensors, source=str(path))
    metadata = read_metadata(resolve_file(path))
    cfg = infer_config(official, metadata, source=str(path))
    check_tensors(cfg, official, source=str(path))
    return cfg, official


def check_tensors(cfg: AdapterConfig, official: Tensors, source: str = "checkpoint") -> None:
    """Every tensor the config implies is there with its shape, and nothing else (a damaged or mixed file)."""
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        parts = (("image_proj.", build_projection(cfg)), ("ip_adapter.", nn.ModuleDict(ip_layers(cfg))))
        expected = {prefix + k: tuple(v.shape) for prefix, module in parts for k, v in module.state_dict().items()}
    proj, attn = split(official)
    for prefix, part in (("image_proj.", proj), ("ip_adapter.", attn)):
        want = {k[len(prefix):] for k in expected if k.startswith(prefix)}
        if set(part) != want:
            missing, extra = sorted(want - set(part)), sorted(set(part) - want)
            what = f"{cfg.kind} image projection" if prefix == "image_proj." else "attention weights"
            raise IPAdapterError(
                f"{source}: {what} incomplete or mixed (missing: {missing[:4]}, unexpected: {extra[:4]})"
            )
    for key, shape in expected.items():
        if tuple(official[key].shape) != shape:
            raise IPAdapterError(
                f"{source}: '{key}' has shape {list(official[key].shape)}, a {cfg.kind} adapter with these widths "
                f"needs {list(shape)} (damaged or mixed file)"
            )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_checkpoint(path: str | os.PathLike, config: AdapterConfig, official: Tensors,
                     layout: str | None = None) -> Path:
    """Write ``.safetensors`` with metadata, atomically (temporary name, then rename).

    ``layout``: "official" (flat "image_proj." / "ip_adapter."), or "xlabs" (XLabs' own names, what x-flux,
    ComfyUI and diffusers' ``FluxPipeline.load_ip_adapter`` read); default: XLabs' for XLabs adapters, else official.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise IPAdapterError(f"{path}: adapters are written as .safetensors; give a name ending in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "ipadapter_format": FORMAT_VERSION,
        "kind": config.kind,
        "num_tokens": str(config.num_tokens),
        "base_family": config.base_family or guess_base_family(config.cross_attention_dim, config.num_layers),
        "ipadapter_config": config.to_json(),
    }
    layout = layout or ("xlabs" if config.flavour == "xlabs" else "official")
    if layout not in ("official", "xlabs"):
        raise IPAdapterError(f"layout {layout!r}: use 'official' or 'xlabs'")
    if layout == "xlabs":
        if config.flavour != "xlabs":
            raise IPAdapterError(f"{path}: the XLabs layout holds XLabs Flux adapters only, not {config.describe()}")
        official = flux_checkpoint.official_to_xlabs(official)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in official.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def parameter_count(official: Tensors) -> int:
    return sum(t.numel() for t in official.values())
