"""The paper's metrics for any model and adapter, and the ``ipadapter eval`` command.

    pairs = read_pairs("coco/data.json")                   # (image, caption) pairs
    clip = ClipScorer.from_pretrained("openai/clip-vit-large-patch14")  # the judge (the paper's ViT-L/14)
    result = evaluate(ipadapter.load(pipe, "ip.safetensors"), pairs, clip, EvalSettings(samples=4))
    print(format_table(result.metrics))

- CLIP-I: cosine similarity of the judge's image embeddings, generated image vs prompt image.
- CLIP-T: cosine similarity of the generated image's embedding and the pair's caption's embedding (the
  paper's CLIPScore without its 2.5 weight; pairs with an empty caption are left out).
- Attribute accuracy, with a judge (a plug-in: :class:`Judge`): attributes read back from each generated image's
  pixels, compared with those its prompt expects. The shapes world brings one
  (:class:`ipadapter.world.judge.WorldJudge`: background colour, shape colour, shape); ``ipadapter eval`` picks
  it for world data.

Each (prompt, sample) has its own seed, ``seed + index * samples + sample``, and its own generator, so the
images do not depend on the batch size or on how many processes share the work: under ``accelerate launch``
(GPUs) or ``torchrun`` (CPU processes) each process takes every n-th prompt and the records are gathered at the
end, so the results equal a single process's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..core.encoders import load_image
from ..core.errors import IPAdapterError, param
from ..core.files import atomic_write


# ---------------------------------------------------------------------------------------------------- judge
class Judge(Protocol):
    """Reads attributes from pixels and says which a prompt expects (e.g. :class:`ipadapter.world.judge.WorldJudge`).

    ``labels``: how a table names each attribute (and "all").
    """

    labels: Mapping[str, str]

    def read(self, image: Image.Image) -> dict[str, str | None]:
        """The attributes a generated image shows."""

    def expected(self, truth: dict[str, str], text_prompt: str) -> dict[str, str | None]:
        """What a generation should show, from its prompt image's true attributes and its text prompt."""

    def truth(self, image: Image.Image, path: str | None = None, data: str | os.PathLike | None = None):
        """A prompt image's true attributes (``path``: its file, ``data``: the data it came from), or None."""


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Pair:
    """One evaluation prompt: an image, its caption and, when a judge knows them, its true attributes."""

    image: Image.Image
    caption: str = ""
    name: str = ""
    truth: dict[str, str] | None = None  # e.g. {"background", "colour", "shape"} on the shapes world
    prompt: str | None = None  # this pair's own text prompt (else the settings' prompt); the caption stays the
    #                            CLIP-T reference, e.g. the wanted result of an image + text prompt


def read_pairs(data: str | os.PathLike, data_root: str | os.PathLike | None = None,
               limit: int | None = None, judge: Judge | None = None) -> list[Pair]:
    """(image, caption) pairs from anything the trainer reads (:func:`ipadapter.data.read_records`).

    The official JSON list (``[{"image_file": "a.png", "text": "..."}]``, paths relative to ``data_root``,
    default the JSON's folder), JSONL, a folder of images with same-name ``.txt`` captions, or ``.tar`` shards.
    Unlike training, evaluation skips nothing: a missing or unreadable image, or an empty caption, is an error
    (a benchmark that silently drops prompts is not comparable). Only the first ``limit`` pairs are read.

    ``judge`` gives each prompt image's true attributes where it knows them (the world judge: from the world's
    ``samples.json`` beside the data, else from the pixels of clean world images).
    """
    from ..training.data import BadItem, BadItems, decode_image, read_records

    bad = BadItems()
    records = read_records(data, data_root, bad)
    for record in records:  # training takes "" as an image-only item; CLIP-T needs a caption to score against
        if not record.text:
            bad.add("empty caption", record.name)
    total = len(records) + bad.count
    if bad.count:
        raise IPAdapterError(f"{param('data')} {data}: {_bad_line(bad, total)}; evaluation uses every pair, so fix "
                             f"the data or the paths ({param('data_root')})")
    records = records[:limit] if limit is not None else records
    pairs = []
    for index, record in enumerate(records):
        try:
            image, _ = decode_image(record.image)
        except BadItem as e:
            bad.add(e.reason, record.name, index, e.detail)
            continue
        name = os.path.basename(record.image.path) if record.image.offset < 0 else record.name
        path = record.image.path if record.image.offset < 0 else None  # a file of its own, not a tar member
        known = judge.truth(image, path, data) if judge is not None else None
        pairs.append(Pair(image, record.text, name, known))
    if bad.count:
        raise IPAdapterError(f"{param('data')} {data}: {_bad_line(bad, len(records))}; evaluation uses every pair")
    return pairs


