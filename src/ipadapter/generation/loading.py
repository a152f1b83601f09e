"""What users have on disk: the device and precision to run on, single-file models, and LoRAs.

    device = resolve_device("cuda")                   # checked before anything loads
    dtype = resolve_dtype("bf16", device)             # default: fp16 on cuda/mps, fp32 on cpu
    pipe = load_model("dreamshaper.safetensors", config="stable-diffusion-v1-5/stable-diffusion-v1-5",
                      device=device, dtype=dtype)     # a diffusers folder or hub id works too
    apply_loras(pipe, [("style.safetensors", 0.8)])    # diffusers/peft or kohya layout

Single files are the original Stable Diffusion layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*`` / ``conditioner.*``), read by diffusers' ``from_single_file``; the family (SD 1.x, SD 2.x,
SDXL) comes from the keys. LoRAs go through diffusers' ``load_lora_weights``/``set_adapters`` (peft), so the
image prompt and the LoRA compose exactly as they do in diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.errors import IPAdapterError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEVICES = "cpu, cuda, cuda:N, mps"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# the diffusers configuration from_single_file reads for each family when no --model-config is given
DEFAULT_CONFIGS = {"SD 1.x": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "SD 2.x": "stabilityai/stable-diffusion-2-1", "SDXL": "stabilityai/stable-diffusion-xl-base-1.0"}


# ----------------------------------------------------------------------------------------- device, dtype
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` checked against this machine and this torch build; None: cuda, then mps, then cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise IPAdapterError(f"device {device!r}: not a device; use one of {DEVICES}") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise IPAdapterError(f"device {device}: this torch is a CPU-only build (no CUDA); use cpu, or install "
                                 "a CUDA build of torch")
        if not torch.cuda.is_available():
            raise IPAdapterError(f"device {device}: no CUDA GPU is visible on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IPAdapterError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                                 f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not _mps_available():
            raise IPAdapterError(f"device {device}: no Apple GPU (MPS) on this machine; use cpu")
    elif dev.type != "cpu":
        raise IPAdapterError(f"device {device}: not supported; use one of {DEVICES}")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """fp16 | bf16 | fp32 (or a torch dtype); None: fp16 on cuda and mps, fp32 on cpu."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise IPAdapterError(f"dtype {dtype}: use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    key = str(dtype).lower().replace("float", "fp").replace("bfloat16", "bf16").replace("bfp16", "bf16")
    if key not in DTYPES:
        raise IPAdapterError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


