"""The SD3 family (InstantX SD3.5 IP-Adapter): its file format, the time-conditioned resampler, the joint-block
processor, generation parity with diffusers' own adapter, and attach/detach. diffusers is the oracle (tests only)."""

from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------------------------------------- generation
STEPS = dict(num_inference_steps=3, width=32, height=32, max_sequence_length=16, output_type="np")


def _image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(40, 48, 3) * 255).astype(np.uint8))


def _generators(seed: int, n: int = 1):
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


def _uint8(images):
    import numpy as np

    return (np.asarray(images) * 255).round().astype("uint8")


@pytest.fixture(scope="module")
def diffusers_runs(instantx_file):
    """diffusers' own SD3 IP-Adapter on the same file, on a second copy of the pipeline (the same seeds give the
    same weights), then unloaded again: the oracle."""
    sd3_pipe = tiny_sd3_pipeline()

    def run(scale: float, **kwargs):
        originals = dict(sd3_pipe.transformer.attn_processors)
        sd3_pipe.load_ip_adapter(str(instantx_file.parent), weight_name=instantx_file.name, image_encoder_folder=None)
        sd3_pipe.set_ip_adapter_scale(scale)
        # diffusers leaves the weights where it read them from the file, at addresses that need not be 64-byte
        # aligned; a batch-1 matrix-vector product then takes another CPU kernel path whose rounding differs by an
        # ulp. Same values, aligned copies: the oracle computes what it computes, on ordinary tensors.
        with torch.no_grad():
            modules = [sd3_pipe.transformer.image_proj, *sd3_pipe.transformer.attn_processors.values()]
            for module in modules:
                for param in module.parameters() if isinstance(module, torch.nn.Module) else ():
                    param.data = param.data.clone()
        try:
            return sd3_pipe(**kwargs).images
        finally:
            del sd3_pipe.transformer.image_proj
            sd3_pipe.transformer.set_attn_processor(originals)
    return run


@pytest.fixture
def ours(sd3_pipe, instantx_file):
    from ipadapter.generation.pipeline import load

    ip = load(sd3_pipe, instantx_file)
    yield ip
    ip.detach()


@pytest.mark.parametrize("prompt,guidance,num_images", [("", 5.0, 1), ("a red cat", 5.0, 1), ("a red cat", 1.0, 1),
                                                         ("a red cat", 4.0, 2)])
def test_generation_matches_diffusers(sd3_pipe, ours, diffusers_runs, prompt, guidance, num_images):
    image = _image(0)
    got = ours.generate(images=[image], prompt=prompt, scale=0.7, guidance_scale=guidance, seed=3,
                        num_images=num_images, **STEPS)
    want = diffusers_runs(0.7, prompt=prompt, ip_adapter_image=image, guidance_scale=guidance,
                          generator=_generators(3, num_images), num_images_per_prompt=num_images, **STEPS)
    base = sd3_pipe(prompt=prompt, guidance_scale=guidance, generator=_generators(3, num_images),
                    num_images_per_prompt=num_images, **STEPS).images
    assert abs(got - want).max() <= 1e-4
    assert (_uint8(got) == _uint8(want)).all()
    assert abs(got - base).max() > 1e-2  # the image prompt acts


@pytest.mark.parametrize("guidance,num_images", [(5.0, 1), (5.0, 2), (1.0, 2)])
def test_one_image_set_per_text_prompt(ours, guidance, num_images):
    """images=[[a], [b]] with two text prompts (what `ipadapter eval` batches): each prompt's rows see their own
    set, as when generated alone - the pipeline tiles the features it is handed over its whole batch."""
    a, b = _image(0), _image(1)
    kw = dict(scale=1.0, guidance_scale=guidance, num_images=num_images, **STEPS)
    both = ours.generate(images=[[a], [b]], prompt=["x", "a red cat"], seed=0, **kw)
    alone = [ours.generate(images=[a], prompt="x", seed=0, **kw),
             ours.generate(images=[b], prompt="a red cat", seed=num_images, **kw)]
    assert abs(both - np.concatenate(alone)).max() <= 1e-5  # batched kernels round differently
    swapped = ours.generate(images=[[b], [a]], prompt=["x", "a red cat"], seed=0, **kw)
    assert abs(swapped[:num_images] - both[:num_images]).max() > 1e-4  # the set, not the prompt, moved
    with pytest.raises(IPAdapterError, match="image lists"):
        ours.generate(images=[[a], [b], [a]], prompt=["x", "y"], seed=0, **kw)


