"""Flux adapter files: XLabs v1/v2 (.safetensors, .bin, diffusers' names) and InstantX FLUX, read, inspected,
converted and written back; hyperparameters from the tensors; one-line errors for damaged files."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ipadapter.cli.generate import cmd_convert, cmd_inspect
from ipadapter.core.checkpoint import read_checkpoint, write_checkpoint
from ipadapter.core.errors import IPAdapterError

EMBED, TOKEN_WIDTH, WIDTH, DOUBLE = 24, 64, 32, 3


def xlabs_tensors(tokens: int = 4, blocks: int = DOUBLE, seed: int = 0) -> dict[str, torch.Tensor]:
    """An XLabs Flux file's tensors under XLabs' own names (random values, small widths)."""
    g = torch.Generator().manual_seed(seed)
    t = {"ip_adapter_proj_model.proj.weight": torch.randn(tokens * TOKEN_WIDTH, EMBED, generator=g),
         "ip_adapter_proj_model.proj.bias": torch.randn(tokens * TOKEN_WIDTH, generator=g),
         "ip_adapter_proj_model.norm.weight": torch.randn(TOKEN_WIDTH, generator=g),
         "ip_adapter_proj_model.norm.bias": torch.randn(TOKEN_WIDTH, generator=g)}
    for i in range(blocks):
        for which in "kv":
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{which}_proj"
            t[f"{name}.weight"] = torch.randn(WIDTH, TOKEN_WIDTH, generator=g)
            t[f"{name}.bias"] = torch.randn(WIDTH, generator=g)
    return t


def instantx_tensors(tokens: int = 8, layers: int = 5, seed: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """InstantX FLUX's ``ip-adapter.bin`` structure: nested image_proj / ip_adapter state dicts."""
    g = torch.Generator().manual_seed(seed)
    proj = {"proj.0.weight": torch.randn(2 * EMBED, EMBED, generator=g),
            "proj.0.bias": torch.randn(2 * EMBED, generator=g),
            "proj.2.weight": torch.randn(tokens * TOKEN_WIDTH, 2 * EMBED, generator=g),
            "proj.2.bias": torch.randn(tokens * TOKEN_WIDTH, generator=g),
            "norm.weight": torch.randn(TOKEN_WIDTH, generator=g), "norm.bias": torch.randn(TOKEN_WIDTH, generator=g)}
    attn = {f"{i}.to_{w}_ip.weight": torch.randn(WIDTH, TOKEN_WIDTH, generator=g) for i in range(layers) for w in "kv"}
    return {"image_proj": proj, "ip_adapter": attn}


def _official_from_xlabs(t: dict) -> dict:
    out = {}
    for k, v in t.items():
        if k.startswith("ip_adapter_proj_model."):
            out["image_proj." + k[len("ip_adapter_proj_model."):]] = v
        else:
            _, i, _, name, param = k.split(".")
            out[f"ip_adapter.{i}.to_{name.split('_')[-2]}_ip.{param}"] = v
    return out


@pytest.mark.parametrize("tokens", [4, 16])
def test_xlabs_safetensors_v1_v2(tmp_path, tokens):
    path = tmp_path / "ip_adapter.safetensors"
    tensors = xlabs_tensors(tokens)
    save_file(tensors, str(path))
    cfg, official = read_checkpoint(path)
    assert (cfg.kind, cfg.flavour, cfg.num_tokens, cfg.embed_dim) == ("global", "xlabs", tokens, EMBED)
    assert cfg.cross_attention_dim == TOKEN_WIDTH and cfg.layer_widths == {i: WIDTH for i in range(DOUBLE)}
    assert cfg.kv_bias and not cfg.kv_norm
    want = _official_from_xlabs(tensors)
    assert sorted(official) == sorted(want)
    assert all(torch.equal(official[k], want[k]) for k in want)


