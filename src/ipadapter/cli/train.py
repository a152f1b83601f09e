"""``ipadapter train``: flags -> a :class:`~ipadapter.training.train.TrainConfig` -> ``train()``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..core.errors import IPAdapterError
from ..training.train import KINDS, TrainConfig, train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train an adapter (any kind; SD 1.x, SDXL, FLUX.1, SD3.5; 1 CPU to many "
                                            "GPUs)",
                              description="Train an IP-Adapter. Settings come from --config (JSON), then the flags; "
                                          "launch with `accelerate launch -m ipadapter.cli train ...` for several "
                                          "GPUs.")
    t.add_argument("--config", help="JSON file of TrainConfig settings (see configs/)")
    t.add_argument("--model", help="diffusers model folder (SD 1.x, SDXL, FLUX.1, SD3/SD3.5) or single "
                                   ".safetensors/.ckpt file (SD 1.x or SDXL); default: the embedded world model, "
                                   "ipadapter.embedded_model()")
    t.add_argument("--model-config", metavar="DIR_OR_HUB_ID",
                   help="for a single-file --model: a diffusers folder or hub id of the same family (its configs)")
    t.add_argument("--data", help=".json/.jsonl list, folder of images + .txt captions, or .tar shards")
    t.add_argument("--data-root", help="folder the JSON list's paths are relative to")
    t.add_argument("--output", help="output folder: ip-adapter.safetensors, checkpoints/, logs/")
    t.add_argument("--kind", choices=KINDS, help="default: global (UNets; Flux in the XLabs layout), time-plus (SD3.5)")
    t.add_argument("--image-encoder", help="CLIP vision folder (SD3.5: SigLIP; default MODEL/image_encoder)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int, help="per process")
    t.add_argument("--resolution", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--cache", help="feature cache folder (latents, text and image features computed once)")
    t.add_argument("--no-cache", action="store_true", help="encode every step instead of caching")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set ema_decay=0.999 --set mixed_precision=bf16")
    return t


def config_from_args(args) -> TrainConfig:
    values: dict = {}
    if args.config:
        values = dataclasses.asdict(TrainConfig.from_file(args.config))
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise IPAdapterError(f"--set {item}: expected KEY=VALUE")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    flags = {"model": args.model, "model_config": args.model_config, "data": args.data, "data_root": args.data_root,
             "output": args.output,
             "kind": args.kind, "image_encoder": args.image_encoder, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "resolution": args.resolution, "save_every": args.save_every,
             "lr": args.lr, "cache": args.cache}
    values.update({k: v for k, v in flags.items() if v is not None})
    from ..generation.pipeline import embedded_name, resolve_model

    if embedded_name(values.get("model") or None):  # as generate/eval/ui: an embedded world member, by name or default
        values["model"] = str(resolve_model(values.get("model") or None)[0])
    if args.no_cache:
        values["cache"] = None
    if args.resume:
        values["resume"] = True
    return TrainConfig.from_dict(values, "flags")


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    from ..generation.loading import is_single_file, single_file_folder

    if cfg.model and is_single_file(cfg.model):  # the trainer reads a diffusers folder: write it once, beside OUTPUT
        if int(os.environ.get("RANK", "0")) == 0:
            single_file_folder(cfg.model, cfg.model_config, os.path.join(cfg.output, "base-model"))
        _wait_for_rank0(os.path.join(cfg.output, "base-model", "ipadapter-source.json"))
        cfg = dataclasses.replace(cfg, model=os.path.join(cfg.output, "base-model"))
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


def _wait_for_rank0(marker: str, timeout_s: float = 3600.0) -> None:
    import time

    start = time.monotonic()
    while not os.path.isfile(marker):
        if time.monotonic() - start > timeout_s:
            raise IPAdapterError(f"{marker}: rank 0 did not write the converted single-file model")
        time.sleep(1.0)