def _bad_line(bad, total: int) -> str:
    reason, shown = next(iter(bad.examples.items()))
    return f"{bad.summary(total).splitlines()[0]}, e.g. {reason}: {shown[0]}"


# ------------------------------------------------------------------------------------------------- CLIP
class ClipScorer:
    """A contrastive CLIP model (image and text towers with projections) used to score generations."""

    def __init__(self, model, tokenizer, processor, name: str = "clip"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ClipScorer:
        """A transformers ``CLIPModel`` folder (or hub id), or a shapes-world model folder (assembled from its
        ``text_encoder``, ``image_encoder`` and ``text_projection.safetensors``)."""
        path = Path(path)
        if (path / "text_projection.safetensors").is_file() and (path / "image_encoder").is_dir():
            return _from_world_folder(path).to(device)
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        if path.exists() and not (path / "config.json").is_file():
            raise IPAdapterError(f"{param('clip')} {path}: not a CLIPModel folder (no config.json)")
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=not _looks_like_hub_id(path))
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=not _looks_like_hub_id(path))
        except Exception as e:  # noqa: BLE001 - any load failure is bad input
            raise IPAdapterError(f"{param('clip')} {path}: cannot load a CLIP model and its tokenizer "
                                 f"({' '.join(str(e).split())[:140]})") from None
        try:
            processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=not _looks_like_hub_id(path))
        except Exception:  # noqa: BLE001 - no preprocessor_config.json: CLIP's defaults at the model's size
            size = int(model.config.vision_config.image_size)
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls(model, tokenizer, processor, str(path)).to(device)

    def to(self, device: str | torch.device) -> ClipScorer:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings [n, D]."""
        pixels = self.processor(images=[load_image(im) for im in images], return_tensors="pt").pixel_values
        emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return torch.nn.functional.normalize(_tensor(emb).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings [n, D] (texts longer than the tokenizer's limit are truncated)."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        emb = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device))
        return torch.nn.functional.normalize(_tensor(emb).float(), dim=-1)


def _tensor(output) -> torch.Tensor:
    # get_*_features returns a tensor in transformers 4 and an output object (pooler_output) in 5
    return output if torch.is_tensor(output) else output.pooler_output


def _looks_like_hub_id(path: Path) -> bool:
    return not path.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/"))


def _from_world_folder(folder: Path) -> ClipScorer:
    """The world builder's CLIP towers, saved as parts of its pipeline folder, put back together."""
    from safetensors.torch import load_file
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    try:
        text = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
        vision = CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder"))
        extra = load_file(str(folder / "text_projection.safetensors"))
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        processor = CLIPImageProcessor.from_pretrained(str(folder / "feature_extractor"))
    except Exception as e:  # noqa: BLE001
        raise IPAdapterError(f"{param('clip')} {folder}: cannot assemble the world's CLIP model "
                             f"({' '.join(str(e).split())[:140]})") from None
    config = CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                        projection_dim=vision.config.projection_dim)
    model = CLIPModel(config)
    # CLIPTextModel is the text transformer itself in transformers 5, a wrapper around .text_model in 4
    model.text_model.load_state_dict(getattr(text, "text_model", text).state_dict())
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(extra["text_projection.weight"])
        if "logit_scale" in extra:
            model.logit_scale.copy_(extra["logit_scale"].reshape(()))
    return ClipScorer(model, tokenizer, processor, str(folder))


