"""The ``ipadapter`` command: a thin layer over the library. Bad input -> one line on stderr, exit 2.

``generate`` takes repeated groups (see ``GENERATE_GRAMMAR``, shown by ``ipadapter generate --help``): each
``--adapter FILE`` starts a group and the per-adapter flags after it (``--image``, ``--image-weight``,
``--image-mask``, ``--negative-image``, ``--embeds``, ``--face-embeds``, ``--scale``, ``--combine``, ``--start``,
``--end``, ``--curve``, ``--blocks``) belong to it, flags before the first ``--adapter`` to the first group; each
``--controlnet DIR`` starts a group for ``--control-image`` and ``--control-scale``. Per-image flags pair up by
order within their group. ``embed`` writes image embeddings with their negative for ``generate --embeds``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.errors import IPAdapterError
from .args import _finite, _fraction, _Grouped, _notes, _positive_int, _scale, _seeds, _size

GENERATE_GRAMMAR = """\
Several adapters and ControlNets (a group grammar):
  Each --adapter FILE starts a group; the per-adapter options that follow it, up to the next --adapter,
  belong to it. Options given before the first --adapter belong to the first one (or to the default
  adapter of the embedded world model when no --adapter is given). Per-adapter options:
    --image PATH           prompt image; repeat for several
    --image-weight F       one per --image of the group, in the same order (default 1 each)
    --image-mask PATH      grayscale region mask (white = where the image acts); one per --image,
                           or one with --combine average/norm-average
    --negative-image PATH  replaces the zero embedding of the unconditional branch: one, or one per --image
    --embeds FILE          precomputed embeddings from `ipadapter embed` (no image encoder is loaded
                           when every adapter has them)
    --face-embeds FILE     FaceID: face-ID embeddings
    --composition-image PATH, --face-image PATH: repeat for several
    --scale, --combine, --start, --end, --curve, --blocks and ComfyUI's controls (--weight-type,
    --embeds-scaling, --crop, --tiles, --unfold-batch, --negative-noise ...): once per adapter
  Each --controlnet DIR starts a ControlNet group; --control-image PATH (required) and --control-scale F
  after it belong to it. The ControlNet sees the text prompt only; the adapter steers the UNet.
  Init images, masks and control images of another size than the output are resized, with a note.

Examples:
  ipadapter generate --image red-circle.png --image-mask left.png \\
                     --image blue-square.png --image-mask right.png -o regions.png
  ipadapter generate --adapter plus.safetensors --image style.png --blocks style \\
                     --adapter plus-face.safetensors --image face.png --scale 0.6 --start 0.3 -o out.png
  ipadapter generate --image ref.png --init-image photo.png --strength 0.6 -o out.png
  ipadapter generate --image ref.png --controlnet cn-depth/ --control-image depth.png -o out.png
  ipadapter embed --image ref.png --negative-image blur.png -o ref.safetensors
  ipadapter generate --embeds ref.safetensors -o out.png
