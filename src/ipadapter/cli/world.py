"""``ipadapter world build|data``: flags -> :func:`~ipadapter.world.family.build_family` and the data writer."""

from __future__ import annotations

import argparse

from ..world.family import ADAPTER_BATCH, ADAPTER_STEPS, ADAPTERS, MEMBERS, TRAIN_IMAGES, build_family
from .args import _float, _positive_int


def add_world_parser(subparsers) -> argparse.ArgumentParser:
    def _probability(text: str) -> float:
        value = _float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
        return value

    p = subparsers.add_parser("world", help="the embedded shapes world: data and model family")
    sub = p.add_subparsers(dest="world_command", required=True)
    b = sub.add_parser("build", help="train the whole model family (base + adapters) from scratch")
    b.add_argument("--out", required=True, help="the UNet member's folder (a diffusers StableDiffusionPipeline "
                                                "folder); the transformer member goes to OUT_sd3")
    b.add_argument("--members", nargs="+", choices=MEMBERS, default=None,
                   help="build only these members (default: both; world-sd3 needs world's parts in --out)")
    b.add_argument("--sd3-out", default=None, help="the transformer member's folder (default: OUT_sd3)")
    b.add_argument("--device", default="cpu", help="cpu or cuda (same code; a GPU takes minutes, a CPU hours)")
    b.add_argument("--quick", action="store_true", help="a seconds-long smoke variant (tests)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--base-budget", type=float, default=None, help="seconds for the base model's training stages")
    b.add_argument("--adapter-steps", type=_positive_int, default=None, help=f"default {ADAPTER_STEPS}")
    b.add_argument("--adapter-batch", type=_positive_int, default=None, help=f"default {ADAPTER_BATCH}")
    b.add_argument("--train-images", type=_positive_int, default=None,
                   help=f"adapter training images (default {TRAIN_IMAGES})")
    b.add_argument("--adapter-seconds", type=float, default=None,
                   help="fit the adapters' step count to about this many seconds each (measured first)")
    b.add_argument("--skip-base", action="store_true", help="reuse the base model in --out, train adapters only")
    b.add_argument("--adapters", nargs="+", metavar="FILE", choices=list(ADAPTERS), default=None,
                   help="train only these adapter files (default: all of them)")
    d = sub.add_parser("data", help="write N world samples in the official JSON training format")
    d.add_argument("--out", required=True)
    d.add_argument("-n", type=_positive_int, default=1000)
    d.add_argument("--seed", type=int, default=None, help="default: the training seed (evaluation uses another)")
    d.add_argument("--caption-keep", type=_probability, default=0.5,
                   help="chance that a caption names each attribute (default 0.5; 1 = full captions)")
    d.add_argument("--prompt-swap", type=_probability, default=0.0,
                   help="chance of a separate prompt image contradicting what the caption names (the 'pairs' data)")
    return p


def cmd_world(args) -> int:
    if args.world_command == "data":
        from ..world import shapes as world

        path = world.write_dataset(args.out, args.n, seed=world.TRAIN_SEED if args.seed is None else args.seed,
                                   caption_keep=args.caption_keep, prompt_swap=args.prompt_swap)
        print(path)
        return 0
    build_family(args.out, device=args.device, quick=args.quick, seed=args.seed, base_budget_s=args.base_budget,
                 adapter_steps=args.adapter_steps, adapter_seconds=args.adapter_seconds, skip_base=args.skip_base,
                 adapter_batch=args.adapter_batch, train_images=args.train_images, only=args.adapters,
                 members=args.members, sd3_out=args.sd3_out)
    print(args.out)
    return 0
