"""Checkpoint formats: every readable layout, kind and hyperparameter inference, round trips, bad files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ALL_KINDS, PATCH_AND_GLOBAL, cross_layers, diffusers_ip_adapter, make_adapter
from ipadapter.bases import check
from ipadapter.core.adapter import Adapter
from ipadapter.core.checkpoint import parameter_count, read_checkpoint, write_checkpoint
from ipadapter.core.config import AdapterConfig
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation.pipeline import load

# Fields every layout must give back from the tensors alone (no metadata): full's token count depends on the
# encoder, not on any tensor, and PlusV2's shortcut is a usage choice, so both need our metadata.
INFERRED = ("kind", "cross_attention_dim", "embed_dim", "layer_widths", "resampler_dim", "resampler_depth",
            "resampler_heads", "resampler_dim_head", "resampler_ff_mult", "id_embed_dim", "id_hidden_dim",
            "lora_layers")


@pytest.fixture(scope="module")
def adapters(sd15_pipe) -> dict[str, Adapter]:
    """One random adapter of every kind for the SD 1.5-shaped UNet."""
    return {kind: make_adapter(sd15_pipe.unet, kind, encoder=sd15_pipe.image_encoder) for kind in ALL_KINDS}


def _official(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def _split(official):
    proj = {k[len("image_proj."):]: v for k, v in official.items() if k.startswith("image_proj.")}
    attn = {k[len("ip_adapter."):]: v for k, v in official.items() if k.startswith("ip_adapter.")}
    return proj, attn


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _assert_config_fits(cfg: AdapterConfig, want: AdapterConfig, fields=INFERRED) -> None:
    for name in fields:
        assert getattr(cfg, name) == getattr(want, name), name


# ------------------------------------------------------------------------------------------------ layouts
def _write_official_bin(path, official):
    proj, attn = _split(official)
    torch.save({"image_proj": proj, "ip_adapter": attn}, path)


def _write_flat_safetensors(path, official):
    save_file(official, str(path))  # no metadata: like the public .safetensors files


def _write_training(path, official, unet=None, wrap=""):
    proj, attn = _split(official)
    tensors = {f"{wrap}image_proj_model.{k}": v for k, v in proj.items()}
    tensors.update({f"{wrap}adapter_modules.{k}": v for k, v in attn.items()})
    if unet is not None:  # training runs that save the whole model keep the UNet beside the adapter
        tensors.update({f"{wrap}unet.{k}": v.clone() for k, v in unet.state_dict().items()})
    if path.suffix == ".bin":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))


LAYOUTS = {
    "official.bin": _write_official_bin,
    "flat.safetensors": _write_flat_safetensors,
    "training.safetensors": _write_training,
    "training.bin": _write_training,
    "training-ddp.bin": lambda path, official: _write_training(path, official, wrap="module."),
}


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_as_the_official_tensors(tmp_path, adapters, kind, layout):
    adapter = adapters[kind]
    official = _official(adapter)
    path = tmp_path / f"adapter.{layout.split('.')[-1]}"
    LAYOUTS[layout](path, official)
    cfg, tensors = read_checkpoint(path)
    _assert_same_tensors(tensors, official)
    _assert_config_fits(cfg, adapter.config)
    if kind != "full":
        assert cfg.num_tokens == adapter.config.num_tokens


@pytest.mark.parametrize("kind", ["global", "plus"])
def test_training_checkpoint_with_whole_unet_beside(tmp_path, sd15_pipe, adapters, kind):
    official = _official(adapters[kind])
    path = tmp_path / "model.safetensors"
    _write_training(path, official, unet=sd15_pipe.unet)
    cfg, tensors = read_checkpoint(path)
    _assert_same_tensors(tensors, official)  # the UNet's own weights are left out
    _assert_config_fits(cfg, adapters[kind].config)


@pytest.mark.parametrize("kind", PATCH_AND_GLOBAL)
def test_diffusers_converted_layout(tmp_path, sd15_pipe, adapter_file, kind):
    """A UNet state dict saved after diffusers' load_ip_adapter reads back as the file it was loaded from."""
    source = adapter_file("sd15", kind)
    want_cfg, want = read_checkpoint(source)
    with diffusers_ip_adapter(sd15_pipe, [source], [1.0]):
        dumped = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()
                  if k.startswith("encoder_hid_proj.") or ".processor." in k}
    assert any(k.startswith("encoder_hid_proj.image_projection_layers.0.") for k in dumped)
    path = tmp_path / "diffusers_unet.safetensors"
    save_file(dumped, str(path))
    cfg, tensors = read_checkpoint(path)
    _assert_same_tensors(tensors, want)
    _assert_config_fits(cfg, want_cfg)


