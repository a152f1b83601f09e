"""Per-step cost of an SD3.5 image prompt (issue 12): bare transformer vs our adapter vs diffusers' SD3 IP-Adapter.

One "step" is one ``SD3Transformer2DModel`` forward of batch 2 (negative + positive rows, classifier-free guidance)
as inside the pipeline's denoising loop, both adapters handed the same ``ip_adapter_image_embeds`` (SigLIP
so400m-shaped features: 729 x 1152) in ``joint_attention_kwargs`` at every step, as the pipeline hands them.

The transformer is SD3.5-Large-shaped but scaled down to run on a CPU: 64-wide heads as in Large, fewer heads and
joint blocks, 32x32 latents (patch 2: 256 image tokens) and 77 + 64 text tokens. The resampler keeps InstantX's 64
queries, depth 4 and the real SigLIP input (729 x 1152) but is scaled down in width like the transformer
(``--resampler-dim``, InstantX: 1280); at full size the per-block image attention over 4096 latent tokens dominates.

* bare: the transformer alone (no image prompt).
* ours: ``ipadapter.attach``; the transformer calls our per-step token maker (resampler + every block's image K/V
  at once), then our joint processors.
* diffusers: the same weights through ``transformer._load_ip_adapter_weights`` (resampler per step, image K/V per
  block inside its processors).

Both add the same attention per block (the image queries over image keys + image-prompt keys), so the goal is that
ours adds no more than diffusers. Variants run interleaved in rounds (the order rotates every round); the added cost
is the median over rounds of (variant - bare) in the same round, with its interquartile range. Each run checks that
ours and diffusers give the same output and that the image prompt changes it.
Run: ``python benchmarks/bench_sd3.py [--quick] [--device cuda] [--threads N] [--layers N] [--heads N]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import machine, pct, timed  # noqa: E402 - the sibling benchmark's helpers
from ipadapter.bases import attach  # noqa: E402
from ipadapter.bases.sd3 import SD3  # noqa: E402
from ipadapter.core.adapter import Adapter  # noqa: E402

SIGLIP_TOKENS, SIGLIP_WIDTH = 729, 1152  # so400m-patch14-384: 27 x 27 patches, hidden 1152
TEXT_TOKENS, BATCH = 77 + 64, 2


def build(args, device: str):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    width = args.heads * 64
    bare = SD3Transformer2DModel(
        sample_size=args.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
        attention_head_dim=64, num_attention_heads=args.heads, caption_projection_dim=width, joint_attention_dim=width,
        pooled_projection_dim=256, pos_embed_max_size=max(args.latent // 2, 16), qk_norm="rms_norm",
    ).to(device).eval()
    config = SD3.new_config(bare, "time-plus", SIGLIP_WIDTH, resampler_dim=args.resampler_dim)
    if args.quick:
        config.num_tokens = 16
    torch.manual_seed(1)
    adapter = Adapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
    return bare, adapter.eval()


def diffusers_state_dict(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        group, name = key.split(".", 1)
        nested[group][name] = value.detach().clone()
    return nested


def run(args, device: str, sync) -> dict:
    bare, adapter = build(args, device)
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(BATCH, 16, args.latent, args.latent, generator=gen).to(device)
    text = torch.randn(BATCH, TEXT_TOKENS, bare.config.joint_attention_dim, generator=gen).to(device)
    pooled = torch.randn(BATCH, 256, generator=gen).to(device)
    feats = torch.randn(1, SIGLIP_TOKENS, SIGLIP_WIDTH, generator=gen)
    embeds = torch.cat([torch.zeros_like(feats), feats]).to(device)  # [negative; positive], as the pipeline lays out

    ours = copy.deepcopy(bare)
    attach(ours, adapter)
    adapter.state.scale = 0.5
    theirs = copy.deepcopy(bare)
    theirs._load_ip_adapter_weights(diffusers_state_dict(adapter), low_cpu_mem_usage=False)
    for proc in theirs.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = 0.5
    timesteps = torch.linspace(1000, 10, max(args.steps, 2)).to(device)
    where = {"t": 0}

    def call(model, with_image: bool, t=None):
        if t is None:
            where["t"] = (where["t"] + 1) % len(timesteps)
            t = timesteps[where["t"]]
        kwargs = {"ip_adapter_image_embeds": embeds} if with_image else None
        return model(hidden_states=sample, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=t.expand(BATCH), joint_attention_kwargs=kwargs, return_dict=False)[0]

    t0 = timesteps[0]
    out_bare, out_ours, out_theirs = call(bare, False, t0), call(ours, True, t0), call(theirs, True, t0)
    check = {"ours_vs_diffusers": float((out_ours - out_theirs).abs().max()),
             "ours_vs_bare": float((out_ours - out_bare).abs().max())}
    variants = {"bare": lambda: call(bare, False), "ours": lambda: call(ours, True),
                "diffusers": lambda: call(theirs, True)}
    names = list(variants)
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[: r % 3]:
            times[name].append(statistics.median(timed(variants[name], sync) for _ in range(args.steps)))
    return {"times": times, "check": check}


def summary(result: dict) -> str:
    times, ms = result["times"], 1000.0
    bare = statistics.median(times["bare"])
    cells, added = [], {}
    for name in ("ours", "diffusers"):
        diffs = [a - b for a, b in zip(times[name], times["bare"])]
        q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
        added[name] = statistics.median(diffs)
        cells.append(f"{(bare + added[name]) * ms:.1f} ({pct(added[name], bare)}, IQR [{pct(q[0], bare)}, "
                     f"{pct(q[2], bare)}])")
    ratio = f"{added['ours'] / added['diffusers']:.2f}" if added["diffusers"] > 0 else "n/a"
    return "\n".join([
        "| bare ms/step | ours ms/step (+%) | diffusers ms/step (+%) | ours added / diffusers added "
        "| max abs diff ours vs diffusers |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {bare * ms:.1f} | {cells[0]} | {cells[1]} | {ratio} | {result['check']['ours_vs_diffusers']:.1e} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke run, numbers meaningless")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="transformer calls per variant per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8, help="joint blocks (SD3.5 Large: 38)")
    parser.add_argument("--heads", type=int, default=8, help="64-wide heads (SD3.5 Large: 38)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (1024 px: 128)")
    parser.add_argument("--resampler-dim", type=int, default=256, help="resampler width, 64 per head (InstantX: 1280)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.layers, args.heads, args.latent = 2, 1, 0, 2, 2, 16
        args.resampler_dim = 128
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    started = time.perf_counter()
    with torch.no_grad():
        result = run(args, device, sync)
    print(f"# {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(f"Per-step cost, SD3.5-shaped transformer ({args.layers} joint blocks, {args.heads} heads x 64), "
          f"{args.latent}x{args.latent} latents (patch 2), {TEXT_TOKENS} text tokens, batch {BATCH} (guidance), "
          f"SigLIP features {SIGLIP_TOKENS}x{SIGLIP_WIDTH}, resampler width {args.resampler_dim}, fp32, {device}; "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"Machine: {machine(device)}")
    print()
    print(summary(result))
    print()
    print(f"max abs diff ours vs bare transformer {result['check']['ours_vs_bare']:.3g} (the image prompt acts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
