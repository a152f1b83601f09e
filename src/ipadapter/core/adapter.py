"""The adapter as a module (projection + per-layer image K/V), and attach/detach on a diffusers UNet.

Attach and detach are exact inverses: attach swaps in :class:`~ipadapter.attention.IPAttnProcessor` on the
layers the adapter touches and remembers the UNet's own processors; detaching the last adapter puts those very
objects back and removes the hook, so the UNet is the base model again bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .attention import AdapterState, IPAttnProcessor, Runtime, ip_layers
from .checkpoint import read_checkpoint, write_checkpoint
from .config import AdapterConfig
from .errors import IPAdapterError
from .projection import build_projection


@dataclass(frozen=True)
class UNetLayer:
    index: int  # position in unet.attn_processors (the official checkpoints' key index)
    name: str  # processor name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    width: int  # attention inner width (rows of to_k_ip)
    cross_dim: int | None  # width of encoder_hidden_states; None for self-attention

    @property
    def block(self) -> str:
        """The block path used by per-block scales, e.g. "down_blocks.2.attentions.1"."""
        parts = self.name.split(".")
        return ".".join(parts[:3]) if parts[0] != "mid_block" else ".".join(parts[:3])


def unet_layers(unet: nn.Module) -> list[UNetLayer]:
    """Every attention layer of the UNet in diffusers' ``attn_processors`` order."""
    layers = []
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name[: -len(".processor")])
        cross = attn.to_k.in_features if getattr(attn, "is_cross_attention", False) else None
        layers.append(UNetLayer(index, name, attn.to_k.out_features, cross))
    return layers


def describe_unet(unet: nn.Module) -> str:
    cross = [layer for layer in unet_layers(unet) if layer.cross_dim is not None]
    width = cross[0].cross_dim if cross else 0
    family = {(768, 16): "SD 1.5", (1024, 16): "SD 2.x", (2048, 70): "SDXL"}.get((width, len(cross)), "custom UNet")
    return f"{family}, {len(cross)} cross-attention layers, width {width}"


