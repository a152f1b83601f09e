"""The ``ipadapter`` command: generate / inspect / convert, run in-process for speed, plus real subprocesses
to check what a user sees on stderr (one line, exit 2, no traceback; nothing from the libraries)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import GEN, diffusers_ip_adapter, generator, random_image
from ipadapter.cli import main
from ipadapter.core.checkpoint import parameter_count, read_checkpoint
from ipadapter.testing import tiny_image_encoder

STEPS, SEED, SCALE = 2, 3, 0.7


@pytest.fixture(scope="module")
def files(sd15_pipe, adapter_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    sd15_pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    random_image(0).save(root / "ref.png")
    tiny_image_encoder(hidden=80).save_pretrained(str(root / "wide_encoder"))
    return {"root": root, "model": root / "model", "image": root / "ref.png", "global": adapter_file("sd15", "global"),
            "plus": adapter_file("sd15", "plus"), "faceid": adapter_file("sd15", "faceid"),
            "sdxl": adapter_file("sdxl", "global"), "wide_encoder": root / "wide_encoder"}


def _generate(files, out, *extra, adapter="global"):
    return ["generate", "--model", str(files["model"]), "--adapter", str(files[adapter]), "--image",
            str(files["image"]), "--prompt", GEN["prompt"], "--steps", str(STEPS), "--guidance", "5", "--seed",
            str(SEED), "--width", "32", "--height", "32", "--scale", str(SCALE), "-o", str(out), *extra]


def _run(capsys, argv) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------------------------------------ generate
def test_generate_to_a_file_matches_diffusers_with_the_same_seed(capsys, sd15_pipe, files, tmp_path):
    out = tmp_path / "out.png"
    rc, stdout, err = _run(capsys, _generate(files, out))
    assert rc == 0, err
    assert stdout.strip() == str(out)
    with Image.open(out) as img:
        params = img.info["parameters"]
        pixels = np.asarray(img.convert("RGB"))
    assert GEN["prompt"] in params
    for text in (f"Seed: {SEED}", f"Steps: {STEPS}", "CFG scale: 5", f"{files['global'].name}", f"{SCALE}",
                 "Size: 32x32"):
        assert text in params, text
    # --seed S is torch.Generator("cpu").manual_seed(S) handed to the pipeline: diffusers' own adapter agrees
    with diffusers_ip_adapter(sd15_pipe, [files["global"]], [SCALE]):
        ref = sd15_pipe(ip_adapter_image=Image.open(files["image"]).convert("RGB"),
                        **{**GEN, "output_type": "pil"}, generator=generator(SEED)).images[0]
    assert np.array_equal(pixels, np.asarray(ref))


def test_generate_to_a_folder_with_several_images(capsys, files, tmp_path):
    out = tmp_path / "new" / "folder"
    rc, stdout, err = _run(capsys, _generate(files, out, "--num-images", "2"))
    assert rc == 0, err
    written = sorted(out.iterdir())
    assert len(written) == 2 and all(p.suffix == ".png" for p in written)
    assert stdout.split() == [str(p) for p in written]
    arrays = [np.asarray(Image.open(p)) for p in written]
    assert not np.array_equal(arrays[0], arrays[1])
    assert all("parameters" in Image.open(p).info for p in written)


def test_output_names(tmp_path):
    from ipadapter.cli.generate import _outputs

    assert _outputs(str(tmp_path / "a.png"), 1, 5) == [tmp_path / "a.png"]
    assert _outputs(str(tmp_path / "a.png"), 2, 5) == [tmp_path / "a-0.png", tmp_path / "a-1.png"]
    assert [p.parent for p in _outputs(str(tmp_path / "d"), 2, 5)] == [tmp_path / "d"] * 2


def test_generate_faceid_from_an_embeddings_file(capsys, files, tmp_path):
    np.save(tmp_path / "face.npy", np.random.RandomState(0).randn(1, 512).astype(np.float32))
    out = tmp_path / "face.png"
    argv = ["generate", "--model", str(files["model"]), "--adapter", str(files["faceid"]), "--face-embeds",
            str(tmp_path / "face.npy"), "--steps", "2", "--width", "32", "--height", "32", "-o", str(out)]
    rc, _, err = _run(capsys, argv)
    assert rc == 0, err
    assert out.is_file()


# --------------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("kind", ["global", "plus", "faceid"])
def test_inspect(capsys, files, kind):
    rc, out, err = _run(capsys, ["inspect", str(files[kind])])
    assert rc == 0, err
    cfg, tensors = read_checkpoint(files[kind])
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert fields["kind"] == kind
    assert fields["tokens"].startswith(str(cfg.num_tokens))
    assert fields["layers"].startswith("16 ") and "32, 64" in fields["layers"]
    assert fields["cross-attention width"] == "32"
    assert fields["parameters"] == f"{parameter_count(tensors):,}"
    assert "base family" in fields
    if kind == "plus":
        assert fields["resampler"].startswith("depth 4, heads 1, dim_head 64")
    if kind == "faceid":
        assert fields["LoRA"] == "32 layers, rank 4"


def test_inspect_sdxl_shape(capsys, files):
    rc, out, _ = _run(capsys, ["inspect", str(files["sdxl"])])
    assert rc == 0 and "70 (attention widths" in out


# --------------------------------------------------------------------------------------------- convert
def _training_layout(src: Path, dst: Path) -> None:
    tensors = load_file(str(src))
    renamed = {k.replace("image_proj.", "image_proj_model.", 1).replace("ip_adapter.", "adapter_modules.", 1): v
               for k, v in tensors.items()}
    torch.save({"module": renamed, "step": 100}, dst)


@pytest.mark.parametrize("kind", ["global", "plus"])
def test_convert_training_layout_to_official(capsys, files, tmp_path, kind):
    src = tmp_path / "checkpoint.bin"
    _training_layout(files[kind], src)
    out = tmp_path / "converted.safetensors"
    rc, stdout, err = _run(capsys, ["convert", str(src), str(out)])
    assert rc == 0, err
    assert str(out) in stdout
    got, want = load_file(str(out)), load_file(str(files[kind]))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert read_checkpoint(out)[0].kind == kind


# ------------------------------------------------------------------------------------------- bad input
def _bad_inputs(files, tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(files["global"].read_bytes()[:300])
    pickled = tmp / "pickled.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2)}, "cfg": argparse.Namespace(a=1)}, pickled)
    (tmp / "notimage.png").write_text("hello")
    big = tmp / "big.png"
    Image.new("1", (10000, 5001)).save(big)
    out = tmp / "out.png"

    def gen(*extra, adapter="global"):
        argv = _generate(files, out, adapter=adapter)
        for flag, value in zip(extra[::2], extra[1::2]):
            argv[argv.index(flag) + 1] = value
        return argv

    return {
        "missing adapter": (gen("--adapter", str(tmp / "none.safetensors")), ("none.safetensors", "no such")),
        "truncated adapter": (gen("--adapter", str(truncated)), ("truncated.safetensors", "truncated or corrupt")),
        "pickled adapter": (gen("--adapter", str(pickled)), ("pickled.bin", "non-tensor")),
        "other family": (gen(adapter="sdxl"), ("70 cross-attention layers", "this UNet", "16 cross-attention layers")),
        "encoder width": (gen(adapter="plus") + ["--image-encoder", str(files["wide_encoder"])],
                          ("hidden width", "64", "this encoder has 80")),
        "unreadable image": (gen("--image", str(tmp / "notimage.png")), ("notimage.png", "not a readable image")),
        "missing image": (gen("--image", str(tmp / "nope.png")), ("nope.png", "no such image")),
        "huge image": (gen("--image", str(big)), ("big.png", "over 50 megapixels")),
        "model folder": (gen("--model", str(tmp)), (str(tmp), "model_index.json")),
        "inspect corrupt": (["inspect", str(truncated)], ("truncated or corrupt",)),
        "convert corrupt": (["convert", str(pickled), str(out.with_suffix(".safetensors"))], ("non-tensor",)),
        "convert suffix": (["convert", str(files["global"]), str(tmp / "x.bin")], (".safetensors",)),
    }


CASES = ["missing adapter", "truncated adapter", "pickled adapter", "other family", "encoder width",
         "unreadable image", "missing image", "huge image", "model folder", "inspect corrupt", "convert corrupt",
         "convert suffix"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, sd15_pipe, files, tmp_path, case):
    argv, fragments = _bad_inputs(files, tmp_path)[case]
    before = {p.name for p in tmp_path.iterdir()}
    processors = dict(sd15_pipe.unet.attn_processors)
    rc, stdout, err = _run(capsys, argv)
    _assert_one_line_error(rc, err, *fragments)
    assert {p.name for p in tmp_path.iterdir()} == before  # no output, no temporary file
    assert stdout == ""
    assert all(sd15_pipe.unet.attn_processors[k] is v for k, v in processors.items())


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "abc"])
def test_bad_scale_flag(capsys, files, tmp_path, value):
    argv = _generate(files, tmp_path / "o.png")
    argv[argv.index("--scale") + 1] = value
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "--scale" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------- subprocess
def _command() -> list[str]:
    script = Path(sys.executable).with_name("ipadapter")
    return [str(script)] if script.is_file() else [shutil.which("ipadapter") or "ipadapter"]


def _subprocess(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONWARNINGS": ""}
    return subprocess.run(_command() + argv, capture_output=True, text=True, env=env, timeout=300)


def test_subprocess_success_is_quiet(files, tmp_path):
    out = tmp_path / "out.png"
    proc = _subprocess(_generate(files, out), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bars, FutureWarnings or library notices
    assert proc.stdout.strip() == str(out) and out.is_file()


def test_subprocess_hub_id_offline(files, tmp_path):
    out = tmp_path / "out.png"
    argv = _generate(files, out)
    argv[argv.index("--model") + 1] = "someone/not-cached"
    proc = _subprocess(argv, tmp_path)
    _assert_one_line_error(proc.returncode, proc.stderr, "someone/not-cached", "not in the local", "--model DIR")
    assert not out.exists()


@pytest.mark.parametrize("good", [True, False])
def test_a_command_closes_the_process_group_it_ran_in(capsys, files, tmp_path, good):
    """Under torchrun/accelerate the CLI destroys the group before exiting (left to interpreter exit, a gloo
    process can die with SIGABRT); after an error it does so without waiting on the others."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        rc, _, _ = _run(capsys, ["inspect", str(files["global"] if good else tmp_path / "missing.safetensors")])
        assert rc == (0 if good else 2)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------ a newcomer's first hour
