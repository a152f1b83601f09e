"""Precision, offload hooks and torch.compile with adapters attached, against diffusers at the same dtype (CPU).

Tolerances: bf16 keeps 8 mantissa bits, fp16 11; both paths run the same UNet in that dtype and differ only in
the order of a few additions, so the difference is bounded relative to the prediction's scale:
max |ours - diffusers| <= 2e-2 x max |diffusers| (bf16), 2e-3 x (fp16). fp32 parity (1e-4) is in test_pipeline.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import PATCH_AND_GLOBAL, diffusers_ip_adapter, noise_prediction, unet_inputs
from ipadapter.generation.pipeline import ImagePrompt, load
from ipadapter.testing import random_adapter, tiny_pipeline

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
SCALE = 0.7


@pytest.fixture(scope="module")
def fp32_pipe():
    return tiny_pipeline("sd15")


@pytest.fixture(scope="module")
def half_pipes():
    """dtype -> a tiny SD 1.5 pipeline in that dtype (built once; each test leaves it without adapters)."""
    pipes: dict = {}

    def get(dtype):
        if dtype not in pipes:
            pipes[dtype] = tiny_pipeline("sd15").to(dtype=dtype)
        return pipes[dtype]

    return get


def _inputs(pipe, dtype):
    inputs = unet_inputs(pipe)
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def _ours(pipe, path, image, inputs):
    ip = load(pipe, path)
    try:
        ip.set_images(prompt=ImagePrompt(images=[image], scale=SCALE))
        ip.adapters[0].state.cfg = True
        return noise_prediction(pipe, inputs)
    finally:
        ip.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", PATCH_AND_GLOBAL)
def test_half_precision_matches_diffusers_at_the_same_dtype(fp32_pipe, half_pipes, prompt_images, tmp_path, dtype,
                                                            kind):
    path = tmp_path / f"{kind}.safetensors"
    random_adapter(fp32_pipe.unet, kind, encoder=fp32_pipe.image_encoder).save(path)
    pipe = half_pipes(dtype)
    inputs = _inputs(pipe, dtype)
    base = noise_prediction(pipe, inputs)
    ours = _ours(pipe, path, prompt_images[0], inputs)
    with diffusers_ip_adapter(pipe, [path], [SCALE]):
        embeds = pipe.prepare_ip_adapter_image_embeds(prompt_images[0], None, "cpu", 1, True)
        ref = noise_prediction(pipe, inputs, image_embeds=[e.to(dtype) for e in embeds])
    assert ours.dtype == dtype
    assert (ref - base).abs().max() > 1e-2  # the adapter acts
    assert (ours.float() - ref.float()).abs().max() <= TOLERANCE[dtype] * ref.float().abs().max()


def test_the_adapter_and_encoder_follow_the_pipelines_dtype(fp32_pipe, prompt_images, tmp_path):
    path = tmp_path / "global.safetensors"
    random_adapter(fp32_pipe.unet, "global", encoder=fp32_pipe.image_encoder).save(path)
    pipe = tiny_pipeline("sd15", with_image_encoder=False).to(dtype=torch.bfloat16)
    encoder_dir = tmp_path / "encoder"
    fp32_pipe.image_encoder.save_pretrained(str(encoder_dir))
    ip = load(pipe, path, image_encoder=encoder_dir)
    try:
        assert all(p.dtype == torch.bfloat16 for p in ip.adapters[0].parameters())
        assert next(ip.image_encoder.model.parameters()).dtype == torch.bfloat16
        out = ip.generate(images=[prompt_images[0]], num_inference_steps=2, height=32, width=32, seed=0,
                          output_type="np")
        assert out.shape == (1, 32, 32, 3)
    finally:
        ip.detach()


def test_cpu_offload_hooks_give_the_same_prediction(fp32_pipe, prompt_images, tmp_path):
    from accelerate import cpu_offload

    path = tmp_path / "plus.safetensors"
    random_adapter(fp32_pipe.unet, "plus", encoder=fp32_pipe.image_encoder).save(path)
    pipe = tiny_pipeline("sd15")
    inputs = unet_inputs(pipe)
    plain = _ours(pipe, path, prompt_images[0], inputs)
    ip = load(pipe, path)  # attach first, then offload (what enable_model_cpu_offload does to a loaded pipeline)
    try:
        cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
        assert any(p.device.type == "meta" for p in pipe.unet.parameters())  # the weights really are offloaded
        ip.set_images(prompt=ImagePrompt(images=[prompt_images[0]], scale=SCALE))
        ip.adapters[0].state.cfg = True
        offloaded = noise_prediction(pipe, inputs)
    finally:
        ip.detach()
    assert torch.allclose(offloaded, plain, atol=1e-6)


def _counting_backend(count: list):
    """A dynamo backend that runs the traced graph as is and records each graph it is handed (one per compile)."""
    def backend(gm, example_inputs):
        count.append(len(gm.graph.nodes))
        return gm.forward

    return backend


@pytest.mark.parametrize("curve", ["constant", "linear"])
def test_compiled_unet_does_not_recompile_across_steps(prompt_images, curve):
    """The UNet with an adapter attached, compiled, called as in 4 denoising steps (a new timestep each, and with
    a schedule a new adapter weight each): every graph is compiled at the first step and reused after, and the
    output is eager's. (Under a schedule the weight is a 0-d tensor computed in the graph from the timestep: a
    Python float would be a graph constant, compiled again at every step.)"""
    import torch._dynamo

    from ipadapter.bases import attach, detach, runtime_of
    from ipadapter.core.encoders import Features
    from ipadapter.generation import controls
    from ipadapter.testing import tiny_image_encoder, tiny_unet

    unet = tiny_unet("sd15").eval()
    adapter = random_adapter(unet, "global", encoder=tiny_image_encoder())
    attach(unet, adapter)
    runtime_of(unet).cfg_hint = lambda: True
    cond = adapter.project(Features(image_embeds=torch.randn(1, 48)))
    uncond = adapter.project(Features(image_embeds=torch.zeros(1, 48)))
    adapter.state.set_tokens(cond[None], uncond[None])
    adapter.state.scale = 0.8
    if curve != "constant":
        adapter.state.schedule = controls.schedule(0.0, 1.0, curve)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    timesteps = torch.tensor([751, 501, 251, 1])
    with torch.no_grad():
        eager = [unet(x, t, encoder_hidden_states=text, return_dict=False)[0] for t in timesteps]
        torch._dynamo.reset()
        compiled: list = []
        fast = torch.compile(unet, backend=_counting_backend(compiled))
        try:
            outs, counts = [], []
            for t in timesteps:
                outs.append(fast(x, t, encoder_hidden_states=text, return_dict=False)[0])
                counts.append(len(compiled))
        finally:
            torch._dynamo.reset()
            detach(unet)
    assert counts[0] >= 1 and counts == [counts[0]] * 4, f"graphs compiled after each step: {counts}"
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs, eager))
    if curve != "constant":
        assert not torch.allclose(eager[0], eager[-1])  # the weight did change across steps


#: a schedule whose weight changes at every step and is 0 at some (outside start..end)
WINDOW = dict(start=0.0, end=0.6, curve="linear")


def _inductor_backend(count: list):
    """The default backend (inductor), recording each graph it is handed."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        count.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    return backend


