"""The embedded world's whole model family in one command: base model, then its adapters, with our trainer.

    ipadapter world build --out src/ipadapter/world/model [--device cuda] [--quick]

1. ``world_build.build``: tokenizer, contrastive CLIP towers, VAE, text-to-image UNet (a diffusers folder).
2. ``world.write_dataset``: training pairs in the official JSON format (TRAIN_SEED; evaluation uses EVAL_SEED).
3. ``train.train``: five adapters on the frozen base with the same images, steps and batch -- the default one
   (``ip-adapter.safetensors``: global, trained where every captioned item comes with a prompt image that
   contradicts what the caption names, so that one adapter serves image-only prompts and image + text prompts);
   the paper's decoupled adapter with global features, the fine-grained "plus" one and the paper's "simple
   adapter" ablation (image tokens appended to the text tokens, no new K/V), all on the paper's (image, caption)
   data; and "pairs", global with contradicting prompt images for half the captioned items.

Reproducible: every stage is seeded. Device-agnostic: ``--device cuda`` runs the same code on a GPU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from ..core.errors import IPAdapterError

ADAPTERS = {  # file name -> (kind, AdapterConfig overrides, training data: a key of DATA)
    "ip-adapter.safetensors": ("global", {}, "contra"),
    "ip-adapter_global.safetensors": ("global", {}, "paper"),
    "ip-adapter_plus.safetensors": ("plus", {"resampler_depth": 2}, "paper"),
    "ip-adapter_simple.safetensors": ("global", {"attention": "concat"}, "paper"),
    "ip-adapter_pairs.safetensors": ("global", {}, "pairs"),
}
# "pairs": the same images and captions, but half of the items whose caption names something get a prompt image
# in which those attributes differ (world.contradicting_prompt): the text must win where it speaks. The paper
# trains on (image, caption) alone, which never shows the adapter a disagreement; see the README's results.
PAIRS_PROMPT_SWAP = 0.5
DATA = {  # variant -> world.write_dataset settings
    "paper": {}, "pairs": {"prompt_swap": PAIRS_PROMPT_SWAP}, "contra": {"prompt_swap": 1.0, "image_only": 0.125},
}
# The embedded model's default adapter (embedded_model()): the "pairs" adapter fine-tuned where every item whose
# caption names something has a prompt image contradicting it and 1/8 + 7/8 x 1/8 of the items are image-only
# (empty caption, own image). The text is never dropped (drop_text 0): a contradicting item without its text would
# teach the adapter to move away from its image. One adapter for image-only (scale 1) and image + text (0.5).
DEFAULT_ADAPTER = "ip-adapter.safetensors"
TRAINING = {  # per-adapter changes to the shared recipe; "init_adapter" names a file in the family trained first
    DEFAULT_ADAPTER: {"init_adapter": "ip-adapter_pairs.safetensors", "steps": 300, "drop_text": 0.0},
}
RECIPE = ("ipadapter train on the frozen base: world images (TRAIN_SEED + seed), partial captions (each attribute "
          "named with chance 1/2; empty -> 'a shape'), AdamW lr 3e-4 wd 0.01, warm-up, grad clip 1.0, drop "
          "image/text/both 5% each, feature cache. 'pairs' data: the same, with prompt images that contradict the "
          f"caption for {PAIRS_PROMPT_SWAP:.0%} of the items whose caption names something. The default "
          f"'{DEFAULT_ADAPTER}': the pairs adapter fine-tuned on 'contra' data (such prompt images for all of them, "
          "1/8 of the items image-only, empty caption, on top of the empty partial captions), text never dropped")
TRAIN_IMAGES = 6_000  # the shipped family's settings: a CPU afternoon; a GPU can afford more
ADAPTER_STEPS = 900
ADAPTER_BATCH = 128
ADAPTER_LR = 3e-4  # the paper's 1e-4 is for 1M steps; this world gets a few thousand
ADAPTER_WARMUP = 100
QUICK = dict(train_images=64, adapter_steps=4, adapter_batch=8)


def build_family(out_dir: str | Path, device: str = "cpu", quick: bool = False, seed: int = 0,
                 base_budget_s: float | None = None, adapter_steps: int | None = None,
                 adapter_batch: int | None = None, train_images: int | None = None,
                 adapter_seconds: float | None = None, skip_base: bool = False, progress: bool = True,
                 base_overrides: dict | None = None, only: list[str] | None = None) -> dict:
    """Build (or, with ``skip_base``, reuse) the base model in ``out_dir`` and train its adapters there.

    ``adapter_seconds``: fit the step count to this many seconds per adapter, measured on the global one (two
    short probe runs on the shared feature cache); every adapter then gets the same steps and batch.
    ``only``: train just these adapter files (names from :data:`ADAPTERS`); the others in ``out_dir`` stay.
    """
    from ..training.train import TrainConfig, train
    from . import shapes as world
    from .build import build

    out = Path(out_dir)
    unknown = sorted(set(only or ()) - set(ADAPTERS))
    if unknown:
        raise IPAdapterError(f"--adapters {', '.join(unknown)}: the world's adapters are {', '.join(ADAPTERS)}")
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
    chosen = {n: v for n, v in ADAPTERS.items() if only is None or n in only}
    for name in list(chosen):  # an adapter fine-tuned from another comes after it
        start = TRAINING.get(name, {}).get("init_adapter")
        if start in chosen:
            chosen[name] = chosen.pop(name)
        elif start is not None and not (out / start).is_file():
            raise IPAdapterError(f"--adapters {name}: it starts from {start}, which is not in {out} (train both)")
    with tempfile.TemporaryDirectory(prefix="ipadapter-world-") as tmp:
        data = {}
        for variant in sorted({v[2] for v in chosen.values()} | ({"paper"} if adapter_seconds else set())):
            data[variant] = world.write_dataset(Path(tmp) / f"data-{variant}", n_images, seed=world.TRAIN_SEED + seed,
                                                progress=progress, **DATA[variant])
            if variant in ("paper", "pairs"):
                # Partial captions make the image carry what the text leaves out; these two were trained when an
                # empty caption counted as a bad item, so it becomes the attribute-free "a shape" (reproducible).
                items = json.loads(data[variant].read_text())
                for item in items:
                    item["text"] = item["text"] or "a shape"
                data[variant].write_text(json.dumps(items))

        def config(name: str, kind: str, extra: dict, steps: int, variant: str = "paper", **changes) -> TrainConfig:
            return TrainConfig(
                model=str(out), data=str(data[variant]), output=str(Path(tmp) / name), kind=kind,
                adapter=dict(extra), max_steps=steps, batch_size=batch, lr=ADAPTER_LR,
                warmup_steps=min(ADAPTER_WARMUP, steps // 10), max_grad_norm=1.0, save_every=steps, seed=seed,
                device=device, progress=progress, cache=str(Path(tmp) / f"cache-{kind}"), tensorboard=False,
                **changes,
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
        for name, (kind, extra, variant) in chosen.items():
            started = time.perf_counter()
            changes = dict(TRAINING.get(name, {}))
            own_steps = changes.pop("steps", None)  # explicit --adapter-steps / --quick / --adapter-seconds win
            if changes.get("init_adapter"):
                changes["init_adapter"] = str(out / changes["init_adapter"])
            n_steps = steps if adapter_steps or quick or adapter_seconds or own_steps is None else own_steps
            written = train(config(name, kind, extra, n_steps, variant, **changes))
            shutil.copy2(written, out / name)
            if changes.get("init_adapter"):
                changes["init_adapter"] = Path(changes["init_adapter"]).name
            summary["adapters"][name] = {"kind": kind, **extra, "data": variant, **DATA[variant],
                                         **changes, "steps": n_steps, "batch": batch, "images": n_images,
                                         "seconds": round(time.perf_counter() - started, 1)}
            if progress:
                print(f"world: trained {name} in {summary['adapters'][name]['seconds']} s", flush=True)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    record = {k: v for k, v in summary.items() if k != "base"}
    previous = out / "world_family.json"
    if only is not None and previous.is_file():  # keep what the other adapters' runs recorded
        try:
            earlier = json.loads(previous.read_text()).get("adapters", {})
        except (json.JSONDecodeError, AttributeError):
            earlier = {}
        record["adapters"] = {**{k: v for k, v in earlier.items() if k in ADAPTERS}, **record["adapters"]}
    record["recipe"] = RECIPE
    previous.write_text(json.dumps(record, indent=1) + "\n")
    return summary
