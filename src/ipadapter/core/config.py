"""One config describes every adapter kind; the projection and the attention layers are built from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["global", "plus", "full", "faceid", "faceid-plus", "faceid-portrait", "mlp", "time-plus"]
KINDS: tuple[str, ...] = ("global", "plus", "full", "faceid", "faceid-plus", "faceid-portrait", "mlp", "time-plus")

#: Which image-encoder output each kind consumes.
#: "image_embeds" = projected CLIP embedding, "penultimate" = hidden_states[-2] (all patch tokens + CLS),
#: "face_id" = a 512-d insightface embedding given by the user (plus penultimate features for faceid-plus).
ENCODER_FEATURE: dict[str, str] = {
    "global": "image_embeds",
    "plus": "penultimate",
    "full": "penultimate",
    "faceid": "face_id",
    "faceid-plus": "face_id+penultimate",
    "faceid-portrait": "face_id",
    # InstantX SD3.5: a resampler conditioned on the denoising timestep over SigLIP hidden_states[-2]
    "time-plus": "penultimate",
    # InstantX FLUX.1-dev: the pooled SigLIP embedding (its pooler_output, read as image_embeds) -> MLP -> tokens
    "mlp": "image_embeds",
}

#: Adapter flavours: where and how the image attention enters a denoiser (one row per published family).
#: kv_bias: the image K/V projections have biases; kv_norm: an RMSNorm (no weights) over each head of the image
#: keys and values; blocks: which blocks get image attention; added: where the result joins the block;
#: negative: the unconditional image prompt when none is given ("zero": the kind's zero features, "black": a
#: black picture encoded, as diffusers' Flux pipelines do).
FLAVOURS: dict[str, dict[str, Any]] = {
    "": dict(label="", kv_bias=False, kv_norm="", blocks="cross-attention", added="before to_out", negative="zero"),
    "xlabs": dict(label="XLabs Flux", kv_bias=True, kv_norm="", blocks="double", added="after the feed-forward",
                  negative="black"),
    "instantx": dict(label="InstantX FLUX", kv_bias=False, kv_norm="rms", blocks="double+single",
                     added="before to_out", negative="black"),
}


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter from its tensors' shapes, and to check it fits a UNet.

    kind: which projection turns encoder features into image tokens.
    num_tokens: image tokens per image reaching each cross-attention layer.
    cross_attention_dim: width of the tokens (= the UNet's cross-attention width).
    embed_dim: width of the encoder feature the projection reads (projected embedding for "global",
        hidden size for patch kinds, 512 face-ID width for FaceID).
    layer_widths: {processor index: attention width} for every layer holding image K/V (official
        positional indices over all attention processors, so odd numbers for standard UNets).
    lora_layers: {processor index: rank} for FaceID LoRA on the UNet's attention (empty otherwise).
    time_embed_dim: "time-plus" only: width of the sinusoidal timestep features its time embedding reads (320).
    head_dim: "time-plus" only: the denoiser's attention head width (the image-attention RMSNorms' width).
    """

    kind: str = "global"
    num_tokens: int = 4
    cross_attention_dim: int = 768
    embed_dim: int = 1024
    layer_widths: dict[int, int] = field(default_factory=dict)
    # resampler ("plus", "faceid-plus") hyperparameters, read from the keys
    resampler_dim: int = 0
    resampler_depth: int = 0
    resampler_heads: int = 0
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    # FaceID MLP: 512 -> id_hidden -> num_tokens * width
    id_embed_dim: int = 0
    id_hidden_dim: int = 0
    lora_layers: dict[int, int] = field(default_factory=dict)
    # FaceID-PlusV2: ID tokens added back to the resampler output, weighted by s_scale. The tensors are those of
    # FaceID-Plus, so this cannot be read from a file: set it (saved in our metadata once written).
    shortcut: bool = False
    s_scale: float = 1.0
    time_embed_dim: int = 0
    head_dim: int = 0
    base_family: str = ""  # "sd15", "sdxl", "sd2", "sd3" ... when known; informational
    # "decoupled": the paper's separate image K/V per layer. "concat": the paper's "simple adapter" ablation,
    # image tokens appended to the text tokens of the existing cross-attention (no new K/V; projection only).
    attention: str = "decoupled"
    # a row of FLAVOURS: "" (the paper's UNet adapters), "xlabs" or "instantx" (Flux transformers)
    flavour: str = ""
    # the image encoder family it reads: "clip" or "siglip"; "" = the one its published files read (SigLIP for
    # time-plus and InstantX, CLIP otherwise). Set by the trainer from the encoder it trained with.
    encoder: str = ""

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown adapter flavour {self.flavour!r}; expected one of {', '.join(FLAVOURS)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.encoder not in ("", "clip", "siglip"):
            raise ValueError(f"unknown image encoder family {self.encoder!r}; expected 'clip' or 'siglip'")
        if self.attention not in ("decoupled", "concat"):
            raise ValueError(f"unknown attention mode {self.attention!r}; expected 'decoupled' or 'concat'")
        self.layer_widths = {int(k): int(v) for k, v in self.layer_widths.items()}
        self.lora_layers = {int(k): int(v) for k, v in self.lora_layers.items()}

    @property
    def encoder_feature(self) -> str:
        return ENCODER_FEATURE[self.kind]

    @property
    def uses_patch_features(self) -> bool:
        return "penultimate" in self.encoder_feature

    @property
    def uses_face_id(self) -> bool:
        return self.kind.startswith("faceid")

    @property
    def kv_bias(self) -> bool:
        return bool(FLAVOURS[self.flavour]["kv_bias"])

    @property
    def kv_norm(self) -> str:
        return str(FLAVOURS[self.flavour]["kv_norm"])

    @property
    def num_layers(self) -> int:
        return len(self.layer_widths)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def time_conditioned(self) -> bool:
        """Whether the image tokens depend on the denoising timestep (computed once per step, not per generation)."""
        return self.kind == "time-plus"

    def describe(self) -> str:
        if self.flavour == "xlabs":
            width = next(iter(self.layer_widths.values()), 0)
            return f"XLabs Flux adapter: {self.num_layers} double blocks, width {width}, {self.num_tokens} tokens"
        if self.flavour == "instantx":
            width = next(iter(self.layer_widths.values()), 0)
            return (f"InstantX FLUX adapter: {self.num_layers} double + single blocks, width {width}, "
                    f"{self.num_tokens} tokens")
        if self.time_conditioned:
            return (f"{self.kind} adapter (SD3.5): {self.num_layers} joint blocks, width {self.cross_attention_dim}, "
                    f"{self.num_tokens} tokens")
        family = family_label(self.base_family)
        return (
            f"{self.kind} adapter ({family}): {self.num_layers} cross-attention layers, "
            f"width {self.cross_attention_dim}, {self.num_tokens} tokens"
        )


#: base_family key -> the one name every message, log line and ``inspect`` uses for it
FAMILY_LABELS: dict[str, str] = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL", "custom": "custom UNet",
                                 "flux": "FLUX.1", "sd3": "SD3.5"}


def family_label(base_family: str) -> str:
    """The name users read for a ``base_family`` key ("" or an unknown key: "unknown base")."""
    return FAMILY_LABELS.get(base_family, base_family or "unknown base")


def guess_base_family(cross_attention_dim: int, num_layers: int) -> str:
    """Name the base model family an adapter was made for, from its width and layer count."""
    if cross_attention_dim == 768 and num_layers == 16:
        return "sd15"
    if cross_attention_dim == 1024 and num_layers == 16:
        return "sd2"
    if cross_attention_dim == 2048 and num_layers == 70:
        return "sdxl"
    if cross_attention_dim == 4096 and num_layers in (19, 57):
        return "flux"
    return "custom"