def compiled_generation(ip, backend, steps: int = 4, **call) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(eager image, image with ``torch.compile(pipe.<denoiser>, backend=backend(graphs))``, graphs compiled so far
    after each step) for one generation through :meth:`IPAdapter.generate`; the pipeline gets its own denoiser
    back."""
    import torch._dynamo

    compiled: list = []
    pipe, attr = ip.pipe, ip.family.denoiser_attr
    eager = ip.generate(num_inference_steps=steps, seed=0, output_type="np", **call)
    own = getattr(pipe, attr)
    torch._dynamo.reset()
    setattr(pipe, attr, torch.compile(own, backend=backend(compiled)))
    after: list[int] = []

    def count(p, i, t, kw):
        after.append(len(compiled))
        return kw

    try:
        fast = ip.generate(num_inference_steps=steps, seed=0, output_type="np", callback_on_step_end=count, **call)
    finally:
        setattr(pipe, attr, own)
        torch._dynamo.reset()
    return eager, fast, after


def test_compiled_unet_through_generate_reuses_its_graphs(prompt_images, tmp_path):
    """``pipe.unet = torch.compile(pipe.unet)`` after load, a whole generation with a schedule and guidance: the
    graphs of step 1 serve every later step (the per-generation layout caches stay off under compile: filled at
    step 1 they would change the path traced at step 2), and the image is eager's."""
    pipe = tiny_pipeline("sd15")
    path = tmp_path / "plus.safetensors"
    random_adapter(pipe.unet, "plus", encoder=pipe.image_encoder).save(path)
    ip = load(pipe, path)
    eager, fast, after = compiled_generation(ip, _counting_backend, images=[prompt_images[0]], prompt="a cat",
                                             height=32, width=32, **WINDOW)
    assert after[0] >= 1 and after == [after[0]] * len(after), f"graphs compiled after each step: {after}"
    assert np.abs(fast - eager).max() <= 1e-5


@pytest.mark.slow  # inductor compiles C++ kernels with gcc: ~9 min on the shared 2-core machine, seconds on a GPU box
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor's CPU backend needs a C++ compiler (none on PATH)")
def test_inductor_compiled_unet_gives_eagers_image(prompt_images, tmp_path):
    """The default backend (inductor, CPU): a whole generation with a schedule, within 1e-4 of eager's image in
    [0, 1] (inductor fuses and reorders float32 arithmetic; seen: 2e-6), and no graph compiled after step 1."""
    pipe = tiny_pipeline("sd15")
    path = tmp_path / "global.safetensors"
    random_adapter(pipe.unet, "global", encoder=pipe.image_encoder).save(path)
    ip = load(pipe, path)
    eager, fast, after = compiled_generation(ip, _inductor_backend, steps=3, images=[prompt_images[0]],
                                             prompt="a cat", height=32, width=32, **WINDOW)
    assert after[0] >= 1 and after == [after[0]] * len(after), f"graphs compiled after each step: {after}"
    assert np.abs(fast - eager).max() <= 1e-4


