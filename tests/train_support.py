"""Tiny model folders and image datasets for the trainer's tests (built once per session; nothing downloaded)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ipadapter.testing import tiny_pipeline
from ipadapter.training.train import TrainConfig

_ROOT = Path(tempfile.mkdtemp(prefix="ipadapter-train-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)
_MODELS: dict[str, Path] = {}


def model_dir(shape: str = "sd15") -> Path:
    """A saved tiny diffusers pipeline folder (SD 1.5- or SDXL-shaped) with image_encoder/ and feature_extractor/."""
    if shape not in _MODELS:
        folder = _ROOT / f"model-{shape}"
        tiny_pipeline(shape, folder)
        _MODELS[shape] = folder
    return _MODELS[shape]


def write_dataset(folder: Path, n: int = 12, seed: int = 0, aspects: bool = False, faces: bool = False) -> Path:
    """n small random images (sizes vary; with ``aspects`` square, wide and tall) and data.json; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = [(16, 16), (12, 28), (28, 12)][i % 3] if aspects else (18 + i % 5, 16 + i % 3)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
        item = {"image_file": f"{i:03d}.png", "text": f"picture {i}"}
        if faces:
            item["face_id"] = rng.standard_normal(512).round(4).tolist()
        items.append(item)
    path = folder / "data.json"
    path.write_text(json.dumps(items))
    return path


def config(data: Path, output: Path, shape: str = "sd15", **overrides) -> TrainConfig:
    """Small, quick settings: 16 px images, batch 2, no cache, no TensorBoard or bar, a check every step."""
    values = dict(model=str(model_dir(shape)), data=str(data), output=str(output), resolution=16, batch_size=2,
                  max_steps=3, save_every=100, cache=None, tensorboard=False, progress=False, log_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def transformer_model_dir(family: str) -> Path:
    """A saved tiny FluxPipeline ("flux": CLIP + T5, CLIP image encoder; "flux-schnell": the same without the
    guidance embedding) or StableDiffusion3Pipeline ("sd3": two CLIPs + T5, SigLIP image encoder) folder."""
    from ipadapter.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    if family not in _MODELS:
        folder = _ROOT / f"model-{family}"
        if family == "flux-schnell":
            tiny_flux_pipeline(folder, guidance=False)
        else:
            {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}[family](folder)
        _MODELS[family] = folder
    return _MODELS[family]


#: small settings per transformer family: 16 px (8 x 8 latents), 8 T5 tokens, a small SD3.5 resampler
TRANSFORMER_RUNS = {"flux": dict(max_sequence_length=8), "flux-schnell": dict(max_sequence_length=8),
                    "sd3": dict(max_sequence_length=8, num_tokens=8,
                                adapter={"resampler_dim": 64, "time_embed_dim": 32})}


def transformer_config(family: str, data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(TRANSFORMER_RUNS[family], model=str(transformer_model_dir(family)))
    values.update(overrides)
    return config(data, output, **values)
