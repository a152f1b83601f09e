"""Generation controls end to end: parity with diffusers' built-in IP-Adapter where it has the feature,
exact behaviour on tiny random models where it has not, the world model where it is installed, and the CLI.

diffusers' own IP-Adapter (load_ip_adapter / set_ip_adapter_scale / ip_adapter_image) is the oracle here only.
Tiny pipelines: 32x32 images, 2-3 DDIM steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ipadapter
from ipadapter import testing
from ipadapter.cli import build_parser, main
from ipadapter.core.errors import IPAdapterError
from ipadapter.generation.controls import IPAdapterNote

SIZE = 32
COMMON = dict(prompt="a cat", num_inference_steps=3, guidance_scale=7.5, width=SIZE, height=SIZE, output_type="np")


def noise(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def u8(x) -> np.ndarray:
    return (np.clip(np.asarray(x), 0, 1) * 255).round().astype(np.uint8)


def gens(seed: int, n: int = 1):
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


def tiny_controlnet(shape: str):
    from diffusers import ControlNetModel

    torch.manual_seed(9)
    # the tiny VAE downsamples by 2, so the control embedding does too (one stride-2 conv)
    return ControlNetModel.from_unet(testing.tiny_unet(shape, 32 if shape == "sd15" else 64),
                                     conditioning_embedding_out_channels=(16, 32)).eval()


class Pair:
    """Our pipeline with an adapter and an identical pipeline with diffusers' built-in adapter (the oracle)."""

    def __init__(self, shape: str, folder, kinds=("global",)):
        self.shape = shape
        self.ours, self.ref = testing.tiny_pipeline(shape), testing.tiny_pipeline(shape)
        files = []
        for k, kind in enumerate(kinds):
            adapter = testing.random_adapter(self.ours.unet, kind, encoder=self.ours.image_encoder, seed=k)
            adapter.save(folder / f"{shape}-{kind}-{k}.safetensors")
            files.append(f"{shape}-{kind}-{k}.safetensors")
        self.ref.load_ip_adapter(str(folder), subfolder=[""] * len(files), weight_name=files)
        self.ref.set_progress_bar_config(disable=True)
        self.ip = ipadapter.load(self.ours, [folder / f for f in files])

    def variant(self, name: str, **kwargs):
        import diffusers

        family = "StableDiffusionXL" if self.shape == "sdxl" else "StableDiffusion"
        pipe = getattr(diffusers, f"{family}{name}Pipeline").from_pipe(self.ref, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {shape: Pair(shape, folder) for shape in ("sd15", "sdxl")}


def assert_same_image(ours, ref):
    assert ours.shape == ref.shape
    diff = np.abs(u8(ours).astype(int) - u8(ref).astype(int))
    assert diff.max() == 0, f"{(diff > 0).sum()} uint8 values differ (max {diff.max()})"


# ------------------------------------------------------------------------------------ parity with diffusers
@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_img2img_matches_diffusers(pairs, shape):
    p = pairs[shape]
    prompt_image, init = noise(1), noise(2)
    ours = p.ip.generate(images=[prompt_image], init_image=init, strength=0.7, seed=0, **COMMON)
    p.ref.set_ip_adapter_scale(0.5)  # the default with a text prompt
    common = {k: v for k, v in COMMON.items() if k not in ("width", "height")}
    ref = p.variant("Img2Img")(ip_adapter_image=prompt_image, image=init, strength=0.7, generator=gens(0),
                               **common).images
    assert_same_image(ours, ref)


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_inpainting_matches_diffusers(pairs, shape):
    p = pairs[shape]
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    ours = p.ip.generate(images=[noise(1)], init_image=noise(2), mask_image=mask, strength=0.9, scale=0.8, seed=3,
                         **COMMON)
    p.ref.set_ip_adapter_scale(0.8)
    ref = p.variant("Inpaint")(ip_adapter_image=noise(1), image=noise(2), mask_image=mask, strength=0.9,
                               generator=gens(3), **COMMON).images
    assert_same_image(ours, ref)


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_controlnet_matches_diffusers_and_sees_text_only(pairs, shape):
    p = pairs[shape]
    net = tiny_controlnet(shape)
    seen = []
    hook = net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]),
                                         with_kwargs=True)
    try:
        ours = p.ip.generate(images=[noise(1)], controlnets=[net], control_images=[noise(4)], control_scales=0.8,
                             seed=0, **COMMON)
    finally:
        hook.remove()
    p.ref.set_ip_adapter_scale(0.5)
    ref = p.variant("ControlNet", controlnet=net)(ip_adapter_image=noise(1), image=noise(4),
                                                  controlnet_conditioning_scale=0.8, generator=gens(0),
                                                  **COMMON).images
    assert_same_image(ours, ref)
    text_tokens = p.ours.tokenizer.model_max_length
    assert seen and set(seen) == {text_tokens}  # the ControlNet never gets image tokens


