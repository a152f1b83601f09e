"""The shapes world's results (issue 4), measured on held-out prompt images with ``ipadapter eval``'s code.

Every prompt image is drawn from ``world.EVAL_SEED`` streams (never the training stream); generations are read
back by ``world_parse`` (which shares nothing with the generator) and scored by the world's contrastive CLIP.

1. image-only prompts (empty text, scale 1), each adapter: background / shape colour / shape accuracy, CLIP-I,
   CLIP-T; against the text-only baseline with an empty prompt (and, for reference, with the caption);
2. image + text at scale 0.5: prompt images of a magenta triangle on yellow + "on a black background"; the
   background should follow the text, the shape and its colour the image; also against the scale (0.1 .. 1)
   for the global adapters (the paper's data and the contradicting-pairs data);
3. scale 0 gives the text-only image bit for bit (the adapter attached vs detached, same seeds, float output);
4. ablations as numbers: the "simple adapter" (image tokens concatenated to the text tokens, no new K/V) against
   the decoupled one, and global against plus, on the same metrics;
5. a sweep of the scale from 0 to 1 with conflicting text (another held-out image's caption): CLIP-I against
   CLIP-T, plotted to ``clip_scale_sweep.png``;
6. a picture grid (prompt images vs generations) ``world_grid.png``.

Writes ``world_results.json`` and ``world_results.md`` (the README table) to --out-dir (default docs/) and prints
the table. matplotlib is needed for the plot only (requirements-dev.txt).

    python benchmarks/world_report.py                      # the embedded world model, its four adapters
    python benchmarks/world_report.py --device cuda
    python benchmarks/world_report.py --model runs/world --adapters global=a.safetensors simple=b.safetensors
    python benchmarks/world_report.py --quick --out-dir /tmp/report   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ipadapter.core.checkpoint import parameter_count, read_checkpoint
from ipadapter.evaluation.evaluate import ClipScorer, EvalSettings, Pair, find_clip, write_json
from ipadapter.evaluation.evaluate import evaluate as _evaluate
from ipadapter.generation.pipeline import EMBEDDED_MODEL, load, load_pipeline
from ipadapter.world import shapes as world
from ipadapter.world.judge import WorldJudge, world_pairs

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_NAMES = ("global", "plus", "simple", "pairs")  # world_model/ip-adapter_<name>.safetensors
MULTI_IMAGE = ("yellow", "magenta", "triangle")  # prompt image: a magenta triangle on yellow ...
MULTI_TEXT = "on a black background"  # ... and this text, at scale 0.5
MULTI_SCALE = 0.5
TARGETS = {"image_only": {"background": 0.90, "colour": 0.90, "shape": 0.80}, "image_text": {"all": 0.80}}
FULL = dict(prompts=128, samples=4, steps=25, guidance=5.0, multi_prompts=32, sweep_prompts=48, sweep_samples=2,
            scales=[round(0.1 * i, 1) for i in range(11)], exact_prompts=8, grid_rows=8,
            multi_scales=[round(0.1 * i, 1) for i in range(1, 11)])
QUICK = dict(prompts=6, samples=1, steps=3, guidance=5.0, multi_prompts=4, sweep_prompts=4, sweep_samples=1,
             scales=[0.0, 0.5, 1.0], exact_prompts=2, grid_rows=3, multi_scales=[0.3, 1.0])


def evaluate(*args, **kwargs):
    """Every run here is on the shapes world: scored by its judge too."""
    return _evaluate(*args, judge=WorldJudge(), **kwargs)


# -------------------------------------------------------------------------------------------------- prompts
def multimodal_pairs(n: int) -> list[Pair]:
    """n held-out magenta-triangle-on-yellow prompt images (sizes and places vary), captioned with the wanted
    result; the truth is the image's own attributes (the text's background replaces it when scored)."""
    rng = random.Random(world.EVAL_SEED + 101)
    background, colour, shape = MULTI_IMAGE
    pairs = []
    for i in range(n):
        size = rng.randint(world.MIN_SIZE + 6, world.MAX_SIZE)
        s = world.Sample(background, colour, shape, size, rng.randint(0, world.IMAGE_SIZE - size),
                         rng.randint(0, world.IMAGE_SIZE - size))
        wanted = world.caption_from_parts("black", colour, shape)
        pairs.append(Pair(world.draw(s), wanted, f"multi-{i:03d}", {"background": background, "colour": colour,
                                                                     "shape": shape}))
    return pairs


def sweep_pairs(n: int) -> list[Pair]:
    """Held-out prompt images, each captioned with another held-out image that differs in every attribute:
    the text pulls one way and the image the other, so CLIP-T and CLIP-I trade off as the scale moves."""
    images = world.samples(n, world.EVAL_SEED + 202)
    others = iter(world.samples(50 * n, world.EVAL_SEED + 203))
    pairs = []
    for i, s in enumerate(images):
        o = next(o for o in others if o.background not in (s.background, s.colour) and o.colour != s.colour
                 and o.shape != s.shape)
        pairs.append(Pair(world.draw(s), world.caption(o), f"sweep-{i:03d}",
                          {"background": s.background, "colour": s.colour, "shape": s.shape}))
    return pairs


# -------------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def scale_zero_check(pipe, adapter_file: Path, pairs: list[Pair], cfg: dict, seed: int) -> dict:
    """The adapter attached at scale 0 vs the bare pipeline: same seeds, float outputs compared exactly."""
    kw = dict(num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance"], output_type="np")
    ip = load(pipe, adapter_file)
    try:
        with_adapter = [ip.generate(images=[p.image], prompt=MULTI_TEXT, scale=0.0, seed=seed + i, **kw)
                        for i, p in enumerate(pairs)]
    finally:
        ip.detach()
    bare = [pipe(prompt=MULTI_TEXT, generator=torch.Generator("cpu").manual_seed(seed + i), **kw).images
            for i in range(len(pairs))]
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(with_adapter, bare)]
    return {"images": len(pairs), "bit_exact": sum(d == 0.0 for d in diffs), "max_abs_diff": max(diffs),
            "text": MULTI_TEXT}


def adapter_info(path: Path) -> dict:
    cfg, tensors = read_checkpoint(path)
    return {"file": str(path), "kind": cfg.kind, "attention": cfg.attention, "tokens": cfg.num_tokens,
            "parameters": parameter_count(tensors)}


def target_checks(results: dict, main: str) -> dict:
    """Pass/fail of each stated target: for the main adapter, and image + text for every adapter."""
    checks = {}
    image_only = results["image_only"].get(main)
    if image_only:
        for k, floor in TARGETS["image_only"].items():
            checks[f"image-only {k} >= {floor:.0%}"] = bool(image_only[k] >= floor)
        checks["image-only CLIP-I above the empty-prompt baseline"] = bool(
            image_only["clip_i"] > results["text_only"]["empty"]["clip_i"])
    for name, multi in results["image_text"].items():  # this one for every adapter: they differ here
        if name != "text_only":
            floor = TARGETS["image_text"]["all"]
            checks[f"image + text at {MULTI_SCALE}: all three as wanted >= {floor:.0%} ({name})"] = bool(
                multi["all"] >= floor)
    zero = results.get("scale_zero")
    if zero:
        checks["scale 0 == text-only, bit for bit"] = zero["bit_exact"] == zero["images"]
    return checks


# -------------------------------------------------------------------------------------------------- outputs
def plot_sweep(sweep: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=120)
    for name, points in sweep.items():
        x = [p["clip_t"] for p in points]
        y = [p["clip_i"] for p in points]
        ax.plot(x, y, marker="o", label=name)
        for p in points:
            if p["scale"] in (0.0, 0.5, 1.0) or len(points) <= 5:
                ax.annotate(f"{p['scale']:g}", (p["clip_t"], p["clip_i"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP-T (generated vs the text prompt)")
    ax.set_ylabel("CLIP-I (generated vs the prompt image)")
    ax.set_title("Shapes world: adapter scale 0 -> 1 with conflicting text", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="adapter")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def grid_image(columns: list[tuple[str, list[Image.Image]]], cell: int = 96, pad: int = 4,
               header: int = 18) -> Image.Image:
    """Columns of images under a label each (rows line up across columns)."""
    rows = max(len(images) for _, images in columns)
    width = len(columns) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, header + rows * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (label, images) in enumerate(columns):
        x = pad + c * (cell + pad)
        draw.text((x + 2, 3), label, fill=(0, 0, 0))
        for r, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, header + pad + r * (cell + pad)))
    return canvas


def markdown(results: dict, checks: dict) -> str:
    def cell(m: dict | None, key: str) -> str:
        if not m or m.get(key) is None:
            return "-"
        return f"{m[key]:.1%}" if key in ("background", "colour", "shape", "all") else f"{m[key]:.3f}"

    head = ("| prompt | adapter | background | shape colour | shape | all three | CLIP-I | CLIP-T |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []

    def row(prompt: str, adapter: str, m: dict | None) -> None:
        keys = ("background", "colour", "shape", "all", "clip_i", "clip_t")
        rows.append(f"| {prompt} | {adapter} | " + " | ".join(cell(m, k) for k in keys) + " |")

    for name, m in results["image_only"].items():
        row("image only (empty text, scale 1)", _label(results, name), m)
    row("text only, empty prompt (baseline)", "-", results["text_only"]["empty"])
    row("text only, the caption (reference)", "-", results["text_only"]["caption"])
    multi = f"image (magenta triangle on yellow) + \"{MULTI_TEXT}\", scale {MULTI_SCALE}"
    for name, m in results["image_text"].items():
        if name != "text_only":
            row(multi, _label(results, name), m)
    row(f"text only, \"{MULTI_TEXT}\"", "-", results["image_text"].get("text_only"))
    s = results["settings"]
    lines = [head, *rows, "",
             f"Held-out prompt images (world.EVAL_SEED): {s['prompts']} image-only prompts x {s['samples']} samples, "
             f"{s['multi_prompts']} image+text prompts x {s['samples']}; {s['steps']} DDIM steps, guidance "
             f"{s['guidance']}. Image + text rows: \"all three\" = black background (the text) with a magenta "
             f"triangle (the image). CLIP-T there is against \"a magenta triangle on a black background\"."]
    zero = results.get("scale_zero")
    if zero:
        lines.append(f"Scale 0 vs the text-only pipeline: {zero['bit_exact']}/{zero['images']} images bit-exact "
                     f"(max abs difference {zero['max_abs_diff']:g}).")
    scans = results.get("image_text_scales") or {}
    if scans:
        scales = [p["scale"] for p in next(iter(scans.values()))]
        lines += ["", f"Image + text (magenta triangle on yellow + \"{MULTI_TEXT}\"), \"all three\" against the scale "
                  f"({s['multi_prompts']} prompts x 1 sample):", "",
                  "| adapter | " + " | ".join(f"{x:g}" for x in scales) + " |",
                  "| --- | " + " | ".join("---" for _ in scales) + " |"]
        lines += [f"| {_label(results, name)} | " + " | ".join(f"{p['all']:.0%}" for p in points) + " |"
                  for name, points in scans.items()]
    if checks:
        lines += ["", "| target | met |", "| --- | --- |"]
        lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in checks.items()]
    return "\n".join(lines)


def _label(results: dict, name: str) -> str:
    info = results["adapters"].get(name, {})
    what = {"global": "global", "plus": "plus (resampler)", "simple": "simple (concat, no new K/V)",
            "pairs": "global, contradicting-pairs data"}.get(name, name)
    if info.get("attention") == "concat" and "concat" not in what:
        what += " (concat)"
    return f"{what}, {info['parameters'] / 1e6:.2f}M" if info.get("parameters") else what


# ------------------------------------------------------------------------------------------------------ run
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(EMBEDDED_MODEL), help="world model folder (default: the embedded one)")
    ap.add_argument("--adapters", nargs="*", default=None, metavar="NAME=FILE",
                    help="adapters to compare (default: ip-adapter_{global,plus,simple}.safetensors in --model); "
                         "the first is the main one the targets are checked on")
    ap.add_argument("--clip", default=None, help="CLIPModel folder that scores (default: <model>/clip, or the "
                                                 "world model's own CLIP towers)")
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--quick", action="store_true", help="a few prompts and steps: a smoke run, not the results")
    ap.add_argument("--prompts", type=int, default=None, help="image-only prompts (default 128)")
    ap.add_argument("--samples", type=int, default=None, help="samples per prompt (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 5)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def resolve_adapters(model: Path, given: list[str] | None) -> dict[str, Path]:
    if given:
        out = {}
        for item in given:
            if "=" not in item:
                sys.exit(f"--adapters {item}: expected NAME=FILE, e.g. global=ip-adapter_global.safetensors")
            name, file = item.split("=", 1)
            if not Path(file).is_file():
                sys.exit(f"--adapters {item}: no such file")
            out[name] = Path(file)
        return out
    out = {n: model / f"ip-adapter_{n}.safetensors" for n in ADAPTER_NAMES}
    out = {n: p for n, p in out.items() if p.is_file()}
    if not out:
        sys.exit(f"{model}: no ip-adapter_{{global,plus,simple}}.safetensors; pass --adapters NAME=FILE")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("prompts", "samples", "steps", "guidance"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        sys.exit(f"{model}: not a model folder (the embedded world model is not built yet? pass --model DIR)")
    adapters = resolve_adapters(model, args.adapters)
    main_adapter = next(iter(adapters))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out_dir)
    t_start = time.perf_counter()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # keep stderr for our own progress lines
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    pipe = load_pipeline(model, device=device, dtype=torch.float32)
    clip_dir = find_clip(args.clip, model)
    clip = ClipScorer.from_pretrained(clip_dir, device=device)

    def settings(**kw) -> EvalSettings:
        base = dict(samples=cfg["samples"], steps=cfg["steps"], guidance=cfg["guidance"], seed=args.seed,
                    batch_size=args.batch_size)
        return EvalSettings(**{**base, **kw})

    pairs = world_pairs(cfg["prompts"])
    multi = multimodal_pairs(cfg["multi_prompts"])
    sweep_set = sweep_pairs(cfg["sweep_prompts"])
    results: dict = {
        "settings": {**cfg, "seed": args.seed, "model": str(model), "clip": str(clip_dir), "device": str(device),
                     "torch": torch.__version__, "machine": platform.machine(),
                     "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None},
        "adapters": {n: adapter_info(p) for n, p in adapters.items()},
        "image_only": {}, "text_only": {}, "image_text": {}, "image_text_scales": {}, "sweep": {},
        "seconds": {},
    }
    build_info = model / "world_build.json"
    if build_info.is_file():
        results["world_build"] = {k: v for k, v in json.loads(build_info.read_text()).items()
                                  if k in ("clip", "vae", "unet", "eval", "adapters")}
    grid_cols: list[tuple[str, list[Image.Image]]] = [("prompt", [p.image for p in pairs[: cfg["grid_rows"]]])]
    multi_cols: list[tuple[str, list[Image.Image]]] = [("prompt", [p.image for p in multi[: cfg["grid_rows"]]])]

    def timed(key: str, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        results["seconds"][key] = round(time.perf_counter() - t, 1)
        print(f"  {key}: {results['seconds'][key]} s", file=sys.stderr, flush=True)
        return out

    print(f"world report on {device}: {len(adapters)} adapter(s), {cfg['prompts']} prompts x {cfg['samples']}",
          file=sys.stderr)
    for name, path in adapters.items():
        ip = load(pipe, path)
        try:
            r = timed(f"image_only/{name}", evaluate, ip, pairs, clip, settings(scale=1.0), keep_images=True)
            results["image_only"][name] = r.metrics
            grid_cols.append((name, [im[0] for im in r.images[: cfg["grid_rows"]]]))
            r = timed(f"image_text/{name}", evaluate, ip, multi, clip,
                      settings(prompt=MULTI_TEXT, scale=MULTI_SCALE), keep_images=True)
            results["image_text"][name] = r.metrics
            multi_cols.append((f"{name} +text", [im[0] for im in r.images[: cfg["grid_rows"]]]))
            if name in ("global", "pairs") or len(adapters) == 1:  # image + text: which scale works, if any
                results["image_text_scales"][name] = [
                    {"scale": scale, **{k: m[k] for k in ("background", "colour", "shape", "all")}}
                    for scale in cfg["multi_scales"]
                    for m in [timed(f"image_text/{name}/{scale}", evaluate, ip, multi, clip,
                                    settings(prompt=MULTI_TEXT, scale=scale, samples=1)).metrics]]
            if name != "simple" or len(adapters) == 1:  # the sweep: the decoupled adapters
                points = []
                for scale in cfg["scales"]:
                    m = timed(f"sweep/{name}/{scale}", evaluate, ip, sweep_set, clip,
                              settings(prompt_from_caption=True, scale=scale, samples=cfg["sweep_samples"])).metrics
                    points.append({"scale": scale, "clip_i": m["clip_i"], "clip_t": m["clip_t"],
                                   "text_attributes": m["all"]})
                results["sweep"][name] = points
        finally:
            ip.detach()
    r = timed("text_only/empty", evaluate, pipe, pairs, clip, settings(text_only=True), keep_images=True)
    results["text_only"]["empty"] = r.metrics
    grid_cols.append(("text only", [im[0] for im in r.images[: cfg["grid_rows"]]]))
    results["text_only"]["caption"] = timed("text_only/caption", evaluate, pipe, pairs, clip,
                                            settings(text_only=True, prompt_from_caption=True)).metrics
    r = timed("image_text/text_only", evaluate, pipe, multi, clip, settings(text_only=True, prompt=MULTI_TEXT),
              keep_images=True)
    results["image_text"]["text_only"] = r.metrics
    multi_cols.append(("text only +text", [im[0] for im in r.images[: cfg["grid_rows"]]]))
    results["scale_zero"] = timed("scale_zero", scale_zero_check, pipe, adapters[main_adapter],
                                  pairs[: cfg["exact_prompts"]], cfg, args.seed)

    checks = target_checks(results, main_adapter)
    results["targets"] = {"adapter": main_adapter, "checks": checks}
    results["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    table = markdown(results, checks)
    results["markdown"] = table

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_sweep(results["sweep"], out_dir / "clip_scale_sweep.png")
    gap = [("", [])]
    grid_image(grid_cols + gap + multi_cols).save(out_dir / "world_grid.png")
    write_json(out_dir / "world_results.json", results)
    (out_dir / "world_results.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out_dir / 'world_results.json'}, world_results.md, clip_scale_sweep.png, world_grid.png "
          f"({results['seconds']['total']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
