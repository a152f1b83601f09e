"""``ipadapter train``: one trainer for every adapter kind (global, plus, full, faceid, time-plus) and base family
(SD 1.x/2.x and SDXL UNets with their DDPM objective; FLUX.1 and SD3/SD3.5 transformers with flow matching).

A batch from disk to loss, in reading order:

1. :class:`TrainConfig` - every knob, a plain value; a JSON file and CLI flags fill it.
2. :func:`load_models` - the frozen UNet and noise schedule (and VAE, text and image encoders when features must
   be computed); :func:`ipadapter.bases.new_adapter` builds the adapter with its image K/V copied from the text K/V.
3. ``data.BatchOrder`` - which items form global batch ``k`` (a pure function of seed and ``k``); each rank
   takes its rows.
4. Features of those items: gathered from the cache (``cache.py``; built once by :func:`encode`) or computed now
   by :func:`encode` from ``data.ImageTextDataset``'s decoded pixels and tokens.
5. :func:`loss_for` - noise, timestep and condition dropout from :func:`step_draws` (seeded by ``k``, so a resumed
   or differently-sharded run draws the same); the family noises the latents (``diffuse``: DDPM for UNets, flow
   matching for transformers) and calls its denoiser (``denoise``); MSE on the family's target.
6. :func:`train` - the loop: accumulate, clip, step, EMA; log, validate, checkpoint atomically; resume.

The same code runs on a laptop CPU, one GPU or many (``accelerate launch``; DDP, DeepSpeed ZeRO-2, FSDP).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bases import FAMILIES, BaseFamily, attach, family_for_index, family_of, runtime_of
from ..bases.base import LOSS_WEIGHTING, TIMESTEP_SAMPLING
from ..bases.unet import UNET
from ..core.adapter import Adapter
from ..core.encoders import Features, ImageEncoder
from ..core.errors import IPAdapterError
from ..core.files import publish
from . import data as D

KINDS = ("global", "plus", "full", "faceid", "time-plus")
#: which ``Features`` field each kind's projection reads
FEATURE = {"global": "image_embeds", "plus": "penultimate", "full": "penultimate", "faceid": "face_id",
           "time-plus": "penultimate"}


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's recipe (AdamW 1e-4, wd 0.01, 5/5/5% dropout)."""

    # what to train
    model: str = ""  # diffusers model folder (SD 1.x/2.x, SDXL, FLUX.1, SD3/SD3.5), with image_encoder/ or give one
    model_config: str | None = None  # single-file model: a diffusers folder or hub id of its family (CLI converts)
    data: str = ""  # .json/.jsonl list, images + .txt, webdataset shards, a datasets folder or parquet (data.py)
    output: str = ""
    data_root: str | None = None  # folder the JSON paths are relative to (default: the JSON file's folder)
    image_column: str | None = None  # Hugging Face datasets: the image column (default: image, img, jpg, ...)
    caption_column: str | None = None  # ... and the caption column (default: text, caption, prompt, txt)
    streaming: bool = False  # datasets: stream the rows (written once to data_cache) instead of memory-mapping
    data_cache: str | None = None  # compressed/remote shards, streamed rows, uncompressed (default OUTPUT/data-cache)
    kind: str | None = None  # default: the family's (global: UNets, Flux's XLabs layout; time-plus: SD3.5 InstantX)
    image_encoder: str | None = None  # default MODEL/image_encoder (Flux: CLIP ViT-L/14; SD3.5: SigLIP)
    num_tokens: int | None = None  # default 4 (global, faceid), 16 (plus), all patches (full)
    adapter: dict = field(default_factory=dict)  # other AdapterConfig fields, e.g. {"resampler_depth": 2}
    init_adapter: str | None = None  # start from this adapter file's weights (same kind and shape), not new ones
    # data
    resolution: int | None = None  # default: the UNet's native size
    buckets: bool | None = None  # multi-aspect buckets (default: on for SDXL)
    random_crop: bool = False
    random_flip: bool = False
    num_workers: int | None = None  # loader processes (default 0 on CPU, up to 8 with a GPU)
    max_bad_fraction: float = 0.10
    # optimisation
    max_steps: int = 1000
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    projection_lr: float | None = None  # the image projection's own rate (image_proj.*; default: lr): a resampler
    # must learn which patch states to read, where the K/V copies start from the text's (see the world's plus)
    # steps that first fit a new patch projection (plus, full) to the image encoder's own projected embedding:
    # its tokens' mean, through a throwaway linear head, predicts the embedding (cosine) on up to
    # projection_pretrain_images training images; no denoiser runs (minutes at most). A new resampler otherwise
    # starts by passing on the patch average, which is mostly the background (the world's plus, README)
    projection_pretrain: int = 0
    projection_pretrain_images: int = 4096
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"  # or "cosine" (decays to 0 at max_steps)
    warmup_steps: int = 0
    max_grad_norm: float = 0.0  # 0 = no clipping
    ema_decay: float = 0.0  # 0 = no EMA; with EMA the written adapter holds the EMA weights
    drop_image: float = 0.05  # one draw per sample: image only, text only, both
    drop_text: float = 0.05
    drop_both: float = 0.05
    mixed_precision: str | None = None  # "no", "bf16", "fp16" (frozen weights in that type, adapter fp32,
    #                                     autocast); None: what `accelerate launch` says, else "no"
    gradient_checkpointing: bool = False
    # flow matching (Flux, SD3): as diffusers' training examples
    timestep_sampling: str | None = None  # uniform, logit_normal or mode (default: Flux uniform, SD3 logit_normal)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"  # or sigma_sqrt, cosmap
    guidance_scale: float = 3.5  # Flux: the guidance embedding of guidance-distilled transformers (FLUX.1-dev)
    # T5 tokens of each caption (Flux, SD3); None: 77, or the zero rows a world member was trained with
    max_sequence_length: int | None = None
    seed: int = 0
    device: str | None = None  # "cpu" forces the CPU; default: what accelerate picks
    # feature cache
    cache: str | None = "auto"  # folder; "auto": OUTPUT/cache when it fits (< cache_auto_gb); None: no cache
    cache_auto_gb: float = 16.0
    cache_dtype: str = "float32"  # "float16"/"bfloat16" halve the cache
    cache_shard_size: int = 1024
    # checkpoints and logs
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    # validation: generate for fixed prompt images every N steps; log the images and their CLIP-I
    validate_every: int = 0
    validation_images: list[str] = field(default_factory=list)
    validation_prompt: str = ""
    validation_steps: int = 20
    validation_scale: float = 1.0

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            import difflib

            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u
                     for u in unknown]
            raise IPAdapterError(f"{source}: unknown setting(s) {', '.join(hints)}")
        values = dict(values)
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except OSError as e:
            raise IPAdapterError(f"--config {path}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise IPAdapterError(f"--config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(values, dict):
            raise IPAdapterError(f"--config {path}: expected a JSON object of settings")
        values.pop("_comment", None)
        return cls.from_dict(values, f"--config {path}")

    def check(self) -> TrainConfig:
        """One-line errors naming the setting, before anything is loaded."""
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise IPAdapterError(f"--{name} is required (or \"{name}\" in the config file)")
        if self.kind is not None and self.kind not in KINDS:
            raise IPAdapterError(f"--kind {self.kind}: trainable kinds are {', '.join(KINDS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every", "validation_steps",
                     "cache_shard_size", "keep_checkpoints", "max_sequence_length"):
            if name == "max_sequence_length" and self.max_sequence_length is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise IPAdapterError(f"{name} = {getattr(self, name)!r}: must be a whole number >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise IPAdapterError(f"--lr {self.lr}: must be a positive number (the paper uses 1e-4)")
        if self.projection_lr is not None and not (self.projection_lr > 0 and math.isfinite(self.projection_lr)):
            raise IPAdapterError(f"projection_lr = {self.projection_lr}: must be a positive number (or unset: lr)")
        for name, least in (("projection_pretrain", 0), ("projection_pretrain_images", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
                raise IPAdapterError(f"{name} = {getattr(self, name)!r}: must be a whole number >= {least}")
        if self.projection_pretrain and self.init_adapter:
            raise IPAdapterError("projection_pretrain fits a new adapter's projection; init_adapter already gives one "
                                 "(set one of them)")
        drops = (self.drop_image, self.drop_text, self.drop_both)
        if any(not 0 <= p <= 1 for p in drops) or sum(drops) > 1:
            raise IPAdapterError(f"drop_image/drop_text/drop_both = {drops}: each in [0, 1], together at most 1")
        choices = {"mixed_precision": (None, "no", "bf16", "fp16"), "lr_schedule": ("constant", "cosine"),
                   "cache_dtype": ("float32", "float16", "bfloat16"), "timestep_sampling": (None, *TIMESTEP_SAMPLING),
                   "loss_weighting": LOSS_WEIGHTING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise IPAdapterError(f"{name} = {getattr(self, name)!r}: use one of {shown}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise IPAdapterError(f"--resolution {self.resolution}: must be a multiple of 8 (the VAE downsamples by 8)")
        if not 0 <= self.ema_decay < 1:
            raise IPAdapterError(f"ema_decay = {self.ema_decay}: must be in [0, 1) (0 = off; try 0.999)")
        if self.ema_decay and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise IPAdapterError("ema_decay with FSDP: the EMA copy would hold parameter shards; use DDP or "
                                 "DeepSpeed ZeRO-2 (configs/), or turn EMA off")
        if not (self.logit_std > 0 and math.isfinite(self.logit_mean) and math.isfinite(self.guidance_scale)):
            raise IPAdapterError(f"logit_mean/logit_std/guidance_scale = {self.logit_mean}/{self.logit_std}/"
                                 f"{self.guidance_scale}: finite numbers, logit_std > 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise IPAdapterError(f"max_bad_fraction = {self.max_bad_fraction}: must be in [0, 1]")
        return self


# ---------------------------------------------------------------------------------------------------- models
@dataclass
class Models:
    """The frozen parts of the base model that training needs; encoders are loaded only when used."""

    path: Path
    unet: nn.Module
    sdxl: bool
    alphas_cumprod: torch.Tensor | None  # [T] on the device (DDPM families)
    prediction_type: str  # "epsilon", "v_prediction", "sample" or "flow" (flow matching)
    scaling: float  # latents = (VAE sample - shift) * scaling
    shift: float
    vae_factor: int
    device: torch.device
    dtype: torch.dtype  # of the frozen weights
    vae: nn.Module | None = None
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    image_encoder: ImageEncoder | None = None
    pipeline: object | None = None  # for validation, built the first time it runs
    family: BaseFamily = field(default_factory=lambda: UNET)  # the family that loaded the denoiser and conditions it
    variant: str = ""  # its name for the model ("SD 1.5", "SDXL", "custom UNet", ...)
    extra: dict = field(default_factory=dict)  # the family's facts about the model (TrainingParts.extra)
    schedule: object | None = None  # flow-matching families: the scheduler's sigmas/timesteps (bases.FlowSchedule)

    @property
    def num_timesteps(self) -> int:
        return int((self.alphas_cumprod if self.schedule is None else self.schedule.sigmas).shape[0])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IPAdapterError(f"{path}: cannot read it ({e})") from None


def load_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Models:
    """The frozen denoiser and noise schedule, loaded by the model folder's base family."""
    path = Path(cfg.model)
    if not (path / "model_index.json").is_file():
        raise IPAdapterError(f"--model {path}: not a diffusers model folder (no model_index.json)")
    family = family_for_index(_read_json(path / "model_index.json"))
    if family is None:
        raise IPAdapterError(f"--model {path}: not a model IP-Adapter trains here (supported: "
                             f"{'; '.join(f.title for f in FAMILIES)})")
    parts = family.load_training_parts(path, device)
    if parts.prediction_type != "flow" and cfg.timestep_sampling is not None:
        raise IPAdapterError(f"timestep_sampling = {cfg.timestep_sampling!r}: a flow-matching setting (Flux, SD3); "
                             f"{parts.variant} trains on its DDPM schedule")
    vae = _read_json(path / "vae" / "config.json")
    from ..generation.pipeline import world_call

    length = cfg.max_sequence_length or world_call(path).get("max_sequence_length", 77)
    extra = dict(parts.extra, max_sequence_length=length, objective={
        "timestep_sampling": cfg.timestep_sampling or family.default_timestep_sampling, "logit_mean": cfg.logit_mean,
        "logit_std": cfg.logit_std, "mode_scale": cfg.mode_scale, "loss_weighting": cfg.loss_weighting,
        "guidance_scale": cfg.guidance_scale})
    return Models(path, parts.denoiser, bool(parts.extra.get("sdxl")), parts.alphas_cumprod, parts.prediction_type,
                  float(vae.get("scaling_factor", 0.18215)), float(vae.get("shift_factor") or 0.0),
                  2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1), device, dtype, family=family,
                  variant=parts.variant, extra=extra, schedule=parts.schedule)


def load_encoders(m: Models, cfg: TrainConfig, need_image: bool) -> None:
    """VAE, text encoder(s), tokenizer(s) and image encoder, frozen, in the frozen-weight dtype."""
    if m.vae is not None:
        return
    from diffusers import AutoencoderKL

    try:
        m.vae = AutoencoderKL.from_pretrained(str(m.path), subfolder="vae")
        m.tokenizers, m.text_encoders = m.family.load_text_encoders(m.path, m.extra)
    except Exception as e:  # noqa: BLE001
        detail = " ".join(str(e).split())[:150]
        raise IPAdapterError(f"--model {m.path}: cannot load the VAE or text encoders ({detail})") from None
    for module in (m.vae, *m.text_encoders):
        frozen(module, m.device, m.dtype)
    if need_image:
        load_image_encoder(m, cfg)


def frozen(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Eval mode, no gradients, on the device in ``dtype`` (fp16 files load as fp16 with transformers 5)."""
    module.requires_grad_(False).eval().to(device)
    if next(module.parameters()).dtype != dtype:  # cast only when needed: diffusers warns on any dtype cast
        module.to(dtype=dtype)
    return module


def image_encoder_dir(cfg: TrainConfig) -> Path:
    path = Path(cfg.image_encoder) if cfg.image_encoder else Path(cfg.model) / "image_encoder"
    if not (path / "config.json").is_file():
        raise IPAdapterError(f"{path}: no image encoder there (no config.json); pass --image-encoder DIR "
                             "(a CLIPVisionModelWithProjection folder)")
    return path


def _model_feature_extractor(m: Models):
    """The model folder's feature_extractor/ (a fallback the encoder's own rule checks for size), or None."""
    folder = m.path / "feature_extractor"
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(str(folder))


def clip_processor(cfg: TrainConfig, m: Models):
    """The image encoder's preprocessing, by generation's rule (:func:`~ipadapter.core.encoders.encoder_processor`:
    the encoder's own config, else a feature extractor sized for it, else CLIP's defaults); None for FaceID."""
    if cfg.kind == "faceid":
        return None
    from ..core.encoders import encoder_processor

    folder = image_encoder_dir(cfg)
    if "siglip" in str(_read_json(folder / "config.json").get("model_type", "")):  # SigLIP's own rule (encoders.py)
        return (m.image_encoder or load_image_encoder(m, cfg)).processor
    return encoder_processor(folder, fallback=_model_feature_extractor(m))


def load_image_encoder(m: Models, cfg: TrainConfig) -> ImageEncoder:
    """``m.image_encoder``: the encoder folder with the same preprocessing as :func:`clip_processor`, frozen."""
    m.image_encoder = ImageEncoder.from_pretrained(image_encoder_dir(cfg), fallback=_model_feature_extractor(m))
    frozen(m.image_encoder.model, m.device, m.dtype)
    return m.image_encoder


def make_adapter(cfg: TrainConfig, unet: nn.Module) -> Adapter:
    """A new adapter shaped for the denoiser (by its family) and the encoder feature its kind reads; K/V
    initialised from the text K/V (the family's ``init_kv``)."""
    from types import SimpleNamespace

    kind = cfg.kind or family_of(unet).default_kind
    overrides = dict(cfg.adapter)
    num_tokens = cfg.num_tokens or overrides.pop("num_tokens", None)  # a top-level setting or the adapter's own
    if kind == "faceid":
        embed, tokens, enc = 512, num_tokens, None
    else:
        from transformers import AutoConfig

        enc = AutoConfig.from_pretrained(str(image_encoder_dir(cfg)))
        enc = getattr(enc, "vision_config", None) or enc
        embed = getattr(enc, "projection_dim", None) if kind == "global" else enc.hidden_size
        tokens = num_tokens or ((enc.image_size // enc.patch_size) ** 2 + 1 if kind == "full" else None)
    family = family_of(unet)
    config = family.new_config(unet, kind, embed or 0, tokens, **overrides)  # first: does the kind fit the model?
    if enc is not None:  # the image encoder family it is trained with, recorded in its metadata
        config = dataclasses.replace(config, encoder="siglip" if "siglip" in str(getattr(enc, "model_type", ""))
                                     else "clip")
    family.check(config, unet, f"--kind {kind}")
    if not embed:
        raise IPAdapterError(f"--image-encoder {image_encoder_dir(cfg)}: a {kind} adapter reads a projected "
                             "embedding; this encoder has none (use a CLIPVisionModelWithProjection folder)")
    torch.manual_seed(cfg.seed)  # the projection's initial weights
    adapter = Adapter(config)
    family.init_kv(adapter, unet)
    if enc is not None:
        adapter.check_encoder(SimpleNamespace(config=enc), f"--image-encoder {image_encoder_dir(cfg)}")
    if cfg.init_adapter:  # fine-tune an adapter file instead (its tensors must fit this one exactly)
        from ..core.checkpoint import read_checkpoint

        _, tensors = read_checkpoint(cfg.init_adapter)
        own = adapter.state_dict()
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            raise IPAdapterError(f"init_adapter {cfg.init_adapter}: its tensors do not fit a new {kind} adapter "
                                 "for this model (give a file of the same kind, tokens and base model)")
        adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
    return adapter


# -------------------------------------------------------------------------------------------------- features
def encode_text(m: Models, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text conditioning the base family reads (SD 1.x: last hidden state; SDXL: two encoders + pooled)."""
    return m.family.encode_text(m.text_encoders, ids, m.device, m.extra)


@torch.no_grad()
def encode(m: Models, batch: dict, kind: str, variants: int = 1) -> dict[str, torch.Tensor]:
    """Decoded batch -> the features training reads: VAE moments, time ids [n, V, ...], text, image feature."""
    n = batch["pixels"].shape[0] // variants
    dist = m.vae.encode(batch["pixels"].to(m.device, m.dtype)).latent_dist
    feats = {"latent_mean": dist.mean.float().unflatten(0, (n, variants)),
             "latent_std": dist.std.float().unflatten(0, (n, variants)),
             "time_ids": batch["time_ids"].to(m.device).unflatten(0, (n, variants))}
    feats.update(encode_text(m, batch["ids"]))
    if kind == "faceid":
        feats["image"] = batch["face"].to(m.device)
    elif kind == "global":
        feats["image"] = m.image_encoder.model(batch["clip"].to(m.device, m.dtype)).image_embeds.float()
    else:  # penultimate hidden states: all patch tokens + CLS
        out = m.image_encoder.model(batch["clip"].to(m.device, m.dtype), output_hidden_states=True)
        feats["image"] = out.hidden_states[-2].float()
    return feats


@torch.no_grad()
def uncond_features(m: Models, adapter: Adapter) -> dict[str, torch.Tensor]:
    """What a dropped condition becomes: the empty caption's embedding; the image as at inference (the core's
    unconditional branch: a zero embedding, or the encoder run on all-zero pixel values for patch kinds)."""
    ids = [tok("", padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in m.tokenizers]
    out = encode_text(m, ids)
    if adapter.config.kind == "faceid":
        out["image"] = torch.zeros(1, 512, device=m.device)
    else:
        size = int(m.image_encoder.model.config.image_size)
        zeros = torch.zeros(1, 3, size, size, device=m.device, dtype=m.dtype)
        _, unc = m.image_encoder.encode(adapter.config, pixel_values=zeros)
        out["image"] = getattr(unc, FEATURE[adapter.config.kind]).float()
    return out


def pick_variant(feats: dict[str, torch.Tensor], variant: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """[n, V, ...] cached tensors -> [n, ...]: the mirror image where the flip draw says so."""
    out = dict(feats)
    for name in ("latent_mean", "latent_std", "time_ids"):
        t = feats[name]
        out[name] = t[:, 0] if variant is None else t[torch.arange(t.shape[0], device=t.device), variant]
    return out


# ------------------------------------------------------------------------------------------------ the model
class Trainee(nn.Module):
    """The frozen UNet with the adapter attached; only the adapter's parameters require gradients.

    One module so that ``accelerator.prepare`` wraps both and DDP synchronises just the adapter's gradients.
    """

    def __init__(self, unet: nn.Module, adapter: Adapter, family: BaseFamily | None = None,
                 extra: dict | None = None):
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.feature = FEATURE[adapter.config.kind]
        self.family = family or family_of(unet)
        self.extra = extra or {}

    def forward(self, noisy, timesteps, text, image, added_cond=None) -> torch.Tensor:
        if not self.adapter.config.time_conditioned:  # time-conditioned tokens are made inside, from the timestep
            tokens = self.adapter.project(Features(**{self.feature: image}))  # cond-only tokens [B, T, C]
            # every layer's image K/V, computed once here - outside any gradient-checkpointed block
            self.adapter.state.set_tokens(tokens)
        return self.family.denoise(self.unet, noisy, timesteps, text, added_cond, image, self.extra)


def step_draws(gen: torch.Generator, seed: int, k: int, global_batch: int, shape: tuple, num_timesteps: int,
               rows: slice) -> dict[str, torch.Tensor]:
    """Noise, VAE sampling noise, timestep and dropout draw of this rank's rows of global batch ``k``.

    Drawn for the whole global batch from a generator seeded by (seed, k): resuming at ``k`` draws the same,
    and 2 processes of batch b draw what 1 process of batch 2b draws.
    """
    gen.manual_seed((seed * 1_000_003 + k) % (2**63 - 1))
    dev = gen.device
    draws = {"noise": torch.randn((global_batch, *shape), generator=gen, device=dev),
             "vae_eps": torch.randn((global_batch, *shape), generator=gen, device=dev),
             "t": torch.randint(0, num_timesteps, (global_batch,), generator=gen, device=dev),
             "u": torch.rand(global_batch, generator=gen, device=dev),
             # flow matching's timestep densities read these (drawn after the others: DDPM runs draw as before)
             "t_uniform": torch.rand(global_batch, generator=gen, device=dev),
             "t_normal": torch.randn(global_batch, generator=gen, device=dev)}
    return {name: t[rows] for name, t in draws.items()}


def loss_for(model: nn.Module, m: Models, cfg: TrainConfig, feats: dict, uncond: dict, d: dict) -> torch.Tensor:
    """MSE between the denoiser's prediction and the family's target on one batch of features (DDPM: the
    scheduler's prediction type; flow matching: the velocity noise - x0, optionally weighted per sample)."""
    x0 = (feats["latent_mean"] + feats["latent_std"] * d["vae_eps"] - m.shift) * m.scaling
    noisy, timesteps, target, weighting = m.family.diffuse(x0, d, m)
    # one draw per sample: [0, pi) image dropped, [pi, pi+pt) text dropped, [pi+pt, pi+pt+pb) both
    u, pi, pt, pb = d["u"], cfg.drop_image, cfg.drop_text, cfg.drop_both
    drop_image = (u < pi) | ((u >= pi + pt) & (u < pi + pt + pb))
    drop_text = (u >= pi) & (u < pi + pt + pb)
    image = feats["image"]
    image = torch.where(drop_image.view(-1, *[1] * (image.ndim - 1)), uncond["image"].to(image), image)
    text = torch.where(drop_text[:, None, None], uncond["text"].to(feats["text"]), feats["text"]).to(m.dtype)
    added = m.family.added_conditioning(feats, uncond, drop_text, m.dtype, m.extra)
    pred = model(noisy, timesteps, text, image, added)
    if weighting is None:
        return F.mse_loss(pred.float(), target.float())
    return (weighting.float() * (pred.float() - target.float()) ** 2).mean()


# ------------------------------------------------------------------------------------------------- the data
def feature_cache(cfg: TrainConfig, m: Models, records: list, buckets: list, num_items: int):
    """The FeatureCache for this run (None when not caching); its fingerprint names all its inputs."""
    from .cache import FeatureCache

    root = cfg.cache
    if not root:
        return None
    if root == "auto":
        est = estimate_cache_bytes(cfg, m, buckets) * num_items
        if cfg.random_crop or est > cfg.cache_auto_gb * 1e9:
            return None
        root = str(Path(cfg.output) / "cache")
    if cfg.random_crop:
        raise IPAdapterError("--cache with random_crop: crops are drawn every step and cannot be cached; turn "
                             "random_crop off or train without a cache (\"cache\": null)")

    def ident(p: Path) -> list:
        return [str(p.resolve()), *((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ())]

    weights = [ident(f) for sub in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                    "tokenizer_2", "tokenizer_3")
               for f in sorted((m.path / sub).glob("*")) if f.is_file()]
    if cfg.kind != "faceid":
        enc = image_encoder_dir(cfg)
        weights += [ident(f) for f in sorted(enc.glob("*")) if f.is_file()]
        weights += [ident(f) for f in sorted((m.path / "feature_extractor").glob("*")) if f.is_file()]
    data = [ident(Path(p)) for p in sorted(glob.glob(cfg.data))] if any(c in cfg.data for c in "*?[") else \
        ident(Path(cfg.data))
    info = {"model": str(m.path.resolve()), "weights": weights, "data": data,
            "data_root": str(Path(cfg.data_root).resolve()) if cfg.data_root else None,
            "records": _digest(f"{r.name}\t{r.text}\t{r.face if isinstance(r.face, D.Blob) else bool(r.face)}"
                               + (f"\t{r.prompt.name}" if r.prompt is not None else "") for r in records),
            "feature": FEATURE[cfg.kind], "buckets": buckets,
            "flip": cfg.random_flip, "dtype": cfg.cache_dtype, "frozen_dtype": str(m.dtype),
            **({"text": text} if (text := m.family.cache_facts(m.extra)) else {})}
    return FeatureCache(root, info, num_items, cfg.cache_shard_size)


def _digest(lines) -> str:
    import hashlib

    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "replace") + b"\n")
    return h.hexdigest()[:16]


def estimate_cache_bytes(cfg: TrainConfig, m: Models, buckets: list) -> float:
    """Bytes per cached item (latent moments, text states, image feature), from the component configs."""
    h, w = buckets[0]
    channels = _read_json(m.path / "vae" / "config.json").get("latent_channels", 4)
    latents = 2 * channels * (h // m.vae_factor) * (w // m.vae_factor) * (2 if cfg.random_flip else 1)
    text = m.family.text_elements(m.unet, m.extra)
    if cfg.kind == "faceid":
        image = 512
    else:
        enc = _read_json(image_encoder_dir(cfg) / "config.json")
        enc = enc.get("vision_config", enc)
        image = enc.get("projection_dim", 768) if cfg.kind == "global" else \
            ((enc.get("image_size", 224) // enc.get("patch_size", 14)) ** 2 + 1) * enc.get("hidden_size", 1024)
    return (latents + text + image) * (4 if cfg.cache_dtype == "float32" else 2)


def build_cache(cache, cfg: TrainConfig, m: Models, adapter: Adapter, records: list, transform: D.Transform,
                accelerator, log) -> None:
    """Encode every item once (this rank's share of the missing shards) and write the shards."""
    load_encoders(m, cfg, cfg.kind != "faceid")
    transform.tokenizers = m.tokenizers
    dataset = D.ImageTextDataset(records, transform)
    store = getattr(torch, cfg.cache_dtype)
    variants = 2 if cfg.random_flip else 1
    workers = default_workers(cfg, accelerator)
    chunk = max(cfg.batch_size, 16)

    def encode_items(items: list[int]) -> tuple[dict, list]:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=[(i, -1, -1) for i in items], num_workers=workers)
        groups: dict[int, list[dict]] = {}
        bad: list = []
        pending: dict[int, list[dict]] = {}

        def flush(b: int) -> None:
            samples = pending.pop(b, [])
            if not samples:
                return
            batch = {"pixels": torch.cat([s["pixels"] for s in samples]),
                     "time_ids": torch.cat([s["time_ids"] for s in samples]),
                     "ids": [torch.stack([s["ids"][j] for s in samples]) for j in range(len(samples[0]["ids"]))]}
            for key in ("clip", "face"):
                if key in samples[0]:
                    batch[key] = torch.stack([s[key] for s in samples])
            feats = encode(m, batch, cfg.kind, variants)
            feats = {k: v.to(store) if v.is_floating_point() else v for k, v in feats.items()}
            feats["item"] = torch.tensor([s["item"] for s in samples])
            feats["mode"] = torch.tensor([hash(s["mode"]) % 2**31 if s["mode"] else 0 for s in samples])
            groups.setdefault(b, []).append(feats)
            for s in samples:
                if s["mode"]:
                    bad.append([s["item"], "converted", s["mode"], ""])

        for sample in loader:
            if "bad" in sample:
                reason, name, detail = sample["bad"]
                bad.append([sample["item"], reason, name, detail])
                continue
            pending.setdefault(sample["bucket"], []).append(sample)
            if len(pending[sample["bucket"]]) >= chunk:
                flush(sample["bucket"])
        for b in list(pending):
            flush(b)
        merged = {b: {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "mode"}
                  for b, parts in groups.items()}
        return merged, bad

    def progress(done: int, total: int) -> None:
        log(f"cache: shard {done}/{total} written on rank {accelerator.process_index}", quiet=True)

    todo = len(cache.missing())
    if todo:
        log(f"cache: computing features of {len(records)} items into {cache.dir} ({todo} shards to write)")
    cache.build(encode_items, lambda: {k: v.to(store) for k, v in uncond_features(m, adapter).items()},
                accelerator.process_index, accelerator.num_processes, progress)
    accelerator.wait_for_everyone()


def default_workers(cfg: TrainConfig, accelerator) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    if accelerator.device.type == "cpu":
        return 0  # the CPU is busy with the model; decoding in the main process is the fair share
    return max(0, min(8, (os.cpu_count() or 1) // max(1, accelerator.num_processes) - 1))


class StepKeys(torch.utils.data.Sampler):
    """Loader keys of this rank's rows of global batches ``start ... end-1`` (uncached training)."""

    def __init__(self, order: D.BatchOrder, start: int, end: int, rank: int, batch: int):
        self.order, self.start, self.end, self.rank, self.b = order, start, end, rank, batch

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        for k in range(self.start, self.end):
            _, items = self.order.batch(k)
            rows = range(self.rank * self.b, (self.rank + 1) * self.b)
            yield [(int(items[r]), k, r) for r in rows]


# ---------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT = re.compile(r"^step-(\d+)$")


def checkpoints(output: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place), oldest first."""
    folder = Path(output) / "checkpoints"
    found = [(int(mt.group(1)), p) for p in folder.glob("step-*") if (mt := CHECKPOINT.match(p.name))] \
        if folder.is_dir() else []
    return sorted(f for f in found if (f[1] / "state.pt").is_file())


def _save_synced(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    state = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": [state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:]]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- logging
class Log:
    """Lines to stderr (above the progress bar) and to OUTPUT/train.log, main process only."""

    def __init__(self, output: Path, main: bool):
        self.main = main
        self.file = open(output / "train.log", "a") if main else None  # noqa: SIM115 - closed in close()
        self.bar = None

    def __call__(self, message: str, quiet: bool = False) -> None:
        if not self.main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"{stamp} {message}\n")
        self.file.flush()
        if not quiet:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.file:
            self.file.close()


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint and leaves. A second Ctrl-C kills at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        self.__exit__()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# --------------------------------------------------------------------------------------------------- train
def train(config: TrainConfig) -> Path:
    """Train an adapter as ``config`` says; returns OUTPUT/ip-adapter.safetensors (official layout).

    Raises :class:`IPAdapterError` on bad input, too many bad items or a NaN loss (the last good checkpoint
    is kept), and ``KeyboardInterrupt`` after saving a checkpoint on Ctrl-C.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    cfg = dataclasses.replace(config).check()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # in-process callers may train several times, differently
        AcceleratorState._reset_state()
        GradientState._reset_state()
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cpu, step_scheduler_with_optimizer=False)
    out = Path(cfg.output)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    log = Log(out, accelerator.is_main_process)
    cfg.mixed_precision = accelerator.mixed_precision
    try:
        run = Run(cfg, accelerator, log)
        setup_models(run)
        setup_data(run)
        pretrain_projection(run)
        setup_optimizer(run)
        resume(run)
        run_loop(run)
        return write_final(run)
    finally:
        log.close()


@dataclass
class Run:
    """One training run: its settings, processes and every piece the steps below build and share, in order:
    :func:`setup_models`, :func:`setup_data`, :func:`setup_optimizer`, :func:`resume`, :func:`run_loop`
    (which calls :func:`save_checkpoint`) and :func:`write_final`."""

    cfg: TrainConfig
    accelerator: object
    log: Log
    # setup_models
    m: Models | None = None
    adapter: Adapter | None = None
    params: list = field(default_factory=list)
    # setup_data
    bad: D.BadItems | None = None
    records: list = field(default_factory=list)
    total: int = 0
    transform: D.Transform | None = None
    cache: object | None = None  # the FeatureCache, None when features are computed per batch
    cached: object | None = None  # the opened cache
    uncond: dict = field(default_factory=dict)  # what a dropped condition becomes
    order: D.BatchOrder | None = None
    bucket_of: object | None = None
    # setup_optimizer
    model: nn.Module | None = None  # the Trainee, as accelerate wrapped it
    optimizer: object | None = None
    scheduler: object | None = None
    ema: list | None = None
    sharded_state: bool = False
    multiple: int = 1  # image sides are multiples of this (VAE factor x the family's latent multiple)
    # resume / run_loop
    step: int = 0
    last_saved: int | None = None

    def __post_init__(self) -> None:
        a = self.accelerator
        self.rank, self.world, self.main, self.device = a.process_index, a.num_processes, a.is_main_process, a.device
        self.out = Path(self.cfg.output)
        self.frozen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.mixed_precision, torch.float32)
        self.global_batch = self.cfg.batch_size * self.world

    def distributed(self, *kinds: str) -> bool:
        """Whether accelerate runs one of these ``DistributedType`` names (DEEPSPEED, FSDP, ...)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in tuple(DistributedType[k] for k in kinds)


def setup_models(run: Run) -> None:
    """The frozen UNet in the compute type, and the new adapter (fp32 master weights) attached to it."""
    cfg, log = run.cfg, run.log
    m = run.m = load_models(cfg, run.device, run.frozen)
    cfg.kind = cfg.kind or m.family.default_kind
    cfg.resolution = cfg.resolution or m.family.train_resolution(m.unet, m.vae_factor)
    run.multiple = m.vae_factor * m.family.latent_multiple(m.unet)
    if cfg.resolution % run.multiple:
        raise IPAdapterError(f"--resolution {cfg.resolution}: must be a multiple of {run.multiple} for this model "
                             f"({m.variant})")
    adapter = run.adapter = make_adapter(cfg, m.unet)
    attach(m.unet, adapter)
    if cfg.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
    if next(m.unet.parameters()).dtype != run.frozen:
        m.unet.to(dtype=run.frozen)  # the frozen weights in the compute type; the adapter stays fp32 (master weights)
    adapter.float().requires_grad_(True)
    run.params = list(adapter.parameters())
    objective = "flow matching" if m.prediction_type == "flow" else m.prediction_type
    log(f"model {m.path} ({m.variant}, {objective}); {adapter.config.describe()}, "
        f"{sum(p.numel() for p in run.params):,} trainable parameters; {run.world} process(es) on {run.device}")


def setup_data(run: Run) -> None:
    """The items, their buckets, and their features: from the cache (built first if needed) or per batch."""
    cfg, m, log, device = run.cfg, run.m, run.log, run.device
    bad = run.bad = D.BadItems()
    records = run.records = D.read_records(cfg.data, cfg.data_root, bad, D.Source.of(cfg))
    total = run.total = len(records) + bad.count
    bad.check(total, cfg.max_bad_fraction, f"--data {cfg.data}")
    use_buckets = m.sdxl if cfg.buckets is None else cfg.buckets
    buckets = D.make_buckets(cfg.resolution, run.multiple) if use_buckets else [(cfg.resolution, cfg.resolution)]
    transform = run.transform = D.Transform(buckets, [], None, cfg.kind == "faceid", cfg.random_crop,
                                            cfg.random_flip, cfg.seed)
    cache = run.cache = feature_cache(cfg, m, records, buckets, len(records))
    if cache is not None:
        if not cache.complete:
            transform.clip_processor = clip_processor(cfg, m)
            build_cache(cache, cfg, m, run.adapter, records, transform, run.accelerator, log)
        in_memory = cache.nbytes() < _memory_budget()
        on_device = in_memory and (device.type == "cpu" or cache.nbytes() < 0.1 * _device_memory(device))
        cached = run.cached = cache.open(device if on_device else "cpu", in_memory)
        for item, reason, name, detail in cached.bad:
            if reason == "converted":
                bad.add_mode(name, item)
            else:
                bad.add(reason, name, item, detail)
        run.uncond = cached.uncond
        run.bucket_of = cached.bucket_of
        log(f"cache: {cache.dir} ({cache.nbytes() / 1e6:.1f} MB, "
            f"{'on ' + str(device) if on_device else 'in memory' if in_memory else 'memory-mapped'})")
        m.vae = None
        m.text_encoders, m.image_encoder = [], None  # training from the cache needs only the UNet
    else:
        load_encoders(m, cfg, cfg.kind != "faceid")
        transform.tokenizers, transform.clip_processor = m.tokenizers, clip_processor(cfg, m)
        run.uncond = uncond_features(m, run.adapter)
        run.bucket_of = D.scan_buckets(records, buckets, bad) if len(buckets) > 1 else \
            np.zeros(len(records), np.int64)
    bad.check(total, cfg.max_bad_fraction, f"--data {cfg.data}")
    if bad.count or bad.converted:
        log(f"data: {bad.summary(total)}")
    run.order = D.BatchOrder(run.bucket_of, run.global_batch, cfg.seed)


PRETRAIN_KINDS = ("plus", "full")  # projections that read the penultimate states alone


@torch.no_grad()
def pretrain_features(run: Run, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate states [n, S, H], projected embeddings [n, E]) of the prompt images of ``n`` training items
    (a seeded draw; unreadable ones left out), from one pass of the frozen image encoder."""
    cfg, m = run.cfg, run.m
    encoder = m.image_encoder or load_image_encoder(m, cfg)
    processor = run.transform.clip_processor or clip_processor(cfg, m)
    order = np.random.default_rng(cfg.seed).permutation(len(run.records))
    pens, embeds, chunk = [], [], []

    def flush() -> None:
        pixels = processor(images=chunk, return_tensors="pt").pixel_values
        out = encoder.model(pixels.to(m.device, m.dtype), output_hidden_states=True)
        if getattr(out, "image_embeds", None) is None:
            raise IPAdapterError(f"projection_pretrain: the image encoder {image_encoder_dir(cfg)} has no projected "
                                 "embedding to fit to (use a CLIPVisionModelWithProjection folder, or leave it 0)")
        pens.append(out.hidden_states[-2])  # in the frozen weights' type: ViT-H's are 0.7 MB per image in bf16
        embeds.append(out.image_embeds.float())
        chunk.clear()

    from tqdm.auto import tqdm

    bar = tqdm(total=min(n, len(order)), desc="projection pretrain: features", unit="image", dynamic_ncols=True,
               file=sys.stderr, disable=not (run.main and cfg.progress))
    for item in order:
        if bar.n >= n:
            break
        rec = run.records[int(item)]
        try:
            img, _ = D.decode_image(rec.prompt if rec.prompt is not None else rec.image)
        except Exception:  # noqa: BLE001 - an unreadable item is already counted as bad by the data setup
            continue
        chunk.append(img)
        bar.update(1)
        if len(chunk) == 64:
            flush()
    if chunk:
        flush()
    bar.close()
    if not pens:
        raise IPAdapterError(f"projection_pretrain: no readable prompt image in --data {cfg.data}")
    return torch.cat(pens), torch.cat(embeds)


def pretrain_projection(run: Run) -> None:
    """``projection_pretrain`` steps before the denoiser trains (a new adapter only; a resume reads the weights):
    the projection's mean token, through a throwaway linear head, learns to predict the encoder's own projected
    embedding (1 - cosine), AdamW 1e-3 with a short warm-up and a cosine decay, batches of 256. The projection
    starts from what the encoder already summarises, and the denoiser's loss moves it from there."""
    cfg, log = run.cfg, run.log
    if not cfg.projection_pretrain or (cfg.resume and checkpoints(run.out)):
        return
    if cfg.kind not in PRETRAIN_KINDS:
        raise IPAdapterError(f"projection_pretrain: for kinds that read patch states alone ({', '.join(PRETRAIN_KINDS)}"
                             f"), not {cfg.kind}")
    pen, target = pretrain_features(run, cfg.projection_pretrain_images)
    proj = run.adapter.image_proj
    width = run.adapter.config.cross_attention_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the run's own draws stay as they were
        torch.manual_seed(cfg.seed)
        head = nn.Linear(width, target.shape[1]).to(run.device)
    params = [*proj.parameters(), *head.parameters()]
    steps, batch = cfg.projection_pretrain, min(256, len(pen))
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))

    def distance(rows: torch.Tensor) -> torch.Tensor:
        tokens = proj(pen[rows].float())
        return 1 - F.cosine_similarity(head(tokens.mean(1)), target[rows], dim=-1).mean()

    from tqdm.auto import tqdm

    with torch.no_grad():
        first = distance(torch.arange(min(len(pen), 1024))).item()
    for _ in tqdm(range(steps), desc="projection pretrain", unit="step", dynamic_ncols=True, file=sys.stderr,
                  disable=not (run.main and cfg.progress)):
        loss = distance(torch.randint(0, len(pen), (batch,), generator=gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        last = distance(torch.arange(min(len(pen), 1024))).item()
    optimizer.zero_grad(set_to_none=True)
    log(f"projection pretrain: {steps} steps on {len(pen)} images' features; cosine distance to the encoder's "
        f"embedding {first:.4f} -> {last:.4f}")


def setup_optimizer(run: Run) -> None:
    """Optimiser, schedule, EMA; accelerate wraps model + optimiser + schedule (DDP syncs the adapter's grads)."""
    cfg = run.cfg
    model = Trainee(run.m.unet, run.adapter, run.m.family, run.m.extra)
    groups: list = run.params
    if cfg.projection_lr is not None:  # its own group (one group otherwise: checkpoints of either kind resume)
        own = {id(p) for p in run.adapter.image_proj.parameters()}
        groups = [{"params": [p for p in run.params if id(p) not in own]},
                  {"params": [p for p in run.params if id(p) in own], "lr": cfg.projection_lr}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.max_steps) / cfg.max_steps))
        return warm

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    if run.distributed("DEEPSPEED"):
        run.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    run.model, run.optimizer, run.scheduler = run.accelerator.prepare(model, optimizer, scheduler)
    run.ema = [p.detach().clone().float() for p in run.params] if cfg.ema_decay else None
    run.sharded_state = run.distributed("DEEPSPEED", "FSDP")


def resume(run: Run) -> None:
    """Remove half-written checkpoints; with ``resume``, continue from the newest complete one."""
    cfg, out, log = run.cfg, run.out, run.log
    if run.main:
        for stale in (out / "checkpoints").glob(".step-*.tmp") if (out / "checkpoints").is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # a save killed half-way
    if cfg.resume and (found := checkpoints(out)):
        run.step, path = found[-1]
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        _check_resume(state, cfg, run.global_batch, log)
        if run.sharded_state:
            run.accelerator.load_state(str(path / "accelerate"))
        else:
            run.adapter.load_state_dict(state["adapter"])
            run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["lr_scheduler"])
        if run.ema is not None and state.get("ema") is not None:
            for e, saved in zip(run.ema, state["ema"]):
                e.copy_(saved)
        rng_file = path / f"rng-{run.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        log(f"resumed from {path} (step {run.step})")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting at step 0")
    run.last_saved = checkpoints(out)[-1][0] if checkpoints(out) else None


def official_weights(run: Run) -> dict[str, torch.Tensor]:
    """The adapter's tensors (EMA weights when on). Collective under FSDP: call on every rank."""
    if run.distributed("FSDP"):  # parameters are sharded: gather them
        full = run.accelerator.get_state_dict(run.model)
        return {k[len("adapter."):]: v for k, v in full.items() if k.startswith("adapter.")}
    if run.ema is not None:
        return {name: e for (name, _), e in zip(run.adapter.named_parameters(), run.ema)}
    return run.adapter.state_dict()


def save_checkpoint(run: Run, step: int) -> Path:
    """Everything a resume needs, written to a temporary folder and renamed into place (atomic)."""
    cfg, accelerator, adapter = run.cfg, run.accelerator, run.adapter
    folder = run.out / "checkpoints"
    final, tmp = folder / f"step-{step:06d}", folder / f".step-{step:06d}.tmp"
    run.last_saved = step
    if final.is_dir():
        return final
    if run.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_synced(rng_state(), tmp / f"rng-{run.rank}.pt")
    if run.sharded_state:
        accelerator.save_state(str(tmp / "accelerate"))
    weights = official_weights(run)
    accelerator.wait_for_everyone()
    if run.main:
        from ..core.checkpoint import write_checkpoint

        write_checkpoint(tmp / "ip-adapter.safetensors", adapter.config, weights)
        state = {"step": step, "batches": step * cfg.grad_accum, "global_batch": run.global_batch,
                 "world": run.world, "adapter": None if run.sharded_state else adapter.state_dict(),
                 "optimizer": None if run.sharded_state else run.optimizer.state_dict(),
                 "lr_scheduler": run.scheduler.state_dict(), "ema": run.ema,
                 "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                 "bad": {"skipped": dict(run.bad.skipped), "converted": dict(run.bad.converted)}}
        _save_synced(state, tmp / "state.pt")
        if os.environ.get("IPADAPTER_TEST_SAVE_SLEEP"):  # tests kill the process here, mid-save
            time.sleep(float(os.environ["IPADAPTER_TEST_SAVE_SLEEP"]))
        publish(tmp, final)
        for _, old in checkpoints(run.out)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def batches(run: Run, start: int):
    """(k, features of this rank's rows of global batch k, bad items, converted modes) for k = start, ..."""
    cfg, device = run.cfg, run.device
    end = cfg.max_steps * cfg.grad_accum
    rows = slice(run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size)
    if run.cache is not None:
        variants = 2 if cfg.random_flip else 1
        for k in range(start, end):
            bucket, items = run.order.batch(k)
            feats = run.cached.gather(bucket, items[rows])
            variant = None
            if variants > 1:
                flips = D.augment_draws(cfg.seed, k, run.global_batch)[rows, 0] < 0.5
                variant = torch.from_numpy(flips.astype(np.int64)).to(device)
            yield k, pick_variant(feats, variant), [], []
        return
    workers = default_workers(cfg, run.accelerator)
    dataset = D.ImageTextDataset(run.records, run.transform, run.order, run.bucket_of)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepKeys(run.order, start, end, run.rank, cfg.batch_size), num_workers=workers,
        collate_fn=D.collate, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    for k, batch in zip(range(start, end), loader):
        yield k, pick_variant(encode(run.m, batch, cfg.kind), None), batch["bad"], batch["modes"]


def run_loop(run: Run) -> None:
    """The steps: accumulate, clip, step, EMA; at check points log, validate and checkpoint; Ctrl-C saves."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    writer = _tensorboard(run.out, run.log) if run.main and cfg.tensorboard else None
    rows = slice(run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size)
    gen = torch.Generator(run.device)
    T = run.m.num_timesteps
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (run.main and cfg.progress), file=sys.stderr)
    run.log.bar = bar
    checks = CheckPoints(run, writer)
    source = batches(run, run.step * cfg.grad_accum)
    with StopRequest() as stop:
        try:
            while run.step < cfg.max_steps:
                step_loss = None
                for _ in range(cfg.grad_accum):
                    k, feats, bad_items, modes = next(source)
                    for item, reason, name, detail in bad_items:
                        run.bad.add(reason, name, item, detail)
                    for item, mode in modes:
                        run.bad.add_mode(mode, item)
                    d = step_draws(gen, cfg.seed, k, run.global_batch, tuple(feats["latent_mean"].shape[1:]), T, rows)
                    with accelerator.accumulate(run.model):
                        loss = loss_for(run.model, run.m, cfg, feats, run.uncond, d)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                        run.optimizer.step()
                        run.optimizer.zero_grad(set_to_none=True)
                    step_loss = loss.detach() / cfg.grad_accum if step_loss is None else \
                        step_loss + loss.detach() / cfg.grad_accum
                run.scheduler.step()
                if run.ema is not None:
                    torch._foreach_lerp_(run.ema, [p.detach() for p in run.params], 1.0 - cfg.ema_decay)
                run.step += 1
                bar.update(1)
                checks.after_step(step_loss, stop.signal)
        finally:
            bar.close()
            if writer is not None:
                writer.close()


class CheckPoints:
    """What happens between steps: the losses of a window of steps and the bad-item and stop counts are
    synchronised only at check points (every ``log_every`` steps, and where a save, a validation or a stop is
    due), which log, stop on a NaN or too many bad items, validate and save."""

    def __init__(self, run: Run, writer) -> None:
        self.run, self.writer = run, writer
        self.window: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last check: no per-step sync
        self.last_check, self.last_time = run.step, time.perf_counter()

    def after_step(self, step_loss: torch.Tensor, stop_signal) -> None:
        run, cfg = self.run, self.run.cfg
        step = run.step
        self.window.append((step, step_loss))
        due_save = step % cfg.save_every == 0 or step == cfg.max_steps
        due_val = cfg.validate_every and step % cfg.validate_every == 0 and cfg.validation_images
        if not (step % cfg.log_every == 0 or due_save or due_val or (run.world == 1 and stop_signal)):
            return
        flags = self.sync(stop_signal)
        if due_val and run.main:
            validate(cfg, run.m, run.accelerator.unwrap_model(run.model), run.ema, run.params, step, self.writer,
                     run.log, run.accelerator)
        if due_val:
            run.accelerator.wait_for_everyone()
        if due_save:
            save_checkpoint(run, step)
        if flags[0] > 0:
            path = save_checkpoint(run, step)
            run.log(f"interrupted at step {step}: checkpoint saved to {path}; continue with --resume")
            raise KeyboardInterrupt

    def sync(self, stop_signal) -> torch.Tensor:
        """One sync for the window's losses, bad items and stop requests; log; raise on NaN or bad data.
        Returns the summed [stop requested, bad items] of every process."""
        run, cfg = self.run, self.run.cfg
        step, accelerator, bad = run.step, run.accelerator, run.bad
        flags = torch.tensor([float(stop_signal is not None), float(bad.count)], device=run.device)
        losses = torch.stack([loss for _, loss in self.window])
        if run.world > 1:
            losses = accelerator.reduce(losses, "mean")
            flags = accelerator.reduce(flags, "sum")
        values = losses.tolist()
        for (s, _), v in zip(self.window, values):
            if not math.isfinite(v):
                keep = f"the last good checkpoint is {run.out / 'checkpoints' / f'step-{run.last_saved:06d}'}" \
                    if run.last_saved is not None else "no checkpoint was saved before it"
                raise IPAdapterError(
                    f"loss is {v} at step {s}: training stopped; {keep} (resume from it with --resume, "
                    "perhaps with a lower --lr or max_grad_norm)")
        now = time.perf_counter()
        rate = (step - self.last_check) / max(now - self.last_time, 1e-9)
        lr = run.scheduler.get_last_lr()[0]
        mean_loss = sum(values) / len(values)
        run.log.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", mean_loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/steps_per_s", rate, step)
        run.log(f"step {step}: loss {mean_loss:.5f}, lr {lr:.2e}, {rate:.2f} steps/s", quiet=True)
        if flags[1] > cfg.max_bad_fraction * run.total:  # every rank sees the same sum: all stop together
            raise IPAdapterError(
                f"--data {cfg.data}: {int(flags[1])} of {run.total} items are unusable (over the "
                f"{cfg.max_bad_fraction:.0%} limit) - {bad.summary(run.total).splitlines()[0]} on this process; "
                "fix the data or the paths (--data-root) and run again")
        self.window, self.last_check, self.last_time = [], step, now
        return flags


def write_final(run: Run) -> Path:
    """The adapter file, in the official layout (after a last checkpoint if the final step has none)."""
    final = run.out / "ip-adapter.safetensors"
    if run.last_saved != run.step:
        save_checkpoint(run, run.step)
    weights = official_weights(run)
    if run.main:
        from ..core.checkpoint import write_checkpoint

        write_checkpoint(final, run.adapter.config, weights)
        if run.bad.count or run.bad.converted:
            run.log(f"data: {run.bad.summary(run.total)}")
        run.log(f"wrote {final}")
    run.accelerator.wait_for_everyone()
    return final


def _check_resume(state: dict, cfg: TrainConfig, global_batch: int, log) -> None:
    saved = state.get("config", {})
    for name in ("kind", "num_tokens", "resolution"):
        if saved.get(name) != getattr(cfg, name):
            raise IPAdapterError(f"--resume: the checkpoint was trained with {name} = {saved.get(name)!r}, this run "
                                 f"has {getattr(cfg, name)!r}; use another --output or the same setting")
    if state.get("global_batch") != global_batch or saved.get("grad_accum") != cfg.grad_accum:
        log(f"--resume: global batch was {state.get('global_batch')} x {saved.get('grad_accum')} accumulation, now "
            f"{global_batch} x {cfg.grad_accum}; training continues, but not on the exact batches of an unbroken run")


def _memory_budget() -> float:
    try:
        return 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4e9


def _device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return _memory_budget() * 4


def _tensorboard(out: Path, log):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard is not installed (pip install tensorboard); logging to train.log only")
        return None
    return SummaryWriter(str(out / "logs"))


# ----------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(cfg: TrainConfig, m: Models, model: Trainee, ema, params, step: int, writer, log, accelerator) -> None:
    """Generate for the fixed prompt images with the current (EMA) weights; log the images and their CLIP-I."""
    from ..core.encoders import load_image
    from ..generation.pipeline import IPAdapter, save_png

    if cfg.kind == "faceid":
        log("validation: skipped for faceid adapters (prompts are face embeddings, CLIP-I does not apply)")
        return
    if m.image_encoder is None:  # trained from the cache: load the encoders the first time they are needed
        load_image_encoder(m, cfg)
    if m.pipeline is None:
        pipe = m.family.validation_pipeline(m.path, model.unet, m.extra, lambda part: frozen(part, m.device, m.dtype))
        pipe.set_progress_bar_config(disable=True)
        m.pipeline = pipe.to(m.device)
    pipe = m.pipeline
    saved = None
    if ema is not None:  # validate what would be written: the EMA weights
        saved = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.data.copy_(e)
    runtime = runtime_of(model.unet)
    hint = runtime.cfg_hint
    folder = Path(cfg.output) / "validation" / f"step-{step:06d}"
    scores = []
    try:
        ip = IPAdapter(pipe, [model.adapter], m.image_encoder)
        with accelerator.autocast():
            for i, file in enumerate(cfg.validation_images):
                prompt = load_image(file)
                image = ip.generate(images=[prompt], prompt=cfg.validation_prompt, scale=cfg.validation_scale,
                                    num_inference_steps=cfg.validation_steps, seed=i, height=cfg.resolution,
                                    width=cfg.resolution)[0]
                save_png(image, folder / f"{i:02d}.png", f"step {step}, prompt image {file}")
                out = m.image_encoder.model(m.image_encoder.pixels([image, prompt]))
                emb = getattr(out, "image_embeds", None)
                emb = (out.pooler_output if emb is None else emb).float()  # SigLIP: its pooled output
                scores.append(float(F.cosine_similarity(emb[0:1], emb[1:2]).item()))
                if writer is not None:
                    arr = torch.from_numpy(np.array(image)).permute(2, 0, 1)
                    writer.add_image(f"validation/{i:02d}", arr, step)
    finally:
        runtime.cfg_hint = hint
        model.adapter.state.set_tokens(None)
        if saved is not None:
            for p, s in zip(params, saved):
                p.data.copy_(s)
    clip_i = sum(scores) / len(scores)
    if writer is not None:
        writer.add_scalar("validation/clip_i", clip_i, step)
    log(f"validation at step {step}: CLIP-I {clip_i:.4f} over {len(scores)} prompt image(s) -> {folder}")
