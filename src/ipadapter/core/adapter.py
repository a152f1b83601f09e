"""The adapter as a module: the projection (features -> image tokens) and the per-layer image K/V.

Base-agnostic: which denoiser layers it fits, and attaching it, are the base family's business
(:mod:`ipadapter.bases`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .attention import AdapterState, ip_layers
from .checkpoint import read_checkpoint, write_checkpoint
from .config import AdapterConfig
from .errors import IPAdapterError
from .projection import build_projection


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
        self.state.flavour = config.flavour  # where a transformer family's processor adds this adapter's attention
        if config.time_conditioned:  # its tokens are made at every step, from the timestep (see bases/sd3.py)
            self.state.projection = self.image_proj

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

    def save(self, path: str | os.PathLike) -> None:
        write_checkpoint(path, self.config, self.state_dict())

    def project(self, features) -> torch.Tensor:
        """Encoder features of n images (:class:`~ipadapter.encoders.Features`) -> tokens [n, T, C]."""
        kind = self.config.kind
        if kind in ("global", "mlp"):
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
    def check_encoder(self, encoder: nn.Module, source: str = "adapter") -> None:
        """The image encoder must produce the features this kind reads, at the width it expects."""
        c = self.config
        cfg = encoder.config
        siglip = "siglip" in str(getattr(cfg, "model_type", ""))
        wants = c.encoder or ("siglip" if c.time_conditioned else "")  # "": CLIP, or what a Flux flavour reads
        if (wants == "siglip") != siglip and (wants or not c.flavour):
            want = "a SigLIP encoder (SiglipVisionModel)" if wants == "siglip" else "a CLIP vision encoder"
            raise IPAdapterError(
                f"{source}: {c.kind} adapter reads {want}; this encoder is {getattr(cfg, 'model_type', '?')} "
                "(wrong encoder for this adapter)"
            )
        if c.kind == "global":
            got, what = getattr(cfg, "projection_dim", None), "projected embedding width"
        elif c.kind == "mlp":  # InstantX FLUX: the pooled SigLIP embedding
            got, what = getattr(cfg, "hidden_size", None), "pooled embedding width"
        elif c.uses_patch_features:
            got, what = getattr(cfg, "hidden_size", None), "hidden width (penultimate features)"
        else:
            return
        wants_siglip = {"xlabs": False, "instantx": True}.get(c.flavour)
        if got != c.embed_dim or (wants_siglip is not None and siglip != wants_siglip):
            if c.flavour:  # the published Flux adapters each read one encoder
                hint = "SigLIP so400m-patch14-384" if wants_siglip else "CLIP ViT-L/14 (CLIPVisionModelWithProjection)"
                raise IPAdapterError(
                    f"{source}: {c.describe()} reads a {hint} with {what} {c.embed_dim}; this encoder: "
                    f"{'SigLIP' if siglip else 'CLIP'}, {got}"
                )
            raise IPAdapterError(
                f"{source}: {c.kind} adapter expects an image encoder with {what} {c.embed_dim}; "
                f"this encoder has {got} (wrong encoder for this adapter, e.g. ViT-H vs ViT-bigG?)"
            )


def _rows(features) -> int:
    return next(t.shape[0] for t in (features.image_embeds, features.penultimate, features.face_id) if t is not None)
