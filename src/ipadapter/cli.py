"""The ``ipadapter`` command: a thin layer over the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import IPAdapterError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0 (1.0 = image only, ~0.5 with text)")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE downsamples by 8)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ipadapter", description="IP-Adapter: image prompts for Stable Diffusion (SD 1.x, SDXL).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images from image (and text) prompts")
    g.add_argument("--model", help="diffusers model folder or hub id (default: the embedded world model)")
    g.add_argument("--adapter", help="adapter file (.safetensors/.bin; default: the world model's global adapter)")
    g.add_argument("--image-encoder", help="CLIP vision folder (default: the model's image_encoder/, then one "
                                           "beside the adapter file)")
    g.add_argument("--image", action="append", default=[], help="prompt image; repeat for several (tokens concatenated)")
    g.add_argument("--face-embeds", help="FaceID: face-ID embeddings (.npy/.safetensors, [n, 512])")
    g.add_argument("--prompt", default="", help="text prompt (default: none, an image-only prompt)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--scale", type=_scale, default=None,
                   help="adapter weight (default 1.0 for image-only prompts, 0.5 with a text prompt)")
    g.add_argument("--steps", type=_positive_int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0, help='torch.Generator("cpu").manual_seed(S), as diffusers')
    g.add_argument("--width", type=_size, default=None)
    g.add_argument("--height", type=_size, default=None)
    g.add_argument("--num-images", type=_positive_int, default=1)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("-o", "--output", required=True, help="output PNG file, or a folder")

    i = sub.add_parser("inspect", help="print an adapter file's kind, tokens, widths, layers, parameters")
    i.add_argument("file")

    c = sub.add_parser("convert", help="rewrite any readable adapter layout as official .safetensors")
    c.add_argument("input")
    c.add_argument("output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = {"generate": cmd_generate, "inspect": cmd_inspect, "convert": cmd_convert}[args.command]
        return handler(args) or 0
    except IPAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------ commands
def cmd_inspect(args) -> int:
    from .checkpoint import parameter_count, read_checkpoint

    cfg, tensors = read_checkpoint(args.file)
    family = {"sd15": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}.get(cfg.base_family, cfg.base_family or "unknown")
    widths = sorted(set(cfg.layer_widths.values()))
    rows = [
        ("file", args.file),
        ("kind", cfg.kind),
        ("tokens", f"{cfg.num_tokens} per image"),
        ("encoder feature", f"{cfg.encoder_feature} (width {cfg.embed_dim})"),
        ("cross-attention width", cfg.cross_attention_dim),
        ("layers", f"{cfg.num_layers} (attention widths {', '.join(map(str, widths))})"),
        ("base family", family),
        ("parameters", f"{parameter_count(tensors):,}"),
    ]
    if cfg.kind in ("plus", "faceid-plus"):
        rows.append(("resampler", f"depth {cfg.resampler_depth}, heads {cfg.resampler_heads}, "
                                  f"dim_head {cfg.resampler_dim_head}, width {cfg.resampler_dim}"))
    if cfg.lora_layers:
        rows.append(("LoRA", f"{len(cfg.lora_layers)} layers, rank {max(cfg.lora_layers.values())}"))
    for key, value in rows:
        print(f"{key:>22}: {value}")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import read_checkpoint, write_checkpoint

    cfg, tensors = read_checkpoint(args.input)
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise IPAdapterError(f"{out}: the output must end in .safetensors (the official flat layout)")
    write_checkpoint(out, cfg, tensors)
    print(f"wrote {out} ({cfg.kind}, {cfg.num_layers} layers, {cfg.num_tokens} tokens)")
    return 0


def _outputs(output: str, count: int, seed: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() == ".png":
        if count == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(count)]
    if out.exists() and not out.is_dir():
        raise IPAdapterError(f"{out}: exists and is not a folder; give a .png name or a folder")
    return [out / f"ipadapter-{seed}-{k}.png" for k in range(count)]


def cmd_generate(args) -> int:
    import torch

    from .pipeline import load, load_pipeline, save_png

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, adapter = args.model, args.adapter
    if model is None:
        from .pipeline import embedded_model

        model, default_adapter = embedded_model()
        adapter = adapter or default_adapter
    if adapter is None:
        raise IPAdapterError("--adapter FILE is required with --model")
    if not args.image and not args.face_embeds:
        raise IPAdapterError("give at least one --image PATH (or --face-embeds for FaceID adapters)")
    from .encoders import load_image

    images = [load_image(p) for p in args.image]  # fail on a bad image before loading any model
    outputs = _outputs(args.output, args.num_images, args.seed)
    pipe = load_pipeline(model, device=device)
    ip = load(pipe, adapter, image_encoder=args.image_encoder,
              model_dir=model if Path(str(model)).is_dir() else None)
    scale = args.scale if args.scale is not None else (0.5 if args.prompt else 1.0)
    from .pipeline import ImagePrompt

    prompt = ImagePrompt(images=images, scale=scale, face_embeds=args.face_embeds)
    generated = ip.generate(prompts=[prompt], prompt=args.prompt, negative_prompt=args.negative_prompt,
                            num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                            width=args.width, height=args.height, num_images=args.num_images)
    params = (
        f"{args.prompt}\nNegative prompt: {args.negative_prompt or ''}\n"
        f"Steps: {args.steps}, Sampler: {type(pipe.scheduler).__name__}, CFG scale: {args.guidance}, "
        f"Seed: {args.seed}, Size: {generated[0].width}x{generated[0].height}, Model: {model}, "
        f"IP-Adapter: {os.path.basename(str(adapter))}, IP-Adapter scale: {scale}, "
        f"IP-Adapter images: {', '.join(os.path.basename(str(p)) for p in args.image)}"
    )
    for image, path in zip(generated, outputs):
        save_png(image, path, params)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
