"""Flux: XLabs v1/v2 against diffusers' own Flux IP-Adapter (the oracle, in tests only), InstantX FLUX against a
transcription of its reference formula, scale 0 and detach giving the base model bit for bit, controls, bad files.

Two tiny FluxPipelines built from the same seeds have the same weights: ours runs on one, diffusers' adapter on
the other, so neither leaves anything on the pipeline the other uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ipadapter
from ipadapter.bases import attached
from ipadapter.core.errors import IPAdapterError
from ipadapter.testing import random_adapter, random_flux_adapter, tiny_flux_pipeline, tiny_siglip_encoder

STEPS, SIZE, TEXT_LEN = 2, 32, 16
RUN = dict(num_inference_steps=STEPS, width=SIZE, height=SIZE, max_sequence_length=TEXT_LEN, output_type="np")


@pytest.fixture(scope="module")
def pipes():
    """(ours, diffusers') tiny Flux pipelines with identical weights."""
    return tiny_flux_pipeline(), tiny_flux_pipeline()


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8))


def _seed(s: int = 0):
    return torch.Generator("cpu").manual_seed(s)


def _xlabs_file(tmp_path, transformer, tokens: int, seed: int = 0, name: str = "ip_adapter.safetensors"):
    adapter = random_flux_adapter(transformer, "xlabs", embed_dim=48, num_tokens=tokens, seed=seed)
    adapter.save(tmp_path / name)
    return tmp_path / name


def _theirs(pipe, folder, names, scale, image, **call):
    """diffusers' FluxPipeline.load_ip_adapter on the second pipeline: the oracle."""
    encoder, processor = pipe.image_encoder, pipe.feature_extractor
    pipe.load_ip_adapter(str(folder), weight_name=names, image_encoder_pretrained_model_name_or_path=None)
    try:
        pipe.set_ip_adapter_scale(scale)
        images = image if isinstance(image, list) else [image]
        return pipe(ip_adapter_image=images, generator=_seed(), **RUN, **call).images
    finally:
        pipe.unload_ip_adapter()  # which drops the image encoder too: put it back for the next test
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)


