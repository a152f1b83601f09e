"""Training Flux (XLabs layout) and SD3.5 (InstantX layout) adapters with flow matching: one step's loss against a
hand-written reference step (the flow-matching formula of diffusers' Flux/SD3 training examples, transcribed here;
diffusers' own scheduler and FluxPipeline packing helpers as the oracle), the feature cache, resume, the CLI, and
the written file loading in diffusers' ``load_ip_adapter`` (the oracle, tests only) and in ours."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image

from ipadapter import cli
from ipadapter.bases import attach
from ipadapter.core.checkpoint import read_checkpoint
from ipadapter.core.encoders import Features
from ipadapter.core.errors import IPAdapterError
from ipadapter.training import train as T
from train_support import max_diff, model_dir, transformer_config, transformer_model_dir, weights, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


def _step_inputs(family: str, tmp_path, **overrides):
    """The trainer's models and adapter for ``family``, made features of 2 items, the empty-caption features and
    the draws of global batch 3: what one training step computes its loss from."""
    cfg = transformer_config(family, tmp_path / "data.json", tmp_path / "out", drop_image=0, drop_text=0,
                             drop_both=0, **overrides)
    m = T.load_models(cfg, torch.device("cpu"), torch.float32)
    cfg.kind = m.family.default_kind
    adapter = T.make_adapter(cfg, m.unet)
    with torch.no_grad():  # move the projection off its initialisation so the image path carries weight
        for p in adapter.image_proj.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    attach(m.unet, adapter)
    model = T.Trainee(m.unet, adapter, m.family, m.extra)
    g = torch.Generator().manual_seed(1)
    c = m.unet.config
    text_dim, pooled_dim = c.joint_attention_dim, c.pooled_projection_dim
    image = torch.randn(2, 48, generator=g) if family != "sd3" else torch.randn(2, 17, 48, generator=g)
    feats = {"latent_mean": torch.randn(2, 4, 8, 8, generator=g), "latent_std": torch.rand(2, 4, 8, 8, generator=g),
             "text": torch.randn(2, 12, text_dim, generator=g), "pooled": torch.randn(2, pooled_dim, generator=g),
             "image": image}
    uncond = {"text": torch.zeros(1, 12, text_dim), "pooled": torch.zeros(1, pooled_dim), "image": image[:1] * 0}
    d = T.step_draws(torch.Generator(), 0, 3, 2, (4, 8, 8), m.num_timesteps, slice(0, 2))
    return cfg, m, adapter, model, feats, uncond, d


def _x0(folder, feats, d):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.load_config(str(folder / "vae"))
    return (feats["latent_mean"] + feats["latent_std"] * d["vae_eps"] - vae["shift_factor"]) * vae["scaling_factor"]


def _sigmas(folder, u):
    """diffusers' examples: index = floor(u T) into the scheduler's timesteps; sigma looked up by that timestep."""
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    index = [int((sched.timesteps == t).nonzero()) for t in timesteps]
    return timesteps, sched.sigmas[index].view(-1, 1, 1, 1)


@torch.no_grad()
def _flux_reference(folder, transformer, adapter, feats, d, guidance: float) -> torch.Tensor:
    """One Flux step by hand (diffusers' train_dreambooth_flux.py, transcribed): uniform u, noisy = (1 - s) x0 +
    s n, the 2 x 2-packed latents with their ids, t / 1000, the guidance embedding, target n - x0, MSE."""
    x0, noise = _x0(folder, feats, d), d["noise"]
    timesteps, sigma = _sigmas(folder, d["t_uniform"])
    noisy = (1 - sigma) * x0 + sigma * noise
    b, c, h, w = noisy.shape
    adapter.state.set_tokens(adapter.project(Features(image_embeds=feats["image"])))
    pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
                       guidance=None if guidance is None else torch.full((b,), guidance),
                       pooled_projections=feats["pooled"],
                       encoder_hidden_states=feats["text"], txt_ids=torch.zeros(feats["text"].shape[1], 3),
                       img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                       return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, h * 2, w * 2, 2)  # the tiny VAE downsamples by 2
    return F.mse_loss(pred, noise - x0)


@torch.no_grad()
def _sd3_reference(folder, transformer, feats, d, weighting: str) -> torch.Tensor:
    """One SD3 step by hand (diffusers' train_dreambooth_sd3.py, transcribed, without its x0 preconditioning):
    logit-normal u = sigmoid(n), the scheduler's (shifted) sigma, the raw timestep, the SigLIP features handed to
    the transformer (its time-conditioned resampler runs on this timestep), target n - x0, weighted MSE."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    x0, noise = _x0(folder, feats, d), d["noise"]
    timesteps, sigma = _sigmas(folder, torch.sigmoid(d["t_normal"]))
    noisy = (1 - sigma) * x0 + sigma * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=feats["text"],
                       pooled_projections=feats["pooled"],
                       joint_attention_kwargs={"ip_adapter_image_embeds": feats["image"]}, return_dict=False)[0]
    weight = compute_loss_weighting_for_sd3(weighting, sigma)
    return (weight * (pred - (noise - x0)) ** 2).reshape(2, -1).mean(1).mean()


@pytest.mark.parametrize("model, guidance", [("flux", 3.5), ("flux", 1.0), ("flux-schnell", None)])
def test_flux_step_is_the_flow_matching_reference(tmp_path, model, guidance):
    """FLUX.1-dev-like (guidance-distilled: the guidance embedding gets guidance_scale) and schnell-like (none)."""
    cfg, m, adapter, model, feats, uncond, d = _step_inputs(model, tmp_path, guidance_scale=guidance or 3.5)
    assert m.prediction_type == "flow" and cfg.kind == "global" and adapter.config.flavour == "xlabs"
    loss = T.loss_for(model, m, cfg, feats, uncond, d)
    want = _flux_reference(m.path, m.unet, adapter, feats, d, guidance)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()  # only the adapter learns, and every one of its tensors does
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    own = {id(p) for p in adapter.parameters()}
    assert all(p.grad is None for p in m.unet.parameters() if id(p) not in own)


@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_sd3_step_is_the_flow_matching_reference(tmp_path, weighting):
    cfg, m, adapter, model, feats, uncond, d = _step_inputs("sd3", tmp_path, loss_weighting=weighting)
    assert m.extra["objective"]["timestep_sampling"] == "logit_normal" and cfg.kind == "time-plus"
    loss = T.loss_for(model, m, cfg, feats, uncond, d)
    torch.testing.assert_close(loss, _sd3_reference(m.path, m.unet, feats, d, weighting), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_the_image_tokens_follow_the_timestep_in_sd3_training(tmp_path):
    """The time-conditioned resampler runs on the step's own timestep: the same batch at other timesteps gives
    other image tokens (so the tokens are not made once per batch, as for the other kinds)."""
    cfg, m, adapter, model, feats, uncond, d = _step_inputs("sd3", tmp_path)
    seen = []
    real = m.unet.__dict__["image_proj"]  # StepTokens, installed by attach

    class Spy:
        def __call__(self, embeds, timestep):
            out = real(embeds, timestep)
            seen.append((timestep.clone(), out[0].detach().clone()))
            return out

    m.unet.__dict__["image_proj"] = Spy()
    T.loss_for(model, m, cfg, feats, uncond, d)
    d2 = dict(d, t_normal=d["t_normal"] + 2.0)
    T.loss_for(model, m, cfg, feats, uncond, d2)
    (t1, tok1), (t2, tok2) = seen
    assert not torch.equal(t1, t2) and (tok1 - tok2).abs().max() > 1e-4


@pytest.mark.parametrize("family, t5", [("flux", True), ("sd3", True), ("sd3", False)])
def test_text_conditioning_is_the_pipelines_own(family, t5, tmp_path):
    """What the trainer encodes (and caches) for a caption is what the diffusers pipeline computes for it
    (``encode_prompt``: the oracle); SD3 without T5 gets the pipeline's zeros (``max_sequence_length`` of them)."""
    import json
    import shutil

    from diffusers import DiffusionPipeline

    from ipadapter.bases import family_for_index

    folder = transformer_model_dir(family)
    if not t5:  # the same folder without its T5 (model_index says null, as for SD3 loaded text_encoder_3=None)
        shutil.copytree(folder, tmp_path / "no-t5")
        folder = tmp_path / "no-t5"
        index = json.loads((folder / "model_index.json").read_text())
        index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
        (folder / "model_index.json").write_text(json.dumps(index))
    fam = family_for_index(json.loads((folder / "model_index.json").read_text()))
    extra = dict(fam.load_training_parts(folder, torch.device("cpu")).extra, max_sequence_length=8)
    tokenizers, encoders = fam.load_text_encoders(folder, extra)
    captions = ["a red cat", "two dogs on a hill, at night"]
    ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in tokenizers]
    ours = fam.encode_text(encoders, ids, "cpu", extra)
    skip = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = DiffusionPipeline.from_pretrained(str(folder), vae=None, image_encoder=None, feature_extractor=None, **skip)
    with torch.no_grad():
        if family == "flux":
            text, pooled, _ = pipe.encode_prompt(captions, max_sequence_length=8)
        else:
            text, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                    max_sequence_length=8)
    torch.testing.assert_close(ours["text"], text.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- whole runs
def _losses(output) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", (output / "train.log").read_text())]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cached_run_matches_uncached_and_never_runs_the_encoders(family, dataset, tmp_path, monkeypatch):
    plain = train_run(family, dataset, tmp_path / "plain", max_steps=3)
    cache = tmp_path / "cache"
    cached = train_run(family, dataset, tmp_path / "cached", max_steps=3, cache=str(cache))
    assert np.allclose(_losses(tmp_path / "plain"), _losses(tmp_path / "cached"), rtol=1e-5, atol=0)
    # features encoded in batches of another size round differently in the last bits; Adam turns the rounding
    # noise of a zero gradient into whole steps of the learning rate. XLabs' key biases have exactly such a
    # gradient (a bias on every key shifts every score of a query alike: softmax ignores it), so they are left out.
    a, b = ({k: v for k, v in weights(p).items() if not k.endswith("_k_proj.bias")} for p in (plain, cached))
    assert max_diff(a, b) < 1e-5
    (sub,) = [p for p in cache.iterdir() if p.is_dir()]
    from safetensors.torch import load_file

    shard = load_file(str(next(sub.glob("shard-*.safetensors"))))
    t5 = 8 if family == "flux" else 32 + 8  # Flux: T5 alone; SD3: the CLIP states (32 tokens), then T5
    assert shard["text@0"].shape[1] == t5 and "pooled@0" in shard  # T5 embeddings are in the cache
    # from the complete cache a run needs only the transformer: no VAE, text or image encoder is loaded
    monkeypatch.setattr(T, "load_encoders", _refuse)
    monkeypatch.setattr(T, "load_image_encoder", _refuse)
    again = train_run(family, dataset, tmp_path / "again", max_steps=3, cache=str(cache))
    assert max_diff(weights(again), weights(cached)) == 0
    monkeypatch.undo()
    # another T5 length changes the cached text: a second fingerprint
    train_run(family, dataset, tmp_path / "longer", max_steps=1, cache=str(cache), max_sequence_length=10)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def _refuse(*args, **kwargs):
    raise AssertionError("an encoder was loaded for a run from a complete feature cache")


def train_run(family, data, output, **overrides):
    return T.train(transformer_config(family, data, output, **overrides))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_resume_is_bit_identical_to_an_unbroken_run(family, dataset, tmp_path):
    recipe = dict(max_steps=4, save_every=2, grad_accum=2, warmup_steps=2, ema_decay=0.9, lr=1e-3,
                  cache=str(tmp_path / "cache"), random_flip=True)
    straight = train_run(family, dataset, tmp_path / "straight", **recipe)
    train_run(family, dataset, tmp_path / "broken", **dict(recipe, max_steps=3))
    assert [s for s, _ in T.checkpoints(tmp_path / "broken")] == [2, 3]
    resumed = train_run(family, dataset, tmp_path / "broken", resume=True, **recipe)
    assert max_diff(weights(straight), weights(resumed)) == 0
    assert "resumed from" in (tmp_path / "broken" / "train.log").read_text()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bf16_trains_with_the_adapter_in_fp32(family, dataset, tmp_path):
    out = train_run(family, dataset, tmp_path / "out", max_steps=2, mixed_precision="bf16")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights(out).values())
    assert all(math.isfinite(x) for x in _losses(tmp_path / "out"))