class Adapter(nn.Module):
    """An IP-Adapter: ``image_proj`` (features -> tokens) and ``ip_adapter`` (per-layer image K/V, FaceID LoRA).

    ``state_dict()`` keys are exactly the official flat layout ("image_proj.*", "ip_adapter.<i>.*").
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.image_proj = build_projection(config)
        self.ip_adapter = nn.ModuleDict(ip_layers(config))
        self.state = AdapterState({int(k): v for k, v in self.ip_adapter.items()}, concat=config.attention == "concat")

    # ------------------------------------------------------------------------------------------ creation
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Adapter:
        config, tensors = read_checkpoint(path)
        adapter = cls(config)
        missing, unexpected = adapter.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise IPAdapterError(
                f"{path}: tensors do not match a {config.kind} adapter "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return adapter

    @classmethod
    def for_unet(cls, unet: nn.Module, kind: str, embed_dim: int, num_tokens: int | None = None,
                 **overrides) -> Adapter:
        """A new adapter shaped for ``unet`` (training): image K/V start as copies of the text K/V."""
        cross = [layer for layer in unet_layers(unet) if layer.cross_dim is not None]
        width = cross[0].cross_dim
        defaults = {"global": 4, "plus": 16, "full": 257, "faceid": 4}
        config = AdapterConfig(kind=kind, num_tokens=num_tokens or defaults.get(kind, 4), embed_dim=embed_dim,
                               cross_attention_dim=width, layer_widths={c.index: c.width for c in cross})
        if kind == "plus":
            config.resampler_dim = overrides.pop("resampler_dim", width)
            config.resampler_dim_head = overrides.pop("resampler_dim_head", 64)
            config.resampler_heads = overrides.pop("resampler_heads", max(config.resampler_dim // 64, 1))
            config.resampler_depth = overrides.pop("resampler_depth", 4)
        if kind == "faceid":
            config.id_embed_dim, config.id_hidden_dim = embed_dim, overrides.pop("id_hidden_dim", embed_dim * 2)
        for key, value in overrides.items():
            setattr(config, key, value)
        from .config import guess_base_family

        config.base_family = guess_base_family(width, len(cross))
        adapter = cls(config)
        adapter.init_kv_from_unet(unet)
        return adapter

    def init_kv_from_unet(self, unet: nn.Module) -> None:
        """W'k, W'v <- the layer's text Wk, Wv (the paper's initialisation)."""
        for layer in unet_layers(unet):
            ip = self.ip_adapter[str(layer.index)] if str(layer.index) in self.ip_adapter else None
            if ip is not None and ip.has_kv:
                attn = unet.get_submodule(layer.name[: -len(".processor")])
                with torch.no_grad():
                    ip.to_k_ip.weight.copy_(attn.to_k.weight)
                    ip.to_v_ip.weight.copy_(attn.to_v.weight)

    def save(self, path: str | os.PathLike) -> None:
        write_checkpoint(path, self.config, self.state_dict())

    def project(self, features) -> torch.Tensor:
        """Encoder features of n images (:class:`~ipadapter.encoders.Features`) -> tokens [n, T, C]."""
        kind = self.config.kind
        if kind == "global":
            x = features.image_embeds
        elif kind in ("plus", "full"):
            x = features.penultimate
        else:
            x = features.face_id
        if x is None:
            raise IPAdapterError(
                f"{kind} adapter: the features it reads ({self.config.encoder_feature}) were not given"
            )
        param = next(self.image_proj.parameters())
        x = x.to(param.device, param.dtype)
        if kind == "faceid-plus":
            if features.penultimate is None:
                raise IPAdapterError("faceid-plus adapter: needs the face image besides the face-ID embedding")
            return self.image_proj(x, features.penultimate.to(param.device, param.dtype))
        return self.image_proj(x)

    def project_pair(self, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) features -> (cond, uncond) tokens, projected as one batch [uncond; cond].

        One call instead of two, and the very numbers diffusers gets: it projects the stacked pair, and a matrix
        product's rounding depends on its batch size.
        """
        def stack(u, c):
            return None if c is None or u is None else torch.cat([u.to(c), c])

        both = type(cond)(*(stack(getattr(uncond, f), getattr(cond, f))
                            for f in ("image_embeds", "penultimate", "face_id")))
        tokens = self.project(both)
        n_uncond = len(tokens) - _rows(cond)
        return tokens[n_uncond:], tokens[:n_uncond]

    # ------------------------------------------------------------------------------------------- checks
    def check_unet(self, unet: nn.Module, source: str = "adapter") -> None:
        """Raise a one-line error naming what does not fit, before touching the UNet."""
        layers = {layer.index: layer for layer in unet_layers(unet)}
        cross = [layer for layer in layers.values() if layer.cross_dim is not None]
        c = self.config
        here = describe_unet(unet)
        mine = c.describe()
        if not cross or cross[0].cross_dim != c.cross_attention_dim or len(cross) != c.num_layers:
            raise IPAdapterError(f"{source}: {mine}; this UNet: {here}")
        for index, width in c.layer_widths.items():
            layer = layers.get(index)
            if layer is None or layer.cross_dim is None or layer.width != width:
                found = "missing" if layer is None else ("self-attention" if layer.cross_dim is None else layer.width)
                raise IPAdapterError(
                    f"{source}: layer {index} should be cross-attention of width {width}, "
                    f"this UNet has {found} ({here})"
                )
        for index in c.lora_layers:
            if index not in layers:
                raise IPAdapterError(f"{source}: LoRA for attention layer {index}, which this UNet lacks ({here})")
            width = self.ip_adapter[str(index)].to_q_lora.up.weight.shape[0]
            if layers[index].width != width:
                raise IPAdapterError(
                    f"{source}: LoRA for attention layer {index} has width {width}, this UNet's is "
                    f"{layers[index].width} ({here})"
                )

    def check_encoder(self, encoder: nn.Module, source: str = "adapter") -> None:
        """The image encoder must produce the features this kind reads, at the width it expects."""
        c = self.config
        cfg = encoder.config
        if c.kind == "global":
            got, what = getattr(cfg, "projection_dim", None), "projected embedding width"
        elif c.uses_patch_features:
            got, what = getattr(cfg, "hidden_size", None), "hidden width (penultimate features)"
        else:
            return
        if got != c.embed_dim:
            raise IPAdapterError(
                f"{source}: {c.kind} adapter expects an image encoder with {what} {c.embed_dim}; "
                f"this encoder has {got} (wrong encoder for this adapter, e.g. ViT-H vs ViT-bigG?)"
            )


