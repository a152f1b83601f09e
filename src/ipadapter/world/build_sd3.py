"""The world's transformer member: a tiny SD3.5-shaped text-to-image model on the UNet member's frozen parts.

Same tokenizer, CLIP text tower (as both of SD3's CLIP encoders), vision tower and VAE as the embedded model
(``world/model``); only the ``SD3Transformer2DModel`` is new, trained from scratch here by rectified flow:

1. latents: the VAE's posterior of every pool image, shifted and scaled to unit variance (SD3's
   ``shift_factor`` / ``scaling_factor``, written into the member's VAE config);
2. text: what ``StableDiffusion3Pipeline.encode_prompt`` hands the transformer without T5 -- both CLIPs'
   penultimate states side by side, then ``max_sequence_length`` zero rows (no T5 here), and both pooled
   projections side by side;
3. transformer: flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s), logit-normal s
   (SD3's default), lr warm-up + cosine, grad clip, EMA, 10% empty captions for classifier-free guidance;
4. save: a standard diffusers ``StableDiffusion3Pipeline`` folder (``text_encoder_3`` None) with the vision
   tower as ``image_encoder``, loadable offline with ``from_pretrained``.

Without T5 the pipeline appends ``max_sequence_length`` zero rows (diffusers' default 256); this member is
trained with :data:`T5_ZERO_TOKENS` of them, and is called with ``max_sequence_length=T5_ZERO_TOKENS``
(``ipadapter`` does so for it; see :data:`ipadapter.generation.pipeline.EMBEDDED_CALL`).

    python -m ipadapter.world.build_sd3 --base src/ipadapter/world/model --out src/ipadapter/world/model_sd3
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import shapes as world
from .build import (
    Stage,
    _optim,
    _randint,
    _set_lr,
    caption_table,
    configure,
    encode_pool,
    lr_at,
    n_params,
    render_pool,
)

T5_ZERO_TOKENS = 16  # the pipeline's max_sequence_length for this member (no T5: zero rows)
POOL_TRAIN = 20_000
LAYERS = 4
HEADS = 4
HEAD_DIM = 32
PATCH = 2
STEPS = 12_000
BATCH = 64
LR = 1e-3
WARMUP = 500
EMA = 0.999
DROP_CAPTION = 0.1
FULL_CAPTION_P = 0.6
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0
SHIFT = 1.0  # the scheduler's shift: SD3 uses 3.0 at 1024 px; 64 px images need none
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
TIME_BUDGET_S = 2_100.0
EVAL_SAMPLES = 48
QUICK = dict(pool_train=256, steps=8, batch=8, warmup=2, eval_samples=2, time_budget_s=None)


@dataclass
class SD3Config:
    pool_train: int = POOL_TRAIN
    t5_zero_tokens: int = T5_ZERO_TOKENS
    layers: int = LAYERS
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    patch: int = PATCH
    steps: int = STEPS
    batch: int = BATCH
    lr: float = LR
    warmup: int = WARMUP
    ema: float = EMA
    drop_caption: float = DROP_CAPTION
    full_caption_p: float = FULL_CAPTION_P
    logit_mean: float = LOGIT_MEAN
    logit_std: float = LOGIT_STD
    shift: float = SHIFT
    weight_decay: float = WEIGHT_DECAY
    grad_clip: float = GRAD_CLIP
    time_budget_s: float | None = TIME_BUDGET_S
    eval_samples: int = EVAL_SAMPLES


def make_config(quick: bool = False, **overrides) -> SD3Config:
    return configure(SD3Config, QUICK if quick else {}, overrides)


def load_base_parts(base: Path):
    """The UNet member's tokenizer, text tower with its projection, vision tower, processor and VAE, frozen."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    text = CLIPTextModelWithProjection.from_pretrained(str(base / "text_encoder"))
    proj = load_file(str(base / "text_projection.safetensors"))
    text.text_projection.weight.data.copy_(proj["text_projection.weight"])
    vision = CLIPVisionModelWithProjection.from_pretrained(str(base / "image_encoder"))
    processor = CLIPImageProcessor.from_pretrained(str(base / "feature_extractor"))
    vae = AutoencoderKL.from_pretrained(str(base / "vae"))
    for m in (text, vision, vae):
        m.eval().requires_grad_(False)
    return tok, text, vision, processor, vae


def make_transformer(cfg: SD3Config, text_width: int, pooled_width: int, latent_size: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=2 * text_width,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * pooled_width,
        pos_embed_max_size=latent_size, qk_norm="rms_norm",  # SD3.5's q/k RMSNorm
    )


