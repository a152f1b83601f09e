"""Per-step cost of an image prompt (issue 2): bare UNet vs our adapter vs diffusers' IP-Adapter.

One "step" is one UNet forward of batch 2 (unconditional + conditional rows, classifier-free guidance), as inside
a denoising loop, on an SD 1.5-shaped UNet (widths 64/128/256/256, cross-attention width 768, 32x32 latents).

* bare: the UNet alone.
* ours: ``ipadapter.attach`` + ``adapter.state.set_tokens`` once per generation (projection and image K/V of all
  16 layers are computed there, timed separately as the one-off cost), then the plain UNet call per step.
* diffusers: the same weights through ``unet._load_ip_adapter_weights`` and
  ``added_cond_kwargs={"image_embeds": [embeds]}`` at every step, as its pipelines call it, so the projection
  and the image K/V projections run at every step.

The image encoder is left out: both encode the prompt image once per generation. Its outputs are given with
realistic shapes (CLIP ViT-H/14): a 1024-d embedding (global) or 257 x 1280 penultimate features (plus, full).

Variants run interleaved in rounds (the order rotates every round) so machine drift hits all of them alike; the
added cost is the median over rounds of (variant - bare) within the same round, and its interquartile range over
rounds is the noise band. On CPU each step is timed alone; on a GPU a round times its steps queued back to back
(one sync per block), as in a denoising loop. Torch runs with one thread by default (``--threads``) so that other
processes on a shared machine disturb it less. Each run also checks that ours and diffusers give the same output.
Run: ``python benchmarks/bench_attention.py [--quick] [--device cuda] [--threads N] [--kinds global,plus,full]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ipadapter.bases import attach, new_adapter
from ipadapter.core.adapter import Adapter
from ipadapter.core.encoders import Features

# SD 1.5 shape, scaled down in width only: the cross-attention width (768) and the image-token counts are the real
# ones, so image K/V and projection costs are realistic relative to the UNet's own text cross-attention.
UNET = dict(
    block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    in_channels=4, out_channels=4, sample_size=32,
)
BATCH, TEXT_TOKENS = 2, 77
EMBED_DIM, HIDDEN, PATCH_TOKENS = 1024, 1280, 257  # CLIP ViT-H/14: projected embedding, hidden width, 16x16+CLS
STEPS_PER_GENERATION = 30  # to amortise our one-off cost


@dataclass
class Kind:
    name: str
    num_tokens: int
    embed_dim: int
    overrides: dict = field(default_factory=dict)


# plus: the public ip-adapter-plus_sd15 resampler (dim = cross-attention width 768, 12 heads x 64, depth 4, 16
# queries); SDXL's plus files use dim 1280 / 20 heads, which only makes diffusers' per-step projection dearer.
KINDS = {
    "global": Kind("global", 4, EMBED_DIM),
    "plus": Kind("plus", 16, HIDDEN, dict(resampler_dim=768, resampler_heads=12, resampler_dim_head=64,
                                          resampler_depth=4)),
    "full": Kind("full", PATCH_TOKENS, HIDDEN),
}


def features(kind: Kind, generator: torch.Generator, device: str) -> tuple[Features, Features]:
    """(cond, uncond) encoder outputs for one prompt image, shaped like CLIP ViT-H/14's."""
    if kind.name == "global":  # unconditional = zero embedding (the paper's)
        cond = torch.randn(1, EMBED_DIM, generator=generator)
        return Features(image_embeds=cond.to(device)), Features(image_embeds=torch.zeros_like(cond).to(device))
    # unconditional = the encoder on an all-zero pixel tensor: non-zero features
    cond = torch.randn(1, PATCH_TOKENS, HIDDEN, generator=generator)
    uncond = torch.randn(1, PATCH_TOKENS, HIDDEN, generator=generator)
    return Features(penultimate=cond.to(device)), Features(penultimate=uncond.to(device))