def test_diffusers_converted_faceid_projection(tmp_path, sd15_pipe):
    """FaceID's MLP in diffusers' naming (ff.net.* / norm) maps back to proj.0 / proj.2 / norm."""
    adapter = make_adapter(sd15_pipe.unet, "faceid", lora=False, id_hidden=1024)
    official = _official(adapter)
    proj, attn = _split(official)
    source = tmp_path / "faceid.bin"
    torch.save({"image_proj": proj, "ip_adapter": attn}, source)
    with diffusers_ip_adapter(sd15_pipe, [source], [1.0]):
        dumped = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()
                  if k.startswith("encoder_hid_proj.") or ".processor." in k}
    path = tmp_path / "diffusers_unet.safetensors"
    save_file(dumped, str(path))
    cfg, tensors = read_checkpoint(path)
    assert cfg.kind == "faceid"
    _assert_same_tensors(tensors, official)


# -------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize(
    ("kind", "overrides", "expect"),
    [
        ("global", {"num_tokens": 8}, {"num_tokens": 8}),
        ("plus", {"num_tokens": 8, "resampler_depth": 2}, {"num_tokens": 8, "resampler_depth": 2}),
        ("plus", {"resampler_dim": 128, "resampler_heads": 2, "resampler_depth": 3},
         {"resampler_dim": 128, "resampler_heads": 2, "resampler_dim_head": 64, "resampler_depth": 3}),
        ("plus", {"resampler_ff_mult": 2}, {"resampler_ff_mult": 2}),
        ("faceid-portrait", {}, {"num_tokens": 16, "lora_layers": {}}),
        ("faceid-plus", {"resampler_depth": 3}, {"resampler_depth": 3, "num_tokens": 4}),
    ],
)
def test_hyperparameters_inferred_from_tensors(tmp_path, sd15_pipe, kind, overrides, expect):
    adapter = make_adapter(sd15_pipe.unet, kind, encoder=sd15_pipe.image_encoder, **overrides)
    path = tmp_path / "a.bin"
    _write_official_bin(path, _official(adapter))  # no metadata: shapes only
    cfg, _ = read_checkpoint(path)
    assert cfg.kind == kind
    for name, value in expect.items():
        assert getattr(cfg, name) == value, name
    assert cfg.layer_widths == cross_layers(sd15_pipe.unet)
    Adapter.from_file(path)  # and the module built from the inferred config takes every tensor


def test_sdxl_shape_inference(tmp_path, sdxl_pipe, adapter_file):
    cfg, tensors = read_checkpoint(adapter_file("sdxl", "plus"))
    assert cfg.num_layers == 70
    assert sorted(cfg.layer_widths) == list(range(1, 140, 2))  # odd positions: attn2 of every block
    assert cfg.layer_widths == cross_layers(sdxl_pipe.unet)
    assert cfg.cross_attention_dim == sdxl_pipe.unet.config.cross_attention_dim


def test_faceid_lora_layers_on_self_and_cross_attention(adapters):
    cfg = adapters["faceid"].config
    keys = set(adapters["faceid"].state_dict())
    assert "ip_adapter.0.to_q_lora.down.weight" in keys  # attn1 (self-attention)
    assert "ip_adapter.1.to_out_lora.up.weight" in keys  # attn2 (cross-attention) beside to_k_ip
    assert "ip_adapter.1.to_k_ip.weight" in keys
    assert "ip_adapter.0.to_k_ip.weight" not in keys
    assert set(cfg.lora_layers) == set(range(32)) and set(cfg.lora_layers.values()) == {4}


def test_non_64_dim_head_survives_through_our_metadata(tmp_path, sd15_pipe):
    adapter = make_adapter(sd15_pipe.unet, "plus", encoder=sd15_pipe.image_encoder, resampler_dim=64,
                           resampler_heads=4, resampler_dim_head=16)
    adapter.save(tmp_path / "a.safetensors")
    cfg, _ = read_checkpoint(tmp_path / "a.safetensors")
    assert (cfg.resampler_heads, cfg.resampler_dim_head) == (4, 16)


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_write_read_round_trip(tmp_path, adapters, kind):
    adapter = adapters[kind]
    path = tmp_path / "out.safetensors"
    adapter.save(path)
    cfg, tensors = read_checkpoint(path)
    assert cfg.to_dict() == adapter.config.to_dict()
    _assert_same_tensors(tensors, _official(adapter))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == kind
    assert meta["num_tokens"] == str(adapter.config.num_tokens)
    assert "base_family" in meta
    assert not any(k.startswith(("image_proj_model.", "adapter_modules.")) for k in tensors)
    again = Adapter.from_file(path)
    _assert_same_tensors(_official(again), _official(adapter))