def make_scheduler(cfg: SD3Config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


@torch.no_grad()
def sd3_text(text, ids: torch.Tensor, zeros: int, device, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) as StableDiffusion3Pipeline makes them with the same CLIP twice and
    no T5: [penultimate | penultimate] then ``zeros`` zero rows; [pooled | pooled]."""
    states, pooled = [], []
    for i in range(0, len(ids), batch):
        out = text(input_ids=ids[i : i + batch].to(device), output_hidden_states=True)
        h = out.hidden_states[-2]
        states.append(torch.cat([torch.cat([h, h], -1), h.new_zeros(h.shape[0], zeros, 2 * h.shape[-1])], 1))
        pooled.append(torch.cat([out.text_embeds, out.text_embeds], -1))
    return torch.cat(states), torch.cat(pooled)


def train_transformer(cfg, latents, caps, text_states, device, gen, progress):
    mean, std = latents
    states, pooled = text_states
    model = make_transformer(cfg, states.shape[-1] // 2, pooled.shape[-1] // 2, mean.shape[-1]).to(device).train()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = _optim(params, cfg.lr, cfg.weight_decay, device)
    full, partial = caps.full.to(device), caps.partial.to(device)
    stage = Stage("sd3 transformer", cfg.steps, cfg.time_budget_s, progress)
    b = cfg.batch
    for step in stage:
        _set_lr(opt, lr_at(step, stage.total, cfg.warmup, cfg.lr))
        idx = _randint(len(mean), b, gen, device)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=device)
        u = torch.rand(b, generator=gen, device=device)
        part = partial[idx, _randint(partial.shape[1], b, gen, device)]
        c = torch.where(u < cfg.drop_caption + (1 - cfg.drop_caption) * cfg.full_caption_p, full[idx], part)
        c = torch.where(u < cfg.drop_caption, torch.full_like(c, caps.empty), c)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(b, generator=gen, device=device))
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = model(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=states[c],
                     pooled_projections=pooled[c], return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(cfg.ema, (1 + step) / (10 + step)))
        if step % 10 == 0:
            stage.log(loss=loss.item(), lr=opt.param_groups[0]["lr"])
    info = stage.close()
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    return model.eval().requires_grad_(False), info


def build_sd3(base_dir: str | Path, out_dir: str | Path, device: str = "cpu", quick: bool = False, seed: int = 0,
              progress: bool = True, **overrides) -> dict:
    """Train the transformer on the base member's frozen parts; write a StableDiffusion3Pipeline folder.

    Returns (and writes to ``out_dir/world_build.json``) the parameters, timings, sizes and the base's samples
    judged by world_parse."""
    from diffusers import StableDiffusion3Pipeline

    t_start = time.perf_counter()
    cfg = make_config(quick, **overrides)
    base, out = Path(base_dir), Path(out_dir)
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    tok, text, vision, processor, vae = load_base_parts(base)
    text.to(dev)
    vae.to(dev)
    pool = render_pool(cfg.pool_train, world.TRAIN_SEED + seed, progress)
    caps = caption_table(tok, pool, seed)
    mean, std = encode_pool(vae, pool.images, dev)
    shift = mean.mean().item()
    scaling = 1.0 / (mean - shift).std().item()
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scaling, 5))
    shift, scaling = vae.config.shift_factor, vae.config.scaling_factor
    states = sd3_text(text, caps.ids, cfg.t5_zero_tokens, dev)
    transformer, info = train_transformer(cfg, ((mean - shift) * scaling, std * scaling), caps, states, dev, gen,
                                          progress)
    summary: dict = {"config": asdict(cfg), "seed": seed, "device": str(dev), "base": str(base),
                     "transformer": {**info, "params": n_params(transformer),
                                     "joint_blocks": len(transformer.transformer_blocks)},
                     "vae": {"shift_factor": shift, "scaling_factor": scaling}}
    del mean, std, states
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.cpu(), scheduler=make_scheduler(cfg), vae=vae.cpu(), text_encoder=text.cpu(),
        tokenizer=tok, text_encoder_2=text, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
        image_encoder=vision, feature_extractor=processor,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copy2(base / "text_projection.safetensors", out / "text_projection.safetensors")  # CLIP-T scores, as base
    summary["train_seconds"] = round(time.perf_counter() - t_start, 1)
    if cfg.eval_samples:
        summary["eval"] = evaluate(out, n=cfg.eval_samples, device=device, progress=progress)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "world_build.json").write_text(json.dumps(summary, indent=1) + "\n")
    if progress:
        print(json.dumps({k: summary[k] for k in ("transformer", "vae", "eval") if k in summary}), flush=True)
    return summary


@torch.no_grad()
def evaluate(model_dir: str | Path, n: int = 48, device: str = "cpu", steps: int = 25, guidance: float = 5.0,
             seed: int = 0, batch: int = 48, progress: bool = True) -> dict:
    """Sample held-out full captions (diffusers' pipeline, no adapter) and read them back with world_parse."""
    from diffusers import StableDiffusion3Pipeline

    from .parse import parse

    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir), text_encoder_3=None, tokenizer_3=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    smp = world.samples(n, world.EVAL_SEED + 1 + seed)
    prompts = [world.caption(s) for s in smp]
    gen = torch.Generator(device="cpu").manual_seed(world.EVAL_SEED + seed)
    images = []
    for i in range(0, n, batch):
        images += pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                       height=world.IMAGE_SIZE, width=world.IMAGE_SIZE,
                       max_sequence_length=T5_ZERO_TOKENS).images
    parsed = [parse(im) for im in images]
    right = {k: [p[k] == getattr(s, k) for p, s in zip(parsed, smp, strict=True)]
             for k in ("background", "colour", "shape")}
    res = {"n": n, "steps": steps, "guidance": guidance,
           **{f"{k}_right": float(np.mean(v)) for k, v in right.items()},
           "all_right": float(np.mean([all(t) for t in zip(*right.values(), strict=True)]))}
    if progress:
        print(f"evaluate sd3 member: {json.dumps(res)}", flush=True)
    return res


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the world's SD3.5-shaped transformer member.")
    ap.add_argument("--base", required=True, help="the UNet member's folder (its tokenizer, towers and VAE)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = None if v == "None" else (float(v) if "." in v or "e" in v else int(v))
    build_sd3(args.base, args.out, device=args.device, quick=args.quick, seed=args.seed, **overrides)


if __name__ == "__main__":
    _main()
