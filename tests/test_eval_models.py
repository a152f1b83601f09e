"""`ipadapter eval` on what users have: single-file models and LoRAs (generate's loading code), and Flux and SD3
model folders (tiny random models, CPU). The images eval saves must be the ones the library makes for the same
settings and seeds; a tiny random CLIPModel scores them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ipadapter.cli import main
from ipadapter.evaluation.evaluate import EvalSettings, evaluate, read_pairs
from ipadapter.generation.loading import apply_loras, load_model
from ipadapter.generation.pipeline import load
from ipadapter.testing import (
    random_adapter,
    random_flux_adapter,
    random_time_plus_adapter,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
)
from ipadapter.world import shapes as world
from single_file_support import sd1_original
from test_evaluate import tiny_clip_folder
from test_loading import peft_lora

SIZE, STEPS = 32, 2


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict:
    """A tiny SD 1.5 folder, the same weights as one original-layout file, an adapter, a LoRA, a CLIP judge and
    three held-out world pairs."""
    root = tmp_path_factory.mktemp("eval-models")
    pipe = tiny_pipeline("sd15", root / "model")
    save_file(sd1_original(pipe), str(root / "model.safetensors"))
    random_adapter(pipe.unet, "global", encoder=pipe.image_encoder).save(root / "adapter.safetensors")
    save_file(peft_lora(pipe.unet), str(root / "lora.safetensors"))
    data = world.write_dataset(root / "world", 3, seed=world.EVAL_SEED, partial_captions=False, progress=False)
    return {"root": root, "model": root / "model", "file": root / "model.safetensors",
            "adapter": root / "adapter.safetensors", "lora": root / "lora.safetensors",
            "clip": tiny_clip_folder(root / "clip"), "data": Path(data) if Path(data).is_file() else
            root / "world" / "data.json"}


def _eval(disk, out: Path, *extra) -> tuple[int, dict, list[np.ndarray]]:
    """Run the CLI; (exit code, the results JSON, the saved images in order)."""
    args = ["eval", "--data", disk["data"], "--clip", disk["clip"], "--samples", "1", "--steps", STEPS,
            "--num-prompts", "2", "--batch-size", "1", "--width", SIZE, "--height", SIZE, "--device", "cpu",
            "--out", out / "result.json", "--save-images", out / "images", *extra]
    rc = main([str(a) for a in args])
    if rc:
        return rc, {}, []
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "images").glob("*.png"))]
    return rc, json.loads((out / "result.json").read_text()), images


def _one_line_error(capsys, rc: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------ single files, LoRAs
def test_eval_takes_a_single_file_and_loras_as_generate_does(disk, tmp_path):
    sd = ("--adapter", disk["adapter"], "--guidance", "5")
    rc, folder_run, folder_images = _eval(disk, tmp_path / "folder", "--model", disk["model"], *sd)
    assert rc == 0 and len(folder_images) == 2
    rc, file_run, file_images = _eval(disk, tmp_path / "file", "--model", disk["file"], "--model-config",
                                      disk["model"], *sd)
    assert rc == 0 and file_run["settings"]["model"] == str(disk["file"])
    assert all(np.array_equal(a, b) for a, b in zip(file_images, folder_images))  # same weights, same images
    assert file_run["metrics"] == folder_run["metrics"]

    rc, lora_run, lora_images = _eval(disk, tmp_path / "lora", "--model", disk["model"], "--lora",
                                      f"{disk['lora']}:0.8", *sd)
    assert rc == 0
    assert all(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(lora_images, folder_images))  # the LoRA acts
    # ... as it does in the library: apply_loras, then the adapter, the same settings
    pipe = load_model(disk["model"])
    apply_loras(pipe, [(disk["lora"], 0.8)])
    settings = EvalSettings(samples=1, steps=STEPS, guidance=5.0, batch_size=1, width=SIZE, height=SIZE)
    want = evaluate(load(pipe, disk["adapter"]), read_pairs(disk["data"], limit=2), None, settings,
                    keep_images=True).images
    assert all(np.array_equal(got, np.asarray(w[0])) for got, w in zip(lora_images, want))


def test_eval_model_file_and_lora_errors_are_one_line(disk, tmp_path, capsys):
    base = ("--adapter", disk["adapter"])
    for extra, fragments in (
        (("--model", disk["model"], "--lora", tmp_path / "missing.safetensors"), ("--lora", "no such file")),
        (("--model", disk["model"], "--model-config", disk["model"]), ("--model-config", "only for a single-file")),
        (("--model", disk["model"], "--device", "gpu"), ("--device 'gpu'", "not a device")),
        (("--model", disk["model"], "--true-cfg", "2"), ("--true-cfg needs --negative-prompt",)),
        (("--model", disk["model"], "--true-cfg", "2", "--negative-prompt", "blurry"), ("--true-cfg", "no true CFG")),
    ):
        rc, _, _ = _eval(disk, tmp_path, *extra, *base)
        _one_line_error(capsys, rc, *fragments)
        assert not (tmp_path / "result.json").exists() and not (tmp_path / "images").exists()
    bad_lora = tmp_path / "sdxl-lora.safetensors"
    save_file(peft_lora(tiny_pipeline("sdxl").unet), str(bad_lora))
    rc, _, _ = _eval(disk, tmp_path, "--model", disk["model"], "--lora", bad_lora, *base)
    _one_line_error(capsys, rc, "--lora", "sdxl-lora.safetensors", "does not fit")


# --------------------------------------------------------------------------------------------- Flux, SD3
@pytest.fixture(scope="module")
def transformers(tmp_path_factory) -> dict:
    """name -> (model folder, adapter file): a tiny FluxPipeline with an XLabs adapter, a tiny SD3 pipeline with an
    InstantX SD3.5 (time-plus) adapter."""
    root = tmp_path_factory.mktemp("eval-transformers")
    flux = tiny_flux_pipeline(root / "flux")
    random_flux_adapter(flux.transformer, "xlabs", embed_dim=48).save(root / "xlabs.safetensors")
    sd3 = tiny_sd3_pipeline(root / "sd3")
    random_time_plus_adapter(sd3.transformer, sd3.image_encoder).save(root / "sd35.safetensors")
    return {"flux": (root / "flux", root / "xlabs.safetensors"), "sd3": (root / "sd3", root / "sd35.safetensors")}


@pytest.mark.parametrize("family, extra, call, guidance", [
    ("flux", ("--true-cfg", "2", "--negative-prompt", "blurry"), dict(true_cfg_scale=2.0, negative_prompt="blurry"),
     3.5),
    ("sd3", (), {}, 7.5),
])
def test_eval_on_flux_and_sd3_folders_makes_the_librarys_images(disk, transformers, tmp_path, family, extra, call,
                                                                guidance):
    """eval on a Flux (XLabs, true CFG, the distilled guidance by default) or SD3 (SD3.5 adapter) folder: the report,
    and the images IPAdapter.generate makes for each pair's image and seed."""
    model, adapter = transformers[family]
    rc, run, images = _eval(disk, tmp_path, "--model", model, "--adapter", adapter, *extra)
    assert rc == 0 and len(images) == 2
    assert run["settings"]["guidance"] == guidance and run["metrics"]["n_images"] == 2
    assert -1.0 <= run["metrics"]["clip_i"] <= 1.0
    ip = load(load_model(model), adapter)
    pairs = read_pairs(disk["data"], limit=2)
    for index, (pair, got) in enumerate(zip(pairs, images)):  # image 0 of pair i has seed 0 + i
        want = ip.generate(images=[pair.image], seed=index, num_inference_steps=STEPS, width=SIZE, height=SIZE,
                           **call)[0]
        assert np.array_equal(got, np.asarray(want)), f"pair {index}"
    if call:  # the flags acted: without true CFG the images differ
        plain = ip.generate(images=[pairs[0].image], seed=0, num_inference_steps=STEPS, width=SIZE, height=SIZE)[0]
        assert np.abs(np.asarray(plain).astype(int) - images[0]).max() > 0
    rc, base, _ = _eval(disk, tmp_path / "base", "--model", model, "--text-only", "--prompt", "a red circle")
    assert rc == 0 and base["settings"]["text_only"] and base["metrics"]["n_images"] == 2


def test_flux_single_files_are_refused_in_one_line(disk, tmp_path, capsys):
    """Only Stable Diffusion single files convert (diffusers' from_single_file per family); a Flux transformer file
    given as --model says so."""
    flux_file = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, str(flux_file))
    rc, _, _ = _eval(disk, tmp_path, "--model", flux_file, "--adapter", disk["adapter"])
    _one_line_error(capsys, rc, "--model", "flux1-dev.safetensors")
