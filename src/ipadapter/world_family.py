"""The embedded world's whole model family in one command: base model, then its adapters, with our trainer.

    ipadapter world build --out src/ipadapter/world_model [--device cuda] [--quick]

1. ``world_build.build``: tokenizer, contrastive CLIP towers, VAE, text-to-image UNet (a diffusers folder).
2. ``world.write_dataset``: training pairs in the official JSON format (TRAIN_SEED; evaluation uses EVAL_SEED).
3. ``train.train``: three adapters on the frozen base with the same data, steps and batch -- the paper's
   decoupled adapter with global features (the default adapter), the fine-grained "plus" one, and the
   paper's "simple adapter" ablation (image tokens appended to the text tokens, no new K/V).

Reproducible: every stage is seeded. Device-agnostic: ``--device cuda`` runs the same code on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ADAPTERS = {  # file name -> (kind, AdapterConfig overrides)
    "ip-adapter_global.safetensors": ("global", {}),
    "ip-adapter_plus.safetensors": ("plus", {"resampler_depth": 2}),
    "ip-adapter_simple.safetensors": ("global", {"attention": "concat"}),
}
TRAIN_IMAGES = 12_000
ADAPTER_STEPS = 3_000
ADAPTER_BATCH = 128
ADAPTER_LR = 3e-4  # the paper's 1e-4 is for 1M steps; this world gets a few thousand
ADAPTER_WARMUP = 100
QUICK = dict(train_images=64, adapter_steps=4, adapter_batch=8)


def build_family(out_dir: str | Path, device: str = "cpu", quick: bool = False, seed: int = 0,
                 base_budget_s: float | None = None, adapter_steps: int | None = None,
                 adapter_batch: int | None = None, train_images: int | None = None,
                 adapter_seconds: float | None = None, skip_base: bool = False, progress: bool = True,
                 base_overrides: dict | None = None) -> dict:
    """Build (or, with ``skip_base``, reuse) the base model in ``out_dir`` and train its adapters there.

    ``adapter_seconds``: fit the step count to this many seconds per adapter, measured on the global one (two
    short probe runs on the shared feature cache); every adapter then gets the same steps and batch.
    """
    from . import world
    from .train import TrainConfig, train
    from .world_build import build

    out = Path(out_dir)
    steps = adapter_steps or (QUICK["adapter_steps"] if quick else ADAPTER_STEPS)
    batch = adapter_batch or (QUICK["adapter_batch"] if quick else ADAPTER_BATCH)
    n_images = train_images or (QUICK["train_images"] if quick else TRAIN_IMAGES)
    summary: dict = {}
    t0 = time.perf_counter()
    if not skip_base:
        overrides = dict(base_overrides or {})
        if base_budget_s is not None:
            overrides["time_budget_s"] = base_budget_s or None
        summary["base"] = build(out, device=device, quick=quick, seed=seed, progress=progress, **overrides)
    summary["adapters"] = {}
    with tempfile.TemporaryDirectory(prefix="ipadapter-world-") as tmp:
        data_json = world.write_dataset(Path(tmp) / "data", n_images, seed=world.TRAIN_SEED + seed,
                                        progress=progress)
        # Partial captions make the image carry what the text leaves out; an empty one would count as a bad
        # item for the trainer (it drops the text itself, 5% + 5%), so it becomes the attribute-free "a shape".
        items = json.loads(Path(data_json).read_text())
        for item in items:
            item["text"] = item["text"] or "a shape"
        Path(data_json).write_text(json.dumps(items))

        def config(name: str, kind: str, extra: dict, steps: int) -> TrainConfig:
            return TrainConfig(
                model=str(out), data=str(data_json), output=str(Path(tmp) / name), kind=kind, adapter=dict(extra),
                max_steps=steps, batch_size=batch, lr=ADAPTER_LR, warmup_steps=min(ADAPTER_WARMUP, steps // 10),
                max_grad_norm=1.0, save_every=steps, seed=seed, device=device, progress=progress,
                cache=str(Path(tmp) / f"cache-{kind}"), tensorboard=False,
            )

        if adapter_seconds:
            timings = []
            for probe in (1, 20, 120):  # the first run builds the feature cache; time the two after it
                started = time.perf_counter()
                train(config(f"probe-{probe}", "global", {}, probe))
                timings.append(time.perf_counter() - started)
            rate = 100 / max(timings[2] - timings[1], 1e-3)
            steps = max(100, min(steps, int(rate * adapter_seconds)))
            summary["probe_steps_per_s"] = round(rate, 2)
            if progress:
                print(f"world: {rate:.1f} steps/s -> {steps} steps per adapter", flush=True)
        for name, (kind, extra) in ADAPTERS.items():
            started = time.perf_counter()
            written = train(config(name, kind, extra, steps))
            shutil.copy2(written, out / name)
            summary["adapters"][name] = {"kind": kind, **extra, "steps": steps, "batch": batch,
                                         "seconds": round(time.perf_counter() - started, 1)}
            if progress:
                print(f"world: trained {name} in {summary['adapters'][name]['seconds']} s", flush=True)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "world_family.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "base"},
                                                      indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------- CLI
def add_world_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("world", help="the embedded shapes world: data and model family")
    sub = p.add_subparsers(dest="world_command", required=True)
    b = sub.add_parser("build", help="train the whole model family (base + adapters) from scratch")
    b.add_argument("--out", required=True, help="output folder (a diffusers StableDiffusionPipeline folder)")
    b.add_argument("--device", default="cpu", help="cpu or cuda (same code; a GPU takes minutes, a CPU hours)")
    b.add_argument("--quick", action="store_true", help="a seconds-long smoke variant (tests)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--base-budget", type=float, default=None, help="seconds for the base model's training stages")
    b.add_argument("--adapter-steps", type=int, default=None)
    b.add_argument("--adapter-seconds", type=float, default=None,
                   help="fit the adapters' step count to about this many seconds each (measured first)")
    b.add_argument("--skip-base", action="store_true", help="reuse the base model in --out, train adapters only")
    d = sub.add_parser("data", help="write N world samples in the official JSON training format")
    d.add_argument("--out", required=True)
    d.add_argument("-n", type=int, default=1000)
    d.add_argument("--seed", type=int, default=None, help="default: the training seed (evaluation uses another)")
    return p


def cmd_world(args) -> int:
    if args.world_command == "data":
        from . import world

        path = world.write_dataset(args.out, args.n, seed=world.TRAIN_SEED if args.seed is None else args.seed)
        print(path)
        return 0
    build_family(args.out, device=args.device, quick=args.quick, seed=args.seed, base_budget_s=args.base_budget,
                 adapter_steps=args.adapter_steps, adapter_seconds=args.adapter_seconds, skip_base=args.skip_base)
    print(args.out)
    return 0
