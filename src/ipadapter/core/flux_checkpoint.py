"""Flux adapter files as pure functions: XLabs v1/v2 and InstantX FLUX.1-dev layouts <-> the official flat one.

In memory every Flux adapter is in the official flat layout too: ``image_proj.<name>`` and ``ip_adapter.<i>.<name>``,
``i`` counting the blocks that carry image K/V (XLabs: double block ``i``; InstantX: the 19 double blocks, then
the 38 single blocks, as its reference node lists them).

- XLabs (``ip_adapter.safetensors`` of XLabs-AI/flux-ip-adapter and -v2): ``ip_adapter_proj_model.proj`` (CLIP
  ViT-L/14 projected embedding 768 -> N x 4096; N = 4, or 16 in v2), ``ip_adapter_proj_model.norm`` [4096], and per
  double block ``double_blocks.<i>.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`` [3072, 4096].
- diffusers after ``FluxPipeline.load_ip_adapter``: ``encoder_hid_proj.image_projection_layers.0.{image_embeds,
  norm}.*`` and ``transformer_blocks.<i>.attn.processor.to_{k,v}_ip.0.{weight,bias}`` (a saved transformer).
- InstantX (``ip-adapter.bin``): ``{"image_proj": {proj.0, proj.2, norm}, "ip_adapter": {"<i>.to_k_ip.weight",
  "<i>.to_v_ip.weight"}}``: pooled SigLIP 1152 -> 2304 -> GELU -> 128 x 4096 -> LayerNorm; K/V without bias (their
  RMSNorms have no weights). Its flattened form is the official flat layout already.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .config import AdapterConfig
from .errors import IPAdapterError

Tensors = dict[str, torch.Tensor]

XLABS_PROJ = "ip_adapter_proj_model."
_XLABS_KV = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
_DIFFUSERS_KV = re.compile(r"^(?:transformer\.)?transformer_blocks\.(\d+)\.attn\.processor\.to_([kv])_ip\.0\."
                           r"(weight|bias)$")
_DIFFUSERS_PROJ = "encoder_hid_proj.image_projection_layers.0."


def is_xlabs(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(XLABS_PROJ) or _XLABS_KV.match(k) for k in tensors)


def is_diffusers_flux(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(_DIFFUSERS_KV.match(k) for k in tensors)


def xlabs_to_official(tensors: Tensors, source: str = "checkpoint") -> Tensors:
    """XLabs' own key names -> the official flat layout (the keys of nothing else are kept)."""
    out: Tensors = {}
    for key, value in tensors.items():
        if key.startswith(XLABS_PROJ):
            out["image_proj." + key[len(XLABS_PROJ):]] = value
        elif m := _XLABS_KV.match(key):
            index, which, name = m.groups()
            out[f"ip_adapter.{int(index)}.to_{which}_ip.{name}"] = value
    if not any(k.startswith("ip_adapter.") for k in out):
        raise IPAdapterError(f"{source}: XLabs Flux adapter without its double-block image K/V "
                             "('double_blocks.<i>.processor.ip_adapter_double_stream_k_proj.weight')")
    return out


def diffusers_flux_to_official(tensors: Tensors, source: str = "checkpoint") -> Tensors:
    """A Flux transformer saved after diffusers' ``load_ip_adapter`` -> official flat layout (its first adapter)."""
    out: Tensors = {}
    for key, value in tensors.items():
        if m := _DIFFUSERS_KV.match(key):
            index, which, name = m.groups()
            out[f"ip_adapter.{int(index)}.to_{which}_ip.{name}"] = value
        elif key.startswith(_DIFFUSERS_PROJ):
            name = key[len(_DIFFUSERS_PROJ):].replace("image_embeds.", "proj.")
            out["image_proj." + name] = value
    return out