def find_clip(explicit: str | os.PathLike | None, model_dir: str | os.PathLike | None) -> str | Path:
    """``explicit``, else ``<model>/clip`` (a CLIPModel folder), else the world model's own CLIP towers."""
    if explicit is not None:
        return explicit
    if model_dir is not None:
        model_dir = Path(model_dir)
        if (model_dir / "clip" / "config.json").is_file():
            return model_dir / "clip"
        if (model_dir / "text_projection.safetensors").is_file():
            return model_dir
    raise IPAdapterError(f"no CLIP model to score with: pass {param('clip')} DIR (a transformers CLIPModel folder, "
                         "e.g. openai/clip-vit-large-patch14 as in the paper)")


# ----------------------------------------------------------------------------------------------- metrics
def clip_i(generated: Sequence[Image.Image], prompt_images: Sequence[Image.Image], clip: ClipScorer) -> torch.Tensor:
    """CLIP-I of each (generated, prompt image) pair: cosine similarity of their CLIP image embeddings [n]."""
    if len(generated) != len(prompt_images):
        raise ValueError(f"{len(generated)} generated images for {len(prompt_images)} prompt images")
    return (clip.image_embeds(generated) * clip.image_embeds(prompt_images)).sum(-1)


def clip_t(generated: Sequence[Image.Image], captions: Sequence[str], clip: ClipScorer) -> torch.Tensor:
    """CLIP-T of each (generated, caption) pair: cosine similarity of image and text embeddings [n]."""
    if len(generated) != len(captions):
        raise ValueError(f"{len(generated)} generated images for {len(captions)} captions")
    return (clip.image_embeds(generated) * clip.text_embeds(captions)).sum(-1)


def attribute_hits(parsed: dict, expected: dict) -> dict[str, bool]:
    """Per attribute: does the parsed image show what was expected (attributes expected as None are left out)."""
    return {k: parsed.get(k) == v for k, v in expected.items() if v is not None}


def summarize_hits(hits: Sequence[dict[str, bool]], attributes: Sequence[str] | None = None) -> dict[str, float]:
    """Per attribute the fraction of hits (among images where it was expected), "all" and "n"."""
    attributes = attributes if attributes is not None else list(dict.fromkeys(k for h in hits for k in h))
    out: dict[str, float] = {}
    for k in attributes:
        values = [h[k] for h in hits if k in h]
        out[k] = float(np.mean(values)) if values else float("nan")
    out["all"] = float(np.mean([all(h.values()) for h in hits])) if hits else float("nan")
    out["n"] = len(hits)
    return out


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class EvalSettings:
    samples: int = 4  # images per prompt (the paper: 4)
    scale: float | None = None  # None: 1.0 for image-only prompts, 0.5 with a text prompt
    prompt: str = ""  # text prompt for every pair ("" = image-only, as the paper's Table 1)
    prompt_from_caption: bool = False  # use each pair's caption as its text prompt instead
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 8  # prompts per pipeline call (each with ``samples`` images)
    text_only: bool = False  # baseline: the base model alone, no image prompt
    width: int | None = None
    height: int | None = None
    true_cfg: float | None = None  # Flux's true classifier-free guidance (true_cfg_scale; needs negative_prompt)

    def text_for(self, pair: Pair) -> str:
        if self.prompt_from_caption:
            return pair.caption
        return pair.prompt if pair.prompt is not None else self.prompt

    def scale_for(self, text: str) -> float:
        return self.scale if self.scale is not None else (0.5 if text else 1.0)


def sample_seed(seed: int, index: int, sample: int, samples: int) -> int:
    """The seed of one (prompt, sample): distinct for every image, whatever the batching."""
    return seed + index * samples + sample


