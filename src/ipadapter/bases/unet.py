"""SD 1.x / 2.x / SDXL: the UNet family (``UNet2DConditionModel``), the first base module.

Official checkpoint indices count every attention processor of the UNet in diffusers' ``attn_processors`` order
(down blocks, up blocks, mid block; attn1 then attn2 inside each transformer block), so cross-attention layers sit
on odd indices: SD 1.5 has 16 (1, 3, ..., 31), SDXL 70. The processor here is the one attention processor for every
adapter kind and any number of adapters on these UNets.

Style and composition blocks (InstantStyle). On SDXL the InstantStyle authors found style in
``up_blocks.0.attentions.1`` and layout in ``down_blocks.2.attentions.1``: the second attention of the first
up stage and of the last down stage, both at the UNet's coarsest attention resolution (32x32 tokens at 1024 px),
each ten transformer layers deep. SD 1.x/2.x have attention in down_blocks.0-2 and up_blocks.1-3 (plus the
middle block); the stages at the same place in the U are ``down_blocks.2`` (the last down stage with attention)
and ``up_blocks.1`` (the first up stage with attention), 16x16 tokens at 512 px. Their attentions are one
transformer layer each, so a single one carries about a tenth of what SDXL's does: the SD 1.x presets take the
whole stage. ``style`` = ``up_blocks.1`` and ``composition`` = ``down_blocks.2``, which is also what the
InstantStyle authors' own SD 1.5 script uses (its style+layout variant adds the mid block), and ComfyUI's SD 1.5
"composition" weights the same two attentions (0.25 and 1). The rule is structural, not by name: the first up
stage and the last down stage that have attentions, whatever the UNet; SDXL-like UNets (no attention in
down_blocks.0) take their ``.attentions.1``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import (
    AdapterSlots,
    AdapterState,
    Runtime,
    attend,
    is_one,
    is_zero,
    layer_masks,
    scale_keys_values,
)
from ..core.config import AdapterConfig, family_label, guess_base_family
from ..core.errors import IPAdapterError, param
from .base import BaseFamily, CallFacts, Layer, TrainingParts

PRESETS: tuple[str, ...] = ("style", "composition")
#: new adapters' image tokens per kind (the public files' counts)
DEFAULT_TOKENS = {"global": 4, "plus": 16, "full": 257, "faceid": 4}


class IPAttnProcessor(AdapterSlots):
    """Attention processor for one UNet attention layer carrying one or more adapters' weights."""

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        delta = None
        for layer, state in zip(self.layers, self.states):
            # FaceID LoRA belongs to its adapter: off while the adapter has no prompt or a zero scale, so an
            # idle or zero-scale adapter leaves the base model exactly
            if layer.has_lora and state.lora_scale and state.active and state.scale != 0:
                d = state.lora_scale * getattr(layer, name)(x)
                delta = d if delta is None else delta + d
        return delta

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if (d := self._lora("to_q_lora", hidden_states)) is not None:
            query = query + d
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if is_cross:
            encoder_hidden_states = self._concat_image_tokens(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if (d := self._lora("to_k_lora", encoder_hidden_states)) is not None:
            key = key + d
        if (d := self._lora("to_v_lora", encoder_hidden_states)) is not None:
            value = value + d

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if is_cross:
            hidden_states = self._add_image_attention(hidden_states, query, attn.heads, head_dim)

        out = attn.to_out[0](hidden_states)
        if (d := self._lora("to_out_lora", hidden_states)) is not None:
            out = out + d
        hidden_states = attn.to_out[1](out)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _scale(self, state: AdapterState) -> float | torch.Tensor:
        # progress only matters under a schedule, and reading it may wait for the GPU (see Runtime.progress); under
        # torch.compile a scheduled weight is a 0-d tensor (core.attention.call_progress)
        return state.effective_scale(self.index, self.runtime.progress if state.schedule is not None else 0.0)

    def _concat_image_tokens(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The "simple adapter" ablation: image tokens appended to the text tokens (shared text K/V)."""
        extra = []
        for state in self.states:
            if state.concat and state.active and not is_zero(self._scale(state)):
                tokens, _ = state.keys_values(self.index, encoder_hidden_states.shape[0], self.runtime.cfg_hint)
                extra.append(tokens.flatten(1, 2).to(encoder_hidden_states.dtype))
        return torch.cat([encoder_hidden_states, *extra], dim=1) if extra else encoder_hidden_states

    def _add_image_attention(self, hidden_states, query, heads: int, head_dim: int) -> torch.Tensor:
        batch, seq = hidden_states.shape[:2]
        for state in self.states:
            if not state.active or state.concat or self.index not in state.kv:
                continue
            scale = self._scale(state)
            if is_zero(scale):
                continue
            # the pipeline's guidance flag is asked only where it laid out no rows (reading it under torch.compile
            # traces the pipeline's properties)
            k, v = state.keys_values(self.index, batch, self.runtime.cfg_hint)  # [batch, n_images, T, W]
            weights = state.image_weights
            rescaled = state.kv_scaling != "v"  # K and/or V carry the scale instead of the output
            if state.masks is None:
                bias = None
                if weights is not None:  # [n*T] additive logits, shared by every query
                    bias = torch.log(weights.to(query)).repeat_interleave(k.shape[2]).view(1, 1, 1, -1)
                k, v = k.flatten(1, 2), v.flatten(1, 2)
                if rescaled:
                    k, v = scale_keys_values(k, v, scale, state.kv_scaling)
                    scale = 1
                out = attend(query, k, v, heads, head_dim, bias)
                out = out.to(query.dtype)
                # scale 1 (the default) skips a multiply that would give the very same values: one kernel less per
                # layer and step, which counts where the UNet is launch-bound (small latents on a GPU)
                hidden_states = hidden_states + (out if is_one(scale) else scale * out)
                continue
            masks = layer_masks(state.masks, seq, self.runtime.latent_hw).to(query)  # [n_images, seq]
            if weights is not None:
                masks = masks * weights.to(query)[:, None]
            for j in range(k.shape[1]):
                kj, vj, sj = k[:, j], v[:, j], scale
                if rescaled:
                    kj, vj = scale_keys_values(kj, vj, scale, state.kv_scaling)
                    sj = 1
                out = attend(query, kj, vj, heads, head_dim).to(query.dtype)
                hidden_states = hidden_states + sj * out * masks[j, None, :, None]
        return hidden_states


# ----------------------------------------------------------------------------------------------- presets
def _cross_layers(layers: Sequence) -> list:
    return [layer for layer in layers if getattr(layer, "cross_dim", None) is not None]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _stages(layers: Sequence, side: str) -> list[int]:
    return sorted({int(layer.name.split(".")[1]) for layer in layers if layer.name.startswith(side + "_blocks.")})


def preset_blocks(layers: Sequence, preset: str) -> list[str]:
    """Block prefixes of a preset for this UNet (see the module docstring for the choice)."""
    cross = _cross_layers(layers)
    names = [layer.name for layer in cross]
    downs, ups = _stages(cross, "down"), _stages(cross, "up")
    if preset == "style":
        if not ups:
            raise IPAdapterError(f"{param('blocks')} style: this UNet has no up block with attention")
        stage = f"up_blocks.{ups[0]}"
    elif preset == "composition":
        if not downs:
            raise IPAdapterError(f"{param('blocks')} composition: this UNet has no down block with attention")
        stage = f"down_blocks.{downs[-1]}"
    else:
        raise IPAdapterError(f"{param('blocks')} {preset!r}: unknown preset; use one of {', '.join(PRESETS)}")
    sdxl_like = bool(downs) and downs[0] != 0  # SDXL: no attention in down_blocks.0, deep transformer stacks
    second = f"{stage}.attentions.1"
    if sdxl_like and any(_matches(n, second) for n in names):
        return [second]
    return [stage]


# ------------------------------------------------------------------------------------------------ family
def is_sdxl(pipe_or_dir) -> bool:
    """An SDXL pipeline (two text encoders) or model folder."""
    if isinstance(pipe_or_dir, (str, Path)):
        index = Path(pipe_or_dir) / "model_index.json"
        return index.is_file() and "XL" in index.read_text()
    return hasattr(pipe_or_dir, "text_encoder_2")



_MODE_WORDS = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}
_SECTIONS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # a UNet2DConditionModel's attn_processors order


def spatial_name(name: str) -> str | None:
    """A processor name as the plain spatial UNet (UNet2DConditionModel) names it, or None when the layer is no
    part of it: AnimateDiff's motion modules (UNetMotionModel) and ControlNet-XS's control branch
    (UNetControlNetXSModel, whose base layers are "base_attentions" / "mid_block.base_midblock")."""
    if ".motion_modules." in name or ".ctrl_" in name or name.startswith(("ctrl_", "control_")):
        return None
    return name.replace("mid_block.base_midblock.", "mid_block.").replace(".base_attentions.", ".attentions.")


def _spatial_order(name: str) -> tuple:
    parts = name.split(".")
    return (_SECTIONS.get(parts[0], 3), *((0, int(p)) if p.isdigit() else (1, p) for p in parts[1:]))


class UNetFamily(BaseFamily):
    name = "unet"
    title = "SD 1.x, SD 2.x and SDXL UNets"
    denoiser_attr = "unet"

    def recognises(self, denoiser: nn.Module) -> bool:
        return hasattr(denoiser, "attn_processors") and hasattr(denoiser, "down_blocks") and \
            hasattr(denoiser, "up_blocks")

    def label(self, denoiser: nn.Module) -> str:
        cross = [layer for layer in self.layers(denoiser) if layer.cross_dim is not None]
        width = cross[0].cross_dim if cross else 0
        return family_label(guess_base_family(width, len(cross)))

    def layers(self, denoiser: nn.Module) -> list[Layer]:
        """The spatial UNet's attention layers, indexed as the official checkpoints index them: the position in a
        UNet2DConditionModel's ``attn_processors`` (down blocks, up blocks, mid block). Layers of other modules
        sharing the denoiser (AnimateDiff's motion modules in a UNetMotionModel, ControlNet-XS's control branch in
        a UNetControlNetXSModel) are left out, so those UNets take SD 1.5 / SDXL adapters as they are."""
        names = [(spatial_name(name), name) for name in denoiser.attn_processors]
        spatial = sorted(((s, n) for s, n in names if s is not None), key=lambda pair: _spatial_order(pair[0]))
        layers = []
        for index, (_, name) in enumerate(spatial):
            attn = denoiser.get_submodule(name[: -len(".processor")])
            cross = attn.to_k.in_features if getattr(attn, "is_cross_attention", False) else None
            layers.append(Layer(index, name, attn.to_k.out_features, cross))
        return layers

    def processor(self, layer: Layer, runtime: Runtime) -> nn.Module:
        return IPAttnProcessor(layer.index, runtime)

    def read_call(self, args: tuple, kwargs: dict) -> CallFacts:
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        hw = (int(sample.shape[-2]), int(sample.shape[-1])) if sample is not None else None
        added = kwargs.get("added_cond_kwargs") or {}
        frames = int(sample.shape[2]) if sample is not None and sample.ndim == 5 else 1  # [b, c, frames, h, w]
        return CallFacts(latent_hw=hw, timestep=timestep, batch=int(sample.shape[0]) if sample is not None else 0,
                         image_embeds=added.get("image_embeds"), frames=frames)

    # ------------------------------------------------------------------------------------ fitting adapters
    def check(self, config: AdapterConfig, denoiser: nn.Module, source: str = "adapter") -> None:
        """Raise a one-line error naming what does not fit, before touching the UNet."""
        layers = {layer.index: layer for layer in self.layers(denoiser)}
        cross = [layer for layer in layers.values() if layer.cross_dim is not None]
        c = config
        here = self.describe(denoiser)
        if c.time_conditioned or not cross or cross[0].cross_dim != c.cross_attention_dim or \
                len(cross) != c.num_layers:
            raise IPAdapterError(f"{source}: {c.describe()}; this UNet: {here}")
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
            width = c.layer_widths.get(index) or c.layer_widths.get(index + 1) or c.layer_widths.get(index - 1)
            if layers[index].width != width:
                raise IPAdapterError(
                    f"{source}: LoRA for attention layer {index} has width {width}, this UNet's is "
                    f"{layers[index].width} ({here})"
                )

    def new_config(self, denoiser: nn.Module, kind: str, embed_dim: int, num_tokens: int | None = None,
                   **overrides) -> AdapterConfig:
        cross = [layer for layer in self.layers(denoiser) if layer.cross_dim is not None]
        width = cross[0].cross_dim
        config = AdapterConfig(kind=kind, num_tokens=num_tokens or DEFAULT_TOKENS.get(kind, 4), embed_dim=embed_dim,
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
        config.base_family = guess_base_family(width, len(cross))
        return config

    def init_kv(self, adapter, denoiser: nn.Module) -> None:
        for layer in self.layers(denoiser):
            ip = adapter.ip_adapter[str(layer.index)] if str(layer.index) in adapter.ip_adapter else None
            if ip is not None and ip.has_kv:
                attn = denoiser.get_submodule(layer.module_name)
                with torch.no_grad():
                    ip.to_k_ip.weight.copy_(attn.to_k.weight)
                    ip.to_v_ip.weight.copy_(attn.to_v.weight)

    # ------------------------------------------------------------------------------------------ generation
    def preset_blocks(self, layers: list[Layer], preset: str) -> list[str]:
        return preset_blocks(layers, preset)

    def pipeline_class(self, pipe, mode: str, controlnet: bool) -> type:
        import diffusers

        own = type(pipe).__name__
        if not own.startswith("StableDiffusion") and getattr(diffusers, own, None) is type(pipe):
            # a UNet model with pipelines of its own (Kolors: a ChatGLM text encoder): follow them, not SD's
            stem = own.removesuffix("Pipeline")
            for word in ("Img2Img", "Inpaint", "ControlNet"):
                stem = stem.replace(word, "")
            name = f"{stem}{'ControlNet' if controlnet else ''}{_MODE_WORDS[mode]}Pipeline"
            cls = getattr(diffusers, name, None)
            if cls is None:
                raise IPAdapterError(f"{own}: diffusers has no {name} for {mode}{' with a ControlNet' * controlnet}")
            return cls
        family = "StableDiffusionXL" if is_sdxl(pipe) else "StableDiffusion"
        kind = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}[mode]
        return getattr(diffusers, f"{family}{'ControlNet' if controlnet else ''}{kind}Pipeline")

    def default_size(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    # -------------------------------------------------------------------------------------------- training
    def load_training_parts(self, path, device: torch.device) -> TrainingParts:
        """The frozen UNet and its noise schedule from a diffusers folder (SD 1.x/2.x or SDXL)."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = Path(path)
        sdxl = "XL" in json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        try:
            unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")
            noise = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
        except Exception as e:  # noqa: BLE001 - a broken folder is bad input
            raise IPAdapterError(
                f"--model {path}: cannot load the UNet or scheduler ({' '.join(str(e).split())[:150]})"
            ) from None
        unet = unet.requires_grad_(False).eval().to(device)
        return TrainingParts(unet, self.label(unet), noise.alphas_cumprod.to(device, torch.float32),
                             noise.config.prediction_type, {"sdxl": sdxl})

    @staticmethod
    def load_text_encoders(path, extra: dict) -> tuple[list, list]:
        """(tokenizers, text encoders) of a model folder: SD 1.x/2.x one CLIP text model, SDXL two."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        sdxl = extra.get("sdxl", False)
        names = ("", "_2") if sdxl else ("",)
        tokenizers = [AutoTokenizer.from_pretrained(str(path), subfolder=f"tokenizer{n}") for n in names]
        encoders = [CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder")]
        if sdxl:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(str(path), subfolder="text_encoder_2"))
        return tokenizers, encoders

    @staticmethod
    @torch.no_grad()
    def encode_text(encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor], device, extra: dict) -> dict:
        """SD 1.x: the text encoder's last hidden state. SDXL: both encoders' penultimate states + pooled."""
        if not extra.get("sdxl", False):
            return {"text": encoders[0](ids[0].to(device))[0].float()}
        states, pooled = [], None
        for encoder, tokens in zip(encoders, ids):
            out = encoder(tokens.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model
        return {"text": torch.cat(states, -1).float(), "pooled": pooled.float()}

    @staticmethod
    def added_conditioning(feats: dict, uncond: dict, drop_text: torch.Tensor, dtype, extra: dict) -> dict | None:
        """SDXL's added conditioning (pooled text, size/crop ids), the pooled text dropped with the text."""
        if not extra.get("sdxl", False):
            return None
        pooled = torch.where(drop_text[:, None], uncond["pooled"].to(feats["pooled"]), feats["pooled"])
        return {"text_embeds": pooled.to(dtype), "time_ids": feats["time_ids"].to(dtype)}


UNET = UNetFamily()