# --------------------------------------------------------------------------------- the file, in diffusers
def _picture():
    return Image.fromarray((np.random.RandomState(3).rand(40, 48, 3) * 255).astype(np.uint8))


def test_flux_writes_the_xlabs_layout_that_diffusers_loads(dataset, tmp_path):
    from ipadapter.generation.pipeline import load
    from ipadapter.testing import tiny_flux_pipeline

    out = train_run("flux", dataset, tmp_path / "out", max_steps=3, lr=1e-3)
    keys = set(weights(out))
    assert {"ip_adapter_proj_model.proj.weight", "ip_adapter_proj_model.norm.weight",
            "double_blocks.1.processor.ip_adapter_double_stream_k_proj.bias"} <= keys
    assert all(k.startswith(("ip_adapter_proj_model.", "double_blocks.")) for k in keys)
    cfg, _ = read_checkpoint(out)
    assert (cfg.flavour, cfg.kind, cfg.num_tokens, cfg.num_layers) == ("xlabs", "global", 4, 2)

    run = dict(prompt="a red cat", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
               output_type="np")
    theirs = tiny_flux_pipeline()  # the same seeds: the weights of the trained model folder
    theirs.load_ip_adapter(str(out.parent), weight_name=out.name, image_encoder_pretrained_model_name_or_path=None)
    images = {}
    for scale in (0.0, 1.0):
        theirs.set_ip_adapter_scale(scale)
        images[scale] = theirs(ip_adapter_image=_picture(), generator=torch.Generator().manual_seed(0), **run).images
    assert np.abs(images[1.0] - images[0.0]).max() > 1e-3  # the trained adapter changes the image
    ours = load(tiny_flux_pipeline(), out)
    mine = ours.generate(images=[_picture()], scale=1.0, seed=0, **{k: v for k, v in run.items()
                                                                       if k != "output_type"})
    assert np.abs(np.asarray(mine[0], np.float32) / 255 - images[1.0][0]).max() <= 2 / 255