def official_to_xlabs(official: Mapping[str, torch.Tensor]) -> Tensors:
    """The official flat layout of an XLabs adapter -> XLabs' key names (what x-flux, ComfyUI and diffusers read)."""
    out: Tensors = {}
    for key, value in official.items():
        if key.startswith("image_proj."):
            out[XLABS_PROJ + key[len("image_proj."):]] = value
            continue
        m = re.match(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.(weight|bias)$", key)
        if m is None:
            raise IPAdapterError(f"'{key}' has no place in the XLabs Flux layout")
        index, which, name = m.groups()
        out[f"double_blocks.{index}.processor.ip_adapter_double_stream_{which}_proj.{name}"] = value
    return out


# ------------------------------------------------------------------------------------------ recognising
def flux_flavour(proj: Mapping[str, torch.Tensor], attn: Mapping[str, torch.Tensor]) -> str:
    """"xlabs", "instantx" or "" (not a Flux adapter), from the official flat layout's names alone.

    XLabs' image K/V have biases (no UNet adapter's do). InstantX's sit on every index from 0 on with an MLP
    projection; a UNet file never has image K/V on index 0 (the first down block's self-attention).
    """
    if any(k.endswith(("to_k_ip.bias", "to_v_ip.bias")) for k in attn):
        return "xlabs"
    lora = any("_lora." in k for k in attn)
    if not lora and "0.to_k_ip.weight" in attn and {"proj.0.weight", "proj.2.weight", "norm.weight"} <= set(proj):
        return "instantx"
    return ""


def infer_flux_config(proj: Mapping[str, torch.Tensor], attn: Mapping[str, torch.Tensor], saved: Mapping,
                      source: str = "checkpoint") -> AdapterConfig | None:
    """The config of a Flux adapter's tensors (hyperparameters from their shapes), or None for other files."""
    flavour = saved.get("flavour") or flux_flavour(proj, attn)
    if flavour not in ("xlabs", "instantx"):
        return None
    label = "XLabs Flux" if flavour == "xlabs" else "InstantX FLUX"
    layer_widths: dict[int, int] = {}
    cross_dims: set[int] = set()
    names = ("weight", "bias") if flavour == "xlabs" else ("weight",)
    pattern = re.compile(rf"^(\d+)\.to_[kv]_ip\.({'|'.join(names)})$")
    for key, t in attn.items():
        m = pattern.match(key)
        if m is None:
            raise IPAdapterError(f"{source}: unexpected key 'ip_adapter.{key}' in a {label} adapter")
        if m.group(2) == "weight":
            if t.ndim != 2:
                raise IPAdapterError(f"{source}: 'ip_adapter.{key}' should be 2-D, has shape {list(t.shape)}")
            layer_widths[int(m.group(1))] = int(t.shape[0])
            cross_dims.add(int(t.shape[1]))
    if not layer_widths:
        raise IPAdapterError(f"{source}: {label} adapter without image K/V weights ('ip_adapter.<i>.to_k_ip.weight')")
    if sorted(layer_widths) != list(range(len(layer_widths))):
        raise IPAdapterError(f"{source}: {label} adapter's blocks are not numbered 0..n-1 "
                             f"(found {sorted(layer_widths)[:6]}...; file incomplete?)")
    if len(cross_dims) != 1:
        raise IPAdapterError(f"{source}: image K/V weights disagree on the token width ({sorted(cross_dims)})")
    width = cross_dims.pop()
    if flavour == "xlabs":
        if "proj.weight" not in proj:
            raise IPAdapterError(f"{source}: XLabs Flux adapter without its projection ('ip_adapter_proj_model.proj')")
        rows, embed = proj["proj.weight"].shape
        kind, extra = "global", {}
    else:
        if "proj.2.weight" not in proj or "proj.0.weight" not in proj:
            raise IPAdapterError(f"{source}: InstantX FLUX adapter without its MLP projection ('image_proj.proj.0/2')")
        rows = proj["proj.2.weight"].shape[0]
        hidden, embed = proj["proj.0.weight"].shape
        kind, extra = "mlp", {"id_hidden_dim": int(hidden)}
    if rows % width:
        raise IPAdapterError(f"{source}: projection rows {rows} are not a multiple of the token width {width}")
    return AdapterConfig(kind=kind, num_tokens=int(rows) // width, embed_dim=int(embed), cross_attention_dim=width,
                         layer_widths=layer_widths, flavour=flavour, base_family="flux", **extra)
