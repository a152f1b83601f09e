"""What users have on disk: single-file models, LoRAs, and the device/precision flags (tiny models, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import GEN, diffusers_ip_adapter, generator, random_image
from ipadapter.cli import main
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation.loading import (
    apply_loras,
    load_model,
    parse_lora,
    resolve_device,
    resolve_dtype,
    single_file_family,
)
from ipadapter.generation.pipeline import load
from ipadapter.testing import tiny_pipeline
from single_file_support import sd1_original

SCALE = 0.7


@pytest.fixture(scope="module")
def disk(tmp_path_factory, adapter_file):
    """A tiny SD 1.5-shaped model as a diffusers folder and as one original-layout file, an adapter, an image."""
    root = tmp_path_factory.mktemp("loading")
    pipe = tiny_pipeline("sd15", root / "model")
    save_file(sd1_original(pipe), str(root / "model.safetensors"))
    torch.save(sd1_original(pipe), str(root / "model.ckpt"))
    random_image(0).save(root / "ref.png")
    return {"root": root, "model": root / "model", "file": root / "model.safetensors", "ckpt": root / "model.ckpt",
            "image": root / "ref.png", "adapter": adapter_file("sd15", "global")}


def _run(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(rc: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _generate(disk, model, out, *extra):
    return ["generate", "--model", model, "--adapter", disk["adapter"], "--image", disk["image"], "--prompt",
            "a red circle", "--steps", "2", "--guidance", "5", "--seed", "3", "--width", "32", "--height", "32",
            "--scale", SCALE, "--device", "cpu", "-o", out, *extra]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------------------------------- single files
@pytest.mark.slow  # each generation here costs seconds; several per test
def test_a_single_file_gives_the_folders_image(capsys, disk, tmp_path):
    rc, _, err = _run(capsys, _generate(disk, disk["model"], tmp_path / "folder.png"))
    assert rc == 0, err
    for source in ("file", "ckpt"):
        out = tmp_path / f"{source}.png"
        rc, _, err = _run(capsys, _generate(disk, disk[source], out, "--model-config", disk["model"]))
        assert rc == 0, err
        assert np.array_equal(_pixels(out), _pixels(tmp_path / "folder.png")), source


def test_single_file_weights_are_the_folders(disk):
    folder = load_model(disk["model"])
    single = load_model(disk["file"], config=disk["model"])
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_train_reads_a_single_file_as_a_folder_written_once(disk, tmp_path):
    from ipadapter.generation.loading import single_file_folder

    folder = single_file_folder(disk["file"], disk["model"], tmp_path / "base-model")
    assert (folder / "model_index.json").is_file() and (folder / "image_encoder" / "config.json").is_file()
    written = (folder / "unet").stat().st_mtime_ns
    assert single_file_folder(disk["file"], disk["model"], tmp_path / "base-model") == folder
    assert (folder / "unet").stat().st_mtime_ns == written  # reused, not rewritten
    a, b = load_model(disk["model"]).unet.state_dict(), load_model(folder).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_family_comes_from_the_keys(disk):
    keys = load_file(str(disk["file"])).keys()
    assert single_file_family(keys) == "SD 1.x"
    unet = [k for k in keys if k.startswith("model.diffusion_model.")]
    assert single_file_family(unet + ["cond_stage_model.model.token_embedding.weight"]) == "SD 2.x"
    assert single_file_family(unet + ["conditioner.embedders.1.model.token_embedding.weight"]) == "SDXL"
    with pytest.raises(IPAdapterError, match="original single-file layout"):
        single_file_family(["first_stage_model.encoder.conv_in.weight"])


def test_single_file_errors_are_one_line(capsys, disk, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _run(capsys, _generate(disk, disk["file"], tmp_path / "a.png"))  # no --model-config, offline
    _one_line_error(rc, err, "--model-config", "SD 1.x", "stable-diffusion-v1-5")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(disk["file"].read_bytes()[:5000])
    rc, _, err = _run(capsys, _generate(disk, truncated, tmp_path / "b.png", "--model-config", disk["model"]))
    _one_line_error(rc, err, "cut.safetensors", "not a readable")
    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(other))
    rc, _, err = _run(capsys, _generate(disk, other, tmp_path / "c.png", "--model-config", disk["model"]))
    _one_line_error(rc, err, "other.safetensors", "not a Stable Diffusion checkpoint")
    rc, _, err = _run(capsys, _generate(disk, disk["model"], tmp_path / "d.png", "--model-config", disk["model"]))
    _one_line_error(rc, err, "--model-config", "only for a single-file")
    assert not any(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------------------------------- LoRAs
def _attention_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") and ".attn" in n
            and (not n.endswith(".0") or n.endswith("to_out.0"))}


def peft_lora(unet, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers/peft layout: unet.<module>.lora_A/lora_B.weight (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in _attention_linears(unet).items():
        out[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
        out[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
    return out


def kohya_lora(unet, rank: int = 4, alpha: float = 2.0, seed: int = 1) -> dict[str, torch.Tensor]:
    """kohya (sd-scripts) layout: lora_unet_<module with _>.lora_down/lora_up.weight and .alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in _attention_linears(unet).items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
        out[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def loras(disk):
    unet = tiny_pipeline("sd15").unet
    paths = {"peft": disk["root"] / "peft.safetensors", "kohya": disk["root"] / "kohya.safetensors",
             "sdxl": disk["root"] / "sdxl.safetensors"}
    save_file(peft_lora(unet), str(paths["peft"]))
    save_file(kohya_lora(unet), str(paths["kohya"]))
    save_file(peft_lora(tiny_pipeline("sdxl").unet), str(paths["sdxl"]))
    return paths


@pytest.fixture(scope="module")
def folder_pipe(disk):
    return load_model(disk["model"])


def _ours(pipe, disk, loras: list[tuple]) -> np.ndarray:
    names = apply_loras(pipe, loras)
    ip = load(pipe, disk["adapter"])
    try:
        return ip.generate(images=[Image.open(disk["image"]).convert("RGB")], scale=SCALE, seed=0, **GEN)
    finally:
        ip.detach()
        if names:
            pipe.delete_adapters(names)


def _theirs(pipe, disk, loras: list[tuple]) -> np.ndarray:
    names = [f"ref{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        if loras:
            pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
        with diffusers_ip_adapter(pipe, [disk["adapter"]], [SCALE]):
            return pipe(ip_adapter_image=Image.open(disk["image"]).convert("RGB"), **GEN,
                        generator=generator(0)).images
    finally:
        if names:
            pipe.delete_adapters(names)


@pytest.mark.slow  # each generation here costs seconds; several per test
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_a_lora_with_the_image_prompt_matches_diffusers(folder_pipe, disk, loras, kind):
    plain = _ours(folder_pipe, disk, [])
    ours = _ours(folder_pipe, disk, [(loras[kind], 0.8)])
    theirs = _theirs(folder_pipe, disk, [(loras[kind], 0.8)])
    assert np.abs(ours - plain).max() > 1e-2  # the LoRA acts
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.array_equal(_ours(folder_pipe, disk, []), plain)  # and is gone again


@pytest.mark.slow  # each generation here costs seconds; several per test
def test_two_loras_with_weights_match_diffusers(folder_pipe, disk, loras):
    chosen = [(loras["peft"], 0.5), (loras["kohya"], 1.0)]
    ours = _ours(folder_pipe, disk, chosen)
    theirs = _theirs(folder_pipe, disk, chosen)
    one = _ours(folder_pipe, disk, chosen[:1])
    assert np.abs(ours - one).max() > 1e-2
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.slow  # each generation here costs seconds; several per test
def test_lora_flags_and_bad_lora_files(capsys, disk, loras, tmp_path):
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("C:/x/a.safetensors:0.5") == ("C:/x/a.safetensors", 0.5)
    rc, _, err = _run(capsys, _generate(disk, disk["model"], tmp_path / "ok.png", "--lora", f"{loras['peft']}:0.8"))
    assert rc == 0, err
    rc, _, err = _run(capsys, _generate(disk, disk["model"], tmp_path / "no.png"))
    assert not np.array_equal(_pixels(tmp_path / "ok.png"), _pixels(tmp_path / "no.png"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(loras["peft"].read_bytes()[:3000])
    for bad, fragment in ((loras["sdxl"], "does not fit"), (truncated, "not a readable"),
                          (tmp_path / "missing.safetensors", "no such file")):
        rc, _, err = _run(capsys, _generate(disk, disk["model"], tmp_path / "bad.png", "--lora", bad))
        _one_line_error(rc, err, "--lora", bad.name, fragment)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"text.weight": torch.zeros(3)}, str(unrelated))
    rc, _, err = _run(capsys, _generate(disk, disk["model"], tmp_path / "bad.png", "--lora", unrelated))
    _one_line_error(rc, err, "--lora", "unrelated.safetensors")
    assert not (tmp_path / "bad.png").exists()


# -------------------------------------------------------------------------------------- devices, dtypes
def test_device_and_dtype_are_checked_before_any_model_loads(capsys, disk, tmp_path):
    missing = tmp_path / "no-such-model"  # the device error must come first: no model is read
    argv = _generate(disk, missing, tmp_path / "a.png")
    argv[argv.index("--device") + 1] = "gpu"
    rc, _, err = _run(capsys, argv)
    _one_line_error(rc, err, "--device 'gpu'", "cpu, cuda")
    if not torch.cuda.is_available():
        argv[argv.index("--device") + 1] = "cuda"
        rc, _, err = _run(capsys, argv)
        _one_line_error(rc, err, "--device cuda")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype(None, "mps") == torch.float16 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(IPAdapterError, match="fp16, bf16, fp32"):
        resolve_dtype("fp8", "cpu")


# ------------------------------------------------------------------------------------------- embedded members
def test_embedded_members_are_named_and_a_real_folder_of_that_name_wins(tmp_path, monkeypatch, capsys):
    """``--model world`` / ``world-sd3`` (and no --model) name the shipped members and bring their default adapter;
    a folder of the same name in the working directory is that folder; an unknown member is one clear line."""
    from ipadapter.generation.pipeline import (
        EMBEDDED_MEMBERS,
        EMBEDDED_MODEL,
        embedded_model,
        embedded_name,
        resolve_model,
    )

    assert embedded_name(None) == "world" and resolve_model(None) == embedded_model()
    assert EMBEDDED_MEMBERS["world"] == EMBEDDED_MODEL
    for name, folder in EMBEDDED_MEMBERS.items():
        if not (folder / "model_index.json").is_file():
            continue
        assert resolve_model(name) == (folder, folder / "ip-adapter.safetensors")
        assert resolve_model(name, "mine.safetensors") == (folder, "mine.safetensors")
        assert embedded_name(str(folder)) == name  # the folder by its path is the member too (its call settings)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "world-sd3").mkdir()
    assert embedded_name("world-sd3") is None and resolve_model("world-sd3", "a.safetensors") == ("world-sd3",
                                                                                                  "a.safetensors")
    with pytest.raises(IPAdapterError, match="not an embedded model; they are world, world-sd3"):
        embedded_model("world-flux")


def test_a_rebuilt_or_copied_member_keeps_its_call_settings(tmp_path):
    """`world build --out DIR` writes the transformer member to DIR_sd3: that folder (or a copy of the shipped
    one) is called with the T5 zero rows its world_build.json records, as the shipped member is; other models
    get nothing added. (The base without them draws from out of its training distribution.)"""
    import json

    from ipadapter.generation.pipeline import EMBEDDED_MEMBERS, world_call

    assert world_call("world-sd3") == {"max_sequence_length": 16} and world_call("world") == {}
    rebuilt = tmp_path / "DIR_sd3"
    rebuilt.mkdir()
    (rebuilt / "world_build.json").write_text(json.dumps({"config": {"t5_zero_tokens": 12}}))
    assert world_call(str(rebuilt)) == {"max_sequence_length": 12}
    shipped = EMBEDDED_MEMBERS["world-sd3"] / "world_build.json"
    if shipped.is_file():
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / "world_build.json").write_text(shipped.read_text())
        assert world_call(str(copy)) == {"max_sequence_length": 16}
    (tmp_path / "other").mkdir()
    assert world_call(str(tmp_path / "other")) == {} and world_call(str(tmp_path / "missing")) == {}
    (tmp_path / "other" / "world_build.json").write_text("{broken")
    assert world_call(str(tmp_path / "other")) == {}