@dataclass
class EvalResult:
    metrics: dict
    records: list[dict]
    settings: dict
    images: list[list[Image.Image]] | None = None  # [prompt][sample] when asked to keep them

    def to_json(self) -> dict:
        return {"settings": self.settings, "metrics": self.metrics, "per_sample": self.records}


def evaluate(target, pairs: Sequence[Pair], clip: ClipScorer | None, settings: EvalSettings | None = None,
             keep_images: bool = False, progress: bool = False, info: dict | None = None,
             judge: Judge | None = None) -> EvalResult:
    """Generate ``settings.samples`` images per pair and score them (CLIP-I, CLIP-T, and with a ``judge`` the
    attributes of pairs whose truth it knows).

    ``target``: an :class:`~ipadapter.pipeline.IPAdapter` with one adapter, or a plain diffusers pipeline for
    ``text_only``. Under ``accelerate launch`` each process takes every n-th pair; every process returns the
    gathered result. ``info`` is copied into the result's settings (model and file names, ...).
    """
    from accelerate import PartialState

    settings = settings or EvalSettings()
    if not pairs:
        raise IPAdapterError("nothing to evaluate: no (image, caption) pairs")
    state = PartialState()
    mine = list(range(len(pairs)))[state.process_index::state.num_processes]
    records, images = [], {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc="eval", disable=not progress or not state.is_main_process)
    for start in range(0, len(mine), settings.batch_size):
        chunk = mine[start : start + settings.batch_size]
        generated = generate_batch(target, [pairs[i] for i in chunk], chunk, settings)
        for j, i in enumerate(chunk):
            records += score_prompt(pairs[i], i, generated[j], clip, settings, judge)
            if keep_images:
                images[i] = generated[j]
        bar.update(len(chunk))
    bar.close()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
        if keep_images:
            images = {k: v for part in gather_object([images]) for k, v in part.items()}
    records.sort(key=lambda r: (r["index"], r["sample"]))
    meta = {**asdict(settings), **(info or {}), "num_prompts": len(pairs), "processes": state.num_processes}
    if settings.text_only:
        meta["scale"] = None
    return EvalResult(summarize(records), records, meta,
                      [images[i] for i in range(len(pairs))] if keep_images else None)


@torch.no_grad()
def generate_batch(target, pairs: Sequence[Pair], indices: Sequence[int],
                   settings: EvalSettings) -> list[list[Image.Image]]:
    """``settings.samples`` images for each pair, in one :meth:`IPAdapter.generate` call: [pair][sample]."""
    from ..generation.pipeline import ImagePrompt, IPAdapter

    ip = target if isinstance(target, IPAdapter) else None
    texts = [settings.text_for(p) for p in pairs]
    generators = [torch.Generator("cpu").manual_seed(sample_seed(settings.seed, i, k, settings.samples))
                  for i in indices for k in range(settings.samples)]
    if settings.text_only:  # the base model alone: no adapter acts
        ip, prompts = IPAdapter(ip.pipe if ip is not None else target, []), []
    else:
        if ip is None:
            raise IPAdapterError("an image-prompt evaluation needs a pipeline with an adapter (or text_only=True)")
        if len(ip.adapters) != 1:
            raise IPAdapterError(f"{len(ip.adapters)} adapters attached; evaluation scores one at a time")
        scales = {settings.scale_for(t) for t in texts}
        if len(scales) > 1:  # per-pair text decides the default scale: one call per scale
            return _split_by_scale(target, pairs, indices, settings, texts)
        # one image set per text prompt: prompt j is conditioned on pair j's image
        prompts = [ImagePrompt(images=[[p.image] for p in pairs], scale=scales.pop())]
    negative = [settings.negative_prompt] * len(texts) if settings.negative_prompt is not None else None
    extra = {}
    if settings.true_cfg is not None:
        if negative is None:
            raise IPAdapterError(f"{param('true_cfg')} needs {param('negative_prompt')} (true CFG runs an "
                                 "unconditional pass with it)")
        extra["true_cfg_scale"] = settings.true_cfg
    out = ip.generate(prompts=prompts, prompt=texts, negative_prompt=negative, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance, generator=generators, num_images=settings.samples,
                      width=settings.width, height=settings.height, **extra)
    s = settings.samples
    return [out[j * s : (j + 1) * s] for j in range(len(pairs))]