def test_sd3_writes_the_instantx_layout_that_diffusers_loads(dataset, tmp_path):
    from ipadapter.generation.pipeline import load
    from ipadapter.testing import tiny_sd3_pipeline

    out = train_run("sd3", dataset, tmp_path / "out", max_steps=3, lr=1e-3)
    keys = set(weights(out))
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)
    assert {"image_proj.time_embedding.linear_1.weight", "ip_adapter.0.norm_ip.linear.weight",
            "ip_adapter.2.to_k_ip.weight"} <= keys
    cfg, _ = read_checkpoint(out)
    assert (cfg.kind, cfg.num_tokens, cfg.num_layers) == ("time-plus", 8, 3)

    run = dict(prompt="a red cat", num_inference_steps=2, height=32, width=32, guidance_scale=1.0,
               max_sequence_length=8)
    theirs = tiny_sd3_pipeline()
    theirs.load_ip_adapter(str(out.parent), weight_name=out.name, image_encoder_folder=None)
    images = {}
    for scale in (0.0, 1.0):
        theirs.set_ip_adapter_scale(scale)
        images[scale] = theirs(ip_adapter_image=_picture(), generator=torch.Generator().manual_seed(0),
                               output_type="np", **run).images
    assert np.abs(images[1.0] - images[0.0]).max() > 1e-3
    ours = load(tiny_sd3_pipeline(), out)
    mine = ours.generate(images=[_picture()], scale=1.0, seed=0, **run)
    assert np.abs(np.asarray(mine[0], np.float32) / 255 - images[1.0][0]).max() <= 2 / 255


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_validation_generates_through_ipadapter(family, dataset, tmp_path):
    images = [str(dataset.parent / "000.png")]
    out = tmp_path / "out"
    validated = train_run(family, dataset, out, max_steps=3, validate_every=1, validation_images=images,
                          validation_steps=2, validation_prompt="a red cat", validation_scale=0.5,
                          cache=str(tmp_path / "cache"))
    assert [p.name for p in (out / "validation" / "step-000002").iterdir()] == ["00.png"]
    score = float((out / "train.log").read_text().split("CLIP-I ")[1].split()[0])
    assert -1.0 <= score <= 1.0
    plain = train_run(family, dataset, tmp_path / "plain", max_steps=3, cache=str(tmp_path / "cache"))
    assert max_diff(weights(validated), weights(plain)) == 0  # validating leaves the training as it was


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_trains_flux_and_refuses_what_does_not_fit(dataset, tmp_path, capsys):
    flux, sd3 = transformer_model_dir("flux"), transformer_model_dir("sd3")
    common = ["--data", str(dataset), "--max-steps", "1", "--batch-size", "2", "--no-cache", "--set",
              "tensorboard=false", "--set", "progress=false", "--set", "max_sequence_length=8"]
    rc = cli.main(["train", "--model", str(flux), "--output", str(tmp_path / "flux"), "--resolution", "16", *common])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "flux" / "ip-adapter.safetensors")
    bad = [([str(flux), "--kind", "plus"], "XLabs layout"),
           ([str(sd3), "--kind", "global"], "time-plus"),
           ([str(model_dir()), "--kind", "time-plus"], "time-plus"),
           ([str(model_dir()), "--set", "timestep_sampling=logit_normal"], "flow-matching"),
           ([str(sd3), "--set", "timestep_sampling=cubic"], "timestep_sampling"),
           ([str(flux), "--image-encoder", str(sd3 / "image_encoder")], "projected embedding")]
    capsys.readouterr()  # building the SD 1.5 folder printed its progress
    for args, match in bad:
        rc = cli.main(["train", "--model", *args, "--output", str(tmp_path / "bad"), *common])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and match in err and "Traceback" not in err, (args, err)


