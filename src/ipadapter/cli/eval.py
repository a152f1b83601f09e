"""``ipadapter eval``: flags -> :func:`~ipadapter.evaluation.evaluate.evaluate`, a table and a JSON file."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from ..core.errors import IPAdapterError
from ..evaluation.evaluate import (
    ClipScorer,
    EvalSettings,
    evaluate,
    find_clip,
    format_table,
    read_pairs,
    write_json,
)
from .args import _notes, _positive_int, _scale
from .generate import _add_flux_flags, _add_model_flags, _device_and_dtype, _guidance, _load_model


def add_eval_parser(sub) -> None:
    """The ``eval`` subcommand's flags (``sub``: the CLI's subparsers)."""
    e = sub.add_parser("eval", help="CLIP-I / CLIP-T (and world attribute accuracy) over (image, caption) pairs")
    e.add_argument("--model", help="diffusers model folder, hub id, or single .safetensors/.ckpt file (default: "
                                   "the embedded world model; world-sd3: its SD3.5-shaped member)")
    e.add_argument("--adapter", help="adapter file (default: the embedded model's default adapter)")
    e.add_argument("--image-encoder", help="CLIP vision folder for the adapter (default: the model's)")
    e.add_argument("--data", help="pairs: official JSON, JSONL, a folder of images + .txt captions, or .tar "
                                  "shards (default: held-out shapes-world images)")
    e.add_argument("--data-root", help="folder the JSON's image paths are relative to (default: the JSON's)")
    e.add_argument("--clip", help="CLIPModel folder or hub id that scores (default: <model>/clip, or the world "
                                  "model's own CLIP)")
    e.add_argument("--samples", type=_positive_int, default=4, help="images per prompt (default 4, as the paper)")
    e.add_argument("--scale", type=_scale, default=None,
                   help="adapter weight (default 1.0 for image-only prompts, 0.5 with a text prompt)")
    e.add_argument("--prompt", default="", help="text prompt for every pair (default: none, image-only)")
    e.add_argument("--prompt-from-caption", action="store_true", help="use each pair's caption as its text prompt")
    e.add_argument("--negative-prompt", default=None)
    e.add_argument("--steps", type=_positive_int, default=30)
    e.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the model's: 7.5 on UNets and SD3, 3.5 distilled guidance on Flux)")
    e.add_argument("--width", type=_positive_int, default=None, help="image width (default: the model's native)")
    e.add_argument("--height", type=_positive_int, default=None, help="image height (default: the model's native)")
    e.add_argument("--seed", type=int, default=0, help="image k of prompt i uses seed + i * samples + k")
    e.add_argument("--num-prompts", type=_positive_int, default=None,
                   help="first N pairs only (default: all; 64 for the default world data)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per pipeline call")
    e.add_argument("--out", help="results JSON (settings, metrics, one record per image)")
    e.add_argument("--save-images", help="folder for the generated images (<index>-<name>-<sample>.png)")
    e.add_argument("--text-only", action="store_true",
                   help="baseline: the base model alone with --prompt (default empty), no image prompt")
    _add_model_flags(e)  # --model-config, --lora, --device (accelerate's under accelerate launch), --dtype
    _add_flux_flags(e)


def cmd_eval(args) -> int:
    from accelerate import PartialState

    from ..generation import limits
    from ..generation.loading import config_folder
    from ..generation.pipeline import adapter_in_model, load

    device, dtype = _device_and_dtype(args)  # a bad --device fails first, before any model loads
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise IPAdapterError(f"--guidance {args.guidance}: must be a finite number")
    if args.true_cfg is not None and args.negative_prompt is None:
        raise IPAdapterError("--true-cfg needs --negative-prompt (true CFG runs an unconditional pass with it)")
    if args.width is not None or args.height is not None:
        limits.check_size(args.width or 8, args.height or 8)
    if args.prompt and args.prompt_from_caption:
        raise IPAdapterError("--prompt and --prompt-from-caption exclude each other; give one")
    if args.out is not None and Path(args.out).is_dir():
        raise IPAdapterError(f"--out {args.out}: is a folder; give a .json file name")
    from ..generation.pipeline import resolve_model

    model, adapter = resolve_model(args.model, args.adapter)
    if adapter is None and not args.text_only:
        raise IPAdapterError("--adapter FILE is required with --model (or --text-only for the baseline)")
    adapter = adapter_in_model(adapter, model)
    if adapter is not None and not args.text_only and not Path(adapter).is_file():
        raise IPAdapterError(f"--adapter {adapter}: no such file")
    model_dir = config_folder(model, args.model_config)  # a folder's own, or a single file's --model-config
    from ..world.judge import WorldJudge, world_pairs

    judge = WorldJudge()  # world data are judged on their attributes too: the judge knows its prompt images
    if args.data is not None:
        pairs = read_pairs(args.data, args.data_root, args.num_prompts, judge=judge)
    else:
        pairs = world_pairs(args.num_prompts or 64)
    if not any(p.truth is not None for p in pairs):
        judge = None  # not world data
    clip_source = find_clip(args.clip, model_dir)

    # CPU-only runs join a torchrun/MPI group only when told so (accelerate's rule); GPUs are found alone
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if state.num_processes > 1:
        device = state.device
    clip = ClipScorer.from_pretrained(clip_source, device=device)
    pipe = _load_model(args, model, device, dtype)  # generate's loading: folder, hub id or single file; --lora
    target = pipe if args.text_only else load(pipe, adapter, image_encoder=args.image_encoder, model_dir=model_dir)
    settings = EvalSettings(samples=args.samples, scale=args.scale, prompt=args.prompt,
                            prompt_from_caption=args.prompt_from_caption, negative_prompt=args.negative_prompt,
                            steps=args.steps, guidance=_guidance(args, pipe), seed=args.seed,
                            batch_size=args.batch_size, text_only=args.text_only, width=args.width,
                            height=args.height, true_cfg=args.true_cfg)
    info = {"model": str(model), "adapter": None if args.text_only else str(adapter), "clip": str(clip_source),
            "data": args.data or f"world held-out (EVAL_SEED, {len(pairs)})"}
    with _notes(once=True):
        result = evaluate(target, pairs, clip, settings, keep_images=args.save_images is not None,
                          progress=sys.stderr.isatty(), info=info, judge=judge)
    if not state.is_main_process:
        return 0
    mode = "text-only baseline" if args.text_only else f"adapter {Path(str(adapter)).name}"
    print(format_table(result.metrics, title=f"{mode} on {info['data']}, {args.samples} samples per prompt",
                       labels=judge.labels if judge is not None else None))
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (pair, images) in enumerate(zip(pairs, result.images)):
            for k, image in enumerate(images):
                image.save(folder / f"{i:05d}-{Path(pair.name).stem}-{k}.png")
    if args.out:
        print(f"wrote {write_json(args.out, result.to_json())}")
    return 0