def test_inspect_names_the_simple_adapters_concat_attention(capsys):
    from ipadapter.generation.pipeline import embedded_model

    model, _ = embedded_model()
    rc, out, err = _run(capsys, ["inspect", str(model / "ip-adapter_simple.safetensors")])
    assert rc == 0, err
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert fields["attention"].startswith("concat (the paper's simple adapter: image tokens appended to the text")
    rc, out, _ = _run(capsys, ["inspect", str(model / "ip-adapter_global.safetensors")])
    assert "attention: decoupled (the paper's decoupled cross-attention" in out


def test_generate_shows_progress_when_long_and_is_quiet_when_short(capsys, files, tmp_path, monkeypatch):
    from ipadapter.cli import progress

    monkeypatch.setattr(progress, "LONG_S", 1e9)  # every generation counts as short (no timing in tests)
    rc, _, err = _run(capsys, _generate(files, tmp_path / "short.png"))
    assert rc == 0 and "denoising" not in err  # short, and stderr is no terminal
    monkeypatch.setattr(progress, "LONG_S", 0.0)  # every generation counts as long now
    rc, _, err = _run(capsys, _generate(files, tmp_path / "long.png"))
    assert rc == 0 and "denoising" in err and f"/{STEPS}" in err, err
    assert "error" not in err