def test_plusv2_shortcut_round_trip(tmp_path, sd15_pipe):
    adapter = make_adapter(sd15_pipe.unet, "faceid-plus", encoder=sd15_pipe.image_encoder, shortcut=True,
                           s_scale=0.6)
    assert adapter.image_proj.shortcut and adapter.image_proj.s_scale == 0.6
    adapter.save(tmp_path / "v2.safetensors")
    again = Adapter.from_file(tmp_path / "v2.safetensors")
    assert again.config.shortcut and again.config.s_scale == 0.6
    assert again.image_proj.shortcut and again.image_proj.s_scale == 0.6


def test_sdxl_round_trip_and_base_family(tmp_path, adapter_file):
    cfg, tensors = read_checkpoint(adapter_file("sdxl", "global"))
    path = tmp_path / "x.safetensors"
    write_checkpoint(path, cfg, tensors)
    cfg2, tensors2 = read_checkpoint(path)
    assert cfg2 == cfg
    _assert_same_tensors(tensors2, tensors)
    assert parameter_count(tensors) == sum(t.numel() for t in tensors.values())


def test_write_is_atomic_and_safetensors_only(tmp_path, adapters):
    adapter = adapters["global"]
    with pytest.raises(IPAdapterError, match=r"\.safetensors"):
        write_checkpoint(tmp_path / "a.bin", adapter.config, adapter.state_dict())
    assert not (tmp_path / "a.bin").exists()
    write_checkpoint(tmp_path / "sub" / "a.safetensors", adapter.config, adapter.state_dict())
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.safetensors"]  # no temporary left behind


def test_base_family_guessed_for_real_widths():
    from ipadapter.core.config import guess_base_family

    assert guess_base_family(768, 16) == "sd15"
    assert guess_base_family(1024, 16) == "sd2"
    assert guess_base_family(2048, 70) == "sdxl"


# --------------------------------------------------------------------------------------------- bad files
def _bad_files(tmp_path, adapter):
    official = _official(adapter)
    good = tmp_path / "good.safetensors"
    adapter.save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\xff" * 64 + data[64:])
    _write_official_bin(tmp_path / "good.bin", official)
    data = (tmp_path / "good.bin").read_bytes()
    (tmp_path / "truncated.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.bin").write_bytes(np.random.RandomState(0).bytes(4096))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    proj, attn = _split(official)
    torch.save({"image_proj": proj, "ip_adapter": attn, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "pickled.bin")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "unrelated.safetensors"))
    no_v = {k: v for k, v in official.items() if k != "ip_adapter.5.to_v_ip.weight"}
    save_file(no_v, str(tmp_path / "no_v.safetensors"))
    no_norm = {k: v for k, v in official.items() if k != "image_proj.norm.bias"}
    save_file(no_norm, str(tmp_path / "no_norm.safetensors"))
    save_file({k: v for k, v in official.items() if k.startswith("ip_adapter.")}, str(tmp_path / "no_proj.safetensors"))
    widths = dict(official)
    widths["ip_adapter.3.to_k_ip.weight"] = torch.zeros(32, 7)
    save_file(widths, str(tmp_path / "mixed.safetensors"))
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    rows = dict(official)
    rows["ip_adapter.1.to_v_ip.weight"] = torch.zeros(48, official["ip_adapter.1.to_v_ip.weight"].shape[1])
    save_file(rows, str(tmp_path / "kv_rows.safetensors"))
    norm = dict(official)
    norm["image_proj.norm.weight"] = torch.zeros(31)
    save_file(norm, str(tmp_path / "norm_shape.safetensors"))
    lonely = dict(official)
    for name in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
        lonely[f"ip_adapter.90.{name}.down.weight"] = torch.zeros(4, 32)
        lonely[f"ip_adapter.90.{name}.up.weight"] = torch.zeros(32, 4)
    save_file(lonely, str(tmp_path / "lonely_lora.safetensors"))


