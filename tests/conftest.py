"""Shared fixtures: tiny random SD 1.5- and SDXL-shaped pipelines, adapters of every kind, prompt images.

Nothing is downloaded. The pipelines are session-scoped (building the SDXL one costs ~3 s); every test must
leave them as it found them, which :func:`_leave_pipes_clean` checks and repairs after each test.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.bases import detach, unet_layers
from ipadapter.core.adapter import Adapter
from ipadapter.core.config import AdapterConfig, guess_base_family
from ipadapter.testing import random_adapter, tiny_pipeline

SHAPES = ("sd15", "sdxl")
PATCH_AND_GLOBAL = ("global", "plus", "full")
FACEID_KINDS = ("faceid", "faceid-plus", "faceid-portrait")
ALL_KINDS = PATCH_AND_GLOBAL + FACEID_KINDS
LORA_RANK = 4

_PIPES: dict[str, object] = {}


def _pipe(shape: str):
    if shape not in _PIPES:
        _PIPES[shape] = tiny_pipeline(shape)
    return _PIPES[shape]


@pytest.fixture(scope="session")
def sd15_pipe():
    return _pipe("sd15")


@pytest.fixture(scope="session")
def sdxl_pipe():
    return _pipe("sdxl")


@pytest.fixture
def pipe_for():
    """shape -> the session pipeline of that shape (built on first use)."""
    return _pipe


@pytest.fixture(autouse=True)
def _leave_pipes_clean():
    """A failing test must not leak attached adapters into the next one."""
    yield
    for pipe in _PIPES.values():
        if getattr(pipe.unet, "_ipadapter", None) is not None:
            detach(pipe.unet)


# ------------------------------------------------------------------------------------------------- images
def random_image(seed: int = 0, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A noise picture (width, height); different seeds give clearly different CLIP features."""
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.rand(size[1], size[0], channels) * 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


@pytest.fixture(scope="session")
def prompt_images() -> list[Image.Image]:
    return [random_image(seed) for seed in range(3)]


# ----------------------------------------------------------------------------------------------- adapters
def cross_layers(unet) -> dict[int, int]:
    return {layer.index: layer.width for layer in unet_layers(unet) if layer.cross_dim is not None}


def faceid_config(unet, kind: str, encoder=None, lora: bool = True, id_hidden: int = 64,
                  **overrides) -> AdapterConfig:
    """FaceID configs shaped like the public files (LoRA on every attention layer, attn1 and attn2)."""
    layers = unet_layers(unet)
    width = next(layer.cross_dim for layer in layers if layer.cross_dim is not None)
    cfg = AdapterConfig(
        kind=kind, num_tokens=16 if kind == "faceid-portrait" else 4, cross_attention_dim=width, embed_dim=512,
        layer_widths=cross_layers(unet), id_embed_dim=512, id_hidden_dim=id_hidden,
        lora_layers={layer.index: LORA_RANK for layer in layers} if lora and kind != "faceid-portrait" else {},
    )
    cfg.base_family = guess_base_family(width, len(cfg.layer_widths))
    if kind == "faceid-plus":
        cfg.embed_dim = encoder.config.hidden_size
        cfg.resampler_dim, cfg.resampler_depth, cfg.resampler_heads, cfg.resampler_dim_head = width, 2, 1, 64
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_adapter(unet, kind: str, encoder=None, seed: int = 0, **overrides) -> Adapter:
    """A random adapter of any kind for ``unet`` (plus: depth 4 / dim_head 64, what diffusers assumes)."""
    if kind in PATCH_AND_GLOBAL:
        return random_adapter(unet, kind, encoder=encoder, seed=seed, **overrides)
    torch.manual_seed(seed)
    adapter = Adapter(faceid_config(unet, kind, encoder, **overrides))
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # LoRA "up" starts at zero: randomise so LoRA has an effect
    return adapter


@pytest.fixture(scope="session")
def adapter_file(tmp_path_factory):
    """(shape, kind, seed=0) -> path of a saved random adapter for that session pipeline (cached)."""
    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("adapters")

    def make(shape: str, kind: str, seed: int = 0) -> Path:
        key = (shape, kind, seed)
        if key not in cache:
            pipe = _pipe(shape)
            adapter = make_adapter(pipe.unet, kind, encoder=pipe.image_encoder, seed=seed)
            path = folder / f"{shape}-{kind}-{seed}.safetensors"
            adapter.save(path)
            cache[key] = path
        return cache[key]

    return make


# ------------------------------------------------------------------------------------- diffusers as oracle
@contextlib.contextmanager
def diffusers_ip_adapter(pipe, files: list[Path], scales: list[float]):
    """Load ``files`` with diffusers' own IP-Adapter support (the oracle), and undo it completely after."""
    originals = dict(pipe.unet.attn_processors)
    encoder, extractor = pipe.image_encoder, pipe.feature_extractor
    with _processors_read_once(pipe.unet, originals):
        pipe.load_ip_adapter([str(f.parent) for f in files], subfolder=[""] * len(files),
                             weight_name=[f.name for f in files], image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
    try:
        yield pipe
    finally:
        pipe.unload_ip_adapter()
        if getattr(pipe.unet, "text_encoder_hid_proj", 0) is None:  # Kolors: diffusers leaves None behind, and its
            del pipe.unet.text_encoder_hid_proj  # next load_ip_adapter then drops the text projection (not unloaded)
        pipe.unet.set_attn_processor(originals)
        pipe.register_modules(image_encoder=encoder, feature_extractor=extractor)  # unload_ip_adapter drops them


@contextlib.contextmanager
def _processors_read_once(unet, processors: dict):
    """diffusers' IP-Adapter conversion (``_convert_ip_adapter_attn_to_diffusers``, which only reads processors)
    reads ``unet.attn_processors``, a walk over the whole UNet, once per processor: 300 walks on a tiny
    AnimateDiff SDXL UNet, 16 s of a 2-core CPU. While it converts, hand it the dict read before."""
    cls, convert = type(unet), unet._convert_ip_adapter_attn_to_diffusers
    had = "attn_processors" in cls.__dict__
    own = cls.__dict__["attn_processors"] if had else None
    walk = cls.attn_processors.fget

    def converting(*args, **kwargs):
        cls.attn_processors = property(lambda self: dict(processors) if self is unet else walk(self))
        try:
            return convert(*args, **kwargs)
        finally:
            if had:
                cls.attn_processors = own
            else:
                del cls.attn_processors

    unet._convert_ip_adapter_attn_to_diffusers = converting
    try:
        yield
    finally:
        del unet._convert_ip_adapter_attn_to_diffusers


def unet_inputs(pipe, batch: int = 2, seed: int = 0) -> dict:
    """Random UNet inputs (latents, timestep, text states, SDXL's added conditions) for a batch."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    kwargs = {
        "sample": torch.randn(batch, 4, size, size, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g),
        "added_cond_kwargs": {},
    }
    if unet.config.addition_embed_type == "text_time":
        text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return kwargs


@torch.no_grad()
def noise_prediction(pipe, inputs: dict, **added) -> torch.Tensor:
    kwargs = dict(inputs)
    kwargs["added_cond_kwargs"] = {**inputs["added_cond_kwargs"], **added}
    return pipe.unet(**kwargs).sample


GEN = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)