def test_negative_image_is_the_negative_rows(sd3_pipe, ours, diffusers_runs):
    image, negative = _image(0), _image(1)
    got = ours.generate(images=[image], negative_images=[negative], prompt="a cat", scale=0.6, guidance_scale=5.0,
                        seed=0, **STEPS)
    feats = [sd3_pipe.encode_image(im, "cpu") for im in (negative, image)]
    want = diffusers_runs(0.6, prompt="a cat", ip_adapter_image_embeds=torch.cat(feats), guidance_scale=5.0,
                          generator=_generators(0), **STEPS)
    zero_negative = ours.generate(images=[image], prompt="a cat", scale=0.6, guidance_scale=5.0, seed=0, **STEPS)
    assert abs(got - want).max() <= 1e-4
    assert abs(got - zero_negative).max() > 1e-4  # the negative rows matter (float noise is ~1e-6)


def test_several_images_concatenate_their_tokens(sd3_pipe, ours, diffusers_runs, monkeypatch):
    """Oracle: diffusers' own processors fed the two images' resampled tokens side by side."""
    images = [_image(0), _image(1)]
    got = ours.generate(images=images, prompt="", scale=1.0, guidance_scale=5.0, seed=0, **STEPS)
    from diffusers import SD3Transformer2DModel

    real = SD3Transformer2DModel._convert_ip_adapter_image_proj_to_diffusers

    def concatenating(self, state_dict, low_cpu_mem_usage=False):
        proj = real(self, state_dict, low_cpu_mem_usage=False)

        class Both(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = proj

            def forward(self, embeds, timestep):  # [rows, 2, S, H]
                outs = [self.proj(embeds[:, j], timestep) for j in range(embeds.shape[1])]
                return torch.cat([o[0] for o in outs], dim=1), outs[0][1]
        return Both()

    monkeypatch.setattr(SD3Transformer2DModel, "_convert_ip_adapter_image_proj_to_diffusers", concatenating)
    feats = torch.stack([sd3_pipe.encode_image(im, "cpu")[0] for im in images])[None]
    want = diffusers_runs(1.0, prompt="", ip_adapter_image_embeds=torch.cat([torch.zeros_like(feats), feats]),
                          guidance_scale=5.0, generator=_generators(0), **STEPS)
    one = ours.generate(images=images[:1], prompt="", scale=1.0, guidance_scale=5.0, seed=0, **STEPS)
    assert abs(got - want).max() <= 1e-4
    assert abs(got - one).max() > 1e-3


def test_scale_zero_and_detach_give_the_base_bit_for_bit(sd3_pipe, instantx_file):
    from ipadapter.generation.pipeline import load

    transformer = sd3_pipe.transformer
    originals = dict(transformer.attn_processors)
    keys = sorted(transformer.state_dict())
    base = sd3_pipe(prompt="a cat", guidance_scale=5.0, generator=_generators(0), **STEPS).images
    ip = load(sd3_pipe, instantx_file)
    zero = ip.generate(images=[_image(0)], prompt="a cat", scale=0.0, guidance_scale=5.0, seed=0, **STEPS)
    idle = sd3_pipe(prompt="a cat", guidance_scale=5.0, generator=_generators(0), **STEPS).images  # attached, no image
    ip.detach()
    after = sd3_pipe(prompt="a cat", guidance_scale=5.0, generator=_generators(0), **STEPS).images
    assert (zero == base).all() and (idle == base).all() and (after == base).all()
    assert all(transformer.attn_processors[name] is proc for name, proc in originals.items())
    assert "image_proj" not in transformer.__dict__ and not hasattr(transformer, "image_proj")
    assert sorted(transformer.state_dict()) == keys


def test_start_end_window(sd3_pipe, ours):
    kw = dict(images=[_image(0)], prompt="", scale=1.0, guidance_scale=5.0, seed=0, **STEPS)
    full = ours.generate(**kw)
    late = ours.generate(start=0.5, **kw)
    never = ours.generate(start=0.999, **kw)
    base = sd3_pipe(prompt="", guidance_scale=5.0, generator=_generators(0), **STEPS).images
    assert (never == base).all()
    assert abs(late - full).max() > 1e-3 and abs(late - base).max() > 1e-5  # never == base is exact


def test_precomputed_embeddings_give_the_same_image(tmp_path, ours):
    from ipadapter.generation.controls import save_embeds

    image, negative = _image(0), _image(1)
    cond, uncond = ours.embed([image], [negative])
    path = save_embeds(tmp_path / "e.safetensors", cond, uncond)
    kw = dict(prompt="a cat", scale=0.5, guidance_scale=5.0, seed=0, **STEPS)
    assert (ours.generate(embeds=path, **kw) == ours.generate(images=[image], negative_images=[negative], **kw)).all()


def test_wrong_family_one_line_errors(sd3_pipe, instantx_file):
    from ipadapter.bases import attach
    from ipadapter.testing import random_adapter, tiny_unet

    unet = tiny_unet()
    with pytest.raises(IPAdapterError) as e:
        attach(unet, Adapter.from_file(instantx_file))
    assert "time-plus adapter (SD3.5)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(IPAdapterError) as e:
        attach(sd3_pipe.transformer, random_adapter(unet, "plus"))
    assert "joint blocks" in str(e.value) and "plus adapter" in str(e.value)
    assert "image_proj" not in sd3_pipe.transformer.__dict__
    small = random_time_plus_adapter(tiny_sd3_transformer_fewer_blocks(), sd3_pipe.image_encoder)
    with pytest.raises(IPAdapterError, match="2 joint blocks.*3 joint blocks"):
        attach(sd3_pipe.transformer, small)


def tiny_sd3_transformer_fewer_blocks():
    from ipadapter.testing import tiny_sd3_transformer

    return tiny_sd3_transformer(num_layers=2)


def test_masks_are_refused_on_sd3(ours):
    with pytest.raises(IPAdapterError, match="mask"):
        ours.generate(images=[_image(0)], masks=[_image(1)], prompt="", seed=0, **STEPS)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_generate_inspect_and_wrong_file(tmp_path, sd3_pipe, instantx_file, capsys):
    """``ipadapter generate --model SD3_FOLDER --adapter FILE --image-encoder DIR ...`` gives the library's image;
    --guidance is the CFG scale. The encoder comes as its own folder (InstantX ships SigLIP apart)."""
    import numpy as np
    from PIL import Image

    from ipadapter.cli import main
    from ipadapter.generation.pipeline import load

    model, encoder = tmp_path / "sd3", tmp_path / "siglip"
    sd3_pipe.save_pretrained(str(model), safe_serialization=True)
    sd3_pipe.image_encoder.save_pretrained(str(encoder))
    sd3_pipe.feature_extractor.save_pretrained(str(encoder))
    image = _image(0)
    image.save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(model), "--adapter", str(instantx_file), "--image-encoder", str(encoder),
            "--image", str(tmp_path / "ref.png"), "--prompt", "a cat", "--scale", "0.6", "--steps", "3",
            "--guidance", "5", "--seed", "2", "--width", "32", "--height", "32", "-o", str(out)]
    assert main(argv) == 0
    ip = load(sd3_pipe, instantx_file)
    try:
        want = ip.generate(images=[Image.open(tmp_path / "ref.png")], prompt="a cat", scale=0.6, guidance_scale=5.0,
                           seed=2, num_inference_steps=3, width=32, height=32)[0]
    finally:
        ip.detach()
    assert (np.asarray(Image.open(out)) == np.asarray(want)).all()

    assert main(["inspect", str(instantx_file)]) == 0
    text = capsys.readouterr().out
    assert "time-plus" in text and "SD3.5" in text

    from ipadapter.testing import random_adapter, tiny_unet

    unet_file = tmp_path / "sd15.safetensors"
    random_adapter(tiny_unet(), "plus").save(unet_file)
    rc = main(argv[:4] + [str(unet_file)] + argv[5:-1] + [str(tmp_path / "no.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "plus adapter" in err and "joint blocks" in err and not (tmp_path / "no.png").exists()


def test_block_scales_name_joint_blocks(sd3_pipe, ours):
    kw = dict(images=[_image(0)], prompt="", scale=1.0, guidance_scale=5.0, seed=0, **STEPS)
    base = sd3_pipe(prompt="", guidance_scale=5.0, generator=_generators(0), **STEPS).images
    off = ours.generate(blocks="*=0", **kw)
    one = ours.generate(blocks="transformer_blocks.1=1", **kw)
    full = ours.generate(**kw)
    assert (off == base).all()
    assert abs(one - base).max() > 1e-4 and abs(one - full).max() > 1e-4
    with pytest.raises(IPAdapterError, match="UNet blocks"):
        ours.generate(blocks="style", **kw)


# ---------------------------------------------------------------------------------------------- T5-less folders
def test_an_sd3_folder_saved_without_t5_loads_and_generates(tmp_path, sd3_pipe, instantx_file):
    """save_pretrained writes text_encoder_3 [null, null] for SD3 without T5, and diffusers then refuses
    from_pretrained unless each is passed as None: load_pipeline (and so generate, eval, the page) passes them."""
    import json

    from diffusers import StableDiffusion3Pipeline

    import ipadapter
    from ipadapter.bases.base import saved_without

    folder = tmp_path / "no-t5"
    parts = {k: v for k, v in sd3_pipe.components.items() if k not in ("text_encoder_3", "tokenizer_3")}
    StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    with pytest.raises(ValueError):  # diffusers' own behaviour: why saved_without exists
        StableDiffusion3Pipeline.from_pretrained(str(folder))
    assert saved_without(folder) == {"text_encoder_3": None, "tokenizer_3": None}
    pipe = ipadapter.load_pipeline(folder, dtype=torch.float32)
    assert pipe.text_encoder_3 is None and pipe.transformer is not None
    ip = ipadapter.load(pipe, instantx_file)
    out = ip.generate(images=[_image(1)], prompt="a cat", seed=0, **STEPS)
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(out)).all()


def test_a_time_plus_adapter_records_the_encoder_it_was_trained_with(tmp_path, sd3_adapter):
    """Published time-plus files read SigLIP; one trained on a CLIP vision tower (the world's SD3 member) records
    "clip" in our metadata, loads back with it, and is then checked against CLIP instead."""
    from dataclasses import replace

    from ipadapter.testing import tiny_image_encoder, tiny_siglip_encoder

    path = tmp_path / "clip-time-plus.safetensors"
    clip = tiny_image_encoder()
    cfg = replace(sd3_adapter.config, encoder="clip", embed_dim=clip.config.hidden_size)
    Adapter(cfg).save(path)
    loaded, _ = read_checkpoint(path)
    assert loaded.encoder == "clip" and loaded.kind == "time-plus"
    Adapter(loaded).check_encoder(clip)
    with pytest.raises(IPAdapterError, match="reads a CLIP vision encoder"):
        Adapter(loaded).check_encoder(tiny_siglip_encoder(hidden=clip.config.hidden_size)[0])
    with pytest.raises(ValueError, match="image encoder family"):
        replace(cfg, encoder="dino")


def test_a_fresh_adapter_starts_near_the_base(tmp_path, sd3_pipe):
    """The trainer's initialisation (SD3Family.init_kv): zero image values and image keys that outweigh the
    latent ones, so the image attention - which attends over the latent tokens too - starts adding little; copying
    the block's text K/V as on UNets starts by adding a second self-attention at full strength."""
    from ipadapter.bases.sd3 import IMAGE_KEY_GAIN, SD3
    from ipadapter.core.checkpoint import write_checkpoint
    from ipadapter.generation.pipeline import load
    from ipadapter.testing import time_plus_config

    transformer = sd3_pipe.transformer
    config = time_plus_config(transformer, sd3_pipe.image_encoder.config.hidden_size)
    fresh = Adapter(config)
    SD3.init_kv(fresh, transformer)
    copied = Adapter(config)
    copied.load_state_dict(fresh.state_dict())
    block = transformer.transformer_blocks[0].attn
    with torch.no_grad():
        for layer in SD3.layers(transformer):  # the UNet recipe: image K/V = the block's context K/V
            ip, attn = copied.ip_adapter[str(layer.index)], transformer.get_submodule(layer.module_name)
            ip.to_v_ip.weight.copy_(attn.add_v_proj.weight)
            ip.norm_ip_k.weight.div_(IMAGE_KEY_GAIN)
    ip0 = fresh.ip_adapter["0"]
    assert not ip0.to_v_ip.weight.any()
    torch.testing.assert_close(ip0.norm_ip_k.weight, IMAGE_KEY_GAIN * block.norm_added_k.weight)
    base = sd3_pipe(prompt="a cat", guidance_scale=1.0, generator=_generators(0), **STEPS).images
    dist = {}
    for name, adapter in (("fresh", fresh), ("copied", copied)):
        path = write_checkpoint(tmp_path / f"{name}.safetensors", adapter.config, adapter.state_dict())
        ip = load(sd3_pipe, path)
        try:
            out = ip.generate(images=[_image(0)], prompt="a cat", scale=1.0, guidance_scale=1.0, seed=0, **STEPS)
        finally:
            ip.detach()
        dist[name] = abs(out - base).mean()
    assert dist["fresh"] < 0.5 * dist["copied"], dist