def _assert_parity(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.array_equal((ours * 255).round().astype(np.uint8), (theirs * 255).round().astype(np.uint8))


@pytest.mark.parametrize("tokens, prompt, true_cfg", [
    (4, "", 1.0), (4, "a red cat", 1.0), (4, "a red cat", 2.0), (16, "", 1.0), (16, "a red cat", 2.0),
])
def test_xlabs_matches_diffusers(pipes, image, tmp_path, tokens, prompt, true_cfg):
    ours, theirs = pipes
    path = _xlabs_file(tmp_path, ours.transformer, tokens)
    call = dict(prompt=prompt, guidance_scale=3.5)
    if true_cfg > 1:
        call.update(negative_prompt="blurry", true_cfg_scale=true_cfg)
    ip = ipadapter.load(ours, path)
    try:
        got = ip.generate(images=[image], scale=0.7, seed=0, **RUN, **call)
    finally:
        ip.detach()
    want = _theirs(theirs, tmp_path, path.name, 0.7, image, **call)
    base = ours(generator=_seed(), **RUN, **call).images
    assert np.abs(want - base).max() > 1e-3  # the adapter changes the image: the comparison means something
    _assert_parity(got, want)


def test_xlabs_per_block_scales_and_two_adapters_match_diffusers(pipes, image, tmp_path):
    ours, theirs = pipes
    a = _xlabs_file(tmp_path, ours.transformer, 4, seed=1, name="a.safetensors")
    b = _xlabs_file(tmp_path, ours.transformer, 16, seed=2, name="b.safetensors")
    other = Image.fromarray(np.asarray(image)[::-1].copy())
    ip = ipadapter.load(ours, [a, b])
    try:
        prompts = [ipadapter.ImagePrompt(images=[image], scale=0.8, blocks=[1.0, 0.25]),
                   ipadapter.ImagePrompt(images=[other], scale=0.5)]
        got = ip.generate(prompts=prompts, prompt="a cat", guidance_scale=3.5, seed=0, **RUN)
    finally:
        ip.detach()
    want = _theirs(theirs, tmp_path, [a.name, b.name], [[0.8, 0.2], [0.5, 0.5]], [image, other],
                   prompt="a cat", guidance_scale=3.5)
    _assert_parity(got, want)


def test_xlabs_several_images_and_a_negative_image_match_diffusers(pipes, image, tmp_path):
    ours, theirs = pipes
    path = _xlabs_file(tmp_path, ours.transformer, 4, seed=3)
    other = Image.fromarray(np.asarray(image)[:, ::-1].copy())
    negative = Image.fromarray(255 - np.asarray(image))
    call = dict(prompt="a cat", guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=1.5)
    ip = ipadapter.load(ours, path)
    try:
        got = ip.generate(images=[image, other], negative_images=[negative], scale=0.6, seed=0, **RUN, **call)
    finally:
        ip.detach()
    want = _theirs(theirs, tmp_path, path.name, 0.6, [[image, other]], negative_ip_adapter_image=[negative], **call)
    _assert_parity(got, want)


def test_scale_zero_and_detach_give_the_base_bit_for_bit(pipes, image, tmp_path):
    ours, _ = pipes
    transformer = ours.transformer
    before = dict(transformer.attn_processors)
    keys = set(transformer.state_dict())
    call = dict(prompt="a red cat", guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.0)
    base = ours(generator=_seed(), **RUN, **call).images
    ip = ipadapter.load(ours, _xlabs_file(tmp_path, transformer, 4))
    zero = ip.generate(images=[image], scale=0.0, seed=0, **RUN, **call)
    acting = ip.generate(images=[image], scale=0.5, seed=0, **RUN, **call)
    ip.detach()
    after = ours(generator=_seed(), **RUN, **call).images
    assert np.array_equal(zero, base) and np.array_equal(after, base)
    assert not np.array_equal(acting, base)
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert set(transformer.state_dict()) == keys and not hasattr(transformer, "encoder_hid_proj")
    assert not attached(transformer)


def test_region_masks_act_where_white(pipes, image, tmp_path):
    ours, _ = pipes
    ip = ipadapter.load(ours, _xlabs_file(tmp_path, ours.transformer, 4))
    white, black = Image.new("L", (SIZE, SIZE), 255), Image.new("L", (SIZE, SIZE), 0)
    try:
        plain = ip.generate(images=[image], scale=0.8, seed=0, **RUN)
        everywhere = ip.generate(images=[image], masks=[white], scale=0.8, seed=0, **RUN)
        nowhere = ip.generate(images=[image], masks=[black], scale=0.8, seed=0, **RUN)
        half = Image.new("L", (SIZE, SIZE), 0)
        half.paste(255, (0, 0, SIZE // 2, SIZE))
        left = ip.generate(images=[image], masks=[half], scale=0.8, seed=0, **RUN)
    finally:
        ip.detach()
    base = ours(prompt="", generator=_seed(), guidance_scale=3.5, **RUN).images
    assert np.abs(everywhere - plain).max() < 1e-5
    assert np.array_equal(nowhere, base)
    assert not np.array_equal(left, base) and not np.array_equal(left, plain)


def test_start_end_outside_the_window_is_the_base(pipes, image, tmp_path):
    ours, _ = pipes
    ip = ipadapter.load(ours, _xlabs_file(tmp_path, ours.transformer, 4))
    try:
        late = ip.generate(images=[image], scale=0.8, start=0.999, seed=0, **RUN)
    finally:
        ip.detach()
    base = ours(prompt="", generator=_seed(), guidance_scale=3.5, **RUN).images
    assert np.array_equal(late, base)


def test_wrong_family_and_shape_errors(pipes, sd15_pipe, tmp_path):
    ours, _ = pipes
    path = _xlabs_file(tmp_path, ours.transformer, 4)
    with pytest.raises(IPAdapterError, match=r"XLabs Flux adapter: 2 double blocks.*this (UNet|model)") as err:
        ipadapter.load(sd15_pipe, path)
    assert "\n" not in str(err.value)
    sd = random_adapter(sd15_pipe.unet, "global")
    with pytest.raises(IPAdapterError, match="this model: custom Flux, 2 double \\+ 3 single blocks"):
        ipadapter.load(ours, sd)
    bigger = tiny_flux_pipeline(double=3, with_image_encoder=False).transformer
    wrong = _xlabs_file(tmp_path, bigger, 4, name="three.safetensors")
    with pytest.raises(IPAdapterError, match="XLabs Flux adapter: 3 double blocks.*this model: custom Flux, 2 double"):
        ipadapter.load(ours, wrong)
    assert not attached(ours.transformer)


# ---------------------------------------------------------------------------------------------- InstantX
class _InstantXReference:
    """A transcription of InstantX's reference (Shakker-Labs/ComfyUI-IPAdapter-Flux: IPAFluxAttnProcessor2_0 and
    its DoubleStreamBlockIPA / SingleStreamBlockIPA) onto diffusers' Flux attention weights, written out in full:
    q = the block's image query after QK-norm, before RoPE (single blocks: over [text; image]);
    k, v = RMSNorm_head(to_k_ip(tokens)), RMSNorm_head(to_v_ip(tokens)) (no weights, eps 1e-5);
    attention output += scale * softmax(q k^T / sqrt(d)) v, before the output projection."""

    def __init__(self, to_k, to_v, tokens, scale):
        self.to_k, self.to_v, self.tokens, self.scale = to_k, to_v, tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states))), \
            heads(attn.to_v(hidden_states))
        img_q = q
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)

        def rms(x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

        b = img_q.shape[0]
        ik = rms(heads(self.to_k(self.tokens)).expand(b, -1, -1, -1)).transpose(1, 2)
        iv = rms(heads(self.to_v(self.tokens)).expand(b, -1, -1, -1)).transpose(1, 2)
        ip = F.scaled_dot_product_attention(img_q.transpose(1, 2), ik, iv).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out + self.scale * ip
        n_txt = encoder_hidden_states.shape[1]
        text, img = out[:, :n_txt], out[:, n_txt:] + self.scale * ip
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(text)


def test_instantx_matches_its_reference_formula(pipes, image, tmp_path):
    ours, theirs = pipes
    siglip, processor = tiny_siglip_encoder(hidden=48)
    adapter = random_flux_adapter(ours.transformer, "instantx", embed_dim=48, num_tokens=8, std=0.5)
    torch.save({"image_proj": adapter.image_proj.state_dict(), "ip_adapter": adapter.ip_adapter.state_dict()},
               tmp_path / "ip-adapter.bin")
    encoder = ipadapter.ImageEncoder(siglip, processor)
    ip = ipadapter.load(ours, tmp_path / "ip-adapter.bin", image_encoder=encoder)
    try:
        got = ip.generate(images=[image], scale=0.9, prompt="a cat", guidance_scale=3.5, seed=0, **RUN)
    finally:
        ip.detach()
    # the reference: pooled SigLIP -> MLP (Linear, GELU, Linear) -> 8 tokens -> LayerNorm
    pooled = siglip(processor(images=[image], return_tensors="pt").pixel_values).pooler_output
    p = {k: v for k, v in adapter.image_proj.state_dict().items()}
    x = F.linear(F.gelu(F.linear(pooled, p["proj.0.weight"], p["proj.0.bias"])), p["proj.2.weight"], p["proj.2.bias"])
    tokens = F.layer_norm(x.reshape(1, 8, -1), (x.shape[-1] // 8,), p["norm.weight"], p["norm.bias"])
    original = dict(theirs.transformer.attn_processors)
    procs = {}
    for i, name in enumerate(original):
        layer = adapter.ip_adapter[str(i)]
        procs[name] = _InstantXReference(layer.to_k_ip, layer.to_v_ip, tokens, 0.9)
    theirs.transformer.set_attn_processor(procs)
    try:
        with torch.no_grad():
            want = theirs(prompt="a cat", guidance_scale=3.5, generator=_seed(), **RUN).images
    finally:
        theirs.transformer.set_attn_processor(original)
    base = theirs(prompt="a cat", guidance_scale=3.5, generator=_seed(), **RUN).images
    assert np.abs(want - base).max() > 1e-3
    assert np.abs(got - want).max() <= 1e-4


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_generate_on_a_flux_folder_matches_the_library(pipes, image, tmp_path, capsys):
    from ipadapter.cli import main

    ours, _ = pipes
    folder = tmp_path / "flux"
    ours.save_pretrained(str(folder), safe_serialization=True)
    adapter = _xlabs_file(tmp_path, ours.transformer, 4)
    image.save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(folder), "--adapter", str(adapter), "--image", str(tmp_path / "ref.png"),
            "--prompt", "a red cat", "--negative-prompt", "blurry", "--true-cfg", "2", "--scale", "0.7",
            "--steps", "2", "--guidance", "3.5", "--seed", "0", "--width", "32", "--height", "32", "-o", str(out),
            "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    ip = ipadapter.load(ours, adapter)
    try:
        want = ip.generate(images=[image], prompt="a red cat", negative_prompt="blurry", true_cfg_scale=2.0,
                           scale=0.7, num_inference_steps=2, guidance_scale=3.5, seed=0, width=32, height=32)[0]
    finally:
        ip.detach()
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    assert "True CFG scale: 2," in Image.open(out).info["parameters"]  # the one parameters format
    capsys.readouterr()
    bad = [a for a in argv if a not in ("--negative-prompt", "blurry")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--true-cfg needs --negative-prompt" in err and "Traceback" not in err


def test_precomputed_embeddings_give_the_same_image(pipes, image, tmp_path):
    from ipadapter.generation.controls import save_embeds

    ours, _ = pipes
    ip = ipadapter.load(ours, _xlabs_file(tmp_path, ours.transformer, 4))
    call = dict(prompt="a cat", negative_prompt="blurry", true_cfg_scale=2.0, scale=0.6, seed=0, **RUN)
    try:
        cond, uncond = ip.embed([image])  # the unconditional branch: a black picture, as diffusers' Flux encodes
        save_embeds(tmp_path / "ref.safetensors", cond, uncond, {})
        direct = ip.generate(images=[image], **call)
        stored = ip.generate(embeds=str(tmp_path / "ref.safetensors"), **call)
    finally:
        ip.detach()
    assert np.array_equal(direct, stored)


def test_img2img_follows_diffusers_flux_img2img(pipes, image, tmp_path):
    from diffusers import FluxImg2ImgPipeline

    ours, _ = pipes
    init = Image.fromarray((np.random.RandomState(1).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))
    run = dict(num_inference_steps=4, max_sequence_length=TEXT_LEN, output_type="np", guidance_scale=3.5,
               width=SIZE, height=SIZE)
    base = FluxImg2ImgPipeline.from_pipe(ours)(prompt="a cat", image=init, strength=0.6, generator=_seed(),
                                               **run).images
    ip = ipadapter.load(ours, _xlabs_file(tmp_path, ours.transformer, 4))
    try:
        zero = ip.generate(images=[image], scale=0.0, prompt="a cat", init_image=init, strength=0.6, seed=0, **run)
        acting = ip.generate(images=[image], scale=0.8, prompt="a cat", init_image=init, strength=0.6, seed=0, **run)
        assert type(ip.pipeline_for("img2img")).__name__ == "FluxImg2ImgPipeline"
    finally:
        ip.detach()
    assert np.array_equal(zero, base) and np.abs(acting - base).max() > 1e-3


def test_wrong_encoder_one_line_errors(pipes, tmp_path):
    ours, _ = pipes
    siglip, processor = tiny_siglip_encoder(hidden=48)
    with pytest.raises(IPAdapterError, match="XLabs Flux adapter.*reads a CLIP ViT-L/14.*this encoder: SigLIP"):
        ipadapter.load(ours, _xlabs_file(tmp_path, ours.transformer, 4),
                       image_encoder=ipadapter.ImageEncoder(siglip, processor))
    instantx = random_flux_adapter(ours.transformer, "instantx", embed_dim=48)
    with pytest.raises(IPAdapterError, match="InstantX FLUX adapter.*reads a SigLIP.*this encoder: CLIP, 64") as err:
        ipadapter.load(ours, instantx)  # the pipeline's CLIP encoder (hidden width 64)
    assert "\n" not in str(err.value)
    assert not attached(ours.transformer)


def test_siglip_encoder_folder_loads_and_gives_the_pooled_embedding(tmp_path, image):
    siglip, processor = tiny_siglip_encoder(hidden=48)
    siglip.save_pretrained(str(tmp_path / "siglip"))
    processor.save_pretrained(str(tmp_path / "siglip"))
    encoder = ipadapter.ImageEncoder.from_pretrained(tmp_path / "siglip")
    assert type(encoder.model).__name__ == "SiglipVisionModel"
    config = random_flux_adapter(tiny_flux_pipeline(with_image_encoder=False).transformer, "instantx",
                                 embed_dim=48).config
    cond, uncond = encoder.encode(config, [image])
    want = siglip(processor(images=[image], return_tensors="pt").pixel_values).pooler_output
    assert torch.allclose(cond.image_embeds, want, atol=1e-6) and cond.image_embeds.shape == (1, 48)


def test_flux_block_specs():
    from ipadapter.bases import family_of
    from ipadapter.generation.controls import block_scales

    pipe = tiny_flux_pipeline(with_image_encoder=False)
    family = family_of(pipe)
    layers = family.layers(pipe.transformer)  # 2 double blocks (0, 1), then 3 single blocks (2, 3, 4)
    stems = [layer.name.split(".")[0] for layer in layers]
    assert stems == ["transformer_blocks"] * 2 + ["single_transformer_blocks"] * 3
    assert block_scales(layers, [1.0, 0.5], family) == {0: 1.0, 1: 0.5, 2: 1.0, 3: 1.0, 4: 1.0}
    assert block_scales(layers, "transformer_blocks.1=0.3,*=0", family) == {0: 0, 1: 0.3, 2: 0, 3: 0, 4: 0}
    with pytest.raises(IPAdapterError, match="Flux has no presets"):
        block_scales(layers, "style", family)
    with pytest.raises(IPAdapterError, match="6 scales for 5 layers"):
        block_scales(layers, "1,1,1,1,1,1", family)


def test_instantx_precomputed_embeddings_give_the_same_image(pipes, image, tmp_path):
    from ipadapter.generation.controls import save_embeds

    ours, _ = pipes
    siglip, processor = tiny_siglip_encoder(hidden=48)
    adapter = random_flux_adapter(ours.transformer, "instantx", embed_dim=48, num_tokens=8, std=0.5)
    ip = ipadapter.load(ours, adapter, image_encoder=ipadapter.ImageEncoder(siglip, processor))
    try:
        cond, uncond = ip.embed([image])
        save_embeds(tmp_path / "ref.safetensors", cond, uncond, {})
        direct = ip.generate(images=[image], scale=0.9, seed=0, **RUN)
        stored = ip.generate(embeds=str(tmp_path / "ref.safetensors"), scale=0.9, seed=0, **RUN)
    finally:
        ip.detach()
    assert np.array_equal(direct, stored)