def _rows(features) -> int:
    return next(t.shape[0] for t in (features.image_embeds, features.penultimate, features.face_id) if t is not None)


# ------------------------------------------------------------------------------------------ attach / detach
class _Attachment:
    """Bookkeeping kept on the UNet while adapters are attached."""

    def __init__(self, unet: nn.Module):
        self.original = dict(unet.attn_processors)  # the very processor objects, to put back
        self.runtime = Runtime()
        self.adapters: list[Adapter] = []
        self.processors: dict[str, IPAttnProcessor] = {}
        self.hook = unet.register_forward_pre_hook(self.runtime.pre_forward, with_kwargs=True)


def attached(unet: nn.Module) -> list[Adapter]:
    attachment = getattr(unet, "_ipadapter", None)
    return list(attachment.adapters) if attachment else []


def runtime_of(unet: nn.Module) -> Runtime | None:
    attachment = getattr(unet, "_ipadapter", None)
    return attachment.runtime if attachment else None


def attach(unet: nn.Module, adapter: Adapter, source: str = "adapter") -> Adapter:
    """Give ``unet`` the adapter's decoupled cross-attention (several adapters may be attached)."""
    adapter.check_unet(unet, source)
    attachment: _Attachment | None = getattr(unet, "_ipadapter", None)
    if attachment is not None and adapter in attachment.adapters:
        return adapter
    if attachment is None:
        attachment = _Attachment(unet)
        object.__setattr__(unet, "_ipadapter", attachment)  # plain attribute, not a submodule
    param = next(unet.parameters())
    adapter.to(device=param.device, dtype=param.dtype)
    processors = dict(unet.attn_processors)
    for layer in unet_layers(unet):
        key = str(layer.index)
        if key not in adapter.ip_adapter:
            continue
        proc = attachment.processors.get(layer.name)
        if proc is None:
            proc = IPAttnProcessor(layer.index, attachment.runtime)
            attachment.processors[layer.name] = proc
        proc.add(adapter.ip_adapter[key], adapter.state)
        processors[layer.name] = proc
    unet.set_attn_processor(processors)
    attachment.adapters.append(adapter)
    return adapter


def detach(unet: nn.Module, adapter: Adapter | None = None) -> None:
    """Remove one adapter (or all); with none left the UNet's own processors come back, exactly."""
    attachment: _Attachment | None = getattr(unet, "_ipadapter", None)
    if attachment is None:
        return
    remove = attachment.adapters if adapter is None else [adapter]
    for a in list(remove):
        for proc in attachment.processors.values():
            proc.remove(a.state)
        attachment.adapters.remove(a)
        a.state.set_tokens(None)
    if attachment.adapters:
        processors = dict(unet.attn_processors)
        for name, proc in list(attachment.processors.items()):
            if not proc.states:
                processors[name] = attachment.original[name]
                del attachment.processors[name]
        unet.set_attn_processor(processors)
        return
    unet.set_attn_processor(dict(attachment.original))
    attachment.hook.remove()
    object.__delattr__(unet, "_ipadapter")