def test_compiled_flux_transformer_through_generate_reuses_its_graphs(tmp_path):
    """Flux (XLabs adapter, true CFG: two transformer calls per step, one per branch) under a schedule: no graph
    compiled after step 1, eager's image."""
    from ipadapter.testing import random_flux_adapter, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    random_flux_adapter(pipe.transformer, "xlabs", embed_dim=48).save(tmp_path / "xlabs.safetensors")
    ip = load(pipe, tmp_path / "xlabs.safetensors")
    image = _image()
    eager, fast, after = compiled_generation(ip, _counting_backend, images=[image], prompt="a cat",
                                             negative_prompt="blurry", true_cfg_scale=2.0, height=32, width=32,
                                             max_sequence_length=16, **WINDOW)
    assert after[0] >= 1 and after == [after[0]] * len(after), f"graphs compiled after each step: {after}"
    assert np.abs(fast - eager).max() <= 1e-5


def test_compiled_sd3_transformer_through_generate_reuses_its_graphs(tmp_path):
    """SD3.5 (time-plus adapter: the resampler runs inside the transformer call, once per step) under a
    schedule: no graph compiled after step 1, eager's image."""
    from ipadapter.testing import random_time_plus_adapter, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    random_time_plus_adapter(pipe.transformer, pipe.image_encoder).save(tmp_path / "sd35.safetensors")
    ip = load(pipe, tmp_path / "sd35.safetensors")
    eager, fast, after = compiled_generation(ip, _counting_backend, images=[_image()], prompt="a cat",
                                             guidance_scale=5.0, height=32, width=32, **WINDOW)
    assert after[0] >= 1 and after == [after[0]] * len(after), f"graphs compiled after each step: {after}"
    assert np.abs(fast - eager).max() <= 1e-5


def _image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8))


def _family_pipeline(family: str, folder):
    """(pipeline, adapter file, extra generate arguments) for a tiny model of ``family``."""
    from ipadapter.testing import random_flux_adapter, random_time_plus_adapter, tiny_flux_pipeline, tiny_sd3_pipeline

    path = folder / f"{family}.safetensors"
    if family == "flux":
        pipe = tiny_flux_pipeline()
        random_flux_adapter(pipe.transformer, "xlabs", embed_dim=48).save(path)
        return pipe, path, dict(max_sequence_length=16)
    if family == "sd3":
        pipe = tiny_sd3_pipeline()
        random_time_plus_adapter(pipe.transformer, pipe.image_encoder).save(path)
        return pipe, path, {}
    pipe = tiny_pipeline("sd15")
    random_adapter(pipe.unet, "plus", encoder=pipe.image_encoder).save(path)
    return pipe, path, {}


@pytest.mark.parametrize("order", ["attach-then-offload", "offload-then-attach"])
@pytest.mark.parametrize("family", ["sd15", "flux", "sd3"])
def test_offloaded_denoiser_gives_the_same_image(tmp_path, family, order):
    """accelerate's ``cpu_offload`` on the denoiser (its weights on the meta device, moved in per module at each
    call; what ``enable_sequential_cpu_offload`` does), before or after the adapter is loaded: the generation (with
    a schedule) gives the unhooked image. The adapter, the encoder and the row markers go where the denoiser
    computes, not to the meta device."""
    from accelerate import cpu_offload

    pipe, path, extra = _family_pipeline(family, tmp_path)
    call = dict(images=[_image()], prompt="a cat", num_inference_steps=2, height=32, width=32, seed=0,
                output_type="np", **WINDOW, **extra)
    ip = load(pipe, path)
    plain = ip.generate(**call)
    ip.detach()
    denoiser = pipe.unet if family == "sd15" else pipe.transformer
    if order == "attach-then-offload":
        ip = load(pipe, path)
        cpu_offload(denoiser, execution_device=torch.device("cpu"))
    else:
        cpu_offload(denoiser, execution_device=torch.device("cpu"))
        ip = load(pipe, path)
    assert any(p.device.type == "meta" for p in denoiser.parameters())  # the weights really are offloaded
    assert np.array_equal(ip.generate(**call), plain)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flux_and_sd3_adapters_and_encoders_follow_a_bf16_pipeline(tmp_path, family):
    """A bf16 Flux / SD3 pipeline: the adapter (fp32 file) and the pipeline's image encoder come to bf16, and a
    generation with a schedule runs to a finite image. (bf16 against fp32 is no test of correctness on these tiny
    random models: their bf16 rounding moves the image as much as the adapter does on SD3.)"""
    pipe, path, extra = _family_pipeline(family, tmp_path)
    pipe = pipe.to(dtype=torch.bfloat16)
    ip = load(pipe, path)
    assert {p.dtype for p in ip.adapters[0].parameters()} == {torch.bfloat16}
    assert next(ip.image_encoder.model.parameters()).dtype == torch.bfloat16
    out = ip.generate(images=[_image()], prompt="a cat", num_inference_steps=2, height=32, width=32, seed=0,
                      output_type="np", **WINDOW, **extra)
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
