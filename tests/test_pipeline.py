"""Parity with diffusers' built-in IP-Adapter (the oracle) on the same weights, and generation behaviour.

Noise predictions are compared by calling the UNet directly (diffusers: ``added_cond_kwargs["image_embeds"]``;
ours: tokens set on the attached adapter), final images by running the same diffusers pipeline both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import (
    GEN,
    PATCH_AND_GLOBAL,
    SHAPES,
    cross_layers,
    diffusers_ip_adapter,
    generator,
    make_adapter,
    noise_prediction,
    unet_inputs,
)
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation.pipeline import ImagePrompt, check_scale, find_image_encoder, load

SCALE = 0.7


def _ours_noise(pipe, files, prompts, inputs, change=None):
    ip = load(pipe, files)
    try:
        for i, prompt in enumerate(prompts):
            ip.set_images(adapter=i, prompt=prompt)
            ip.adapters[i].state.cfg = True  # the batch is [uncond; cond], like diffusers' stacked embeddings
        if change is not None:
            change(ip)
        return noise_prediction(pipe, inputs)
    finally:
        ip.detach()


def _assert_parity(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the prediction: the comparison means something
    assert (ours - ref).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------ noise predictions
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PATCH_AND_GLOBAL)
def test_noise_prediction_matches_diffusers(pipe_for, adapter_file, prompt_images, shape, kind):
    pipe = pipe_for(shape)
    path = adapter_file(shape, kind)
    inputs = unet_inputs(pipe)
    base = noise_prediction(pipe, inputs)
    ours = _ours_noise(pipe, [path], [ImagePrompt(images=[prompt_images[0]], scale=SCALE)], inputs)
    with diffusers_ip_adapter(pipe, [path], [SCALE]):
        embeds = pipe.prepare_ip_adapter_image_embeds(prompt_images[0], None, "cpu", 1, True)
        ref = noise_prediction(pipe, inputs, image_embeds=embeds)
    _assert_parity(ours, ref, base)


@pytest.mark.parametrize("shape", SHAPES)
def test_several_adapters_several_images_and_scale_changes_match_diffusers(pipe_for, adapter_file, prompt_images,
                                                                           shape):
    pipe = pipe_for(shape)
    files = [adapter_file(shape, "global"), adapter_file(shape, "plus"), adapter_file(shape, "full", seed=1)]
    images = [[prompt_images[0]], [prompt_images[1], prompt_images[2]], [prompt_images[2], prompt_images[0]]]
    scales = [0.6, 0.4, 0.5]
    inputs = unet_inputs(pipe)
    base = noise_prediction(pipe, inputs)
    prompts = [ImagePrompt(images=im, scale=s) for im, s in zip(images, scales)]

    def rescale(ip):  # change one adapter's scale after its tokens are set: no re-encoding
        ip.adapters[1].state.scale = 0.9

    ours = _ours_noise(pipe, files, prompts, inputs)
    ours_changed = _ours_noise(pipe, files, prompts, inputs, change=rescale)
    with diffusers_ip_adapter(pipe, files, scales):
        embeds = pipe.prepare_ip_adapter_image_embeds(images, None, "cpu", 1, True)
        ref = noise_prediction(pipe, inputs, image_embeds=embeds)
        pipe.set_ip_adapter_scale([0.6, 0.9, 0.5])
        ref_changed = noise_prediction(pipe, inputs, image_embeds=embeds)
    _assert_parity(ours, ref, base)
    _assert_parity(ours_changed, ref_changed, ref)


@pytest.mark.parametrize("kind", ["faceid", "faceid-portrait"])
def test_faceid_noise_prediction_matches_diffusers_without_lora(tmp_path, sd15_pipe, kind):
    """diffusers takes face embeddings as precomputed image embeds (its LoRA path needs peft: not here)."""
    pipe = sd15_pipe
    adapter = make_adapter(pipe.unet, kind, lora=False, id_hidden=1024)
    path = tmp_path / f"{kind}.safetensors"
    adapter.save(path)
    faces = torch.randn(3 if kind == "faceid-portrait" else 1, 512)
    inputs = unet_inputs(pipe)
    base = noise_prediction(pipe, inputs)
    ours = _ours_noise(pipe, [path], [ImagePrompt(face_embeds=faces, scale=SCALE)], inputs)
    with diffusers_ip_adapter(pipe, [path], [SCALE]):
        embeds = [torch.stack([torch.zeros_like(faces), faces])]  # [uncond; cond] x n faces x 512
        ref = noise_prediction(pipe, inputs, image_embeds=embeds)
    _assert_parity(ours, ref, base)


# ---------------------------------------------------------------------------------------- final images
def _diffusers_images(pipe, files, scales, images, **kwargs):
    with diffusers_ip_adapter(pipe, files, scales):
        return pipe(ip_adapter_image=images, **{**GEN, "generator": generator(0), **kwargs}).images


def _assert_same_images(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.array_equal((ours * 255).round(), (ref * 255).round())
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PATCH_AND_GLOBAL)
def test_final_images_match_diffusers(pipe_for, adapter_file, prompt_images, shape, kind):
    pipe = pipe_for(shape)
    path = adapter_file(shape, kind)
    ip = load(pipe, path)
    ours = ip.generate(images=[prompt_images[0]], scale=SCALE, generator=generator(0), **GEN)
    ip.detach()
    ref = _diffusers_images(pipe, [path], [SCALE], prompt_images[0])
    _assert_same_images(ours, ref)
    base = pipe(**GEN, generator=generator(0)).images
    assert np.abs(ref - base).max() > 1e-3


def test_several_adapters_and_images_final_images_match_diffusers(sd15_pipe, adapter_file, prompt_images):
    files = [adapter_file("sd15", "plus"), adapter_file("sd15", "global")]
    ip = load(sd15_pipe, files)
    prompts = [ImagePrompt(images=prompt_images[:2], scale=0.5), ImagePrompt(images=[prompt_images[2]], scale=0.8)]
    ours = ip.generate(prompts=prompts, generator=generator(0), **GEN)
    ip.detach()
    ref = _diffusers_images(sd15_pipe, files, [0.5, 0.8], [prompt_images[:2], prompt_images[2]])
    _assert_same_images(ours, ref)


@pytest.mark.parametrize(("guidance", "num_images"), [(5.0, 2), (1.0, 1), (1.0, 2)])
def test_batch_layouts_match_diffusers(sd15_pipe, adapter_file, prompt_images, guidance, num_images):
    """Images per prompt and guidance off change the UNet batch; the image keys/values must follow it."""
    path = adapter_file("sd15", "plus")
    kwargs = dict(guidance_scale=guidance, num_images_per_prompt=num_images)
    ip = load(sd15_pipe, path)
    ours = ip.generate(images=[prompt_images[1]], scale=SCALE, generator=generator(0),
                       **{**GEN, "guidance_scale": guidance}, num_images=num_images)
    ip.detach()
    ref = _diffusers_images(sd15_pipe, [path], [SCALE], prompt_images[1], **kwargs)
    assert ours.shape[0] == num_images
    _assert_same_images(ours, ref)


# ----------------------------------------------------------------------------------- base model / scale
@pytest.mark.parametrize(("shape", "kind"), [("sd15", k) for k in PATCH_AND_GLOBAL + ("faceid", "faceid-plus")]
                         + [("sdxl", "plus")])
def test_scale_zero_is_the_base_model_bit_for_bit(pipe_for, adapter_file, prompt_images, shape, kind):
    pipe = pipe_for(shape)
    base = pipe(**GEN, generator=generator(0)).images
    ip = load(pipe, adapter_file(shape, kind))
    prompt = ImagePrompt(images=[prompt_images[0]], scale=0.0)
    if kind.startswith("faceid"):
        prompt.face_embeds = torch.randn(1, 512)  # FaceID LoRA included: scale 0 switches it off too
    ours = ip.generate(prompts=[prompt], generator=generator(0), **GEN)
    ip.detach()
    assert np.array_equal(ours, base)
    again = pipe(**GEN, generator=generator(0)).images  # and detaching left the base model
    assert np.array_equal(again, base)


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_and_keys_values_computed_once_per_generation(pipe_for, adapter_file, prompt_images, shape):
    pipe = pipe_for(shape)
    ip = load(pipe, adapter_file(shape, "plus"))
    adapter = ip.adapters[0]
    calls = {"kv": 0, "proj": 0, "unet": 0}

    def count(name):
        def hook(*args):
            calls[name] += 1
        return hook

    hooks = [layer.to_k_ip.register_forward_hook(count("kv")) for layer in adapter.ip_adapter.values() if layer.has_kv]
    hooks.append(adapter.image_proj.register_forward_hook(count("proj")))
    hooks.append(pipe.unet.register_forward_hook(count("unet")))
    try:
        ip.generate(images=[prompt_images[0]], scale=SCALE, seed=0, **{**GEN, "num_inference_steps": 3})
    finally:
        for h in hooks:
            h.remove()
        ip.detach()
    assert calls["unet"] == 3
    assert calls["kv"] == len(cross_layers(pipe.unet)) == (16 if shape == "sd15" else 70)  # not layers x steps
    assert calls["proj"] == 1  # conditional and unconditional tokens in one batch, once


# ----------------------------------------------------------------------------------------------- FaceID
def test_faceid_generation_uses_file_embeddings_and_lora_on_both_attentions(tmp_path, sd15_pipe, adapter_file):
    faces = np.random.RandomState(0).randn(1, 512).astype(np.float32)
    np.save(tmp_path / "face.npy", faces)
    ip = load(sd15_pipe, adapter_file("sd15", "faceid"))
    adapter = ip.adapters[0]
    lora_calls = {0: 0, 1: 0}
    hooks = [adapter.ip_adapter[str(i)].to_q_lora.register_forward_hook(
        lambda *a, i=i: lora_calls.__setitem__(i, lora_calls[i] + 1)) for i in lora_calls]
    try:
        ours = ip.generate(prompts=[ImagePrompt(face_embeds=str(tmp_path / "face.npy"), scale=SCALE)],
                           generator=generator(0), **GEN)
        same = ip.generate(prompts=[ImagePrompt(face_embeds=torch.from_numpy(faces), scale=SCALE)],
                           generator=generator(0), **GEN)
    finally:
        for h in hooks:
            h.remove()
        ip.detach()
    assert lora_calls[0] > 0 and lora_calls[1] > 0  # attn1 (self) and attn2 (cross) carry LoRA
    assert np.array_equal(ours, same)
    assert np.abs(ours - sd15_pipe(**GEN, generator=generator(0)).images).max() > 1e-3


def test_faceid_portrait_concatenates_the_faces_tokens(sd15_pipe, adapter_file):
    ip = load(sd15_pipe, adapter_file("sd15", "faceid-portrait"))
    try:
        ip.set_images(prompt=ImagePrompt(face_embeds=torch.randn(3, 512), scale=1.0))
        k, _ = ip.adapters[0].state.kv[1]
        assert k.shape[:3] == (2, 3, 16)  # [uncond; cond] x 3 faces x 16 tokens
    finally:
        ip.detach()


def test_faceid_plus_needs_as_many_face_images_as_embeddings(sd15_pipe, adapter_file, prompt_images):
    ip = load(sd15_pipe, adapter_file("sd15", "faceid-plus"))
    try:
        with pytest.raises(IPAdapterError, match="2 face embedding"):
            ip.set_images(prompt=ImagePrompt(images=[prompt_images[0]], face_embeds=torch.randn(2, 512)))
        ip.set_images(prompt=ImagePrompt(images=prompt_images[:2], face_embeds=torch.randn(2, 512)))
        assert ip.adapters[0].state.kv[1][0].shape[:3] == (2, 2, 4)
        with pytest.raises(IPAdapterError, match="face-ID embeddings"):
            ip.set_images(prompt=ImagePrompt(images=[prompt_images[0]]))
    finally:
        ip.detach()


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [float("nan"), -0.5, float("inf")])
def test_bad_scale_is_refused_and_changes_nothing(sd15_pipe, adapter_file, prompt_images, bad):
    with pytest.raises(IPAdapterError, match="finite number >= 0"):
        check_scale(bad)
    ip = load(sd15_pipe, adapter_file("sd15", "global"))
    try:
        with pytest.raises(IPAdapterError, match="scale"):
            ip.generate(images=[prompt_images[0]], scale=bad, seed=0, **GEN)
        assert not ip.adapters[0].state.active
    finally:
        ip.detach()


def test_image_encoder_search(tmp_path):
    (tmp_path / "model" / "image_encoder").mkdir(parents=True)
    (tmp_path / "model" / "image_encoder" / "config.json").write_text("{}")
    (tmp_path / "adapters" / "image_encoder").mkdir(parents=True)
    (tmp_path / "adapters" / "image_encoder" / "config.json").write_text("{}")
    adapter = tmp_path / "adapters" / "ip.safetensors"
    assert find_image_encoder(adapter, tmp_path / "model") == tmp_path / "model" / "image_encoder"
    assert find_image_encoder(adapter) == tmp_path / "adapters" / "image_encoder"
    assert find_image_encoder(adapter, explicit=tmp_path / "x") == tmp_path / "x"
    with pytest.raises(IPAdapterError, match="pass image_encoder DIR"):
        find_image_encoder(tmp_path / "elsewhere" / "ip.safetensors")


def test_one_image_set_per_text_prompt_conditions_each_prompt_on_its_own(sd15_pipe, adapter_file):
    """images=[[a], [b]] with two text prompts: prompt j sees set j (what `ipadapter eval` batches)."""
    import ipadapter
    from conftest import random_image

    ip = ipadapter.load(sd15_pipe, adapter_file("sd15", "global"))
    a, b = random_image(0), random_image(1)
    try:
        run = dict(prompt=["one", "one"], num_inference_steps=2, seed=[5, 5], output_type="np")  # same noise
        ab = ip.generate(images=[[a], [b]], **run)
        ba = ip.generate(images=[[b], [a]], **run)
        alone = ip.generate(images=[a], prompt="one", num_inference_steps=2, seed=5, output_type="np")
        with pytest.raises(IPAdapterError, match="3 image lists for 2 text prompt"):
            ip.generate(images=[[a], [b], [a]], **run)
        with pytest.raises(IPAdapterError, match="each as long"):
            ip.generate(images=[[a], [a, b]], **run)
    finally:
        ip.detach()
    def diff(x, y):
        return float(np.abs(x - y).max())

    # row j is the prompt on set j as if alone (up to batch rounding), and the two sets give other images
    same = max(diff(ab[0], alone[0]), diff(ba[1], alone[0]), diff(ab[1], ba[0]))
    assert diff(ab[0], ab[1]) > 1e-3 and same < 0.01 * diff(ab[0], ab[1]), (same, diff(ab[0], ab[1]))


def test_image_encoder_search_lists_each_place_once_and_knows_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IPAdapterError) as info:  # a relative name: its folder "." is its own parent, listed once
        find_image_encoder("ip-adapter.bin", "sd15")
    message = str(info.value)
    looked = message[message.index("looked in ") + len("looked in "):message.index(";")].split(", ")
    assert looked == ["sd15/image_encoder", "image_encoder", "models/image_encoder"]
    with pytest.raises(IPAdapterError, match="looked in a/image_encoder, a/models/image_encoder, image_encoder, "
                                             "models/image_encoder;"):
        find_image_encoder("a/ip-adapter.bin")
    assert "official IP-Adapter release keeps it in models/image_encoder beside the adapter files" in message
    # the official release: models/image_encoder beside models/*.bin, used by sdxl_models/*vit-h* too
    (tmp_path / "IP-Adapter" / "models" / "image_encoder").mkdir(parents=True)
    (tmp_path / "IP-Adapter" / "models" / "image_encoder" / "config.json").write_text("{}")
    official = tmp_path / "IP-Adapter" / "models" / "image_encoder"
    assert find_image_encoder(tmp_path / "IP-Adapter" / "models" / "ip-adapter_sd15.bin") == official
    assert find_image_encoder(tmp_path / "IP-Adapter" / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.bin") == official
    assert find_image_encoder(tmp_path / "IP-Adapter" / "ip-adapter_sd15.bin") == official


def test_guidance_must_be_finite_for_python_callers_too(sd15_pipe, adapter_file, prompt_images):
    ip = load(sd15_pipe, adapter_file("sd15", "global"))
    try:
        for bad in (float("nan"), float("inf")):
            with pytest.raises(IPAdapterError, match=f"guidance_scale={bad}: must be a finite number"):
                ip.generate(images=[prompt_images[0]], seed=0, **{**GEN, "guidance_scale": bad})
        with pytest.raises(IPAdapterError, match="num_images=0: must be between 1 and 64"):
            ip.generate(images=[prompt_images[0]], seed=0, num_images=0, **GEN)
        with pytest.raises(IPAdapterError, match="num_inference_steps=5000: must be between 1 and 1000"):
            ip.generate(images=[prompt_images[0]], seed=0, **{**GEN, "num_inference_steps": 5000})
    finally:
        ip.detach()


def test_a_size_far_from_the_native_one_is_noted(sd15_pipe, adapter_file, prompt_images):
    from ipadapter.core.errors import IPAdapterNote

    ip = load(sd15_pipe, adapter_file("sd15", "global"))
    native = ip.output_size()
    try:
        with pytest.warns(IPAdapterNote, match=f"far from this model's native {native[0]}x{native[1]}"):
            ip.generate(images=[prompt_images[0]], seed=0, **{**GEN, "width": native[0] * 3, "height": native[1],
                                                               "num_inference_steps": 1})
    finally:
        ip.detach()


def test_load_finds_a_bare_adapter_name_in_the_pipelines_model_folder(tmp_path, monkeypatch):
    import ipadapter

    model, _ = ipadapter.embedded_model()
    monkeypatch.chdir(tmp_path)  # no such file here
    pipe = ipadapter.load_pipeline(model)
    ip = ipadapter.load(pipe, "ip-adapter_plus.safetensors")  # as the CLI, eval and the page resolve it
    try:
        assert ip.adapters[0].config.kind == "plus"
    finally:
        ip.detach()
    with pytest.raises(IPAdapterError, match="no-such.safetensors: no such checkpoint file"):
        ipadapter.load(pipe, "no-such.safetensors")


def test_an_offline_machine_fails_fast_and_names_hf_download(monkeypatch):
    import socket

    import diffusers
    from huggingface_hub import constants

    from ipadapter.generation.pipeline import load_pipeline

    calls, timeouts = [], []

    def from_pretrained(model_id, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise OSError("not cached" if local_files_only else "network timeout after a long wait")

    def connect(address, timeout=None, *args, **kwargs):
        timeouts.append(timeout)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(IPAdapterError, match=r"hub cannot be reached \(no connection to .*:443.*hf download "
                                             r"someone/not-cached"):
        load_pipeline("someone/not-cached")
    assert calls == [True]  # the cache only: no download attempt waiting on network timeouts
    assert timeouts and all(t is not None and t <= 3 for t in timeouts)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    timeouts.clear()
    with pytest.raises(IPAdapterError, match="HF_HUB_OFFLINE is set"):
        load_pipeline("someone/not-cached")
    assert timeouts == []


def test_a_hub_that_does_not_answer_is_given_up_on_after_the_timeout(monkeypatch):
    import socket
    import threading
    import time

    from huggingface_hub import constants

    from ipadapter.generation.pipeline import hub_unreachable

    release = threading.Event()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    def hang(*args, **kwargs):  # a name lookup that hangs, then fails
        release.wait(30)
        raise OSError(110, "Connection timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    started = time.monotonic()
    try:
        assert hub_unreachable(timeout=0.2) == "no answer from huggingface.co:443 within 0.2 s"
        assert time.monotonic() - started < 5
    finally:
        release.set()