# ------------------------------------------------------------------------------------------ single files
def is_single_file(model: str | os.PathLike) -> bool:
    path = Path(model)
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir()


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, or of a .ckpt/.pt/.bin read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"{what} {path}: no such file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, pickled code: bad input
        raise IPAdapterError(f"{what} {path}: not a readable checkpoint ({_short(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise IPAdapterError(f"{what} {path}: holds no tensor dictionary (a state dict is expected)")
    return obj


def _keys(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape, without reading the tensors of a .safetensors file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        if not path.is_file():
            raise IPAdapterError(f"{what} {path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as e:  # noqa: BLE001
            raise IPAdapterError(f"{what} {path}: not a readable .safetensors file ({_short(e)})") from None
    return {k: tuple(v.shape) for k, v in read_state_dict(path, what).items()}


def single_file_family(keys: Sequence[str] | dict) -> str:
    """SD 1.x, SD 2.x or SDXL from the keys of an original-layout checkpoint; IPAdapterError otherwise."""
    keys = set(keys)
    if "model.diffusion_model.input_blocks.0.0.weight" not in keys:
        raise IPAdapterError("not a Stable Diffusion checkpoint in the original single-file layout (no "
                             "model.diffusion_model.* UNet keys); give an SD 1.x/2.x/SDXL file or a diffusers folder")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "SD 2.x"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "SD 1.x"
    raise IPAdapterError("a UNet without a text encoder (no cond_stage_model.* / conditioner.* keys): a single file "
                         "needs the whole model (UNet, VAE, text encoder)")


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None, device: str = "cpu",
                     dtype: torch.dtype | None = None, image_encoder: bool = True):
    """A diffusers pipeline from one original-layout file; ``config``: a diffusers folder or hub id of the same
    family whose component configs (and tokenizers, scheduler) to use. Without it, diffusers' default for the
    family must be in the local Hugging Face cache."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    try:
        family = single_file_family(_keys(path, "--model"))
    except IPAdapterError as e:
        raise IPAdapterError(f"--model {path}: {e}") from None
    cls = StableDiffusionXLPipeline if family == "SDXL" else StableDiffusionPipeline
    kwargs: dict = dict(torch_dtype=dtype or torch.float32)
    if family != "SDXL":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    # a single file holds no image encoder: IPAdapter loading finds one (--image-encoder, the config folder's
    # image_encoder/, or beside the adapter file); ``image_encoder`` is kept for the folder form's signature
    kwargs.update(image_encoder=None)
    if config is not None:
        if not Path(config).is_dir() and (str(config).count("/") != 1 or str(config).startswith((".", "/"))):
            raise IPAdapterError(f"--model-config {config}: no such folder, and not a hub id (owner/name)")
        kwargs["config"] = str(config)
    try:
        pipe = cls.from_single_file(str(path), local_files_only=config is None or Path(config).is_dir(), **kwargs)
    except Exception as e:  # noqa: BLE001 - no config in the cache, or a config of another family
        if config is None:
            raise IPAdapterError(
                f"--model {path}: an {family} single file; its diffusers configuration ({DEFAULT_CONFIGS[family]}) "
                f"is not in the local Hugging Face cache; pass --model-config DIR_OR_HUB_ID (a diffusers model "
                f"folder of the same family)") from None
        raise IPAdapterError(f"--model {path}: cannot load it as {family} with --model-config {config} "
                             f"({_short(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_model(model: str | os.PathLike, config: str | os.PathLike | None = None, device: str = "cpu",
               dtype: torch.dtype | None = None, image_encoder: bool = True):
    """A pipeline from a diffusers folder, a hub id, or a single original-layout file (see :func:`load_single_file`)."""
    if is_single_file(model):
        return load_single_file(model, config, device, dtype, image_encoder)
    if config is not None:
        raise IPAdapterError(f"--model-config {config}: only for a single-file --model (.safetensors/.ckpt); "
                             f"{model} is a diffusers folder or hub id with its own configuration")
    from .pipeline import load_pipeline

    return load_pipeline(model, device=device, dtype=dtype, image_encoder=image_encoder)


def single_file_folder(path: str | os.PathLike, config: str | os.PathLike | None, folder: str | os.PathLike) -> Path:
    """The single file written once as a diffusers folder (what the trainer reads), reused while the file is the
    same (size and modification time); the config folder's image_encoder/ and feature_extractor/ are linked in."""
    import json
    import shutil

    path, folder = Path(path), Path(folder)
    stamp = {"source": str(path.resolve()), "size": path.stat().st_size if path.is_file() else -1,
             "mtime": path.stat().st_mtime if path.is_file() else -1}
    mark = folder / "ipadapter-source.json"
    if mark.is_file() and json.loads(mark.read_text()) == stamp:
        return folder
    pipe = load_single_file(path, config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    source = config_folder(path, config)
    for part in ("image_encoder", "feature_extractor"):
        if source is not None and (source / part).is_dir() and not (tmp / part / "config.json").exists():
            shutil.rmtree(tmp / part, ignore_errors=True)
            shutil.copytree(source / part, tmp / part)
    (tmp / "ipadapter-source.json").write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def config_folder(model: str | os.PathLike, config: str | os.PathLike | None) -> Path | None:
    """The local diffusers folder that holds the model's components (where an image_encoder/ may be)."""
    source = config if is_single_file(model) else model
    return Path(source) if source is not None and Path(source).is_dir() else None


# ------------------------------------------------------------------------------------------------- LoRAs
def parse_lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` (weight default 1.0)."""
    head, sep, tail = str(text).rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return str(text), 1.0
        if weight != weight or abs(weight) == float("inf"):
            raise IPAdapterError(f"--lora {text}: the weight must be a finite number")
        return head, weight
    return str(text), 1.0


def apply_loras(pipe, loras: Sequence[tuple[str | os.PathLike, float]], prefix: str = "lora") -> list[str]:
    """Load each (file, weight) into the pipeline with diffusers' ``load_lora_weights`` and activate them all
    with ``set_adapters``; returns the adapter names. A file that does not fit is a one-line error."""
    names, weights = [], []
    for i, (path, weight) in enumerate(loras):
        name = f"{prefix}{i}"
        state = read_state_dict(path, "--lora")
        if not state:
            raise IPAdapterError(f"--lora {path}: holds no tensors")
        before = _lora_layers(pipe, name)
        try:
            pipe.load_lora_weights(state, adapter_name=name)
        except Exception as e:  # noqa: BLE001 - another UNet shape, not a LoRA, peft missing
            _unload(pipe, name)
            raise IPAdapterError(f"--lora {path}: does not fit this model ({_short(e)}); a LoRA for another base "
                                 "model (SD 1.x / SDXL) or not a LoRA file") from None
        if _lora_layers(pipe, name) == before:
            _unload(pipe, name)
            raise IPAdapterError(f"--lora {path}: none of its {len(state)} tensors match a layer of this model "
                                 "(a LoRA for another base model, or not a diffusers/peft or kohya LoRA)")
        names.append(name)
        weights.append(float(weight))
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def _lora_layers(pipe, name: str) -> int:
    count = 0
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        for m in module.modules():
            if name in getattr(m, "lora_A", {}):
                count += 1
    return count


def _unload(pipe, name: str) -> None:
    try:
        pipe.delete_adapters(name)
    except Exception:  # noqa: BLE001 - nothing was loaded
        pass


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__
