"""Bit-identity check: a fixed set of generations through the public API only, digested.

    PYTHONPATH=src python benchmarks/identity_check.py --out digests.json            # every case
    PYTHONPATH=src python benchmarks/identity_check.py --compare tests/data/identity_digests.json
    PYTHONPATH=src python benchmarks/identity_check.py --only sd15-global,world-global --compare ...

Each case makes images with ``ipadapter.load`` / ``IPAdapter.generate`` / ``set_images`` (or the ``ipadapter``
command, for ``eval`` and the trainer's validation images) on the tiny SD 1.5- and SDXL-shaped pipelines of
``ipadapter.testing`` and on the embedded world model, and records the sha256 of every image as uint8 pixels
(shape included). Only root-level names (``ipadapter.*``, ``ipadapter.testing``, ``ipadapter.cli.main``) are
used, so the same script runs on the package before and after a restructure (point PYTHONPATH at that tree's
``src``) and shows whether any image moved.

Floating-point results depend on the machine (CPU instruction set, torch build), not only on the code; the file
records a ``probe`` digest of a fixed torch computation, and ``--compare`` (and the test that uses the file) only
judge images made where the probe matches. Runs on one CPU thread (thread count can change float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEPS = 3
SHAPES = ("sd15", "sdxl")
KINDS = ("global", "plus", "full", "faceid", "faceid-plus", "faceid-portrait")
WORLD_ADAPTERS = ("global", "plus", "simple", "pairs")


# --------------------------------------------------------------------------------------------------- digests
def digest(image) -> str:
    """sha256 of an image as uint8 pixels, its shape included."""
    arr = np.ascontiguousarray(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image))
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def tensors_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + repr(tuple(t.shape)).encode() + str(t.dtype).encode() + t.numpy().tobytes())
    return h.hexdigest()


def probe() -> str:
    """Digest of a fixed float computation: equal on machines (and torch builds) that round alike."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 300, generator=g), torch.randn(300, 53, generator=g)
    x = torch.randn(2, 8, 16, 16, generator=g)
    w = torch.randn(16, 8, 3, 3, generator=g)
    out = [a @ b, torch.nn.functional.conv2d(x, w, padding=1), torch.softmax(a, -1),
           torch.nn.functional.layer_norm(a, (300,)), torch.nn.functional.silu(a).exp()]
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in out)).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- inputs
def noise(seed: int, size=(40, 36)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def half_mask(left: bool, size=(16, 16)) -> Image.Image:
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[:, : size[0] // 2] = 255
    return Image.fromarray(arr if left else 255 - arr, "L")


def world_picture(background=(0, 0, 0), colour=(255, 0, 255)) -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:] = background
    arr[16:48, 20:44] = colour
    return Image.fromarray(arr)


class World:
    """Pipelines and adapters, built once per shape (seeded, so the same on every run)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.pipes: dict[str, object] = {}
        self.files: dict[tuple, Path] = {}

    def pipe(self, shape: str):
        from ipadapter.testing import tiny_pipeline

        if shape not in self.pipes:
            self.pipes[shape] = tiny_pipeline(shape)
        return self.pipes[shape]

    def adapter(self, shape: str, kind: str, seed: int = 0) -> Path:
        """A random adapter file of ``kind`` for the tiny ``shape`` pipeline."""
        key = (shape, kind, seed)
        if key not in self.files:
            pipe = self.pipe(shape)
            adapter = _random_adapter(pipe, kind, seed)
            path = self.tmp / f"{shape}-{kind}-{seed}.safetensors"
            adapter.save(path)
            self.files[key] = path
        return self.files[key]


def _random_adapter(pipe, kind: str, seed: int):
    import ipadapter
    from ipadapter.testing import random_adapter

    if kind in ("global", "plus", "full"):
        return random_adapter(pipe.unet, kind, encoder=pipe.image_encoder, seed=seed)
    layers = ipadapter.unet_layers(pipe.unet)
    cross = [layer for layer in layers if layer.cross_dim is not None]
    cfg = ipadapter.AdapterConfig(
        kind=kind, num_tokens=16 if kind == "faceid-portrait" else 4, cross_attention_dim=cross[0].cross_dim,
        embed_dim=512, layer_widths={layer.index: layer.width for layer in cross}, id_embed_dim=512, id_hidden_dim=64,
        lora_layers={layer.index: 4 for layer in layers} if kind != "faceid-portrait" else {})
    if kind == "faceid-plus":
        cfg.embed_dim = pipe.image_encoder.config.hidden_size
        cfg.resampler_dim, cfg.resampler_depth = cfg.cross_attention_dim, 2
        cfg.resampler_heads, cfg.resampler_dim_head = 1, 64
    torch.manual_seed(seed)
    adapter = ipadapter.Adapter(cfg)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return adapter


def faces(n: int = 1, seed: int = 7) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def controlnet(shape: str):
    from diffusers import ControlNetModel

    from ipadapter.testing import tiny_unet

    torch.manual_seed(9)
    return ControlNetModel.from_unet(tiny_unet(shape, 32 if shape == "sd15" else 64),
                                     conditioning_embedding_out_channels=(16, 32)).eval()


# -------------------------------------------------------------------------------------------------- cases
def _load(w: World, shape: str, kinds, **kwargs):
    import ipadapter

    files = [w.adapter(shape, k, seed) for seed, k in enumerate(kinds)]
    return ipadapter.load(w.pipe(shape), files if len(files) > 1 else files[0], **kwargs)


def _with(ip, fn):
    try:
        return fn(ip)
    finally:
        ip.detach()


def kind_case(shape: str, kind: str):
    def run(w: World):
        extra = {"face_embeds": faces()} if kind.startswith("faceid") else {}
        images = [noise(1)] if kind in ("global", "plus", "full", "faceid-plus") else []
        return _with(_load(w, shape, [kind]), lambda ip: ip.generate(
            images=images, prompt="a red circle", num_inference_steps=STEPS, seed=0, **extra))
    return run


def controls_case(shape: str):
    def run(w: World):
        return _with(_load(w, shape, ["global"]), lambda ip: ip.generate(
            images=[noise(1), noise(2)], weights=[1.0, 2.0], masks=[half_mask(True), half_mask(False)],
            negative_images=[noise(3)], start=0.2, end=0.9, curve="linear", blocks="down_blocks.1=0.5,*=1",
            prompt="", num_inference_steps=STEPS, seed=1))
    return run


def average_case(shape: str):
    def run(w: World):
        return _with(_load(w, shape, ["plus"]), lambda ip: ip.generate(
            images=[noise(1), noise(2)], weights=[0.3, 0.7], combine="norm-average", masks=[half_mask(True)],
            curve="ease-out", prompt="a square", scale=0.7, num_inference_steps=STEPS, seed=2))
    return run


def side_case(shape: str, mode: str):
    def run(w: World):
        extra: dict = {"init_image": noise(4, (16, 16))}
        if mode == "img2img":
            extra["strength"] = 0.7
        elif mode == "inpaint":
            extra["mask_image"] = half_mask(True)
        else:
            extra = {"controlnets": [controlnet(shape)], "control_images": [noise(5, (16, 16))],
                     "control_scales": 0.8}
        return _with(_load(w, shape, ["global"]), lambda ip: ip.generate(
            images=[noise(1)], prompt="a cat", num_inference_steps=4, seed=3, **extra))
    return run


def two_adapters_case(shape: str):
    def run(w: World):
        import ipadapter

        prompts = [ipadapter.ImagePrompt(images=[noise(1)], blocks="down_blocks.1=1,*=0.5"),
                   ipadapter.ImagePrompt(images=[noise(2)], scale=0.6, start=0.3)]
        return _with(_load(w, shape, ["global", "plus"]), lambda ip: ip.generate(
            prompts=prompts, prompt="two things", num_inference_steps=STEPS, seed=4))
    return run


def batch_case(shape: str):
    def run(w: World):
        return _with(_load(w, shape, ["full"]), lambda ip: ip.generate(
            images=[noise(6)], prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "dark"],
            num_images=2, num_inference_steps=STEPS, seed=5, guidance_scale=5.0))
    return run


def set_images_case(shape: str):
    def run(w: World):
        def go(ip):
            ip.set_images([noise(1), noise(2)], scale=0.7)
            gens = [torch.Generator("cpu").manual_seed(6)]
            try:
                return ip.pipe(prompt="a cat", num_inference_steps=STEPS, generator=gens).images
            finally:
                ip.clear()
        return _with(_load(w, shape, ["global"]), go)
    return run


def embeds_case(shape: str):
    def run(w: World):
        def go(ip):
            cond, uncond = ip.embed([noise(1)])
            return ip.generate(embeds=(uncond, cond), prompt="", num_inference_steps=STEPS, seed=7)
        return _with(_load(w, shape, ["plus"]), go)
    return run


def world_case(name: str):
    def run(w: World):
        import ipadapter

        folder, _ = ipadapter.embedded_model()
        pipe = w.pipes.get("world") or ipadapter.load_pipeline(folder)
        w.pipes["world"] = pipe
        ip = ipadapter.load(pipe, folder / f"ip-adapter_{name}.safetensors", model_dir=folder)
        text = "on a yellow background" if name == "pairs" else ""
        return _with(ip, lambda ip: ip.generate(images=[world_picture()], prompt=text, num_inference_steps=6,
                                                seed=8, num_images=2))
    return run


def _cli(argv: list[str]) -> None:
    from ipadapter.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    if code:
        raise RuntimeError(f"ipadapter {' '.join(argv)}: exit {code}: {err.getvalue()[-500:]}")


def _pngs(folder: Path) -> list[Image.Image]:
    return [Image.open(p) for p in sorted(folder.rglob("*.png"))]


def cli_generate_case(w: World):
    out = w.tmp / "cli-generate"
    picture = w.tmp / "world.png"
    world_picture((255, 255, 0), (0, 0, 255)).save(picture)
    _cli(["generate", "--image", str(picture), "--steps", "5", "--num-images", "2", "--seed", "11", "--device", "cpu",
          "-o", str(out)])
    return _pngs(out)


def cli_eval_case(*extra: str):
    def run(w: World):
        out = w.tmp / f"cli-eval{'-'.join(extra)}"
        _cli(["eval", "--num-prompts", "3", "--samples", "2", "--steps", "3", "--batch-size", "2", "--device", "cpu",
              "--save-images", str(out / "images"), "--out", str(out / "result.json"), *extra])
        metrics = json.loads((out / "result.json").read_text())["metrics"]
        return [*_pngs(out / "images"), {"metrics": metrics}]
    return run


def train_case(shape: str):
    def run(w: World):
        from ipadapter.testing import tiny_pipeline

        root = w.tmp / f"train-{shape}"
        model, data, out = root / "model", root / "data", root / "out"
        tiny_pipeline(shape, model)
        data.mkdir(parents=True)
        for i in range(4):
            noise(20 + i, (18 + i, 16)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(f"picture {i}")
        _cli(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2",
              "--batch-size", "2", "--resolution", "16", "--save-every", "100", "--no-cache",
              "--set", "validate_every=2", "--set", f'validation_images=["{data / "0.png"}", "{data / "1.png"}"]',
              "--set", "validation_steps=3", "--set", "progress=false", "--set", "tensorboard=false",
              "--set", "device=cpu"])
        from safetensors.torch import load_file

        return [*_pngs(out / "validation"), {"adapter": tensors_digest(load_file(str(out / "ip-adapter.safetensors")))}]
    return run


def cases() -> dict:
    out = {}
    for shape in SHAPES:
        for kind in KINDS:
            out[f"{shape}-{kind}"] = kind_case(shape, kind)
        out[f"{shape}-controls"] = controls_case(shape)
        out[f"{shape}-average-mask"] = average_case(shape)
        for mode in ("img2img", "inpaint", "controlnet"):
            out[f"{shape}-{mode}"] = side_case(shape, mode)
        out[f"{shape}-two-adapters"] = two_adapters_case(shape)
        out[f"{shape}-batch"] = batch_case(shape)
        out[f"{shape}-set-images"] = set_images_case(shape)
        out[f"{shape}-embeds"] = embeds_case(shape)
    for name in WORLD_ADAPTERS:
        out[f"world-{name}"] = world_case(name)
    out["cli-generate"] = cli_generate_case
    out["cli-eval"] = cli_eval_case()
    out["cli-eval-prompt"] = cli_eval_case("--prompt-from-caption")
    out["cli-eval-text-only"] = cli_eval_case("--text-only", "--prompt", "a red circle")
    for shape in SHAPES:
        out[f"train-validation-{shape}"] = train_case(shape)
    return out


def run(names: list[str] | None = None) -> dict:
    """{"probe": ..., "torch": ..., "cases": {name: [digest, ...]}} for the named cases (default: all)."""
    table = cases()
    names = names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(table)}")
    results = {}
    with _quiet(), tempfile.TemporaryDirectory(prefix="ipadapter-identity-") as tmp:
        w = World(Path(tmp))
        for name in names:
            start = time.perf_counter()
            items = table[name](w)
            results[name] = [digest(x) if not isinstance(x, dict) else
                             hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest() for x in items]
            print(f"{name:<28} {len(items):>2} item(s)  {time.perf_counter() - start:6.1f} s", file=sys.stderr)
        found = {"probe": probe(), "torch": torch.__version__, "cases": results}
    return found


@contextlib.contextmanager
def _quiet():
    """One CPU thread, no library logs or bars; restored after (the test calls :func:`run` in-process)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    threads = torch.get_num_threads()
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for lib, (level, bars) in zip(libraries, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def compare(found: dict, reference: dict) -> list[str]:
    """Lines naming every case whose digests differ from the reference (empty: all identical)."""
    if found["probe"] != reference["probe"]:
        return [f"probe {found['probe']} != reference {reference['probe']}: another machine's rounding; not comparable"]
    changed = reference.get("changed_on_purpose", {})  # cases whose images a later issue changed on purpose
    return [f"{name}: differs" for name, digests in found["cases"].items()
            if reference["cases"].get(name) != digests and name not in changed]


def changed_on_purpose(found: dict, reference: dict) -> list[str]:
    """Lines naming the cases listed as changed on purpose, with why, and whether they still differ."""
    changed = reference.get("changed_on_purpose", {})
    return [f"{name}: {'differs' if reference['cases'].get(name) != found['cases'][name] else 'identical'}, "
            f"changed on purpose ({why})" for name, why in changed.items() if name in found["cases"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the digests here (JSON)")
    p.add_argument("--only", help="comma-separated case names (default: all)")
    p.add_argument("--compare", help="reference digests (JSON) to compare with")
    args = p.parse_args(argv)
    found = run(args.only.split(",") if args.only else None)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    if args.compare:
        reference = json.loads(Path(args.compare).read_text())
        problems = compare(found, reference)
        print("\n".join(changed_on_purpose(found, reference)))
        print("\n".join(problems) or f"all other case(s) of {len(found['cases'])} identical to {args.compare}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
