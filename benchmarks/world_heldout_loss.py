"""The training objective on held-out world images: which adapter does the paper's loss prefer, and where?

Issue 15 asks why the world's plus (a resampler over patch states) loses to global on image-only colour and shape.
This measures each adapter file by the very loss it was trained on (the trainer's ``loss_for``: v-prediction MSE,
its seeded noise and timestep draws), on image-only items it never saw (``world.EVAL_SEED + 900``), split by the
prompt shape's side (small 18-25 px, large 35-44 px) and by timestep quarter. Each cell is a trainer run at
lr 1e-12 (nothing moves) with no dropout, so every adapter meets the same images, noise and timesteps: the
differences are paired. A quarter confines the trainer's timestep draw ``t`` to [lo, lo + 250) as
``lo + t % 250`` (this script wraps ``step_draws``; the product has no such setting). "image dropped" is global
with every image replaced by the trainer's unconditional one: what the image prompt is worth at all.

    python benchmarks/world_heldout_loss.py [--items 1024] [--steps 8] [--model FOLDER]   # ~10 min on 2 CPU cores

Prints one table: mean loss per cell, and plus - global with its standard error over the steps (batches of 128).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import tempfile
from pathlib import Path

import numpy as np

import ipadapter.training.train as T
from ipadapter.core.checkpoint import read_checkpoint
from ipadapter.generation.pipeline import EMBEDDED_MODEL
from ipadapter.world import shapes as world

SUBSETS = {"small (18-25 px)": lambda s: s.size <= 25, "large (35-44 px)": lambda s: s.size >= 35}
BANDS = [None, (0, 250), (250, 500), (500, 750), (750, 1000)]


def write_subset(folder: Path, keep, n: int, rng: random.Random) -> Path:
    """n image-only items (empty caption) whose sample passes ``keep``; returns the data.json."""
    folder.mkdir(parents=True)
    items = []
    while len(items) < n:
        s = world.random_sample(rng)
        if keep(s):
            name = f"{len(items):05d}.png"
            world.draw(s).save(folder / name)
            items.append({"image_file": name, "text": ""})
    (folder / "data.json").write_text(json.dumps(items))
    return folder / "data.json"


@contextlib.contextmanager
def timesteps_in(band: tuple[int, int] | None):
    """The trainer's timestep draws confined to ``band`` (same noise, same order of draws)."""
    original = T.step_draws
    if band is not None:
        def banded(*args, **kwargs):
            d = original(*args, **kwargs)
            d["t"] = band[0] + d["t"] % (band[1] - band[0])
            return d
        T.step_draws = banded
    try:
        yield
    finally:
        T.step_draws = original


def adapter_settings(path: Path) -> dict:
    cfg, _ = read_checkpoint(path)
    extra = {"resampler_depth": cfg.resampler_depth} if cfg.kind == "plus" else {}
    return dict(kind=cfg.kind, num_tokens=cfg.num_tokens, adapter=extra, init_adapter=str(path))


def losses(model: Path, data: Path, out: Path, steps: int, settings: dict) -> np.ndarray:
    values = dict(model=str(model), data=str(data), output=str(out), batch_size=128, max_steps=steps, lr=1e-12,
                  warmup_steps=0, drop_image=0.0, drop_text=0.0, drop_both=0.0, cache=None, tensorboard=False,
                  progress=False, log_every=1, save_every=10**9, seed=5, device="cpu")
    T.train(T.TrainConfig(**{**values, **settings}))
    return np.array([float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", (out / "train.log").read_text())])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(EMBEDDED_MODEL))
    ap.add_argument("--items", type=int, default=1024, help="held-out images per subset")
    ap.add_argument("--steps", type=int, default=8, help="batches of 128 per cell")
    args = ap.parse_args()
    model = Path(args.model)
    plus, glob = (adapter_settings(model / f) for f in ("ip-adapter_plus.safetensors", "ip-adapter_global.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="world-heldout-loss-") as tmp:
        rng = random.Random(world.EVAL_SEED + 900)
        for k, (subset, keep) in enumerate(SUBSETS.items()):
            data = write_subset(Path(tmp) / f"data-{k}", keep, args.items, rng)
            for band in BANDS:
                cell = Path(tmp) / f"{k}-{band}"
                with timesteps_in(band):
                    p = losses(model, data, cell / "plus", args.steps, plus)
                    g = losses(model, data, cell / "global", args.steps, glob)
                    dropped = None if band is not None else \
                        losses(model, data, cell / "dropped", args.steps, {**glob, "drop_image": 1.0})
                d = p - g
                rows.append((subset, "all" if band is None else f"{band[0]}-{band[1] - 1}", p.mean(), g.mean(),
                             None if dropped is None else dropped.mean(), d.mean(), d.std(ddof=1) / np.sqrt(len(d)),
                             int((d < 0).sum()), len(d)))
                print(*rows[-1], flush=True)
    print(f"\nheld-out loss (v-prediction MSE), {args.items} image-only items per subset, "
          f"{args.steps} x 128 per cell\n")
    print("| shapes | timesteps | plus | global | image dropped | plus - global | plus lower |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for subset, band, p, g, z, d, se, lower, n in rows:
        zs = "" if z is None else f"{z:.4f}"
        print(f"| {subset} | {band} | {p:.4f} | {g:.4f} | {zs} | {d:+.4f} +- {se:.4f} | {lower} / {n} |")


if __name__ == "__main__":
    main()
