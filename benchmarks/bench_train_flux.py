"""Training throughput on the Flux shape: the trainer from its feature cache against the trainer encoding every
step (VAE, CLIP + T5 text, CLIP image), same items and draws, measured side by side in one run.

    python benchmarks/bench_train_flux.py            # tiny FLUX-shaped model on the CPU
    python benchmarks/bench_train_flux.py --quick    # a smoke run
    python benchmarks/bench_train_flux.py --count-flops   # recount REAL_RATIOS on the real configs (meta tensors)

"Real cost proportions": per sample at 512 px with the trainer's 77 T5 tokens, FLUX.1-dev's frozen-transformer
training step (forward, and backward to the adapter through every block after it; no weight gradients) costs
30.9 TFLOP; T5-XXL's encoder 0.72, CLIP-L text 0.013, CLIP ViT-L/14 0.16 and the VAE encoder 1.12 (torch
FlopCounterMode on the real configs, meta tensors: ``--count-flops``). The tiny model keeps those proportions in
measured time (its T5 is the deepest encoder, as T5-XXL is); the script prints the measured ratios next to the
real ones. What caching saves on Flux is mostly memory: T5-XXL's 4.8 B parameters (9.5 GB in bf16) and the VAE
are never loaded in a cached run; the table's memory column shows the tiny model's share of that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import bench_train as BT  # noqa: E402 - the shared harness: trainer worker, timing clock, images

#: FLUX.1-dev, 512 px, 77 T5 tokens: TFLOP per sample (FlopCounterMode on meta tensors, see count_flops)
REAL_TFLOP = {"step": 30.93, "VAE encoder": 1.118, "T5-XXL text encoder": 0.715, "CLIP-L text encoder": 0.0133,
              "image encoder (ViT-L/14)": 0.162}
REAL_RATIOS = {k: v / REAL_TFLOP["step"] for k, v in REAL_TFLOP.items() if k != "step"}


# ------------------------------------------------------------------------------------------------- the model
#: the tiny encoders' sizes, chosen so that each costs about its real share of a training step (measured below)
T5_LAYERS, VAE_WIDTHS, VAE_LAYERS, VIT_LAYERS, VIT_PATCH = 1, (8, 16), 2, 1, 28


def build_model(folder: Path) -> None:
    """A FluxPipeline folder with random weights: 4 double + 8 single blocks of width 128 over T5-wide (256)
    tokens; a 1-layer T5, a 1-layer CLIP text tower, a narrow 2-block VAE and a 1-layer 224 px ViT, sized so that
    each encoder costs about its real share of a training step (printed by every run)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from ipadapter.testing import tiny_t5_tokenizer, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer(folder / "tok-src")
    tok.model_max_length = 77
    t5_tok = tiny_t5_tokenizer()
    joint = 256
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=4, num_single_layers=8,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=joint,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=joint, d_ff=4 * joint, d_kv=32, num_layers=T5_LAYERS,
                                 num_heads=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=64,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=VAE_WIDTHS, in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=VAE_LAYERS, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=VIT_LAYERS, num_attention_heads=2,
                              intermediate_size=64, patch_size=VIT_PATCH, image_size=224, projection_dim=64)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                        vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=transformer, image_encoder=CLIPVisionModelWithProjection(vision),
                        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                             crop_size={"height": 224, "width": 224}))
    pipe.save_pretrained(str(folder), safe_serialization=True)