def test_flow_matching_densities_follow_their_formulas():
    """uniform / logit-normal / mode, as diffusers' compute_density_for_timestep_sampling defines them."""
    from ipadapter.bases.base import FlowSchedule, flow_matching

    n = 20000
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler(sched)
    d = T.step_draws(torch.Generator(), 0, 0, n, (1, 1, 1), 1000, slice(0, n))
    x0 = torch.zeros(n, 1, 1, 1)
    for sampling in ("uniform", "logit_normal", "mode"):
        _, t, _, _ = flow_matching(x0, d, schedule, {"timestep_sampling": sampling})
        u = {"uniform": d["t_uniform"], "logit_normal": torch.sigmoid(d["t_normal"]),
             "mode": 1 - d["t_uniform"] - 1.29 * (torch.cos(math.pi * d["t_uniform"] / 2) ** 2 - 1 + d["t_uniform"])}
        assert torch.equal(t, sched.timesteps[(u[sampling] * 1000).long().clamp(0, 999)])
    with pytest.raises(IPAdapterError, match="loss_weighting"):
        T.TrainConfig(model="m", data="d", output="o", loss_weighting="snr").check()


# ---------------------------------------------------------------------------------------------- processes
def _without_key_biases(path):
    return {k: v for k, v in weights(path).items() if not k.endswith("_k_proj.bias")}  # see the cache test


