"""The base-family interface: the few questions a denoiser family answers, and nothing else knows the family.

A family (SD 1.x/2.x/SDXL UNets, and later Flux, SD3 ...) is one module in ``bases/`` holding one subclass of
:class:`BaseFamily`, registered with one line in ``bases/__init__.py``. The adapter (``core/``), generation,
training and the CLI ask the family of the denoiser in hand:

- which attention layers may get image attention, with the official checkpoint index of each (:meth:`layers`);
- the family's attention processor, one for every adapter kind (:meth:`processor`), and how it is installed;
- what a forward call tells the adapter (:meth:`read_call`: latent size, timestep);
- whether an adapter file fits, in words users know (:meth:`label`, :meth:`check`), and the shape of a new one;
- per-block presets, which diffusers pipeline class serves a mode, how a model folder is recognised;
- what a training step needs (:class:`TrainingParts`: the denoiser, its text conditioning, the loss target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig


@dataclass(frozen=True)
class Layer:
    """One attention layer of a denoiser, as the adapter sees it."""

    index: int  # the official checkpoint index ("ip_adapter.<index>.*")
    name: str  # processor name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    width: int  # attention inner width (rows of to_k_ip)
    cross_dim: int | None  # width of the tokens it attends to; None for self-attention

    @property
    def block(self) -> str:
        """The block path per-block scales name, e.g. "down_blocks.2.attentions.1" or "mid_block.attentions.0"
        (ControlNet-XS's base layers by their plain-UNet names)."""
        name = self.name.replace("mid_block.base_midblock.", "mid_block.").replace(".base_attentions.", ".attentions.")
        return ".".join(name.split(".")[:3])

    @property
    def module_name(self) -> str:
        """The attention module's name in the denoiser (the processor name without ".processor")."""
        return self.name[: -len(".processor")] if self.name.endswith(".processor") else self.name


@dataclass
class CallFacts:
    """What one forward call of the denoiser tells the adapter (read by the forward pre-hook)."""

    latent_hw: tuple[int, int] | None = None
    timestep: Any = None
    batch: int = 0  # samples in this call (before a denoiser folds frames into its batch)
    image_embeds: Any = None  # what the pipeline handed as image embeddings (our row markers, see core.rows)
    frames: int = 1  # frames per sample the denoiser folds into its spatial layers' batch (AnimateDiff's videos)
    # transformer families: which branch of the image prompt this call is (the rows markers the generator handed
    # the pipeline, see bases/flux.py: 1 conditional, 2 unconditional; None: not said), and the image tokens'
    # position ids (Flux's img_ids: [tokens, 3], for region masks)
    prompt_branch: int | None = None
    token_ids: Any = None


@dataclass
class TrainingParts:
    """The frozen pieces a training step needs, as the family loads them from a model folder."""

    denoiser: nn.Module
    variant: str  # the family's own name for the model in hand ("SD 1.x", "SDXL", ...)
    alphas_cumprod: torch.Tensor | None  # [T] (DDPM families; None for flow matching)
    prediction_type: str  # "epsilon", "v_prediction", "sample" or "flow" (flow matching: the velocity)
    extra: dict = field(default_factory=dict)  # the family's own facts about the model, handed back to its methods
    schedule: FlowSchedule | None = None  # flow-matching families: the scheduler's sigmas and timesteps


@dataclass
class FlowSchedule:
    """A flow-matching scheduler's training grid (``FlowMatchEulerDiscreteScheduler`` as built from its config):
    ``sigmas[i]`` is the noise level of ``timesteps[i]`` (= sigma x num_train_timesteps), i < num_train_timesteps."""

    sigmas: torch.Tensor  # [T] float32
    timesteps: torch.Tensor  # [T] float32

    @classmethod
    def from_scheduler(cls, scheduler, device=None) -> FlowSchedule:
        n = int(scheduler.config.num_train_timesteps)
        return cls(scheduler.sigmas[:n].to(device, torch.float32), scheduler.timesteps[:n].to(device, torch.float32))


#: timestep densities a flow-matching run samples from (diffusers' compute_density_for_timestep_sampling names)
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
#: per-sample loss weightings (diffusers' compute_loss_weighting_for_sd3 names)
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def saved_without(folder) -> dict[str, None]:
    """The components a diffusers folder was saved without (``[null, null]`` in its model_index.json, e.g. SD3
    without T5), as ``from_pretrained`` keywords: diffusers refuses to load such a folder unless each is passed
    as None."""
    import json
    from pathlib import Path

    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}