"""


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate images from image (and text) prompts", epilog=GENERATE_GRAMMAR,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--model", help="diffusers model folder, hub id, or single .safetensors/.ckpt file "
                                   "(default: the embedded world model; world-sd3: its SD3.5-shaped member)")
    _add_model_flags(g)
    g.add_argument("--image-encoder", help="CLIP vision folder (default: the model's image_encoder/, then one "
                                           "beside the adapter file)")
    a = g.add_argument_group("per adapter (each --adapter starts a group, see below)")

    def grouped(flag: str, key: str, **kwargs) -> None:
        a.add_argument(flag, action=_Grouped, dest=f"_adapter_{key}", group="adapter", key=key, **kwargs)

    grouped("--adapter", "adapter", starts=True, metavar="FILE",
            help="adapter file (.safetensors/.bin; default: the world model's global adapter); repeat for several")
    grouped("--image", "images", repeat=True, metavar="PATH", help="prompt image; repeat for several")
    grouped("--image-weight", "weights", repeat=True, type=_scale, metavar="F",
            help="weight of the matching --image (concat: weight k counts the image k times)")
    grouped("--image-mask", "masks", repeat=True, metavar="PATH",
            help="grayscale region mask of the matching --image (white: the image acts there)")
    grouped("--negative-image", "negative_images", repeat=True, metavar="PATH",
            help="image the unconditional branch uses instead of the zero embedding")
    grouped("--embeds", "embeds", metavar="FILE", help="precomputed embeddings (`ipadapter embed`)")
    grouped("--face-embeds", "face_embeds", metavar="FILE",
            help="FaceID: face-ID embeddings (.npy/.safetensors, [n, 512])")
    grouped("--scale", "scale", type=_scale, metavar="F",
            help="adapter weight (default 1.0 for image-only prompts, 0.5 with a text prompt)")
    grouped("--combine", "combine", type=_combine_mode, metavar="MODE",
            help="several images: concat (tokens side by side, default), or ComfyUI's add, subtract, average, "
                 "norm-average, max, min (on the weighted embeddings)")
    grouped("--start", "start", type=_fraction, metavar="F",
            help="fraction of the denoising where the adapter starts acting (default 0)")
    grouped("--end", "end", type=_fraction, metavar="F", help="... and where it stops (default 1)")
    grouped("--curve", "curve", choices=("constant", "linear", "ease-in", "ease-out"),
            help="weight across [start, end]: constant, or a fade to 0: linear, ease-in (1-u^2), ease-out ((1-u)^2)")
    grouped("--blocks", "blocks", metavar="SPEC",
            help="per-block scales: a preset (style, composition), BLOCK=F entries (e.g. "
                 "'up_blocks.0.attentions.1=1,down_blocks.2=0.5', '*=F' for the rest; unnamed blocks get 0)")
    _add_comfy_flags(grouped)

    s = g.add_argument_group("img2img, inpainting, ControlNet")
    s.add_argument("--init-image", metavar="PATH", help="img2img: start from this image")
    s.add_argument("--strength", type=_fraction, default=None,
                   help="img2img: how far to move from the init image (diffusers' default: 0.8, inpainting 1)")
    s.add_argument("--inpaint-mask", metavar="PATH", help="inpainting: white = repaint (needs --init-image)")
    s.add_argument("--controlnet", action=_Grouped, dest="_controlnet_dir", group="controlnet", key="dir",
                   starts=True, metavar="DIR", help="ControlNet folder; repeat for several")
    s.add_argument("--control-image", action=_Grouped, dest="_controlnet_image", group="controlnet", key="image",
                   metavar="PATH", help="control image of the preceding --controlnet")
    s.add_argument("--control-scale", action=_Grouped, dest="_controlnet_scale", group="controlnet", key="scale",
                   type=_finite, metavar="F", help="conditioning scale of the preceding --controlnet (default 1)")

    # defaults of None are filled by cli.reuse (from --reuse-parameters, else its DEFAULTS)
    g.add_argument("--prompt", default=None, help="text prompt (default: none, an image-only prompt)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=_finite, default=None,
                   help="guidance scale (default: 7.5, classifier-free guidance on SD; 3.5 on Flux, where it is "
                        "FluxPipeline's distilled guidance_scale)")
    _add_flux_flags(g)
    g.add_argument("--seed", type=_seeds, default=None,
                   help='S (default 0): image k gets torch.Generator("cpu").manual_seed(S+k) (remake it alone with '
                        "--seed S+k); or S1,S2,... one per image")
    g.add_argument("--width", type=_size, default=None, help="output width (default: the model's)")
    g.add_argument("--height", type=_size, default=None, help="output height (default: the model's)")
    g.add_argument("--num-images", type=_positive_int, default=None, help="images to make (default 1)")
    g.add_argument("--insightface-root", metavar="DIR",
                   help="FaceID photos: where insightface's models/buffalo_l lives (default ~/.insightface)")
    g.add_argument("-o", "--output", required=True,
                   help="output file (.png, .jpg/.jpeg or .webp, the parameters inside), or a folder (PNGs)")
    _add_reuse_flags(g)


def _add_reuse_flags(g) -> None:
    g.add_argument("--reuse-parameters", metavar="IMAGE",
                   help="start from the parameters inside an image this tool (or the page) made; the flags "
                        "given override them (per-adapter flags: those of the same --adapter group)")


COMFY_KEYS: tuple[str, ...] = (
    "weight_type", "composition_weight", "boost", "composition_images", "embeds_scaling", "crop", "interpolation",
    "sharpen", "tiles", "enhance_tiles", "enhance_ratio", "unfold_batch", "encode_batch_size", "negative_noise",
    "noise_strength", "noise_blur", "noise_seed", "face_images",
)


def _combine_mode(text: str) -> str:
    from ..generation.controls import COMBINE_MODES

    key = "-".join(text.strip().lower().split())
    if key not in COMBINE_MODES:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(COMBINE_MODES)}")
    return key


def _weight_type(text: str) -> str:
    from ..generation.weight_types import WEIGHT_TYPES

    key = "-".join(text.strip().lower().split())
    if key not in WEIGHT_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(WEIGHT_TYPES)}")
    return key


def _add_comfy_flags(grouped) -> None:
    """ComfyUI_IPAdapter_plus's controls, per adapter group (docs/controls.md has ComfyUI's names beside ours)."""
    from ..core.encoders import CROPS, INTERPOLATIONS
    from ..generation.controls import NOISES

    grouped("--weight-type", "weight_type", type=_weight_type, metavar="TYPE",
            help="ComfyUI's weight types over the attention blocks: linear, ease-in, ease-out, ease-in-out, "
                 "reverse-in-out, weak-input, weak-output, weak-middle, strong-middle, style-transfer, composition, "
                 "strong-style-transfer, style-and-composition, strong-style-and-composition, "
                 "style-transfer-precise, composition-precise")
    grouped("--composition-image", "composition_images", repeat=True, metavar="PATH",
            help="style-and-composition: the image for the composition blocks")
    grouped("--composition-weight", "composition_weight", type=_finite, metavar="F",
            help="weight of the composition blocks (style-and-composition; default 1)")
    grouped("--boost", "boost", type=_finite, metavar="F",
            help="style-transfer-precise / composition-precise: ComfyUI's style_boost / composition_boost")
    grouped("--embeds-scaling", "embeds_scaling", choices=("v", "kv", "kv-penalty", "k-mean-v-penalty"),
            help="where the weight goes: v (the output, default; ComfyUI 'V only'), kv (K and V), kv-penalty "
                 "(K and V, times width/1280), k-mean-v-penalty (K and V's mean, times width/1280)")
    grouped("--crop", "crop", choices=CROPS, help="encoder input: the square taken (default: the encoder's "
                                                  "centre crop), or pad (black bars)")
    grouped("--interpolation", "interpolation", choices=INTERPOLATIONS,
            help="encoder input resize filter with --crop/--sharpen (default lanczos)")
    grouped("--sharpen", "sharpen", type=_fraction, metavar="F", help="encoder input sharpening, 0..1")
    grouped("--tiles", "tiles", nargs=0, help="tiled IP-Adapter: each --image cut into 256 px tiles, each acting "
                                              "on its own region (an --image-mask per image limits it)")
    grouped("--enhance-tiles", "enhance_tiles", type=_positive_int, metavar="N",
            help="ClipVision enhancer: also encode an N x N grid of pieces and merge them in")
    grouped("--enhance-ratio", "enhance_ratio", type=_fraction, metavar="F",
            help="ClipVision enhancer: the whole image's share (default 1)")
    grouped("--unfold-batch", "unfold_batch", nargs=0,
            help="one reference per batch item: image k of the batch gets --image k alone")
    grouped("--encode-batch-size", "encode_batch_size", type=_positive_int, metavar="N",
            help="images per image-encoder call (default: all at once)")
    grouped("--negative-noise", "negative_noise", choices=NOISES,
            help="negative image from noise (ComfyUI's IPAdapterNoise), on --negative-image or black")
    grouped("--noise-strength", "noise_strength", type=_fraction, metavar="F", help="noise strength (default 1)")
    grouped("--noise-blur", "noise_blur", type=int, metavar="N", help="noise blur kernel (default 0)")
    grouped("--noise-seed", "noise_seed", type=int, metavar="S", help="noise seed (default 0)")
    grouped("--face-image", "face_images", repeat=True, metavar="PATH",
            help="FaceID: a face photo (insightface, the [faceid] extra, finds the face); repeat for Portrait")


def _add_flux_flags(g) -> None:
    f = g.add_argument_group("Flux")
    f.add_argument("--true-cfg", type=_scale, default=None, metavar="F",
                   help="true classifier-free guidance (FluxPipeline's true_cfg_scale; needs --negative-prompt): "
                        "an unconditional pass per step with the negative prompt and the negative image prompt "
                        "(a black picture unless --negative-image); XLabs v1 adapters need it")


def _add_model_flags(g) -> None:
    """--model-config, --lora, --device, --dtype (shared by generate and ui)."""
    m = g.add_argument_group("model files, LoRAs, device and precision")
    m.add_argument("--model-config", metavar="DIR_OR_HUB_ID",
                   help="for a single-file --model: a diffusers folder or hub id of the same family whose "
                        "configuration (and tokenizers, scheduler) to use (needed offline)")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA file (diffusers/peft or kohya layout), weight default 1.0; repeat for several")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda, then mps, then cpu)")
    m.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="precision of the model (default: fp16 on cuda and mps, fp32 on cpu)")


def _device_and_dtype(args):
    """(device, dtype) from --device/--dtype, checked before any model loads."""
    from ..generation.loading import resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
    except IPAdapterError as e:
        raise IPAdapterError(f"--{e}") from None
    return device, resolve_dtype(getattr(args, "dtype", None), device)


def _load_model(args, model, device, dtype, image_encoder: bool = True):
    """The pipeline (a folder, hub id or single file) with the --lora files applied."""
    from ..generation.loading import apply_loras, load_model, parse_lora

    loras = [parse_lora(text) for text in getattr(args, "lora", None) or []]
    for path, _ in loras:  # a missing LoRA fails before the model loads
        if not Path(path).is_file():
            raise IPAdapterError(f"--lora {path}: no such file")
    pipe = load_model(model, getattr(args, "model_config", None), device=device, dtype=dtype,
                      image_encoder=image_encoder)
    apply_loras(pipe, loras)
    return pipe


def _add_embed_parser(sub) -> None:
    e = sub.add_parser("embed", help="precompute image embeddings (with their negative) for generate --embeds")
    e.add_argument("--model", help="model folder whose image_encoder/ to use (default: the embedded world model; "
                                   "or world-sd3)")
    e.add_argument("--adapter", help="the adapter the embeddings are for (it decides which encoder feature)")
    e.add_argument("--image-encoder", help="CLIP vision folder (default: the model's, then one beside the adapter)")
    e.add_argument("--image", action="append", default=[], required=True, help="prompt image; repeat for several")
    e.add_argument("--negative-image", action="append", default=[],
                   help="negative image: one for all, or one per --image (default: the zero embedding)")
    e.add_argument("--device", default=None)
    e.add_argument("-o", "--output", required=True, help="output .safetensors file")


def add_parsers(sub) -> None:
    """``generate``, ``embed``, ``inspect`` and ``convert``."""
    _add_generate_parser(sub)
    _add_embed_parser(sub)
    i = sub.add_parser("inspect", help="print an adapter file's kind, tokens, widths, layers, parameters")
    i.add_argument("file")
    c = sub.add_parser("convert", help="rewrite any readable adapter layout as official .safetensors")
    c.add_argument("input")
    c.add_argument("output")


#: what ``inspect`` says of each attention mode (the paper's names in parentheses)
ATTENTION_WORDS = {
    "decoupled": "decoupled (the paper's decoupled cross-attention: image key/value weights beside the text's)",
    "concat": "concat (the paper's simple adapter: image tokens appended to the text tokens of the existing "
              "cross-attention; no image key/value weights)",
}


def cmd_inspect(args) -> int:
    from ..core.checkpoint import parameter_count, read_checkpoint
    from ..core.config import family_label

    cfg, tensors = read_checkpoint(args.file)
    family = family_label(cfg.base_family)
    widths = sorted(set(cfg.layer_widths.values()))
    rows = [
        ("file", args.file),
        ("kind", cfg.kind if not cfg.flavour else f"{cfg.kind} ({cfg.describe()})"),
        ("attention", ATTENTION_WORDS.get(cfg.attention, cfg.attention)),
        ("tokens", f"{cfg.num_tokens} per image"),
        ("encoder feature", f"{cfg.encoder_feature} (width {cfg.embed_dim})"),
        ("cross-attention width", cfg.cross_attention_dim),
        ("layers", f"{cfg.num_layers} (attention widths {', '.join(map(str, widths))})"),
        ("base family", family),
        ("parameters", f"{parameter_count(tensors):,}"),
    ]
    if cfg.kind in ("plus", "faceid-plus", "time-plus"):
        rows.append(("resampler", f"depth {cfg.resampler_depth}, heads {cfg.resampler_heads}, "
                                  f"dim_head {cfg.resampler_dim_head}, width {cfg.resampler_dim}"))
    if cfg.time_conditioned:
        rows.append(("timestep", f"tokens made at every step (sinusoid width {cfg.time_embed_dim}); per block AdaLN, "
                                 f"QK RMSNorms of width {cfg.head_dim}"))
    if cfg.lora_layers:
        rows.append(("LoRA", f"{len(cfg.lora_layers)} layers, rank {max(cfg.lora_layers.values())}"))
    for key, value in rows:
        print(f"{key:>22}: {value}")
    return 0


def cmd_convert(args) -> int:
    from ..core.checkpoint import read_checkpoint, write_checkpoint

    cfg, tensors = read_checkpoint(args.input)
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise IPAdapterError(f"{out}: the output must end in .safetensors (the official flat layout)")
    write_checkpoint(out, cfg, tensors)
    print(f"wrote {out} ({cfg.kind}, {cfg.num_layers} layers, {cfg.num_tokens} tokens)")
    return 0


def _outputs(output: str, count: int, seed: int) -> list[Path]:
    """The files to write: ``output`` itself (an image name; ``-k`` added for several), or PNGs in a folder."""
    from ..generation.parameters import image_format

    out = Path(output)
    if out.is_dir() or not out.suffix:
        if out.exists() and not out.is_dir():
            raise IPAdapterError(f"{out}: exists and is not a folder; give an image name (.png, .jpg, .webp) "
                                 "or a folder")
        return [out / f"ipadapter-{seed}-{k}.png" for k in range(count)]
    image_format(out)  # a known image suffix, or one line naming those that fit
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(count)]


def _adapter_groups(args) -> tuple[str, list[dict]]:
    """(model, one dict per adapter group) with the defaults filled in and the counts checked."""
    groups = [dict(g) for g in getattr(args, "adapter_groups", None) or [{}]]
    from ..generation.pipeline import resolve_model

    # None or an embedded member's name: its folder, and its default adapter (image-only and image + text prompts)
    model, groups[0]["adapter"] = resolve_model(args.model, groups[0].get("adapter"))
    if groups[0].get("adapter") is None:
        raise IPAdapterError("--adapter FILE is required with --model")
    from ..generation.pipeline import adapter_in_model

    for g in groups:
        g["adapter"] = adapter_in_model(g["adapter"], model)
    several = len(groups) > 1
    for k, g in enumerate(groups, 1):
        name = f"--adapter {k} ({os.path.basename(str(g['adapter']))}): " if several else ""
        images, n = g.get("images", []), len(g.get("images", []))
        if g.get("embeds") and (images or g.get("negative_images")):
            raise IPAdapterError(f"{name}--embeds replaces --image and --negative-image (the file holds both)")
        if not images and not g.get("embeds") and not g.get("face_embeds") and not g.get("face_images"):
            if not getattr(args, "prompt", ""):
                raise IPAdapterError(f"{name}give at least one --image PATH (or --embeds FILE, or --face-embeds for "
                                     "FaceID adapters), or --prompt TEXT alone for text only")
            extra = [f for f, key in (("--negative-image", "negative_images"), ("--image-mask", "masks"),
                                      ("--image-weight", "weights")) if g.get(key)]
            if extra:
                raise IPAdapterError(f"{name}{extra[0]} without --image: it belongs to a prompt image")
        if "weights" in g and images and len(g["weights"]) != n:
            raise IPAdapterError(f"{name}{len(g['weights'])} --image-weight for {n} --image: give one per image")
        combine = g.get("combine", "concat")
        if "masks" in g and images:
            want = n if combine == "concat" else 1
            if len(g["masks"]) != want:
                per = "one per --image" if combine == "concat" else f"one with --combine {combine}"
                raise IPAdapterError(f"{name}{len(g['masks'])} --image-mask for {n} --image: give {per}")
        negatives = g.get("negative_images", [])
        if negatives and images and len(negatives) not in (1, n):
            raise IPAdapterError(f"{name}{len(negatives)} --negative-image for {n} --image: give one, or one per image")
        g["label"] = name
    return model, groups


def cmd_generate(args) -> int:
    from ..generation.loading import config_folder
    from ..generation.pipeline import ImagePrompt, load
    from . import reuse
    from .progress import StepProgress

    reuse.apply(args)  # --reuse-parameters, then the defaults
    device, dtype = _device_and_dtype(args)
    model, groups = _adapter_groups(args)
    controls = [dict(c) for c in getattr(args, "controlnet_groups", None) or []]
    seeds = _check_plain_flags(args, controls)
    _load_inputs(groups, [m for g in groups for m in g.get("masks", [])] + [args.init_image, args.inpaint_mask]
                 + [c["image"] for c in controls])
    outputs = _outputs(args.output, args.num_images, seeds if isinstance(seeds, int) else seeds[0])

    need_encoder = any(not g.get("embeds") for g in groups)
    pipe = _load_model(args, model, device, dtype, image_encoder=need_encoder)
    ip = load(pipe, [g["adapter"] for g in groups], image_encoder=args.image_encoder if need_encoder else False,
              model_dir=config_folder(model, args.model_config), insightface_root=args.insightface_root)
    default_scale = 0.5 if args.prompt else 1.0
    prompts = [
        ImagePrompt(images=g["images"], scale=g.get("scale", default_scale), negative_images=g["negative_images"],
                    face_embeds=g.get("face_embeds"), embeds=g.get("embeds"), weights=g.get("weights"),
                    combine=g.get("combine", "concat"), masks=g["masks"], start=g.get("start", 0.0),
                    end=g.get("end", 1.0), curve=g.get("curve", "constant"), blocks=g.get("blocks"),
                    **{k: g[k] for k in COMFY_KEYS if k in g})
        for g in groups
    ]
    progress = StepProgress()
    try:
        with _notes():
            generated = ip.generate(
                prompts=prompts, prompt=args.prompt, negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seeds, width=args.width,
                height=args.height, num_images=args.num_images, strength=args.strength,
                control_scales=[c.get("scale", 1.0) for c in controls] or None, init_image=args.init_image,
                mask_image=args.inpaint_mask, controlnets=[c["dir"] for c in controls] or None,
                control_images=[c["image"] for c in controls] or None, callback_on_step_end=progress,
                **({"true_cfg_scale": args.true_cfg} if getattr(args, "true_cfg", None) is not None else {}),
            )
    finally:
        progress.close()
    from ..generation.parameters import format_parameters, save_image

    seed_list = seeds if isinstance(seeds, list) else [seeds + k for k in range(args.num_images)]
    for k, (image, path) in enumerate(zip(generated, outputs)):
        save_image(image, path, format_parameters(_parameters(args, pipe, model, groups, controls, seed_list[k],
                                                              image)))
        print(path)
    return 0


def _check_plain_flags(args, controls: list[dict]):
    """The checks that need no model (so a bad flag fails before minutes of loading); returns the seed(s)."""
    from ..generation import limits

    for c in controls:
        if c.get("dir") is None:
            raise IPAdapterError("--control-image/--control-scale given without a --controlnet DIR to belong to")
        if c.get("image") is None:
            raise IPAdapterError(f"--controlnet {c['dir']}: no --control-image after it; each ControlNet needs one")
    if args.inpaint_mask and not args.init_image:
        raise IPAdapterError("--inpaint-mask needs --init-image (the image to paint into)")
    if args.strength is not None and not args.init_image:
        raise IPAdapterError("--strength needs --init-image (it is how far img2img moves from it)")
    if getattr(args, "true_cfg", None) is not None and args.negative_prompt is None:
        raise IPAdapterError("--true-cfg needs --negative-prompt (true CFG runs an unconditional pass with it)")
    limits.check_counts(args.steps, args.num_images)
    if args.guidance is not None:  # None: the family's default (7.5 on UNets, 3.5 on Flux)
        limits.check_guidance(args.guidance)
    if args.width is not None or args.height is not None:
        limits.check_size(args.width or 8, args.height or 8)
    seeds = args.seed if len(args.seed) > 1 else args.seed[0]
    if isinstance(seeds, list) and len(seeds) != args.num_images:
        raise IPAdapterError(f"--seed: {len(seeds)} seeds for --num-images {args.num_images}; give one, or one each")
    return seeds


def _load_inputs(groups: list[dict], side_files: list) -> None:
    """Fail on a bad image before loading any model: prompt images are read here (and passed on as images; their
    notes, e.g. an animated GIF's first frame, shown now), side images only checked (the library reads them
    again, and notes them then)."""
    import warnings

    from ..core.encoders import load_image
    from ..core.errors import IPAdapterNote

    with _notes():
        for g in groups:
            g["image_names"] = [str(p) for p in g.get("images", [])]
            g["negative_names"] = [str(p) for p in g.get("negative_images", [])]
            g["images"] = [load_image(p) for p in g.get("images", [])]
            g["negative_images"] = [load_image(p) for p in g.get("negative_images", [])]
            for key in ("composition_images", "face_images"):
                if key in g:
                    g[f"{key}_names"] = [str(p) for p in g[key]]
                    g[key] = [load_image(p) for p in g[key]]
            g["masks"] = g.get("masks", [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IPAdapterNote)
        for path in side_files:
            if path:
                load_image(path)


def _parameters(args, pipe, model, groups, controls, seed: int, image):
    """What the image carries (:mod:`ipadapter.generation.parameters`): files as given, so that
    ``--reuse-parameters`` finds them again; an adapter inside the model folder by its name."""
    from ..generation.parameters import AdapterParameters, ControlNetParameters, Parameters

    def adapter_name(path) -> str:
        path = Path(str(path))
        return path.name if Path(str(model)).is_dir() and path.parent == Path(str(model)) else str(path)

    adapters = [
        AdapterParameters(adapter=adapter_name(g["adapter"]), scale=float(g.get("scale", 0.5 if args.prompt else 1.0)),
                          images=g["image_names"], weights=[float(w) for w in g.get("weights") or []],
                          masks=[str(m) for m in g["masks"]], negative_images=g["negative_names"],
                          embeds=str(g.get("embeds") or ""), face_embeds=str(g.get("face_embeds") or ""),
                          combine=g.get("combine", "concat"), start=float(g.get("start", 0.0)),
                          end=float(g.get("end", 1.0)), curve=g.get("curve", "constant"), blocks=g.get("blocks") or "",
                          options={k: str(g[k]) for k in COMFY_KEYS if k in g and "images" not in k},
                          option_images={k: g[f"{k}_names"] for k in ("composition_images", "face_images")
                                         if f"{k}_names" in g})
        for g in groups
    ]
    return Parameters(
        prompt=args.prompt, negative_prompt=args.negative_prompt or "", steps=args.steps,
        sampler=type(pipe.scheduler).__name__, guidance=float(_guidance(args, pipe)),
        true_cfg=getattr(args, "true_cfg", None), seed=seed,
        width=image.width, height=image.height, model=str(model), adapters=adapters,
        init_image=str(args.init_image or ""),
        strength=args.strength, inpaint_mask=str(args.inpaint_mask or ""),
        controlnets=[ControlNetParameters(str(c["dir"]), str(c["image"]), float(c.get("scale", 1.0)))
                     for c in controls],
    )


def _guidance(args, pipe) -> float:
    """The guidance scale a generation used: --guidance, else the base family's default."""
    from ..bases import family_of

    return args.guidance if args.guidance is not None else family_of(pipe).default_guidance