@pytest.mark.slow  # three fresh interpreters (launcher + 2 ranks): ~40 s on 2 cores
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_two_processes_match_one_with_twice_the_batch(family, dataset, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    configs = Path(__file__).resolve().parents[1] / "configs"
    out = tmp_path / "two"
    extra = ["--set", "num_tokens=8", "--set", 'adapter={"resampler_dim": 64, "time_embed_dim": 32}'] \
        if family == "sd3" else []
    cmd = [accelerate, "launch", "--config_file", str(configs / "ddp.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "0", "-m", "ipadapter.cli", "train",
           "--model", str(transformer_model_dir(family)), "--data", str(dataset), "--output", str(out),
           "--max-steps", "2", "--batch-size", "2", "--resolution", "16", "--no-cache", "--set", "tensorboard=false",
           "--set", "log_every=1", "--set", "max_sequence_length=8", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train_run(family, dataset, tmp_path / "one", max_steps=2, batch_size=4)
    assert max_diff(_without_key_biases(out / "ip-adapter.safetensors"), _without_key_biases(one)) < 1e-5
    assert np.allclose(_losses(out), _losses(tmp_path / "one"), rtol=1e-5, atol=0)
    assert "2 process(es)" in (out / "train.log").read_text()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_broken_transformer_folder_is_one_clear_error(family, tmp_path):
    """A folder without a loadable transformer/scheduler: one IPAdapterError naming the folder, no traceback."""
    from ipadapter.bases.flux import FLUX
    from ipadapter.bases.sd3 import SD3
    from ipadapter.core.errors import IPAdapterError

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{not json")
    fam = {"flux": FLUX, "sd3": SD3}[family]
    with pytest.raises(IPAdapterError, match=rf"--model {tmp_path}: cannot load the (Flux|SD3) transformer"):
        fam.load_training_parts(tmp_path, torch.device("cpu"))
