"""Everything that needs a GPU, in one prepared run: parity, per-step cost, training memory and speed.

    python benchmarks/gpu_check.py                      # on CUDA: real SD 1.5 / SDXL sizes (random weights)
    python benchmarks/gpu_check.py --device cpu --tiny  # anywhere: tiny sizes, the same code paths (tests run this)
    python benchmarks/gpu_check.py --sections parity,speed --json out.json

Sections (each prints a Markdown table; a failing section is reported in its table and the run goes on):

* ``parity``: our adapter vs diffusers' own IP-Adapter on the same random weights and inputs, one UNet forward of
  [uncond; cond], for every kind diffusers supports (global, plus, full, faceid) on SD 1.5- and SDXL-shaped UNets,
  in fp32, fp16 and bf16 (CPU: fp32 and bf16). Relative error = max |ours - diffusers| / max |diffusers|;
  passes under 1e-4 (fp32), 5e-3 (fp16), 3e-2 (bf16), and only if the adapter moves the output at least 10x more
  than that (so the check cannot pass by both sides ignoring the image).
* ``speed``: ms per denoising step (UNet forward, batch 2) of the bare UNet, ours (image K/V once per
  generation) and diffusers (projection and K/V every step), global and plus, on SD 1.5 size (64x64 latents) and
  SDXL size (128x128), fp16 on CUDA. Interleaved rounds, medians; ratios side by side.
* ``train``: adapter training steps on the SDXL-size UNet at 1024 px (128x128 latents), batch 1 and 4, with the
  options gradient checkpointing, bf16 (frozen UNet in bf16, adapter fp32 under autocast), 8-bit AdamW
  (``bitsandbytes``, skipped when not installed) and DeepSpeed ZeRO-2 (``deepspeed``, skipped when not installed):
  s/step and peak GPU memory (``torch.cuda.max_memory_allocated``); on CPU the step time only.

The exit status is 1 when any parity row fails (a missing optional package is a skip, not a failure).
Random weights: speed and memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

from ipadapter.bases import attach, new_adapter
from ipadapter.core.adapter import Adapter
from ipadapter.core.encoders import Features

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TEXT_TOKENS = 77

# real sizes (random weights): SD 1.5 and SDXL base UNet configs
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, sample_size=128)
# CLIP ViT-H/14 encoder outputs (SD 1.5 and SDXL "vit-h" adapters), FaceID: insightface 512-d
ENCODER = dict(embed=1024, hidden=1280, patches=257, face=512)
TINY_ENCODER = dict(embed=48, hidden=64, patches=17, face=512)


# ------------------------------------------------------------------------------------------------ models
def make_unet(shape: str, tiny: bool, dtype: torch.dtype, device: str):
    from diffusers import UNet2DConditionModel

    from ipadapter.testing import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(shape) if tiny else UNet2DConditionModel(in_channels=4, out_channels=4,
                                                              **(SD15 if shape == "sd15" else SDXL))
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_adapter(unet, kind: str, enc: dict, seed: int = 0) -> Adapter:
    overrides: dict = {}
    if kind == "plus":  # the public files: 64-wide heads (diffusers reads heads = width // 64), depth 4
        width = 64 if enc is TINY_ENCODER else (1280 if unet.config.cross_attention_dim == 2048 else 768)
        overrides = dict(resampler_dim=width, resampler_heads=width // 64, resampler_dim_head=64, resampler_depth=4)
    embed = {"global": enc["embed"], "plus": enc["hidden"], "full": enc["hidden"], "faceid": enc["face"]}[kind]
    tokens = {"global": 4, "plus": 16, "full": enc["patches"], "faceid": 4}[kind]
    torch.manual_seed(seed)
    adapter = new_adapter(unet, kind, embed_dim=embed, num_tokens=tokens, **overrides)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    param = next(unet.parameters())
    return adapter.to(param.device, param.dtype).eval()


def features(kind: str, enc: dict, device: str, dtype: torch.dtype, batch: int = 1) -> tuple[Features, Features]:
    """(cond, uncond) encoder outputs; unconditional = zeros (global, faceid) or other features (patches)."""
    g = torch.Generator().manual_seed(1)
    if kind == "global":
        c = torch.randn(batch, enc["embed"], generator=g)
        return Features(image_embeds=c.to(device, dtype)), Features(image_embeds=torch.zeros_like(c).to(device, dtype))
    if kind == "faceid":
        c = torch.randn(batch, enc["face"], generator=g)
        return Features(face_id=c.to(device, dtype)), Features(face_id=torch.zeros_like(c).to(device, dtype))
    c, u = (torch.randn(batch, enc["patches"], enc["hidden"], generator=g) for _ in range(2))
    return Features(penultimate=c.to(device, dtype)), Features(penultimate=u.to(device, dtype))


def unet_call(unet, batch: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(2)
    size = unet.config.sample_size
    kw = {"sample": torch.randn(batch, 4, size, size, generator=g).to(device, dtype),
          "timestep": torch.tensor(500, device=device),
          "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim,
                                               generator=g).to(device, dtype), "return_dict": False}
    if unet.config.addition_embed_type == "text_time":
        text = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        side = size * 8
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text, generator=g).to(device, dtype),
                                   "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch,
                                                            dtype=dtype, device=device)}
    return kw


def diffusers_copy(unet, adapter: Adapter):
    """A copy of ``unet`` with diffusers' own IP-Adapter processors loaded from the adapter's weights."""
    nested: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        group, name = key.split(".", 1)
        nested[group][name] = value.detach().clone()
    theirs = copy.deepcopy(unet)
    theirs._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    param = next(unet.parameters())
    return theirs.to(param.device, param.dtype)


def diffusers_embeds(kind: str, cond: Features, uncond: Features) -> dict:
    field = {"global": "image_embeds", "faceid": "face_id"}.get(kind, "penultimate")
    return {"image_embeds": [torch.cat([getattr(uncond, field), getattr(cond, field)])[:, None]]}


def ours_copy(unet, adapter: Adapter, cond: Features, uncond: Features):
    ours = copy.deepcopy(unet)
    attach(ours, adapter)
    c, u = adapter.project(cond), adapter.project(uncond)
    adapter.state.set_tokens(c[None], u[None])
    if hasattr(adapter.state, "cfg"):
        adapter.state.cfg = True  # the batch is [uncond; cond]
    return ours


# ------------------------------------------------------------------------------------------------ parity
@torch.no_grad()
def parity_row(shape: str, kind: str, dtype: torch.dtype, tiny: bool, device: str) -> dict:
    enc = TINY_ENCODER if tiny else ENCODER
    unet = make_unet(shape, tiny, dtype, device)
    adapter = make_adapter(unet, kind, enc)
    cond, uncond = features(kind, enc, device, dtype)
    kw = unet_call(unet, 2, device, dtype)
    bare = unet(**kw)[0].float()
    theirs_unet = diffusers_copy(unet, adapter)
    added = {**kw.get("added_cond_kwargs", {}), **diffusers_embeds(kind, cond, uncond)}
    theirs = theirs_unet(**{**kw, "added_cond_kwargs": added})[0].float()
    ours = ours_copy(unet, adapter, cond, uncond)(**kw)[0].float()
    scale = float(theirs.abs().max())
    rel = float((ours - theirs).abs().max()) / scale
    effect = float((theirs - bare).abs().max()) / scale
    ok = rel <= TOLERANCE[dtype] and effect >= 10 * rel
    return dict(shape=shape, kind=kind, dtype=DTYPE_NAMES[dtype], rel=rel, effect=effect, ok=ok)


def section_parity(args) -> list[dict]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if args.device.startswith("cuda") else \
        [torch.float32, torch.bfloat16]
    rows = []
    for shape in ("sd15",) if args.quick else ("sd15", "sdxl"):
        for kind in ("global", "plus", "full", "faceid"):
            for dtype in dtypes:
                rows.append(_guarded(lambda s=shape, k=kind, d=dtype: parity_row(s, k, d, args.tiny, args.device),
                                     dict(shape=shape, kind=kind, dtype=DTYPE_NAMES[dtype])))
    print("\n### Parity with diffusers (one UNet forward, [uncond; cond])\n")
    print("| UNet | kind | dtype | max abs diff / max abs diffusers | adapter effect / max | tolerance | result |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    tol = {v: TOLERANCE[k] for k, v in DTYPE_NAMES.items()}
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['kind']} | {r['dtype']} | | | | ERROR {r['error']} |")
        else:
            print(f"| {r['shape']} | {r['kind']} | {r['dtype']} | {r['rel']:.2e} | {r['effect']:.2e} | "
                  f"{tol[r['dtype']]:.0e} | {'pass' if r['ok'] else 'FAIL'} |")
    return rows


# ------------------------------------------------------------------------------------------------- speed
def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


@torch.no_grad()
def speed_row(shape: str, kind: str, args) -> dict:
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    enc = TINY_ENCODER if args.tiny else ENCODER
    unet = make_unet(shape, args.tiny, dtype, args.device)
    adapter = make_adapter(unet, kind, enc)
    cond, uncond = features(kind, enc, args.device, dtype)
    kw = unet_call(unet, 2, args.device, dtype)
    kw.pop("timestep")  # each call passes it
    theirs = diffusers_copy(unet, adapter)
    added = {**kw.get("added_cond_kwargs", {}), **diffusers_embeds(kind, cond, uncond)}
    ours = ours_copy(unet, adapter, cond, uncond)
    calls = {"bare": lambda t: unet(**kw, timestep=t), "ours": lambda t: ours(**kw, timestep=t),
             "diffusers": lambda t: theirs(**{**kw, "added_cond_kwargs": added}, timestep=t)}
    sync = _sync(args.device)
    t = torch.tensor(500, device=args.device)
    for fn in calls.values():  # warm-up
        fn(t)
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate so drift hits all alike
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                calls[name](t)
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return dict(shape=shape, kind=kind, dtype=DTYPE_NAMES[dtype], **ms)


def section_speed(args) -> list[dict]:
    pairs = [("sd15", "plus")] if args.quick else [(s, k) for s in ("sd15", "sdxl") for k in ("global", "plus")]
    rows = [_guarded(lambda s=s, k=k: speed_row(s, k, args), dict(shape=s, kind=k)) for s, k in pairs]
    print("\n### Per-step cost (UNet forward, batch 2; medians of interleaved rounds)\n")
    print("| UNet | kind | dtype | bare ms | ours ms | diffusers ms | ours / bare | diffusers / bare |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['kind']} | | | | | | ERROR {r['error']} |")
        else:
            print(f"| {r['shape']} | {r['kind']} | {r['dtype']} | {r['bare']:.2f} | {r['ours']:.2f} | "
                  f"{r['diffusers']:.2f} | {r['ours'] / r['bare']:.3f} | {r['diffusers'] / r['bare']:.3f} |")
    return rows


# ------------------------------------------------------------------------------------------------- train
def train_row(batch: int, options: dict, args) -> dict:
    """A few adapter training steps (frozen UNet, trainable adapter) on the SDXL-size UNet: s/step, peak memory."""
    from ipadapter.training.train import Trainee

    cuda = args.device.startswith("cuda")
    frozen = torch.bfloat16 if options.get("bf16") else torch.float32
    enc = TINY_ENCODER if args.tiny else ENCODER
    unet = make_unet("sdxl", args.tiny, frozen, args.device)
    if options.get("checkpointing"):
        unet.enable_gradient_checkpointing()
    adapter = make_adapter(unet, "plus", enc)
    attach(unet, adapter)
    adapter.to(torch.float32).train().requires_grad_(True)  # the trainer keeps the adapter in fp32
    model = Trainee(unet, adapter)
    params = [p for p in adapter.parameters() if p.requires_grad]
    step_fn = _optimizer_step(model, params, options, batch, args)
    cond, _ = features("plus", enc, args.device, torch.float32, batch)
    kw = unet_call(unet, batch, args.device, frozen)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.train_steps + 1):
        _sync(args.device)()
        start = time.perf_counter()
        step_fn(lambda: _loss(model, kw, cond, frozen, cuda))
        _sync(args.device)()
        if i:  # the first step allocates the optimizer state and warms kernels up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return dict(batch=batch, options="+".join(k for k, v in options.items() if v) or "fp32",
                s_per_step=statistics.median(times), peak_gib=peak)


def _loss(model, kw: dict, cond: Features, frozen: torch.dtype, cuda: bool) -> torch.Tensor:
    t = torch.randint(0, 1000, (kw["sample"].shape[0],), device=kw["sample"].device)
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=frozen) if frozen != torch.float32 else \
        contextlib.nullcontext()
    with autocast:
        pred = model(kw["sample"], t, kw["encoder_hidden_states"], cond.penultimate, kw.get("added_cond_kwargs"))
    return torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))


def _optimizer_step(model, params, options: dict, batch: int, args) -> Callable:
    """One optimisation step given a loss closure: AdamW, 8-bit AdamW (bitsandbytes) or DeepSpeed ZeRO-2."""
    if options.get("zero2"):
        import deepspeed  # optional: ImportError -> the row is reported as skipped
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                    init_method="tcp://127.0.0.1:29512", rank=0, world_size=1)
        config = {"train_micro_batch_size_per_gpu": batch, "zero_optimization": {"stage": 2},
                  "bf16": {"enabled": bool(options.get("bf16"))},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)

        def ds_step(loss_fn):
            loss = loss_fn()
            engine.backward(loss)
            engine.step()

        return ds_step
    if options.get("adam8bit"):
        import bitsandbytes as bnb  # optional

        opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def step(loss_fn):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


TRAIN_OPTIONS = [
    {},
    {"checkpointing": True},
    {"bf16": True},
    {"bf16": True, "checkpointing": True},
    {"bf16": True, "checkpointing": True, "adam8bit": True},
    {"bf16": True, "checkpointing": True, "zero2": True},
]


def section_train(args) -> list[dict]:
    rows = []
    for batch in args.train_batches:
        for options in (TRAIN_OPTIONS[0], TRAIN_OPTIONS[4]) if args.quick else TRAIN_OPTIONS:
            label = dict(batch=batch, options="+".join(options) or "fp32")
            rows.append(_guarded(lambda b=batch, o=options: train_row(b, o, args), label))
    side = 64 if args.tiny else 1024
    print(f"\n### Adapter training (plus, SDXL-{'shaped tiny' if args.tiny else 'size'} UNet, {side} px)\n")
    print("| batch | options | s/step | peak GPU memory GiB |")
    print("| ---: | --- | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['options']} | | {r['error']} |")
        else:
            print(f"| {r['batch']} | {r['options']} | {r['s_per_step']:.3f} | {r['peak_gib']:.2f} |")
    return rows


# ------------------------------------------------------------------------------------------------- main
def _guarded(fn: Callable[[], dict], label: dict) -> dict:
    """Run one row; a missing optional package is a skip, any other failure an error, and the run goes on."""
    try:
        return fn()
    except ImportError as e:
        return {**label, "error": f"skipped ({e.name or e} not installed)", "skipped": True}
    except Exception as e:  # noqa: BLE001 - reported in the table; the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        return {**label, "error": " ".join(f"{type(e).__name__}: {e}".split())[:120]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNets (the default without CUDA)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (SD 1.5 parity, one speed row, two training rows, batch 1): what the tests run")
    p.add_argument("--sections", default="parity,speed,train")
    p.add_argument("--rounds", type=int, default=None, help="speed: rounds (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="speed: steps per round (default 10 / 1)")
    p.add_argument("--train-steps", type=int, default=None, help="train: timed steps per row (default 5 / 1)")
    p.add_argument("--train-batches", default="1,4")
    p.add_argument("--json", help="also write every row to this file")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible; use --device cpu --tiny")
    args.tiny = args.tiny or not cuda
    args.rounds = args.rounds or (10 if cuda else 2)
    args.steps = args.steps or (10 if cuda else 1)
    args.train_steps = args.train_steps or (5 if cuda else 1)
    args.train_batches = [1] if args.quick else [int(b) for b in args.train_batches.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    print(f"# gpu_check: {name}, torch {torch.__version__}, device {args.device}, "
          f"{'tiny' if args.tiny else 'real-size'} models")
    sections = {"parity": section_parity, "speed": section_speed, "train": section_train}
    results = {}
    for section in args.sections.split(","):
        if section not in sections:
            print(f"unknown section {section!r}; use {', '.join(sections)}", file=sys.stderr)
            return 2
        results[section] = sections[section](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    failed = [r for r in results.get("parity", []) if not r.get("ok") and not r.get("skipped")]
    print(f"\nparity: {len(results.get('parity', [])) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