def cmd_embed(args) -> int:
    from types import SimpleNamespace

    from ..core.adapter import Adapter
    from ..core.checkpoint import read_checkpoint
    from ..core.encoders import ImageEncoder, load_image
    from ..generation.controls import save_embeds
    from ..generation.pipeline import _feature_field, encode_prompt, find_image_encoder

    model, adapter = args.model, args.adapter
    from ..generation.pipeline import embedded_name, resolve_model

    if embedded_name(model):  # an embedded model: its encoder, and its adapter unless one is given
        try:
            model, adapter = resolve_model(model, adapter)
        except IPAdapterError:
            if adapter is None:
                raise
    if adapter is None:
        raise IPAdapterError("--adapter FILE is required with --model (it decides which encoder feature to store)")
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise IPAdapterError(f"{out}: embeddings are written as .safetensors; give a name ending in .safetensors")
    cfg, _ = read_checkpoint(adapter)
    if cfg.uses_face_id:
        raise IPAdapterError(f"{adapter}: {cfg.kind} adapters take face-ID embeddings directly (--face-embeds)")
    images = [load_image(p) for p in args.image]
    negatives = [load_image(p) for p in args.negative_image]
    if negatives and len(negatives) not in (1, len(images)):
        raise IPAdapterError(f"{len(negatives)} --negative-image for {len(images)} --image: give one, or one per image")
    encoder_dir = find_image_encoder(adapter, model if model and Path(str(model)).is_dir() else None,
                                     args.image_encoder)
    encoder = ImageEncoder.from_pretrained(encoder_dir)
    if args.device:
        encoder.model.to(_device_and_dtype(args)[0])
    Adapter.check_encoder(SimpleNamespace(config=cfg), encoder.model, source=str(adapter))  # reads only .config
    cond, uncond = encode_prompt(cfg, encoder, images, negatives)
    field = _feature_field(cfg)
    meta = {"feature": field, "adapter_kind": cfg.kind, "encoder": str(encoder_dir),
            "images": ", ".join(os.path.basename(p) for p in args.image),
            "negative_images": ", ".join(os.path.basename(p) for p in args.negative_image)}
    save_embeds(out, cond, uncond, meta)
    width = getattr(cond, field).shape[-1]
    print(f"wrote {out} ({len(images)} image(s), {field} of width {width}, with their negative)")
    return 0