def test_two_controlnets_match_diffusers(pairs):
    p = pairs["sd15"]
    nets = [tiny_controlnet("sd15"), tiny_controlnet("sd15")]
    with torch.no_grad():  # make the second one differ
        for param in nets[1].controlnet_cond_embedding.parameters():
            param.mul_(-1.5)
    ours = p.ip.generate(images=[noise(1)], controlnets=nets, control_images=[noise(4), noise(5)],
                         control_scales=[0.6, 1.2], seed=0, **COMMON)
    p.ref.set_ip_adapter_scale(0.5)
    ref = p.variant("ControlNet", controlnet=nets)(ip_adapter_image=noise(1), image=[noise(4), noise(5)],
                                                   controlnet_conditioning_scale=[0.6, 1.2], generator=gens(0),
                                                   **COMMON).images
    assert_same_image(ours, ref)


def test_several_images_concatenated_match_diffusers(pairs):
    p = pairs["sd15"]
    ours = p.ip.generate(images=[noise(1), noise(2), noise(3)], scale=0.9, seed=1, **COMMON)
    p.ref.set_ip_adapter_scale(0.9)
    ref = p.ref(ip_adapter_image=[[noise(1), noise(2), noise(3)]], generator=gens(1), **COMMON).images
    assert_same_image(ours, ref)


@pytest.mark.parametrize("spec", [{"up": {"block_0": [0.0, 1.0, 0.0]}},
                                  {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}])
def test_per_block_dict_scales_match_diffusers_on_sdxl(pairs, spec):
    p = pairs["sdxl"]
    ours = p.ip.generate(images=[noise(1)], scale=1.0, blocks=spec, seed=2, **COMMON)
    p.ref.set_ip_adapter_scale(spec)
    ref = p.ref(ip_adapter_image=noise(1), generator=gens(2), **COMMON).images
    assert_same_image(ours, ref)
    preset = "style" if len(spec) == 1 else "style,composition"  # the InstantStyle presets are these dicts
    assert np.array_equal(p.ip.generate(images=[noise(1)], scale=1.0, blocks=preset, seed=2, **COMMON), ours)


def test_several_adapters_match_diffusers(tmp_path):
    p = Pair("sd15", tmp_path, kinds=("global", "plus"))
    prompts = [ipadapter.ImagePrompt(images=[noise(1)], scale=0.7), ipadapter.ImagePrompt(images=[noise(2)], scale=0.4)]
    ours = p.ip.generate(prompts=prompts, seed=0, **COMMON)
    p.ref.set_ip_adapter_scale([0.7, 0.4])
    ref = p.ref(ip_adapter_image=[noise(1), noise(2)], generator=gens(0), **COMMON).images
    assert_same_image(ours, ref)


# ------------------------------------------------------------------------- behaviour on tiny random models
FIRST_CROSS = {"sd15": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
               "sdxl": "down_blocks.1.attentions.0.transformer_blocks.0.attn2"}


def first_layer_output(p, **kwargs) -> torch.Tensor:
    """The first cross-attention layer's output on the first UNet call: [batch, h, w, C] on its token grid."""
    attn = p.ours.unet.get_submodule(FIRST_CROSS[p.shape])
    seen = []
    hook = attn.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        p.ip.generate(seed=0, **{**COMMON, "num_inference_steps": 1, "output_type": "latent"}, **kwargs)
    finally:
        hook.remove()
    out = seen[0]
    side = int(out.shape[1] ** 0.5)
    return out.view(out.shape[0], side, side, -1)


