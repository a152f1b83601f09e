"""Training throughput: the trainer with the feature cache, without it, and a straightforward loop that encodes
every step (the original recipe), at the same batch size and on the same draws; plus the bare UNet step.

    python benchmarks/bench_train.py                    # tiny SD 1.5-shaped model on the CPU (README figures)
    python benchmarks/bench_train.py --quick            # a smoke run
    python benchmarks/bench_train.py --device cuda --full-size   # SD 1.5 / ViT-H sizes, random weights, 512 px

Every configuration runs in its own process (so peak memory is its own); the rate is the median over timing
windows of ``--window`` steps after the first, in steps per second of the process's CPU time on the CPU (other
programs sharing the cores then do not skew the comparison; torch runs one thread, OMP_NUM_THREADS=1) and per
second of wall time on a GPU. "Realistic relative size": per sample, SD 1.5 at 512 px costs
803 GFLOP for a UNet forward (a frozen-UNet training step is about twice that), 1117 for the VAE encoder, 335
for ViT-H/14 and 13 for the text encoder (torch FlopCounterMode on the real configs), so encoding costs about
0.9 of a training step. The tiny model keeps those proportions in measured time: the script prints the
measured ratios next to the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
#: SD 1.5 at 512 px (FlopCounterMode on the real configs): cost per sample relative to a frozen-UNet training
#: step (~2x the 803 GFLOP forward)
REAL_RATIOS = {"VAE encoder": 1117 / 1606, "image encoder (ViT-H/14)": 335 / 1606, "text encoder": 13 / 1606}


# ------------------------------------------------------------------------------------------------- the model
def build_model(folder: Path, full_size: bool) -> None:
    """A StableDiffusionPipeline folder with random weights: tiny SD 1.5-shaped, or SD 1.5 / ViT-H sized."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from ipadapter.testing import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer(folder / "tok-src")
    if full_size:
        tok.model_max_length = 77
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # the SD 1.x defaults
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12,
                                            num_attention_heads=12, intermediate_size=3072,
                                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=1))
        vision = CLIPVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                  intermediate_size=5120, patch_size=14, image_size=224, projection_dim=1024)
    else:
        unet = UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), layers_per_block=2, sample_size=8,
                                    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(20, 48, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4,
                            sample_size=64)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=128, max_position_embeddings=32,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        # 224 px, 14 px patches: ViT-H's 257 tokens, narrow and shallow to keep ViT-H's share of the cost
        vision = CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384,
                                  patch_size=14, image_size=224, projection_dim=64)
    size = vision.image_size
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, safety_checker=None, requires_safety_checker=False,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        image_encoder=CLIPVisionModelWithProjection(vision),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    if full_size:
        pipe.to(torch.float16)  # half the bytes on disk; the trainer loads fp32 master weights anyway
    pipe.save_pretrained(str(folder), safe_serialization=True)


def write_images(folder: Path, n: int, resolution: int) -> Path:
    """n JPEGs a little larger than the training size (so every step decodes, resizes and crops) + data.json."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        h, w = int(resolution * 1.25), int(resolution * 1.5)
        base = rng.random((h // 8 + 1, w // 8 + 1, 3))  # smooth random pictures (compress like photos)
        arr = np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 255
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
        items.append({"image_file": f"{i:04d}.jpg", "text": f"a photo number {i} of a thing"})
    (folder / "data.json").write_text(json.dumps(items))
    return folder / "data.json"


# ----------------------------------------------------------------------------------------------- the workers
def _peak(device: str) -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _config(a, output: Path, cache: str | None, steps: int):
    from ipadapter.training.train import TrainConfig

    return TrainConfig(model=str(a.workdir / "model"), data=str(a.workdir / "data" / "data.json"), output=str(output),
                       kind="global", resolution=a.resolution, batch_size=a.batch, max_steps=steps,
                       save_every=10**9, log_every=a.window, cache=cache, tensorboard=False, progress=False,
                       mixed_precision=a.precision, device=a.device, num_workers=a.workers, seed=0)


def _clock(device: str) -> float:
    """Process CPU time on the CPU (robust to other programs sharing the cores), wall time with a GPU."""
    return time.perf_counter() if device.startswith("cuda") else time.process_time()


def worker_trainer(a, cached: bool) -> dict:
    """The trainer, cached or not, timed between the check points where it logs each window's loss."""
    from ipadapter.training import train as T

    marks: list[tuple[float, int, float]] = []  # (clock, step, window loss)
    log = T.Log.__call__

    def spy(self, message: str, quiet: bool = False) -> None:
        if message.startswith("step ") and ": loss " in message:
            step, rest = message[5:].split(": loss ")
            marks.append((_clock(a.device), int(step), float(rest.split(",")[0])))
        log(self, message, quiet)

    T.Log.__call__ = spy
    out = a.workdir / ("run-cached" if cached else "run-uncached")
    start = time.perf_counter()
    T.train(_config(a, out, str(a.workdir / "cache") if cached else None, a.steps))
    rates = [(s1 - s0) / (c1 - c0) for (c0, s0, _), (c1, s1, _) in zip(marks, marks[1:])]
    return {"rates": [float("nan")] + rates, "losses": [m[2] for m in marks], "total_s": time.perf_counter() - start,
            **_peak(a.device)}