def test_xlabs_bin_and_diffusers_layouts_read_the_same(tmp_path):
    tensors = xlabs_tensors(16)
    official = _official_from_xlabs(tensors)
    torch.save(tensors, tmp_path / "xlabs.bin")  # XLabs names in a torch file (diffusers would not rename these)
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in official.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in official.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "diffusers.bin")  # what diffusers' load_ip_adapter reads from a .bin
    saved = {f"transformer_blocks.{k.split('.')[1]}.attn.processor.{k.split('.')[2]}.0.{k.split('.')[3]}": v
             for k, v in official.items() if k.startswith("ip_adapter.")}
    saved["encoder_hid_proj.image_projection_layers.0.image_embeds.weight"] = official["image_proj.proj.weight"]
    saved["encoder_hid_proj.image_projection_layers.0.image_embeds.bias"] = official["image_proj.proj.bias"]
    saved["encoder_hid_proj.image_projection_layers.0.norm.weight"] = official["image_proj.norm.weight"]
    saved["encoder_hid_proj.image_projection_layers.0.norm.bias"] = official["image_proj.norm.bias"]
    saved["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(2, 2)  # the transformer's own weights beside them
    save_file(saved, str(tmp_path / "transformer.safetensors"))
    for name in ("xlabs.bin", "diffusers.bin", "transformer.safetensors"):
        cfg, got = read_checkpoint(tmp_path / name)
        assert (cfg.flavour, cfg.num_tokens, cfg.num_layers) == ("xlabs", 16, DOUBLE), name
        assert sorted(got) == sorted(official), name
        assert all(torch.equal(got[k], official[k]) for k in official), name


def test_xlabs_round_trip_writes_xlabs_names(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(xlabs_tensors(4), str(src))
    cfg, official = read_checkpoint(src)
    out = write_checkpoint(tmp_path / "out.safetensors", cfg, official)
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(xlabs_tensors(4))  # XLabs' own names: what x-flux, ComfyUI and diffusers read
    cfg2, official2 = read_checkpoint(out)
    assert cfg2 == cfg
    assert all(torch.equal(official2[k], official[k]) for k in official)
    flat = write_checkpoint(tmp_path / "flat.safetensors", cfg, official, layout="official")
    cfg3, official3 = read_checkpoint(flat)
    assert cfg3 == cfg and sorted(official3) == sorted(official)


def test_instantx_bin_round_trip(tmp_path):
    nested = instantx_tensors()
    torch.save(nested, tmp_path / "ip-adapter.bin")
    cfg, official = read_checkpoint(tmp_path / "ip-adapter.bin")
    assert (cfg.kind, cfg.flavour, cfg.num_tokens, cfg.embed_dim, cfg.id_hidden_dim) == ("mlp", "instantx", 8, EMBED,
                                                                                         2 * EMBED)
    assert cfg.layer_widths == {i: WIDTH for i in range(5)} and cfg.kv_norm == "rms" and not cfg.kv_bias
    out = write_checkpoint(tmp_path / "out.safetensors", cfg, official)
    cfg2, official2 = read_checkpoint(out)
    assert cfg2 == cfg
    for part, sub in nested.items():
        for k, v in sub.items():
            assert torch.equal(official2[f"{part}.{k}"], v)
    with pytest.raises(IPAdapterError, match="XLabs layout holds XLabs Flux adapters only"):
        write_checkpoint(tmp_path / "bad.safetensors", cfg, official, layout="xlabs")


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"), "missing"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("double_blocks.1.")], "not numbered 0..n-1"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("ip_adapter_proj_model.proj")], "without its projection"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("double_blocks.")], "without its double-block"),
    (lambda t: t.update({"double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(WIDTH, 8)}),
     "disagree on the token width"),
    (lambda t: t.update({"ip_adapter_proj_model.norm.weight": torch.zeros(8)}), "has shape"),
])
def test_damaged_xlabs_files_one_line_errors(tmp_path, damage, message):
    tensors = xlabs_tensors(4)
    damage(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(IPAdapterError, match=message) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_damaged_instantx_file(tmp_path):
    nested = instantx_tensors()
    del nested["ip_adapter"]["3.to_v_ip.weight"]
    torch.save(nested, tmp_path / "bad.bin")
    with pytest.raises(IPAdapterError, match="incomplete or mixed"):
        read_checkpoint(tmp_path / "bad.bin")


def test_inspect_and_convert(tmp_path, capsys):
    src = tmp_path / "ip_adapter.safetensors"
    save_file(xlabs_tensors(16), str(src))
    assert cmd_inspect(argparse.Namespace(file=str(src))) == 0
    text = capsys.readouterr().out
    assert "XLabs Flux" in text and "16 per image" in text and "3 double blocks" in text
    torch.save(instantx_tensors(), tmp_path / "ip-adapter.bin")
    out = tmp_path / "instantx.safetensors"
    assert cmd_convert(argparse.Namespace(input=str(tmp_path / "ip-adapter.bin"), output=str(out))) == 0
    assert cmd_inspect(argparse.Namespace(file=str(out))) == 0
    text = capsys.readouterr().out
    assert "InstantX FLUX" in text and "8 per image" in text and "image_embeds (width 24)" in text