def half_masks() -> tuple[Image.Image, Image.Image]:
    left = Image.new("L", (SIZE, SIZE), 0)
    left.paste(255, (0, 0, SIZE // 2, SIZE))
    return left, Image.eval(left, lambda v: 255 - v)


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_regional_masks_steer_each_half(pairs, shape):
    p = pairs[shape]
    left, right = half_masks()
    base = first_layer_output(p, images=[noise(1)], scale=0.0)
    only_a = first_layer_output(p, images=[noise(1)])
    only_b = first_layer_output(p, images=[noise(2)])
    masked_a = first_layer_output(p, images=[noise(1)], masks=[left])
    regions = first_layer_output(p, images=[noise(1), noise(2)], masks=[left, right])
    w = base.shape[2]
    # left mask: the right half is the adapter-free model exactly, the left half is steered
    assert torch.equal(masked_a[:, :, w // 2:], base[:, :, w // 2:])
    assert not torch.allclose(masked_a[:, :, : w // 2], base[:, :, : w // 2])
    # image A on the left, image B on the right: each half is that image's alone
    assert torch.allclose(regions[:, :, : w // 2], only_a[:, :, : w // 2], atol=1e-6)
    assert torch.allclose(regions[:, :, w // 2:], only_b[:, :, w // 2:], atol=1e-6)


def test_grayscale_mask_scales_the_image_attention(pairs):
    p = pairs["sd15"]
    grey = Image.new("L", (SIZE, SIZE), 0)
    grey.paste(51, (0, 0, SIZE // 2, SIZE))  # 0.2 on the left
    base = first_layer_output(p, images=[noise(1)], scale=0.0)
    full = first_layer_output(p, images=[noise(1)])
    partial = first_layer_output(p, images=[noise(1)], masks=[grey])
    assert torch.allclose(partial - base, (full - base) * torch.tensor([0.2] * 8 + [0.0] * 8).view(1, 1, 16, 1),
                          atol=1e-5)


def unet_calls(p, **kwargs) -> list[tuple]:
    """(progress, input sample, timestep, text embeddings, output) of every UNet call of a generation."""
    from ipadapter.bases import runtime_of

    calls = []

    def hook(module, args, kw, out):
        calls.append((runtime_of(module).progress, kw.get("sample", args[0] if args else None).clone(),
                      args[1] if len(args) > 1 else kw["timestep"], kw["encoder_hidden_states"].clone(),
                      out[0].detach().clone()))

    handle = p.ours.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        p.ip.generate(seed=0, **{**COMMON, "num_inference_steps": 4, "output_type": "latent"}, **kwargs)
    finally:
        handle.remove()
    return calls


def test_start_leaves_the_steps_before_it_to_the_base_model(pairs):
    p = pairs["sd15"]
    base = unet_calls(p, images=[noise(1)], scale=0.0)
    late = unet_calls(p, images=[noise(1)], start=0.5)
    assert [c[0] < 0.5 for c in late] == [True, True, False, False]
    for (progress, *_, out), (_, *_, out_base) in zip(late, base):
        assert torch.equal(out, out_base) == (progress < 0.5)


def test_end_gives_the_steps_after_it_to_the_base_model(pairs):
    p = pairs["sd15"]
    calls = unet_calls(p, images=[noise(1)], end=0.5)
    p.ip.clear()  # now the plain base model: feed it the same inputs
    with torch.no_grad():
        for progress, sample, t, text, out in calls:
            alone = p.ours.unet(sample, t, encoder_hidden_states=text).sample
            assert torch.equal(alone, out) == (progress > 0.5)


def test_negative_image_changes_the_unconditional_branch_only(pairs):
    p = pairs["sd15"]
    plain = unet_calls(p, images=[noise(1)])[0][-1]
    negative = unet_calls(p, images=[noise(1)], negative_images=[noise(3)])[0][-1]
    uncond, cond = 0, 1  # the UNet batch is [unconditional; conditional]
    assert torch.equal(negative[cond], plain[cond])
    assert not torch.allclose(negative[uncond], plain[uncond])


def test_weight_counts_an_image_as_if_given_that_many_times(pairs):
    p = pairs["sd15"]
    weighted = p.ip.generate(images=[noise(1), noise(2)], weights=[2.0, 1.0], seed=0, **COMMON)
    repeated = p.ip.generate(images=[noise(1), noise(1), noise(2)], seed=0, **COMMON)
    alone = p.ip.generate(images=[noise(1)], seed=0, **COMMON)
    dropped = p.ip.generate(images=[noise(1), noise(2)], weights=[1.0, 0.0], seed=0, **COMMON)
    assert np.allclose(weighted, repeated, atol=1e-5)
    assert np.allclose(dropped, alone, atol=1e-5)
    assert not np.allclose(weighted, p.ip.generate(images=[noise(1), noise(2)], seed=0, **COMMON), atol=1e-4)


def test_average_modes_are_means_of_the_embeddings(pairs):
    p = pairs["sd15"]
    images = [noise(1), noise(2)]
    cond, uncond = p.ip.features(p.ip.adapters[0], ipadapter.ImagePrompt(images=images))
    e = torch.cat([cond.image_embeds[:1] * 3, cond.image_embeds[1:]]).double()
    mean = (e / e.norm(dim=0, keepdim=True)).mean(0, keepdim=True).float()  # ComfyUI's norm average
    by_hand = p.ip.generate(embeds=(uncond.image_embeds[:1], mean), seed=0, **COMMON)
    norm = p.ip.generate(images=images, weights=[3.0, 1.0], combine="norm-average", seed=0, **COMMON)
    assert np.allclose(norm, by_hand, atol=1e-6)
    first = p.ip.generate(images=images, weights=[2.0, 0.0], combine="average", seed=0, **COMMON)
    # the encoder sees a batch of two there and one here: equal up to batch-size rounding
    assert np.allclose(first, p.ip.generate(images=images[:1], seed=0, **COMMON), atol=1e-5)


def test_seeds_per_image(pairs):
    p = pairs["sd15"]
    batch = p.ip.generate(images=[noise(1)], seed=5, num_images=3, **COMMON)
    second = p.ip.generate(images=[noise(1)], seed=6, **COMMON)
    listed = p.ip.generate(images=[noise(1)], seed=[9, 6], num_images=2, **COMMON)
    assert batch.shape[0] == 3
    assert np.allclose(batch[1], second[0], atol=1e-5) and np.allclose(listed[1], second[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


def test_precomputed_embeddings_give_the_same_image(pairs, tmp_path):
    from ipadapter.generation.controls import save_embeds

    p = pairs["sd15"]
    cond, uncond = p.ip.embed([noise(1), noise(2)], negative_images=[noise(3)])
    path = save_embeds(tmp_path / "e.safetensors", cond, uncond)
    from_file = p.ip.generate(embeds=path, weights=[1.0, 2.0], seed=0, **COMMON)
    from_images = p.ip.generate(images=[noise(1), noise(2)], negative_images=[noise(3)], weights=[1.0, 2.0], seed=0,
                                **COMMON)
    assert np.array_equal(from_file, from_images)


def test_direct_pipe_use_with_controls(pairs):
    p = pairs["sd15"]
    left, _ = half_masks()
    via_generate = p.ip.generate(images=[noise(1)], masks=[left], start=0.2, blocks="style", seed=0, **COMMON)
    p.ip.set_images(prompt=ipadapter.ImagePrompt(images=[noise(1)], scale=0.5, masks=[left], start=0.2,
                                                 blocks="style"))
    try:
        direct = p.ours(generator=gens(0), **COMMON).images
    finally:
        p.ip.clear()
    assert np.array_equal(direct, via_generate)
    assert not np.array_equal(p.ours(generator=gens(0), **COMMON).images, direct)  # clear() forgets them all


def test_python_bad_input_is_one_clear_error_and_leaves_nothing_set(pairs):
    p = pairs["sd15"]
    state = p.ip.adapters[0].state
    for kwargs, fragment in [
        (dict(images=[noise(1), noise(2)], weights=[1.0]), "1 weights"),  # Python names (the CLI: flags)
        (dict(images=[noise(1), noise(2)], masks=[half_masks()[0]]), "1 masks for 2 image"),
        (dict(images=[noise(1)], combine="average", masks=list(half_masks())), "2 masks for 1 image"),
        (dict(images=[noise(1)], controlnets=[tiny_controlnet("sd15")]), "1 controlnets for 0 control_images"),
        (dict(images=[noise(1)], mask_image=noise(2)), "mask_image needs init_image"),
        (dict(images=[noise(1)], start=0.7, end=0.2), "start 0.7 must be below end 0.2"),
        (dict(images=[noise(1)], blocks="up_blocks.0"), "blocks 'up_blocks.0'"),
        (dict(images=[noise(1)], seed=[1, 2], num_images=3), "2 seed"),
    ]:
        with pytest.raises(IPAdapterError, match=fragment):
            p.ip.generate(**kwargs, **COMMON)
        assert not state.active and state.masks is None and state.schedule is None and not state.layer_scales


def test_side_images_of_another_size_are_resized_with_a_note(pairs):
    p = pairs["sd15"]
    with pytest.warns(IPAdapterNote) as notes:
        out = p.ip.generate(images=[noise(1)], init_image=noise(2, 48), mask_image=Image.new("L", (20, 20), 255),
                            **COMMON)
    assert out.shape[1:3] == (SIZE, SIZE)
    text = " | ".join(str(n.message) for n in notes)
    assert "init_image image: 48x48 resized to 32x32" in text and "mask_image image: 20x20" in text  # Python names


# ------------------------------------------------------------------------------------------ the world model
def world(name: str | None = None):
    """The embedded world model with its default adapter, or the adapter file ``name`` in its folder."""
    try:
        model, adapter = ipadapter.embedded_model()
    except IPAdapterError:
        pytest.skip("the embedded world model is not installed yet")
    pipe = ipadapter.load_pipeline(model)
    return pipe, ipadapter.load(pipe, model / name if name else adapter)


def shape_image(colour: str, shape: str, size: int = 64) -> Image.Image:
    from ipadapter.world.shapes import PALETTE

    img = Image.new("RGB", (size, size), PALETTE["white"])
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=PALETTE[colour])
    return img


def colour_fraction(images, colour: str, region=slice(None)) -> float:
    from ipadapter.world.parse import nearest_colour

    hits = total = 0
    for image in images:
        arr = np.asarray(image)[:, region].reshape(-1, 3)
        hits += sum(nearest_colour(px) == colour for px in arr[::3])
        total += len(arr[::3])
    return hits / total


WORLD = dict(num_inference_steps=25, guidance_scale=5.0, output_type="pil")


def test_world_regions_red_left_blue_right():
    # the paper's recipe: the default (fine-tuned on contradicting pairs) blends the two masked images into one
    # shape with no red pixel left (magenta, blue, cyan); the world draws one shape per image, so this test of the
    # masks reads red pixels, which only the paper's adapter leaves here
    pipe, ip = world("ip-adapter_global.safetensors")
    left, right = (m.resize((64, 64)) for m in half_masks())
    out = ip.generate(images=[shape_image("red", "circle"), shape_image("blue", "square")], masks=[left, right],
                      seed=0, num_images=4, **WORLD)
    half = out[0].width // 2
    assert colour_fraction(out, "red", slice(0, half)) > colour_fraction(out, "red", slice(half, None))
    assert colour_fraction(out, "blue", slice(half, None)) > colour_fraction(out, "blue", slice(0, half))


def test_world_late_start_changes_less():
    pipe, ip = world()

    def run(**kw):  # 8 samples: with 4, one odd layout can outweigh the rest
        return np.stack([np.asarray(i, dtype=np.float32) for i in ip.generate(seed=0, num_images=8, **WORLD, **kw)])

    image = [shape_image("green", "square")]
    base, full, late = run(images=image, scale=0.0), run(images=image), run(images=image, start=0.5)
    assert np.abs(late - base).mean() < np.abs(full - base).mean()


def test_world_negative_image_pushes_its_colour_out():
    # the paper's recipe: a solid red negative takes every red pixel out (seeds 0 and 4: 25% / 23% red -> 0%). The
    # default, fine-tuned on contradicting pairs, barely follows a negative image here (the 4-token one: 25% -> 24%,
    # 26% -> 24%; the 16-token one of issue 15's sixth round: 24% -> 26%, 26% -> 27%; the 32-token one of
    # the seventh: 25% -> 26%, 28% -> 28%), so this test of the control
    # reads the paper's adapter, as the regions test above does
    pipe, ip = world("ip-adapter_global.safetensors")
    image = [shape_image("red", "circle")]
    red = Image.new("RGB", (64, 64), (220, 40, 40))
    plain = colour_fraction(ip.generate(images=image, seed=0, num_images=4, **WORLD), "red")
    pushed = colour_fraction(ip.generate(images=image, negative_images=[red], seed=0, num_images=4, **WORLD), "red")
    assert plain > 0.02, "a red circle as the prompt image should give red pixels"
    assert pushed < plain / 2


# ------------------------------------------------------------------------------------------------------ CLI
def test_group_grammar():
    args = build_parser().parse_args([
        "generate", "--image", "a.png", "--adapter", "x.safetensors", "--image", "b.png", "--image-weight", "1",
        "--image-weight", "2", "--scale", "0.5", "--blocks", "style", "--adapter", "y.safetensors", "--image", "c.png",
        "--start", "0.3", "--controlnet", "cn1", "--control-image", "e.png", "--controlnet", "cn2",
        "--control-scale", "0.5", "--control-image", "f.png", "-o", "out.png",
    ])
    first, second = args.adapter_groups
    assert first["adapter"] == "x.safetensors" and first["images"] == ["a.png", "b.png"]
    assert first["weights"] == [1.0, 2.0] and first["scale"] == 0.5 and first["blocks"] == "style"
    assert second["adapter"] == "y.safetensors" and second["images"] == ["c.png"] and second["start"] == 0.3
    assert "scale" not in second
    assert [(c["dir"], c["image"], c.get("scale")) for c in args.controlnet_groups] == [
        ("cn1", "e.png", None), ("cn2", "f.png", 0.5)]


def test_group_grammar_refuses_a_flag_twice_in_one_group(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--adapter", "x", "--scale", "1", "--scale", "2", "-o", "o.png"])
    assert e.value.code == 2
    assert "--scale given twice for --adapter 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pipe = testing.tiny_pipeline("sd15", folder=root / "model")
    testing.random_adapter(pipe.unet, "global", encoder=pipe.image_encoder).save(root / "global.safetensors")
    testing.random_adapter(pipe.unet, "plus", encoder=pipe.image_encoder, seed=1).save(root / "plus.safetensors")
    tiny_controlnet("sd15").save_pretrained(str(root / "cn"))
    for k in range(4):
        noise(k).save(root / f"img{k}.png")
    left, right = half_masks()
    left.save(root / "left.png")
    right.resize((48, 48)).save(root / "right48.png")
    noise(7, 40).save(root / "init40.png")
    return root


def run_cli(root, *argv) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", "--model", str(root / "model"), "--steps", "2", "--width", "32", "--height", "32",
                     *argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_several_adapters_regions_controlnet_img2img_equal_python(cli_model):
    r = cli_model
    code, out, err = run_cli(
        r, "--adapter", str(r / "global.safetensors"), "--image", str(r / "img1.png"), "--image-mask",
        str(r / "left.png"), "--image", str(r / "img2.png"), "--image-mask", str(r / "right48.png"), "--scale", "0.8",
        "--adapter", str(r / "plus.safetensors"), "--image", str(r / "img3.png"), "--blocks", "style", "--start", "0.2",
        "--curve", "linear", "--controlnet", str(r / "cn"), "--control-image", str(r / "img0.png"), "--control-scale",
        "0.7", "--init-image", str(r / "init40.png"), "--strength", "0.9", "--prompt", "a cat", "--seed", "3",
        "-o", str(r / "cli.png"),
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert any("right48.png: 48x48 resized to 32x32" in n for n in notes)
    assert any("init40.png: 40x40 resized to 32x32" in n for n in notes)
    pipe = ipadapter.load_pipeline(r / "model")
    ip = ipadapter.load(pipe, [r / "global.safetensors", r / "plus.safetensors"])
    prompts = [ipadapter.ImagePrompt(images=[r / "img1.png", r / "img2.png"], scale=0.8,
                                     masks=[r / "left.png", r / "right48.png"]),
               ipadapter.ImagePrompt(images=[r / "img3.png"], scale=0.5, blocks="style", start=0.2, curve="linear")]
    with pytest.warns(IPAdapterNote):
        python = ip.generate(prompts=prompts, prompt="a cat", num_inference_steps=2, width=32, height=32, seed=3,
                             controlnets=[r / "cn"], control_images=[r / "img0.png"], control_scales=[0.7],
                             init_image=r / "init40.png", strength=0.9)[0]
    assert np.array_equal(np.asarray(Image.open(r / "cli.png")), np.asarray(python))
    text = Image.open(r / "cli.png").text["parameters"]
    assert "plus.safetensors" in text and "blocks: style" in text
    assert f"ControlNet: {r / 'cn'}, control image" in text


def test_cli_on_sdxl_equals_python(tmp_path):
    pipe = testing.tiny_pipeline("sdxl", folder=tmp_path / "model")
    testing.random_adapter(pipe.unet, "global", encoder=pipe.image_encoder).save(tmp_path / "a.safetensors")
    noise(1).save(tmp_path / "p.png")
    noise(2).save(tmp_path / "n.png")
    noise(3).save(tmp_path / "init.png")
    code, _, err = run_cli(tmp_path, "--adapter", str(tmp_path / "a.safetensors"), "--image", str(tmp_path / "p.png"),
                           "--negative-image", str(tmp_path / "n.png"), "--blocks", "style,composition=0.5",
                           "--end", "0.8", "--init-image", str(tmp_path / "init.png"), "--strength", "0.9",
                           "--num-images", "2",
                           "--seed", "4", "-o", str(tmp_path / "out.png"))
    assert code == 0, err
    ip = ipadapter.load(ipadapter.load_pipeline(tmp_path / "model"), tmp_path / "a.safetensors")
    python = ip.generate(images=[tmp_path / "p.png"], negative_images=[tmp_path / "n.png"], scale=1.0,
                         blocks="style,composition=0.5", end=0.8, init_image=tmp_path / "init.png", strength=0.9,
                         num_images=2, seed=4, num_inference_steps=2, width=32, height=32)
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"out-{k}.png")), np.asarray(python[k]))
    assert "Seed: 5" in Image.open(tmp_path / "out-1.png").text["parameters"]


def test_cli_embed_then_generate_without_an_image_encoder(cli_model, monkeypatch):
    r = cli_model
    code, _, err = run_cli(r, "--adapter", str(r / "global.safetensors"), "--image", str(r / "img1.png"),
                           "--negative-image", str(r / "img2.png"), "-o", str(r / "from-image.png"))
    assert code == 0, err
    assert main(["embed", "--model", str(r / "model"), "--adapter", str(r / "global.safetensors"), "--image",
                 str(r / "img1.png"), "--negative-image", str(r / "img2.png"), "-o", str(r / "e.safetensors")]) == 0
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("an image encoder was loaded")

    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "from_pretrained", refuse)
    code, _, err = run_cli(r, "--adapter", str(r / "global.safetensors"), "--embeds", str(r / "e.safetensors"),
                           "-o", str(r / "from-embeds.png"))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(r / "from-image.png")), np.asarray(Image.open(r / "from-embeds.png")))


@pytest.mark.parametrize("argv, fragment", [
    (["--image", "{r}/img1.png", "--image", "{r}/img2.png", "--image-weight", "1"],
     "1 --image-weight for 2 --image"),
    (["--image", "{r}/img1.png", "--image", "{r}/img2.png", "--image-mask", "{r}/left.png"],
     "1 --image-mask for 2 --image"),
    (["--image", "{r}/img1.png", "--negative-image", "{r}/img2.png", "--negative-image", "{r}/img3.png",
      "--negative-image", "{r}/img0.png", "--image", "{r}/img2.png"], "3 --negative-image for 2 --image"),
    (["--image", "{r}/img1.png", "--controlnet", "{r}/cn"], "no --control-image after it"),
    (["--image", "{r}/img1.png", "--controlnet", "{r}/img0.png", "--control-image", "{r}/img1.png"],
     "not a ControlNet folder"),
    (["--image", "{r}/img1.png", "--inpaint-mask", "{r}/left.png"], "--inpaint-mask needs --init-image"),
    (["--image", "{r}/img1.png", "--init-image", "{r}/img2.png", "--strength", "0.3"], "leaves no denoising step"),
    (["--image", "{r}/img1.png", "--start", "0.6", "--end", "0.4"], "--start 0.6 must be below --end 0.4"),
    (["--image", "{r}/img1.png", "--blocks", "down_blocks.3"], "--blocks 'down_blocks.3'"),
    (["--image", "{r}/img1.png", "--num-images", "2", "--seed", "1,2,3"], "3 seeds for --num-images 2"),
    (["--embeds", "{r}/img1.png"], "img1.png"),
    (["--image", "{r}/img1.png", "--embeds", "{r}/e.safetensors"], "--embeds replaces --image"),
    (["--image", "{r}/missing.png"], "missing.png: no such image file"),
])
def test_cli_bad_input_is_one_line_exit_2(cli_model, argv, fragment):
    r = cli_model
    target = r / "bad.png"
    code, out, err = run_cli(r, "--adapter", str(r / "global.safetensors"), *[a.format(r=r) for a in argv],
                             "-o", str(target))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0] and "Traceback" not in err
    assert not target.exists()


def test_cli_embed_bad_input(cli_model, capsys):
    r = cli_model
    assert main(["embed", "--model", str(r / "model"), "--adapter", str(r / "global.safetensors"), "--image",
                 str(r / "img1.png"), "-o", str(r / "e.pt")]) == 2
    assert main(["embed", "--model", str(r / "model"), "--adapter", str(r / "global.safetensors"), "--image",
                 str(r / "img1.png"), "--negative-image", str(r / "img2.png"), "--negative-image",
                 str(r / "img3.png"), "--image", str(r / "img0.png"), "--image", str(r / "img2.png"), "-o",
                 str(r / "e2.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "ending in .safetensors" in err[0] and "2 --negative-image for 3 --image" in err[1]
    assert not (r / "e.pt").exists() and not (r / "e2.safetensors").exists()


def test_world_text_prompt_uses_the_one_default_adapter_and_other_names_still_load(tmp_path, capsys):
    """The embedded model's default adapter serves image + text too: no note points elsewhere; the paper's recipe
    and the half-pairs one stay loadable by name (the measurements are tests/test_world_model.py's)."""
    try:
        model, default = ipadapter.embedded_model()
    except IPAdapterError:
        pytest.skip("the embedded world model is not installed yet")
    assert default.name == "ip-adapter.safetensors"
    image = tmp_path / "p.png"
    shape_image("red", "circle").save(image)
    base = ["generate", "--image", str(image), "--steps", "1"]
    assert main([*base, "--prompt", "on a black background", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*base, "-o", str(tmp_path / "b.png")]) == 0
    for name in ("ip-adapter_global.safetensors", "ip-adapter_pairs.safetensors"):  # found in the model's folder
        if (model / name).is_file():
            assert main([*base, "--prompt", "on a black background", "--adapter", name, "-o",
                         str(tmp_path / "c.png")]) == 0
    assert "note:" not in capsys.readouterr().err