def test_progress_bar_on_a_terminal():
    import io
    from types import SimpleNamespace

    from ipadapter.cli.progress import StepProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = StepProgress(file=screen, long_s=3600)
    pipe = SimpleNamespace(num_timesteps=3)
    for step in range(3):
        assert bar(pipe, step, 0, {"latents": 1}) == {"latents": 1}
    bar.close()
    assert "denoising" in screen.getvalue() and "3/3" in screen.getvalue()


def test_world_data_then_train_works_as_documented(capsys, tmp_path, monkeypatch):
    """README: `ipadapter world data --out wd -n 64`, then `ipadapter train --data wd/data.json ...`: world data
    has empty captions on purpose (image-only items), and train defaults to the embedded model."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, ["world", "data", "--out", "wd", "-n", "64"])
    assert rc == 0, err
    items = __import__("json").loads((tmp_path / "wd" / "data.json").read_text())
    assert sum(1 for item in items if not item["text"]) >= 7  # what used to stop the run (over 10% "unusable")
    rc, out, err = _run(capsys, ["train", "--data", "wd/data.json", "--output", "out", "--max-steps", "1",
                                 "--batch-size", "2", "--resolution", "16", "--no-cache", "--set", "tensorboard=false",
                                 "--set", "progress=false"])
    assert rc == 0, err
    assert (tmp_path / "out" / "ip-adapter.safetensors").is_file()
    assert "skipped" not in (tmp_path / "out" / "train.log").read_text()