def worker_cache(a) -> dict:
    """Build the cache once (not timed with the steps): one training step into a scratch folder."""
    from ipadapter.training.train import train

    start = time.perf_counter()
    train(_config(a, a.workdir / "run-cache-build", str(a.workdir / "cache"), 1))
    return {"build_s": time.perf_counter() - start}


def worker_naive(a) -> dict:
    """The original recipe's loop, straightforwardly: every step opens the images, runs the CLIP processor, the
    tokenizer, the VAE, the text encoder and the image encoder, then the UNet. Same items and draws as the
    trainer (data.BatchOrder, train.step_draws), so the loss curves can be compared step for step."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection

    from ipadapter.bases import attach, new_adapter
    from ipadapter.training.data import BatchOrder
    from ipadapter.training.train import Models, TrainConfig, Trainee, loss_for, step_draws

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(a.device)
    p = str(a.workdir / "model")
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae").to(device, dtype).requires_grad_(False)
    text = CLIPTextModel.from_pretrained(p, subfolder="text_encoder").to(device, dtype).requires_grad_(False)
    vision = CLIPVisionModelWithProjection.from_pretrained(p, subfolder="image_encoder").to(device, dtype)
    vision.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(p, subfolder="tokenizer")
    processor = CLIPImageProcessor.from_pretrained(p, subfolder="feature_extractor")
    sched = DDPMScheduler.from_pretrained(p, subfolder="scheduler")
    torch.manual_seed(0)
    adapter = new_adapter(unet, "global", embed_dim=vision.config.projection_dim)
    attach(unet, adapter)
    unet.to(dtype=dtype)
    adapter.float().requires_grad_(True)
    model = Trainee(unet, adapter)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)
    m = Models(path=None, unet=unet, sdxl=False, alphas_cumprod=sched.alphas_cumprod.to(device),
               prediction_type=sched.config.prediction_type, scaling=vae.config.scaling_factor, shift=0.0,
               vae_factor=8, device=device, dtype=dtype)
    cfg = TrainConfig()
    root = a.workdir / "data"
    records = json.loads((root / "data.json").read_text())
    order = BatchOrder(np.zeros(len(records), np.int64), a.batch, seed=0)
    gen = torch.Generator(device)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        uncond = {"text": text(empty.to(device))[0].float(), "image": torch.zeros(1, vision.config.projection_dim,
                                                                                  device=device)}
    r = a.resolution

    def to_pixels(img):  # resize the shortest side to r, centre crop, [-1, 1]
        s = r / min(img.size)
        img = img.resize((max(r, round(img.width * s)), max(r, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - r) // 2, (img.height - r) // 2
        arr = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(arr).permute(2, 0, 1)

    losses, times = [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start, wall = _clock(a.device), time.perf_counter()
    for k in range(a.steps):
        _, items = order.batch(k)
        images = [Image.open(root / records[i]["image_file"]).convert("RGB") for i in items]
        pixels = torch.stack([to_pixels(im) for im in images]).to(device, dtype)
        clip = processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)
        ids = tok([records[i]["text"] for i in items], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            feats = {"latent_mean": dist.mean.float(), "latent_std": dist.std.float(),
                     "text": text(ids)[0].float(), "image": vision(clip).image_embeds.float()}
        d = step_draws(gen, 0, k, a.batch, tuple(feats["latent_mean"].shape[1:]), len(m.alphas_cumprod),
                       slice(0, a.batch))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_for(model, m, cfg, feats, uncond, d)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # the original loop logs (and syncs) every step
        sync()
        times.append(_clock(a.device))
    rates, window_losses = [], []
    edges = [start] + times
    for w in range(0, a.steps - a.window + 1, a.window):
        rates.append(a.window / (edges[w + a.window] - edges[w]))
        window_losses.append(sum(losses[w:w + a.window]) / a.window)
    return {"rates": rates, "losses": window_losses, "total_s": time.perf_counter() - wall, **_peak(a.device)}


def worker_bare(a) -> dict:
    """A lower bound: UNet forward + backward + AdamW on fixed tensors (no data, no features, no draws)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ipadapter.bases import attach, new_adapter

    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(str(a.workdir / "model"), subfolder="unet").to(device)
    unet.requires_grad_(False)
    from transformers import CLIPVisionConfig

    embed = CLIPVisionConfig.from_pretrained(str(a.workdir / "model" / "image_encoder")).projection_dim
    adapter = new_adapter(unet, "global", embed_dim=embed)
    attach(unet, adapter)
    unet.to(dtype=dtype)
    adapter.float().requires_grad_(True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    h = a.resolution // 8
    x = torch.randn(a.batch, 4, h, h, device=device)
    t = torch.randint(0, 1000, (a.batch,), device=device)
    text = torch.randn(a.batch, 77 if a.full_size else 32, unet.config.cross_attention_dim, device=device)
    emb = torch.randn(a.batch, embed, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    start, wall = _clock(a.device), time.perf_counter()
    for _ in range(a.steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            adapter.state.set_tokens(adapter.project(_features(emb)))
            out = unet(x, t, encoder_hidden_states=text.to(dtype), return_dict=False)[0]
            loss = out.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(_clock(a.device))
    edges = [start] + times
    rates = [a.window / (edges[w + a.window] - edges[w]) for w in range(0, a.steps - a.window + 1, a.window)]
    return {"rates": rates, "losses": [], "total_s": time.perf_counter() - wall, **_peak(a.device)}


def _features(emb):
    from ipadapter.core.encoders import Features

    return Features(image_embeds=emb)


def worker_ratios(a) -> dict:
    """Measured cost of each encoder per batch, relative to one frozen-UNet training step (median of 5)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    device = torch.device(a.device)
    p = str(a.workdir / "model")
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet").to(device, dtype).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae").to(device, dtype).requires_grad_(False)
    text = CLIPTextModel.from_pretrained(p, subfolder="text_encoder").to(device, dtype).requires_grad_(False)
    vision = CLIPVisionModelWithProjection.from_pretrained(p, subfolder="image_encoder").to(device, dtype)
    b, r, h = a.batch, a.resolution, a.resolution // 8
    x = torch.randn(b, 4, h, h, device=device, dtype=dtype)
    cond = torch.randn(b, text.config.max_position_embeddings, unet.config.cross_attention_dim, device=device,
                       dtype=dtype, requires_grad=True)  # a gradient path through the frozen UNet, as in training
    t = torch.randint(0, 1000, (b,), device=device)
    pixels = torch.randn(b, 3, r, r, device=device, dtype=dtype)
    clip = torch.randn(b, 3, vision.config.image_size, vision.config.image_size, device=device, dtype=dtype)
    ids = torch.ones(b, text.config.max_position_embeddings, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, grad=False):
        out = []
        for _ in range(6):
            start = _clock(a.device)
            with torch.set_grad_enabled(grad):
                fn()
            sync()
            out.append(_clock(a.device) - start)
        return statistics.median(out[1:])

    step = timed(lambda: unet(x, t, cond).sample.float().mean().backward(), grad=True)
    return {"unet step ms": step * 1e3,
            "VAE encoder": timed(lambda: vae.encode(pixels)) / step,
            "image encoder (ViT-H/14)": timed(lambda: vision(clip)) / step,
            "text encoder": timed(lambda: text(ids)) / step}


WORKERS = {"cache": worker_cache, "cached": lambda a: worker_trainer(a, True),
           "uncached": lambda a: worker_trainer(a, False), "naive": worker_naive, "bare": worker_bare,
           "ratios": worker_ratios}


# ------------------------------------------------------------------------------------------------- the driver
def _spawn(a, name: str) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", name, "--workdir", str(a.workdir), "--device", a.device,
           "--batch", str(a.batch), "--steps", str(a.steps), "--window", str(a.window), "--resolution",
           str(a.resolution), "--precision", a.precision] + (["--full-size"] if a.full_size else []) + \
          (["--workers", str(a.workers)] if a.workers is not None else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode != 0:
        sys.exit(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps and images: checks that it runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full-size", action="store_true", help="SD 1.5 / ViT-H sizes, 512 px (for a GPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--precision", default=None, help="no (fp32) or bf16 (default: bf16 on CUDA)")
    ap.add_argument("--workers", type=int, default=None, help="loader processes for the uncached trainer")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.resolution = a.resolution or (512 if a.full_size else 64)
    a.precision = a.precision or ("bf16" if a.device.startswith("cuda") else "no")
    a.window = a.window or (2 if a.quick else 5)
    a.steps = a.steps or (3 * a.window if a.quick else 7 * a.window)
    if a.worker:
        result = WORKERS[a.worker](a)
        print(json.dumps(result))
        return 0

    a.workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    if not (a.workdir / "model" / "model_index.json").is_file():
        build_model(a.workdir / "model", a.full_size)
    n_images = max(4 * a.batch, 16) if a.quick else max(16 * a.batch, 64)
    if not (a.workdir / "data" / "data.json").is_file():
        write_images(a.workdir / "data", n_images, a.resolution)
    print(f"model and {n_images} images in {a.workdir} ({time.perf_counter() - t0:.0f} s); device {a.device}, "
          f"batch {a.batch}, {a.resolution} px, {a.steps} steps, windows of {a.window}, precision {a.precision}")
    ratios = _spawn(a, "ratios")
    print(f"\nencoder cost per batch / one frozen-UNet training step ({ratios.pop('unet step ms'):.1f} ms):")
    for name, real in REAL_RATIOS.items():
        print(f"  {name:<26} {ratios[name]:.2f}   (SD 1.5 at 512 px, by FLOPs: {real:.2f})")
    print(f"  {'all encoders':<26} {sum(ratios.values()):.2f}   (SD 1.5 at 512 px, by FLOPs: "
          f"{sum(REAL_RATIOS.values()):.2f})")

    build = _spawn(a, "cache")
    print(f"\ncache build (one-off, all {n_images} items, includes loading): {build['build_s']:.1f} s")
    rows = [("trainer, cached", _spawn(a, "cached")), ("trainer, no cache", _spawn(a, "uncached")),
            ("encode-every-step loop", _spawn(a, "naive")), ("bare UNet step (bound)", _spawn(a, "bare"))]
    naive = statistics.median(rows[2][1]["rates"][1:] or rows[2][1]["rates"])
    gpu = a.device.startswith("cuda")
    gpu_head = " peak GPU MB |" if gpu else ""
    unit = "steps/s" if gpu else "steps per CPU-second"
    print(f"\n| configuration | {unit} | ms/step | vs encode-every-step | peak RSS MB |{gpu_head} "
          "first / last window loss |")
    print(f"| --- | --- | --- | --- | --- |{' --- |' if gpu else ''} --- |")
    for name, r in rows:
        rate = statistics.median(r["rates"][1:] or r["rates"])
        loss = f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}" if r["losses"] else "-"
        gpu_cell = f" {r['peak_gpu_mb']:.0f} |" if gpu else ""
        print(f"| {name} | {rate:.2f} | {1e3 / rate:.1f} | {rate / naive:.2f}x | {r['peak_rss_mb']:.0f} |{gpu_cell}"
              f" {loss} |")
    curves = [r["losses"] for _, r in rows[:3]]
    gap = max(abs(x - y) for c in curves[1:] for x, y in zip(curves[0], c))
    print(f"\nloss curves (per-window means, same items and draws): max |difference| between configurations "
          f"{gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