def diffusers_state_dict(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict is the official flat layout; diffusers wants it nested {"image_proj": ..., "ip_adapter": ...}."""
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        group, name = key.split(".", 1)
        nested[group][name] = value.detach().clone()
    return nested


@dataclass
class Variant:
    name: str
    step: Callable[[], torch.Tensor]
    times: list[list[float]] = field(default_factory=list)  # per round: per-step seconds


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_kind(bare, kind: Kind, args, device: str, sync: Callable[[], None]) -> dict:
    latent = bare.config.sample_size
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    adapter = new_adapter(bare, kind.name, embed_dim=kind.embed_dim, num_tokens=kind.num_tokens,
                               **kind.overrides)
    adapter.eval()
    cond_f, uncond_f = features(kind, gen, device)
    sample = torch.randn(BATCH, 4, latent, latent, generator=gen).to(device)
    text = torch.randn(BATCH, TEXT_TOKENS, UNET["cross_attention_dim"], generator=gen).to(device)

    ours_unet = copy.deepcopy(bare)
    attach(ours_unet, adapter)

    def one_off() -> None:  # per generation: projection of both rows + every layer's image K/V
        cond, uncond = adapter.project(cond_f), adapter.project(uncond_f)
        adapter.state.set_tokens(cond[None], uncond[None])

    theirs_unet = copy.deepcopy(bare)
    theirs_unet._load_ip_adapter_weights([diffusers_state_dict(adapter)], low_cpu_mem_usage=False)
    # diffusers' pipelines stack [negative; positive] features as [batch, n_images, ...] and pass them every step
    feat = "image_embeds" if kind.name == "global" else "penultimate"
    embeds = torch.cat([getattr(uncond_f, feat), getattr(cond_f, feat)])[:, None]
    added = {"image_embeds": [embeds]}

    timesteps = torch.linspace(999, 1, max(args.steps, 1)).long().to(device)
    state = {"t": 0}

    def next_t() -> torch.Tensor:
        state["t"] = (state["t"] + 1) % len(timesteps)
        return timesteps[state["t"]]

    variants = [
        Variant("bare", lambda: bare(sample, next_t(), encoder_hidden_states=text, return_dict=False)[0]),
        Variant("ours", lambda: ours_unet(sample, next_t(), encoder_hidden_states=text, return_dict=False)[0]),
        Variant("diffusers", lambda: theirs_unet(sample, next_t(), encoder_hidden_states=text,
                                                 added_cond_kwargs=added, return_dict=False)[0]),
    ]
    one_off_times: list[float] = []

    # like for like: same timestep, same inputs -> ours and diffusers must agree, and differ from the bare UNet
    one_off()
    t = timesteps[0]
    out_bare = bare(sample, t, encoder_hidden_states=text, return_dict=False)[0]
    out_ours = ours_unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]
    out_theirs = theirs_unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]
    check = {
        "ours_vs_diffusers": float((out_ours - out_theirs).abs().max()),
        "ours_vs_bare": float((out_ours - out_bare).abs().max()),
    }

    for _ in range(args.warmup):
        one_off()
        for v in variants:
            v.step()
    for r in range(args.rounds):
        one_off_times.append(timed(one_off, sync))
        order = variants[r % 3:] + variants[: r % 3]  # rotate so no variant always runs first
        for v in order:
            if args.per_step_sync:  # CPU: each step timed alone, so a burst of outside load spoils one sample only
                v.times.append([timed(v.step, sync) for _ in range(args.steps)])
            else:  # GPU: steps queue back to back as in a denoising loop; one sync per block
                v.times.append([timed(lambda v=v: [v.step() for _ in range(args.steps)], sync) / args.steps])
    return {"variants": {v.name: v.times for v in variants}, "one_off": one_off_times, "check": check}


def summarise(result: dict) -> dict:
    rounds = {name: [statistics.median(r) for r in times] for name, times in result["variants"].items()}
    every = {name: [t for r in times for t in r] for name, times in result["variants"].items()}
    bare = statistics.median(every["bare"])
    out = {"bare": bare, "one_off": statistics.median(result["one_off"]), "check": result["check"]}
    for name in ("ours", "diffusers"):
        diffs = [a - b for a, b in zip(rounds[name], rounds["bare"])]  # paired within a round: drift cancels
        q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
        added = statistics.median(diffs)
        # bare + paired added (not the variant's own median) so that the ms and the % in a cell tell the same story
        out[name] = {"ms": bare + added, "added": added, "q1": q[0], "q3": q[2]}
    return out


def pct(x: float, base: float) -> str:
    return f"{100 * x / base:+.1f}%"


def table(summaries: dict[str, dict]) -> str:
    ms = 1000.0
    lines = [
        "| kind | bare ms/step | ours ms/step (+%) | diffusers ms/step (+%) | ours added / diffusers added "
        f"| ours one-off ms (per step over {STEPS_PER_GENERATION}) | max abs diff ours vs diffusers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, s in summaries.items():
        bare = s["bare"]
        cells = []
        noise = {}
        for name in ("ours", "diffusers"):
            v = s[name]
            noise[name] = v["q1"] <= 0 <= v["q3"]
            band = f"[{pct(v['q1'], bare)}, {pct(v['q3'], bare)}]"
            cells.append(f"{v['ms'] * ms:.1f} ({pct(v['added'], bare)}, IQR {band})")
        if noise["diffusers"]:
            ratio = "both within noise" if noise["ours"] else "diffusers within noise"
        else:
            ratio = f"{s['ours']['added'] / s['diffusers']['added']:.2f}"
        one_off = f"{s['one_off'] * ms:.1f} ({s['one_off'] * ms / STEPS_PER_GENERATION:.2f})"
        lines.append(f"| {kind} | {bare * ms:.1f} | {cells[0]} | {cells[1]} | {ratio} | {one_off} "
                     f"| {s['check']['ours_vs_diffusers']:.1e} |")
    return "\n".join(lines)


def machine(device: str) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, nproc {os.cpu_count()}, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name()}"
    return f"{text}, {platform.python_implementation()} {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke run, numbers meaningless")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="UNet calls per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 = least disturbed by other processes on a shared CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", default="global,plus,full")
    args = parser.parse_args(argv)
    if args.quick:  # CI smoke run: a smaller UNet and latents (still cross-attention width 768), few calls
        args.rounds, args.steps, args.warmup = 2, 1, 0
    config = dict(UNET, block_out_channels=(32, 64, 64, 64), sample_size=16) if args.quick else UNET
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    args.per_step_sync = not device.startswith("cuda")

    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its loader warns about dtype casting on every load

    torch.manual_seed(0)
    bare = UNet2DConditionModel(**config).to(device).eval()
    summaries = {}
    with torch.no_grad():
        for name in kinds:
            started = time.perf_counter()
            summaries[name] = summarise(run_kind(bare, KINDS[name], args, device, sync))
            print(f"# {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    widths, size = "/".join(map(str, config["block_out_channels"])), config["sample_size"]
    print(f"Per-step cost, SD 1.5-shaped UNet (widths {widths}, cross-attention 768), {size}x{size} latents, "
          f"batch {BATCH} (guidance), fp32, {device}; "
          f"{args.rounds} rounds x {args.steps} steps. bare: median step; ours/diffusers: bare + median over rounds of "
          "(variant - bare) in the same round, IQR of that difference in brackets")
    print(f"Machine: {machine(device)}")
    print()
    print(table(summaries))
    print()
    for name, s in summaries.items():  # the adapter must change the output, or the comparison means nothing
        print(f"{name}: max abs diff ours vs bare UNet {s['check']['ours_vs_bare']:.3g} (the image prompt acts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
