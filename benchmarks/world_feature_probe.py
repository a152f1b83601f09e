"""Linear probes on the embedded world's vision tower: how well each image feature an adapter kind reads tells the
world's attributes apart (issue 15: does the penultimate state that plus / time-plus read hold the shape?).

Softmax regression (Adam, 200 steps, standardised features, a little weight decay) fitted on world images from
``world.TRAIN_SEED`` and scored on held-out ones from ``world.EVAL_SEED``. Features: the projected embedding (global
adapters), the penultimate states flattened (all 65 tokens), their mean, and their CLS token.

Then the tokens that adapter files hand the UNet (``--adapters``; default: the world's global and plus, and a
plus resampler fresh from its initialisation): the same probe on them, how much of their variance each attribute
explains (between-class / total: what the denoiser's attention meets, not just what a probe can dig out), and for
resamplers the share of their first attention layer's weight on the CLS token against one patch token.

    python benchmarks/world_feature_probe.py [--train 1500] [--test 400] [--adapters FILE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ipadapter.core.checkpoint import read_checkpoint
from ipadapter.generation.pipeline import EMBEDDED_MODEL
from ipadapter.world import shapes as world

ATTRIBUTES = ("shape", "colour", "background")


def encode(processor, encoder, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """(projected embeddings [N, E], penultimate states [N, T, H]) of the samples' images."""
    images = [world.draw(s) for s in samples]
    with torch.no_grad():
        out = encoder(processor(images=images, return_tensors="pt").pixel_values, output_hidden_states=True)
    return out.image_embeds, out.hidden_states[-2]


def features(embeds: torch.Tensor, states: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"projected embedding": embeds, "penultimate, all tokens": states.flatten(1),
            "penultimate, token mean": states.mean(1), "penultimate, CLS token": states[:, 0]}


def labels(samples, attr: str, names: list[str]) -> torch.Tensor:
    return torch.tensor([names.index(getattr(s, attr)) for s in samples])


def variance_share(z: torch.Tensor, y: torch.Tensor) -> float:
    """Between-class variance of z [N, D] over its total (how much of z the attribute y explains)."""
    mu = z.mean(0)
    between = sum((y == c).sum() * ((z[y == c].mean(0) - mu) ** 2).sum() for c in y.unique())
    return float(between / ((z - mu) ** 2).sum())


def cls_attention(resampler, states: torch.Tensor) -> tuple[float, float]:
    """Mean weight of the resampler's first attention layer on the CLS token, and on one patch token."""
    attn = resampler.layers[0][0]
    x, lat = attn.norm1(resampler.proj_in(states)), attn.norm2(resampler.latents.expand(states.shape[0], -1, -1))
    q, (k, _) = attn.to_q(lat), attn.to_kv(torch.cat([x, lat], 1)).chunk(2, -1)
    q, k = (t.view(states.shape[0], -1, attn.heads, attn.dim_head).transpose(1, 2) for t in (q, k))
    w = (q @ k.transpose(-1, -2) / attn.dim_head ** 0.5).softmax(-1)
    return float(w[..., 0].mean()), float(w[..., 1:states.shape[1]].mean())


def adapter_tokens(path: str | None, checkpoint: tuple):
    """(label, projection module, kind) of an adapter file and its ``read_checkpoint``; path None: a fresh
    projection shaped as the checkpoint's (its start)."""
    from ipadapter.core.projection import build_projection

    cfg, tensors = checkpoint
    module = build_projection(cfg).eval()
    if path is not None:
        module.load_state_dict({k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")})
    label = f"{cfg.kind} {Path(path).parent.name}/{Path(path).name}" if path else f"{cfg.kind}, fresh (its start)"
    return label, module, cfg.kind


def probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, classes: int) -> float:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], 1e-2)
    for _ in range(200):
        opt.zero_grad()
        (F.cross_entropy(x @ w + b, y) + 1e-4 * (w ** 2).sum()).backward()
        opt.step()
    return float(((xt @ w + b).argmax(1) == yt).float().mean())


def main(argv=None) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(EMBEDDED_MODEL))
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--adapters", nargs="*", default=None, metavar="FILE",
                    help="adapter files whose image tokens to probe (default: the model's global and plus)")
    args = ap.parse_args(argv)
    processor = CLIPImageProcessor.from_pretrained(f"{args.model}/feature_extractor")
    encoder = CLIPVisionModelWithProjection.from_pretrained(f"{args.model}/image_encoder").eval()
    train, test = world.samples(args.train, world.TRAIN_SEED), world.samples(args.test, world.EVAL_SEED)
    (e_train, h_train), (e_test, h_test) = encode(processor, encoder, train), encode(processor, encoder, test)
    f_train, f_test = features(e_train, h_train), features(e_test, h_test)
    names = {a: sorted({getattr(s, a) for s in train}) for a in ATTRIBUTES}
    y = {a: (labels(train, a, names[a]), labels(test, a, names[a])) for a in ATTRIBUTES}
    print(f"held-out accuracy of a linear probe ({args.train} images to fit, {args.test} held out)")
    print("| attribute | " + " | ".join(f_train) + " |")
    print("| --- |" + " --- |" * len(f_train))
    for attr in ATTRIBUTES:
        row = [probe(f_train[k], y[attr][0], f_test[k], y[attr][1], len(names[attr])) for k in f_train]
        print(f"| {attr} | " + " | ".join(f"{v:.1%}" for v in row) + " |", flush=True)

    files = args.adapters if args.adapters is not None else [
        f"{args.model}/ip-adapter_global.safetensors", None, f"{args.model}/ip-adapter_plus.safetensors"]
    checkpoints = {f: read_checkpoint(f) for f in files if f is not None}
    plus_like = next((c for c in checkpoints.values() if c[0].kind == "plus"), None)
    print("\nthe image tokens adapters hand the UNet: probe accuracy | variance share | resampler attention")
    print("| tokens | " + " | ".join(ATTRIBUTES) + " | variance share " + " / ".join(ATTRIBUTES)
          + " | attention on CLS / on a patch |")
    print("| --- | --- | --- | --- | --- | --- |")
    torch.manual_seed(0)
    for path in files:
        if path is None and plus_like is None:
            continue
        label, module, kind = adapter_tokens(path, checkpoints[path] if path is not None else plus_like)
        with torch.no_grad():
            inputs = (e_train, e_test) if kind == "global" else (h_train, h_test)
            z_train, z_test = (module(x).flatten(1) for x in inputs)
            attention = "-" if kind != "plus" else "{:.3f} / {:.4f}".format(*cls_attention(module, h_train))
        accuracy = [probe(z_train, y[a][0], z_test, y[a][1], len(names[a])) for a in ATTRIBUTES]
        shares = [variance_share(z_train, y[a][0]) for a in ATTRIBUTES]
        print(f"| {label} | " + " | ".join(f"{v:.1%}" for v in accuracy) + " | "
              + " / ".join(f"{v:.1%}" for v in shares) + f" | {attention} |", flush=True)


if __name__ == "__main__":
    main()
