"""The SD3 family (InstantX SD3.5 IP-Adapter): its file format, the time-conditioned resampler, the joint-block
processor, generation parity with diffusers' own adapter, and attach/detach. diffusers is the oracle (tests only)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ipadapter.core.adapter import Adapter
from ipadapter.core.checkpoint import read_checkpoint, write_checkpoint
from ipadapter.core.errors import IPAdapterError
from ipadapter.testing import random_time_plus_adapter, tiny_sd3_pipeline

INFERRED = ("kind", "num_tokens", "cross_attention_dim", "embed_dim", "layer_widths", "resampler_dim",
            "resampler_depth", "resampler_heads", "resampler_dim_head", "resampler_ff_mult", "time_embed_dim",
            "head_dim", "base_family")


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def sd3_adapter(sd3_pipe) -> Adapter:
    return random_time_plus_adapter(sd3_pipe.transformer, sd3_pipe.image_encoder)


@pytest.fixture(scope="module")
def instantx_file(tmp_path_factory, sd3_adapter):
    """The adapter as InstantX ships it: flat "image_proj.*" / "ip_adapter.*" .safetensors, no metadata."""
    path = tmp_path_factory.mktemp("instantx") / "ip-adapter.safetensors"
    save_file({k: v.contiguous() for k, v in sd3_adapter.state_dict().items()}, str(path))
    return path


def _nested(adapter: Adapter) -> dict:
    sd = adapter.state_dict()
    return {part: {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")}


# ------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_instantx_layouts_read_with_every_hyperparameter(tmp_path, sd3_adapter, instantx_file, layout):
    path = instantx_file
    if layout == "bin":
        path = tmp_path / "ip-adapter.bin"
        torch.save(_nested(sd3_adapter), path)
    cfg, tensors = read_checkpoint(path)
    for name in INFERRED:
        assert getattr(cfg, name) == getattr(sd3_adapter.config, name), name
    want = sd3_adapter.state_dict()
    assert sorted(tensors) == sorted(want)
    assert all(torch.equal(tensors[k], want[k]) for k in want)


def test_round_trip_through_our_writer(tmp_path, instantx_file, sd3_adapter):
    cfg, tensors = read_checkpoint(instantx_file)
    out = write_checkpoint(tmp_path / "again.safetensors", cfg, tensors)
    cfg2, tensors2 = read_checkpoint(out)
    assert cfg2.to_dict() == cfg.to_dict()
    assert all(torch.equal(tensors2[k], tensors[k]) for k in tensors)
    loaded = Adapter.from_file(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd3_adapter.state_dict().items())


def test_resampler_matches_diffusers(sd3_pipe, sd3_adapter):
    """Our time-conditioned resampler against diffusers' IPAdapterTimeImageProjection loaded from the same file."""
    proj = {k[len("image_proj."):]: v for k, v in sd3_adapter.state_dict().items() if k.startswith("image_proj.")}
    theirs = sd3_pipe.transformer._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False)
    torch.manual_seed(0)
    features = torch.randn(3, 16, sd3_adapter.config.embed_dim)
    timestep = torch.tensor([1000.0, 517.3, 3.0])
    with torch.no_grad():
        tokens, temb = sd3_adapter.image_proj(features, timestep)
        want_tokens, want_temb = theirs(features, timestep)
    assert tokens.shape == (3, sd3_adapter.config.num_tokens, sd3_adapter.config.cross_attention_dim)
    torch.testing.assert_close(temb, want_temb, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens, want_tokens, rtol=0, atol=1e-5)
    assert not torch.allclose(tokens[0], sd3_adapter.image_proj(features[:1], timestep[1:2])[0][0])  # time matters


def _damaged(sd3_adapter, change):
    tensors = {k: v.clone() for k, v in sd3_adapter.state_dict().items()}
    change(tensors)
    return tensors


@pytest.mark.parametrize("name,change,expect", [
    ("no-block-weights", lambda t: [t.pop(k) for k in list(t) if k.startswith("ip_adapter.")], "no per-block weights"),
    ("missing-norm", lambda t: t.pop("ip_adapter.1.norm_q.weight"), "no 'norm_q.weight'"),
    ("missing-value", lambda t: t.pop("ip_adapter.2.to_v_ip.weight"), "incomplete or mixed"),
    ("stray-key", lambda t: t.update({"ip_adapter.0.to_q_ip.weight": torch.zeros(2, 2)}), "unexpected attention key"),
    ("token-width", lambda t: t.update({"ip_adapter.0.to_k_ip.weight": torch.zeros(32, 16)}), "tokens of width"),
    ("resampler-shape", lambda t: t.update({"image_proj.layers.0.2.1.weight": torch.zeros(8, 128)}), "has shape"),
])
def test_damaged_files_one_line_error(tmp_path, sd3_adapter, name, change, expect):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in _damaged(sd3_adapter, change).items()}, str(path))
    with pytest.raises(IPAdapterError) as e:
        read_checkpoint(path)
    assert expect in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ encoder
def test_siglip_encoder_features_and_zero_negative(tmp_path, sd3_pipe, sd3_adapter):
    from PIL import Image

    from ipadapter.core.encoders import ImageEncoder

    sd3_pipe.image_encoder.save_pretrained(tmp_path / "enc")
    sd3_pipe.feature_extractor.save_pretrained(tmp_path / "enc")
    encoder = ImageEncoder.from_pretrained(tmp_path / "enc")
    assert type(encoder.model).__name__ == "SiglipVisionModel"
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    cond, uncond = encoder.encode(sd3_adapter.config, [image])
    pixels = sd3_pipe.feature_extractor(image, return_tensors="pt").pixel_values
    want = sd3_pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(cond.penultimate, want)
    assert torch.equal(uncond.penultimate, torch.zeros_like(want))
    sd3_adapter.check_encoder(encoder.model)


def test_wrong_encoder_is_named(sd3_adapter):
    from ipadapter.testing import tiny_image_encoder, tiny_siglip_encoder

    with pytest.raises(IPAdapterError, match="reads a SigLIP encoder"):
        sd3_adapter.check_encoder(tiny_image_encoder())
    with pytest.raises(IPAdapterError, match="hidden width"):
        sd3_adapter.check_encoder(tiny_siglip_encoder(hidden=32)[0])
