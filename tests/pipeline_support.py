"""Tiny random components for every diffusers UNet pipeline that takes an image prompt (tests/test_pipelines.py).

Each pipeline class is built from its ``__init__`` signature: the SD 1.5- or SDXL-shaped pieces of
:mod:`ipadapter.testing`, with the UNet/VAE/ControlNet/adapter variant the class needs (an 8-channel UNet for
InstructPix2Pix, a motion UNet for AnimateDiff, ...), and called with the inputs its ``__call__`` takes, at
32x32 pixels and 2 steps. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipadapter.testing import random_adapter, tiny_pipeline

SIZE = 32  # pixels; the tiny VAE halves it
STEPS = 2
FRAMES = 2

_BASES: dict[str, object] = {}


def base(shape: str):
    """The shared SD 1.5- or SDXL-shaped pipeline whose components every class starts from (built once)."""
    if shape not in _BASES:
        _BASES[shape] = kolors_pipeline() if shape == "kolors" else tiny_pipeline(shape)
    return _BASES[shape]


def shape_of(cls) -> str:
    init = inspect.signature(cls.__init__).parameters
    if cls.__name__.startswith("Kolors"):
        return "kolors"
    return "sdxl" if "text_encoder_2" in init else "sd15"


def _seeded(seed: int, make):
    torch.manual_seed(seed)
    return make()


def _unet_like(unet, **changes):
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # _use_default_values would undo changes
    return _seeded(4, lambda: UNet2DConditionModel.from_config({**config, **changes}))


def _motion_adapter(unet):
    from diffusers import MotionAdapter

    cfg = unet.config
    layers = cfg.transformer_layers_per_block
    return _seeded(5, lambda: MotionAdapter(
        block_out_channels=tuple(cfg.block_out_channels), motion_layers_per_block=cfg.layers_per_block,
        motion_transformer_layers_per_block=layers if isinstance(layers, int) else tuple(layers),
        motion_norm_num_groups=8, motion_num_attention_heads=2, motion_max_seq_length=8,
        motion_transformer_layers_per_mid_block=layers if isinstance(layers, int) else layers[-1],
    ))


def _controlnet(annotation: str, unet):
    import diffusers

    embed = (16, 32)  # one stride-2 step: 32 pixels -> the 16x16 latent
    if "SparseControlNet" in annotation:
        source = _unet_like(unet, down_block_types=list(unet.config.down_block_types))  # from_unet edits the list
        return _seeded(6, lambda: diffusers.SparseControlNetModel.from_unet(  # its simplified embedding (the default)
            source, conditioning_embedding_out_channels=embed, conditioning_channels=4))  # takes VAE latents
    if "ControlNetUnion" in annotation:  # its control-type transformer is 320 wide unless told: the UNet's width
        net = diffusers.ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=embed)
        width = unet.config.block_out_channels[0]
        config = {k: v for k, v in net.config.items() if not k.startswith("_")}  # _use_default_values: see above
        config.update(num_trans_channel=width, num_proj_channel=width, num_trans_head=2)
        return _seeded(6, lambda: diffusers.ControlNetUnionModel.from_config(config))
    if "ControlNetXS" in annotation:
        return _seeded(6, lambda: diffusers.ControlNetXSAdapter.from_unet(
            unet, size_ratio=0.5, learn_time_embedding=True, conditioning_embedding_out_channels=embed))
    return _seeded(6, lambda: diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embed))


def _t2i_adapter(unet):
    from diffusers import T2IAdapter

    widths = tuple(unet.config.block_out_channels)
    return _seeded(7, lambda: T2IAdapter(in_channels=3, channels=widths, num_res_blocks=1, downscale_factor=4,
                                         adapter_type="full_adapter_xl"))


def _scheduler(cls, scheduler):
    import diffusers

    name = cls.__name__
    if name.startswith("LatentConsistency"):
        return diffusers.LCMScheduler.from_config(scheduler.config)
    if name.startswith("LEdits"):
        return diffusers.DPMSolverMultistepScheduler.from_config(
            scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2)
    return scheduler


def build(cls):
    """A ``cls`` pipeline from tiny random components (a fresh UNet copy: pipelines change their UNet)."""
    pipe0 = base(shape_of(cls))
    parts = dict(pipe0.components)
    init = inspect.signature(cls.__init__).parameters
    name = cls.__name__
    unet = copy.deepcopy(parts["unet"])
    if "InstructPix2Pix" in name:
        unet = _unet_like(unet, in_channels=8)
    elif name.startswith("PIA"):
        unet = _unet_like(unet, in_channels=9)
    elif name.startswith("LatentConsistency"):  # LCM embeds the guidance scale with the timestep
        unet = _unet_like(unet, time_cond_proj_dim=8)
    kwargs = {}
    for key, param in init.items():
        annotation = str(param.annotation)
        if key == "self" or param.kind is param.VAR_KEYWORD:
            continue
        if key == "unet":
            kwargs[key] = unet
        elif key == "motion_adapter":
            kwargs[key] = _motion_adapter(unet)
        elif key == "controlnet":
            kwargs[key] = _controlnet(annotation, unet)
        elif key == "adapter":
            kwargs[key] = _t2i_adapter(unet)
        elif key == "scheduler":
            kwargs[key] = _scheduler(cls, parts["scheduler"])
        elif key == "vae" and "LDM3D" in name:  # RGB + depth
            kwargs[key] = _seeded(2, lambda: type(parts["vae"]).from_config(
                {**parts["vae"].config, "in_channels": 6, "out_channels": 6}))
        elif key == "requires_safety_checker":
            kwargs[key] = False
        elif key in parts:
            kwargs[key] = parts[key]
        elif param.default is inspect.Parameter.empty:
            kwargs[key] = None
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    arr = (rng.rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def call_kwargs(pipe, seed: int = 0) -> dict:
    """The inputs ``pipe.__call__`` takes, at the tiny size."""
    params = inspect.signature(type(pipe).__call__).parameters
    call = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed))
    wanted = {
        "prompt": "a red circle", "height": SIZE, "width": SIZE, "image": picture(10), "mask_image": picture(11, "L"),
        "control_image": picture(12), "strength": 1.0, "num_frames": FRAMES,
        "video": [picture(13 + i) for i in range(FRAMES)],
        "conditioning_frames": [picture(20 + i) for i in range(FRAMES)], "editing_prompt": ["blue"],
        "control_mode": 0,  # ControlNet-Union: which of its control types the control image is
    }
    if type(pipe).__name__.startswith("PIA"):
        wanted["strength"] = 1.0
    for key, value in wanted.items():
        if key in params:
            call[key] = value
    if type(pipe).__name__.startswith("LEdits"):  # no text prompt: the edit is the prompt
        call.pop("prompt", None)
        call.pop("guidance_scale", None)
    return call


def invert_first(pipe, seed: int = 0) -> None:
    """LEdits++ edits an inverted image: invert before each call."""
    if type(pipe).__name__.startswith("LEdits"):
        pipe.invert(image=picture(10), num_inversion_steps=STEPS, skip=0.0,
                    generator=torch.Generator("cpu").manual_seed(seed))


def output_array(out) -> np.ndarray:
    for key in ("images", "frames", "rgb"):
        value = getattr(out, key, None)
        if value is not None:
            return np.asarray(value, dtype=np.float32)
    raise AssertionError(f"no image output in {type(out).__name__}")


_FILES: dict[tuple, Path] = {}
_FOLDER = Path(tempfile.mkdtemp(prefix="ipadapter-pipes-"))


def adapter_file(shape: str, kind: str) -> Path:
    """A random official-format checkpoint for the base of ``shape`` (indices of the spatial UNet)."""
    key = (shape, kind)
    if key not in _FILES:
        pipe = base(shape)
        adapter = random_adapter(pipe.unet, kind, encoder=pipe.image_encoder)
        path = _FOLDER / f"{shape}-{kind}.safetensors"
        adapter.save(path)
        _FILES[key] = path
    return _FILES[key]


# ------------------------------------------------------------------------------------------------ Kolors
def chatglm_tokenizer(folder: Path):
    """A tiny ChatGLM tokenizer: a sentencepiece model trained here on a few words (diffusers' Kolors tests
    download a tiny one; the same class, built offline)."""
    import io

    import sentencepiece as spm
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = "a red green blue circle square triangle on white black background photo of cat dog".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, minloglevel=3)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))


def kolors_pipeline():
    """A random KolorsPipeline: ChatGLM text encoder (hidden 32) projected to the UNet's 64-wide cross-attention."""
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    sdxl = tiny_pipeline("sdxl")
    tokenizer = chatglm_tokenizer(Path(tempfile.mkdtemp(prefix="ipadapter-glm-")))
    cfg = ChatGLMConfig(num_layers=2, padded_vocab_size=128, hidden_size=32, ffn_hidden_size=64, kv_channels=8,
                        num_attention_heads=4, seq_length=64, multi_query_attention=True, multi_query_group_num=2,
                        original_rope=True)
    text = _seeded(3, lambda: ChatGLMModel(cfg)).eval()
    with torch.no_grad():  # its _init_weights leaves weights as allocated (transformers 5): set them, seeded
        torch.manual_seed(3)
        for name, param in text.named_parameters():
            param.copy_(torch.ones_like(param) if "layernorm" in name else torch.randn_like(param) * 0.05)
    unet = _unet_like(sdxl.unet, encoder_hid_dim=32, encoder_hid_dim_type="text_proj",
                      projection_class_embeddings_input_dim=8 * 6 + 32)
    pipe = KolorsPipeline(vae=sdxl.vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sdxl.scheduler,
                          image_encoder=sdxl.image_encoder, feature_extractor=sdxl.feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    return pipe