def _split_by_scale(target, pairs, indices, settings, texts):
    from dataclasses import replace

    out: dict[int, list] = {}
    for scale in sorted({settings.scale_for(t) for t in texts}):
        pick = [j for j, t in enumerate(texts) if settings.scale_for(t) == scale]
        got = generate_batch(target, [pairs[j] for j in pick], [indices[j] for j in pick],
                             replace(settings, scale=scale))
        out.update(zip(pick, got))
    return [out[j] for j in range(len(pairs))]


def score_prompt(pair: Pair, index: int, generated: Sequence[Image.Image], clip: ClipScorer | None,
                 settings: EvalSettings, judge: Judge | None = None) -> list[dict]:
    """One record per generated image of a pair: seed, CLIP-I, CLIP-T, parsed and expected attributes."""
    text = settings.text_for(pair)
    n = len(generated)
    ci = clip_i(generated, [pair.image] * n, clip).tolist() if clip is not None else [None] * n
    ct = clip_t(generated, [pair.caption] * n, clip).tolist() if clip is not None and pair.caption else [None] * n
    expected = judge.expected(pair.truth, text) if judge is not None and pair.truth is not None else None
    records = []
    for k, image in enumerate(generated):
        record = {"index": index, "name": pair.name, "sample": k,
                  "seed": sample_seed(settings.seed, index, k, settings.samples), "caption": pair.caption,
                  "prompt": text, "clip_i": ci[k], "clip_t": ct[k]}
        if expected is not None:
            parsed = judge.read(image)
            record.update(expected=expected, parsed=parsed, hits=attribute_hits(parsed, expected))
        records.append(record)
    return records


def summarize(records: Sequence[dict]) -> dict:
    """Means over all generated images (CLIP-T over those with a caption) and attribute accuracies."""

    def mean(key):
        values = [r[key] for r in records if r.get(key) is not None]
        return (float(np.mean(values)) if values else None), len(values)

    metrics: dict = {"n_prompts": len({r["index"] for r in records}), "n_images": len(records)}
    metrics["clip_i"], _ = mean("clip_i")
    metrics["clip_t"], metrics["clip_t_n"] = mean("clip_t")
    hits = [r["hits"] for r in records if "hits" in r]
    if hits:
        attributes = list(dict.fromkeys(k for r in records if "expected" in r for k in r["expected"]))
        acc = summarize_hits(hits, attributes)
        metrics.update({k: acc[k] for k in (*attributes, "all")}, attributes_n=acc["n"])
    return metrics


_COUNTS = ("n_prompts", "n_images", "clip_i", "clip_t", "clip_t_n", "attributes_n")


def format_table(metrics: dict, title: str | None = None, labels: Mapping[str, str] | None = None) -> str:
    """The metrics as a two-column table; ``labels`` names the judge's attributes (a judge's ``labels``)."""
    rows = [("CLIP-I", metrics.get("clip_i")), ("CLIP-T", metrics.get("clip_t"))]
    rows += [((labels or {}).get(k, k), v) for k, v in metrics.items() if k not in _COUNTS]
    width = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines += [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    lines.append(f"{'images':<{width}}  {metrics['n_images']} ({metrics['n_prompts']} prompts)")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write JSON atomically (a reader never sees half a file)."""
    text = json.dumps(data, indent=1, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


__all__ = [
    "ClipScorer", "EvalResult", "EvalSettings", "Judge", "Pair", "attribute_hits", "clip_i", "clip_t", "evaluate",
    "read_pairs", "summarize_hits",
]