def load_flow_model(path, model_class, title: str, device: torch.device):
    """A flow-matching folder's frozen transformer (on ``device``) and its scheduler; a broken folder is one
    clear error."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..core.errors import IPAdapterError

    try:
        transformer = model_class.from_pretrained(str(path), subfolder="transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path), subfolder="scheduler")
    except Exception as e:  # noqa: BLE001 - a broken folder is bad input
        raise IPAdapterError(f"--model {path}: cannot load the {title} transformer or scheduler "
                             f"({' '.join(str(e).split())[:150]})") from None
    return transformer.requires_grad_(False).eval().to(device), scheduler


def flow_matching(x0: torch.Tensor, d: dict, schedule: FlowSchedule, settings: dict):
    """One flow-matching training step's inputs, as diffusers' Flux/SD3 training examples compute them.

    A density value u in [0, 1) per sample (``settings["timestep_sampling"]``: uniform, logit-normal
    sigmoid(mean + std x n), or the "mode" density), index i = floor(u x T), sigma = sigmas[i], t = timesteps[i];
    noisy = (1 - sigma) x0 + sigma noise; the target is the velocity noise - x0. Returns (noisy, t, target,
    per-sample weighting or None).
    """
    T = schedule.sigmas.shape[0]
    sampling = settings.get("timestep_sampling") or "uniform"
    if sampling == "logit_normal":
        u = torch.sigmoid(settings.get("logit_mean", 0.0) + settings.get("logit_std", 1.0) * d["t_normal"])
    elif sampling == "mode":
        r = d["t_uniform"]
        u = 1 - r - settings.get("mode_scale", 1.29) * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        u = d["t_uniform"]
    index = (u * T).long().clamp(0, T - 1).to(schedule.sigmas.device)
    sigma = schedule.sigmas[index].to(x0.device).view(-1, *[1] * (x0.ndim - 1))
    timesteps = schedule.timesteps[index].to(x0.device)
    noise = d["noise"]
    noisy = (1.0 - sigma) * x0 + sigma * noise
    target = noise - x0
    weighting = settings.get("loss_weighting") or "none"
    if weighting == "sigma_sqrt":
        weight = sigma.float() ** -2.0
    elif weighting == "cosmap":
        weight = 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
    else:
        weight = None
    return noisy, timesteps, target, weight


class BaseFamily:
    """One denoiser family. Subclasses override what differs; the defaults serve diffusers' attention models."""

    name: str = ""
    title: str = ""  # what it serves, in words ("SD 1.x, SD 2.x and SDXL UNets")
    #: the pipeline attribute holding the denoiser ("unet", "transformer")
    denoiser_attr: str = "unet"

    # ------------------------------------------------------------------------------------------- recognising
    def recognises(self, denoiser: nn.Module) -> bool:
        raise NotImplementedError

    def recognises_index(self, model_index: dict) -> bool:
        """Whether a diffusers folder's ``model_index.json`` is a model of this family."""
        return self.denoiser_attr in model_index

    def label(self, denoiser: nn.Module) -> str:
        """The model's name in every message, log line and ``inspect`` ("SD 1.5", "SDXL", ...)."""
        raise NotImplementedError

    def describe(self, denoiser: nn.Module) -> str:
        cross = [layer for layer in self.layers(denoiser) if layer.cross_dim is not None]
        width = cross[0].cross_dim if cross else 0
        return f"{self.label(denoiser)}, {len(cross)} cross-attention layers, width {width}"

    # ---------------------------------------------------------------------------------------------- layers
    def layers(self, denoiser: nn.Module) -> list[Layer]:
        raise NotImplementedError

    def processor(self, layer: Layer, runtime) -> nn.Module:
        raise NotImplementedError

    def processors(self, denoiser: nn.Module) -> dict[str, Any]:
        return dict(denoiser.attn_processors)

    def install(self, denoiser: nn.Module, processors: dict[str, Any]) -> None:
        denoiser.set_attn_processor(processors)

    def read_call(self, args: tuple, kwargs: dict) -> CallFacts:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ fitting adapters
    def check(self, config: AdapterConfig, denoiser: nn.Module, source: str = "adapter") -> None:
        raise NotImplementedError

    def new_config(self, denoiser: nn.Module, kind: str, embed_dim: int, num_tokens: int | None = None,
                   **overrides) -> AdapterConfig:
        raise NotImplementedError

    def init_kv(self, adapter, denoiser: nn.Module) -> None:
        """W'k, W'v <- the layer's own text Wk, Wv (the paper's initialisation of a new adapter)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ generation
    def preset_blocks(self, layers: list[Layer], preset: str) -> list[str]:
        raise NotImplementedError

    def pipeline_class(self, pipe, mode: str, controlnet: bool) -> type:
        raise NotImplementedError

    def default_size(self, pipe) -> int:
        raise NotImplementedError

    #: the pipeline's guidance_scale when none is given (CFG for UNets; the distilled guidance for Flux)
    default_guidance: float = 7.5

    def project(self, adapter, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) tokens of a prompt's features, batched as the reference pipelines do (numbers match)."""
        return adapter.project_pair(cond, uncond)

    def call_kwargs(self, pipe) -> dict:
        """What a generation hands the pipeline besides the user's arguments."""
        return {}

    # -------------------------------------------------------------------------------------------- training
    def load_training_parts(self, path, device: torch.device) -> TrainingParts:
        """The frozen denoiser and its noise schedule, from a diffusers model folder."""
        raise NotImplementedError

    def load_text_encoders(self, path, extra: dict) -> tuple[list, list]:
        """(tokenizers, text encoders) the denoiser is conditioned by."""
        raise NotImplementedError

    def encode_text(self, encoders, ids, device, extra: dict) -> dict:
        """Token ids -> {"text": the denoiser's text tokens, and whatever else the family conditions on}."""
        raise NotImplementedError

    def added_conditioning(self, feats: dict, uncond: dict, drop_text: torch.Tensor, dtype, extra: dict) -> dict | None:
        """The denoiser's extra conditioning for a training batch (None when it takes none)."""
        return None

    # the defaults below are the UNet family's (DDPM objective); transformer families override them
    #: the adapter kind a new run trains when none is asked for
    default_kind: str = "global"
    #: flow-matching families: the timestep density a run samples from when none is asked for
    default_timestep_sampling: str = "uniform"

    def train_resolution(self, denoiser: nn.Module, vae_factor: int) -> int:
        """The training resolution when none is given (the denoiser's native size)."""
        return int(denoiser.config.sample_size) * vae_factor

    def latent_multiple(self, denoiser: nn.Module) -> int:
        """Latent sides must be multiples of this (Flux packs 2 x 2 latents into one token; SD3 patches)."""
        return 1

    def text_elements(self, denoiser: nn.Module, extra: dict) -> int:
        """Numbers per item the cached text conditioning holds (for the cache size estimate)."""
        return 77 * int(denoiser.config.cross_attention_dim or 768)

    def cache_facts(self, extra: dict) -> dict:
        """What else the cached features depend on besides the model folder's files (e.g. the T5 length)."""
        return {}

    def diffuse(self, x0: torch.Tensor, d: dict, m) -> tuple:
        """(noisy latents, timesteps, target, per-sample loss weighting or None) of one batch of clean latents
        ``x0`` and the step's draws ``d``; ``m`` holds the schedule (the trainer's Models: ``alphas_cumprod``,
        ``prediction_type``, ``schedule``, ``extra``). Default: DDPM noising and the scheduler's prediction type."""
        a = m.alphas_cumprod[d["t"]].view(-1, 1, 1, 1)
        noise = d["noise"]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
                  "sample": x0}[m.prediction_type]
        return noisy, d["t"], target, None

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                added: dict | None, image: torch.Tensor, extra: dict) -> torch.Tensor:
        """The denoiser's prediction for a training batch (the adapter attached; its tokens set unless they depend
        on the timestep, then ``image`` holds the features the denoiser hands the adapter)."""
        return denoiser(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]

    def validation_pipeline(self, path, denoiser: nn.Module, extra: dict, frozen) -> Any:
        """A diffusers pipeline around the training denoiser for validation images (``frozen(module)`` puts a
        loaded part on the training device and dtype). Default: SD 1.x/2.x or SDXL with DDIM."""
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        p = str(path)
        parts = dict(vae=frozen(AutoencoderKL.from_pretrained(p, subfolder="vae")),
                     text_encoder=frozen(CLIPTextModel.from_pretrained(p, subfolder="text_encoder")),
                     tokenizer=AutoTokenizer.from_pretrained(p, subfolder="tokenizer"),
                     scheduler=DDIMScheduler.from_pretrained(p, subfolder="scheduler"), unet=denoiser)
        if extra.get("sdxl"):
            encoder_2 = CLIPTextModelWithProjection.from_pretrained(p, subfolder="text_encoder_2")
            parts.update(text_encoder_2=frozen(encoder_2),
                         tokenizer_2=AutoTokenizer.from_pretrained(p, subfolder="tokenizer_2"))
            return StableDiffusionXLPipeline(**parts)
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def execution_device(denoiser: nn.Module) -> torch.device:
    """Where the denoiser computes: under accelerate's offloading (``cpu_offload``, ``enable_*_cpu_offload``) its
    hooks' execution device, while its weights sit on the meta device or the CPU; else its weights' device."""
    for module in denoiser.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next((p.device for p in denoiser.parameters() if p.device.type != "meta"), torch.device("cpu"))
