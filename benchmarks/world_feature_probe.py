"""Linear probes on the embedded world's vision tower: how well each image feature an adapter kind reads tells the
world's attributes apart (issue 15: does the penultimate state that plus / time-plus read hold the shape?).

Softmax regression (Adam, 200 steps, standardised features, a little weight decay) fitted on world images from
``world.TRAIN_SEED`` and scored on held-out ones from ``world.EVAL_SEED``. Features: the projected embedding (global
adapters), the penultimate states flattened (all 65 tokens), their mean, and their CLS token.

    python benchmarks/world_feature_probe.py [--train 1500] [--test 400]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ipadapter.generation.pipeline import EMBEDDED_MODEL
from ipadapter.world import shapes as world


def features(processor, encoder, samples) -> dict[str, torch.Tensor]:
    images = [world.draw(s) for s in samples]
    with torch.no_grad():
        out = encoder(processor(images=images, return_tensors="pt").pixel_values, output_hidden_states=True)
    states = out.hidden_states[-2]
    return {"projected embedding": out.image_embeds, "penultimate, all tokens": states.flatten(1),
            "penultimate, token mean": states.mean(1), "penultimate, CLS token": states[:, 0]}


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
    args = ap.parse_args(argv)
    processor = CLIPImageProcessor.from_pretrained(f"{args.model}/feature_extractor")
    encoder = CLIPVisionModelWithProjection.from_pretrained(f"{args.model}/image_encoder").eval()
    train, test = world.samples(args.train, world.TRAIN_SEED), world.samples(args.test, world.EVAL_SEED)
    f_train, f_test = features(processor, encoder, train), features(processor, encoder, test)
    print(f"held-out accuracy of a linear probe ({args.train} images to fit, {args.test} held out)")
    print("| attribute | " + " | ".join(f_train) + " |")
    print("| --- |" + " --- |" * len(f_train))
    for attr in ("shape", "colour", "background"):
        names = sorted({getattr(s, attr) for s in train})
        y = torch.tensor([names.index(getattr(s, attr)) for s in train])
        yt = torch.tensor([names.index(getattr(s, attr)) for s in test])
        row = [probe(f_train[k], y, f_test[k], yt, len(names)) for k in f_train]
        print(f"| {attr} | " + " | ".join(f"{v:.1%}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