# ----------------------------------------------------------------------------------------------- the workers
def worker_ratios(a) -> dict:
    """Measured cost of each encoder per batch, relative to one frozen-transformer training step (median of 5),
    the step's input gradient flowing back to the text tokens as the adapter's does to its K/V."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection, T5EncoderModel

    from ipadapter.bases.flux import latent_ids, pack_latents

    p = str(a.workdir / "model")
    tr = FluxTransformer2DModel.from_pretrained(p, subfolder="transformer").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae").requires_grad_(False)
    t5 = T5EncoderModel.from_pretrained(p, subfolder="text_encoder_2").requires_grad_(False)
    text = CLIPTextModel.from_pretrained(p, subfolder="text_encoder").requires_grad_(False)
    vision = CLIPVisionModelWithProjection.from_pretrained(p, subfolder="image_encoder").requires_grad_(False)
    b, r, h = a.batch, a.resolution, a.resolution // 2
    x = pack_latents(torch.randn(b, 4, h, h))
    cond = torch.randn(b, 77, tr.config.joint_attention_dim, requires_grad=True)
    pooled, ids = torch.randn(b, tr.config.pooled_projection_dim), torch.ones(b, 77, dtype=torch.long)
    pixels, clip = torch.randn(b, 3, r, r), torch.randn(b, 3, 224, 224)

    def step():
        out = tr(hidden_states=x, timestep=torch.full((b,), 0.5), guidance=torch.full((b,), 3.5),
                 pooled_projections=pooled, encoder_hidden_states=cond, txt_ids=torch.zeros(77, 3),
                 img_ids=latent_ids(h // 2, h // 2), return_dict=False)[0]
        out.float().mean().backward()

    def timed(fn, grad=False):
        out = []
        for _ in range(6):
            start = BT._clock(a.device)
            with torch.set_grad_enabled(grad):
                fn()
            out.append(BT._clock(a.device) - start)
        return statistics.median(out[1:])

    s = timed(step, grad=True)
    return {"step ms": s * 1e3, "VAE encoder": timed(lambda: vae.encode(pixels)) / s,
            "T5-XXL text encoder": timed(lambda: t5(ids)) / s, "CLIP-L text encoder": timed(lambda: text(ids)) / s,
            "image encoder (ViT-L/14)": timed(lambda: vision(clip)) / s}


def count_flops() -> dict:
    """REAL_TFLOP, recounted: FLUX.1-dev's transformer, T5-XXL, CLIP-L, ViT-L/14 and the VAE on meta tensors."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e12

    with torch.device("meta"):
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True,
                                    axes_dims_rope=(16, 56, 56)).requires_grad_(False)
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77))
        vit = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                             num_hidden_layers=24, num_attention_heads=16,
                                                             patch_size=14, image_size=224, projection_dim=768))
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False)
        txt = torch.randn(1, 77, 4096, requires_grad=True)  # the gradient path, as the adapter's K/V give one

        def step():
            tr(hidden_states=torch.randn(1, 1024, 64), timestep=torch.ones(1), guidance=torch.ones(1),
               pooled_projections=torch.randn(1, 768), encoder_hidden_states=txt, txt_ids=torch.zeros(77, 3),
               img_ids=torch.zeros(1024, 3)).sample.sum().backward()

        return {"step": count(step), "VAE encoder": count(lambda: vae.encode(torch.randn(1, 3, 512, 512))),
                "T5-XXL text encoder": count(lambda: t5(torch.zeros(1, 77, dtype=torch.long))),
                "CLIP-L text encoder": count(lambda: clip(torch.zeros(1, 77, dtype=torch.long))),
                "image encoder (ViT-L/14)": count(lambda: vit(torch.randn(1, 3, 224, 224)))}


WORKERS = {"cache": BT.worker_cache, "cached": lambda a: BT.worker_trainer(a, True),
           "uncached": lambda a: BT.worker_trainer(a, False), "ratios": worker_ratios}


# ------------------------------------------------------------------------------------------------- the driver
def _spawn(a, name: str) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", name, "--workdir", str(a.workdir), "--device", a.device,
           "--batch", str(a.batch), "--steps", str(a.steps), "--window", str(a.window), "--resolution",
           str(a.resolution), "--precision", a.precision]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps and images: checks that it runs")
    ap.add_argument("--count-flops", action="store_true", help="recount the real FLOPs (meta tensors) and exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--precision", default=None, help="no (fp32) or bf16 (default: bf16 on CUDA)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.count_flops:
        print(json.dumps({k: round(v, 4) for k, v in count_flops().items()}))
        return 0
    a.precision = a.precision or ("bf16" if a.device.startswith("cuda") else "no")
    a.window = a.window or (2 if a.quick else 5)
    a.steps = a.steps or (3 * a.window if a.quick else 7 * a.window)
    a.workers = 0
    a.full_size = False
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return 0

    a.workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-train-flux-"))
    t0 = time.perf_counter()
    if not (a.workdir / "model" / "model_index.json").is_file():
        build_model(a.workdir / "model")
    n_images = max(4 * a.batch, 16)
    if not (a.workdir / "data" / "data.json").is_file():
        BT.write_images(a.workdir / "data", n_images, a.resolution)
    print(f"tiny FLUX-shaped model and {n_images} images in {a.workdir} ({time.perf_counter() - t0:.0f} s); "
          f"device {a.device}, batch {a.batch}, {a.resolution} px, {a.steps} steps, windows of {a.window}, "
          f"precision {a.precision}")
    ratios = _spawn(a, "ratios")
    print(f"\nencoder cost per batch / one frozen-transformer training step ({ratios.pop('step ms'):.1f} ms):")
    for name, real in REAL_RATIOS.items():
        print(f"  {name:<26} {ratios[name]:.3f}   (FLUX.1-dev at 512 px, 77 T5 tokens, by FLOPs: {real:.3f})")
    print(f"  {'all encoders':<26} {sum(ratios.values()):.3f}   (by FLOPs: {sum(REAL_RATIOS.values()):.3f})")
    build = _spawn(a, "cache")
    print(f"\ncache build (one-off, all {n_images} items, includes loading): {build['build_s']:.1f} s")
    rows = [("trainer, cached", _spawn(a, "cached")), ("trainer, encode every step", _spawn(a, "uncached"))]
    rates = [statistics.median(r["rates"][1:] or r["rates"]) for _, r in rows]
    unit = "steps/s" if a.device.startswith("cuda") else "steps per CPU-second"
    print(f"\n| configuration | {unit} | ms/step | vs encode-every-step | peak RSS MB | first / last window loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, r), rate in zip(rows, rates):
        loss = f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}"
        print(f"| {name} | {rate:.2f} | {1e3 / rate:.1f} | {rate / rates[1]:.2f}x | {r['peak_rss_mb']:.0f} | {loss} |")
    gap = max(abs(x - y) for x, y in zip(rows[0][1]["losses"], rows[1][1]["losses"]))
    print(f"\nloss curves (per-window means, same items and draws): max |difference| {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