BAD = {
    "missing.safetensors": "no such checkpoint file",
    "empty.safetensors": "empty file",
    "truncated.safetensors": "truncated or corrupt",
    "corrupt.safetensors": "truncated or corrupt",
    "truncated.bin": "truncated or corrupt",
    "garbage.bin": "corrupt",
    "pickled.bin": "non-tensor Python objects (argparse.Namespace)",
    "unrelated.safetensors": "no IP-Adapter weights found",
    "no_v.safetensors": "layer 5 has no 'to_v_ip' weight",
    "no_norm.safetensors": "incomplete or mixed",
    "no_proj.safetensors": "no image projection",
    "mixed.safetensors": "disagree on the token width",
    "list.bin": "expected a dict of tensors",
    "kv_rows.safetensors": "'ip_adapter.1.to_",
    "lonely_lora.safetensors": "LoRA on attention layer 90, next to no layer with image weights",
    "norm_shape.safetensors": "'image_proj.norm.weight' has shape [31], a global adapter with these widths needs [32]",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_checkpoint_one_line_error(tmp_path, adapters, name):
    _bad_files(tmp_path, adapters["global"])
    with pytest.raises(IPAdapterError) as info:
        read_checkpoint(tmp_path / name)
    message = str(info.value)
    assert BAD[name] in message
    assert message.startswith(str(tmp_path / name))  # names the file
    assert "\n" not in message and "Traceback" not in message and "\x1b" not in message


def test_folder_with_one_adapter_is_read(tmp_path, adapters):
    adapters["global"].save(tmp_path / "ip.safetensors")
    cfg, _ = read_checkpoint(tmp_path)
    assert cfg.kind == "global"
    adapters["plus"].save(tmp_path / "other.safetensors")
    with pytest.raises(IPAdapterError, match="is a folder"):
        read_checkpoint(tmp_path)


def test_damaged_metadata_is_ignored(tmp_path, adapters):
    official = _official(adapters["plus"])
    save_file(official, str(tmp_path / "m.safetensors"), metadata={"ipadapter_config": "{not json"})
    cfg, _ = read_checkpoint(tmp_path / "m.safetensors")
    assert cfg.kind == "plus" and cfg.resampler_depth == adapters["plus"].config.resampler_depth


# ------------------------------------------------------------------------------------- fit to the UNet
def test_adapter_for_another_family_is_refused_before_touching_the_unet(sd15_pipe, adapter_file):
    unet = sd15_pipe.unet
    before = dict(unet.attn_processors)
    path = adapter_file("sdxl", "global")
    with pytest.raises(IPAdapterError) as info:
        load(sd15_pipe, path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "70 cross-attention layers, width 64" in message
    assert "this UNet" in message and "16 cross-attention layers, width 32" in message
    assert getattr(unet, "_ipadapter", None) is None
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


def test_family_names_in_mismatch_message():
    """Real widths: an SDXL adapter on an SD 1.5 UNet says so in words (meta tensors: no memory, no time)."""
    from ipadapter.testing import tiny_unet

    with torch.device("meta"):
        sd15 = tiny_unet("sd15", cross_dim=768)
        sdxl = tiny_unet("sdxl", cross_dim=2048)
        cfg = AdapterConfig(kind="global", cross_attention_dim=2048, embed_dim=1280, layer_widths=cross_layers(sdxl),
                            base_family="sdxl")
        adapter = Adapter(cfg)
    with pytest.raises(IPAdapterError) as info:
        check(adapter.config, sd15, "ip-adapter_sdxl.safetensors")
    message = str(info.value)
    assert "(SDXL): 70 cross-attention layers, width 2048" in message
    assert "this UNet: SD 1.5, 16 cross-attention layers, width 768" in message
    check(adapter.config, sdxl)  # fits its own family


def test_layer_width_mismatch_is_named(sd15_pipe):
    from ipadapter.testing import tiny_unet

    other = tiny_unet("sd15", widths=(64, 64, 64, 64))  # same layer count and token width, other layer widths
    adapter = make_adapter(sd15_pipe.unet, "global", encoder=sd15_pipe.image_encoder)
    with pytest.raises(IPAdapterError, match=r"layer 1 should be cross-attention of width 32, this UNet has 64"):
        check(adapter.config, other, "a.safetensors")


def test_metadata_json_is_our_config(tmp_path, adapters):
    adapters["faceid"].save(tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        saved = json.loads(f.metadata()["ipadapter_config"])
    assert AdapterConfig.from_dict(saved) == adapters["faceid"].config


@pytest.mark.parametrize("name, payload", [("notes.txt", b"some notes\nnot a checkpoint\n"),
                                           ("notes.bin", b"some notes\nnot a checkpoint\n"), ("hello.pt", b"hello")])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_what_fits(tmp_path, name, payload):
    """torch's weights-only unpickler raises IndexError ("pop from empty list") on text, KeyError on a few bytes."""
    from ipadapter.core.checkpoint import load_tensors

    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(IPAdapterError, match=rf"{name}: not a checkpoint .*an adapter is a \.safetensors file"):
        load_tensors(path)
