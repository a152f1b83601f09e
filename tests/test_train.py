"""The trainer: recipe, cache, resume, kinds, SDXL, validation, config and CLI (tiny models, 16 px, few steps)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ipadapter import cli
from ipadapter.bases import attach, new_adapter, unet_layers
from ipadapter.core.checkpoint import read_checkpoint
from ipadapter.core.errors import IPAdapterError
from ipadapter.testing import tiny_image_encoder, tiny_unet
from ipadapter.training.cache import FeatureCache
from ipadapter.training.train import Models, TrainConfig, Trainee, checkpoints, loss_for, step_draws, train
from train_support import config, max_diff, model_dir, weights, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=12)


# ----------------------------------------------------------------------------------------------- the recipe
def _models(unet, prediction_type: str) -> Models:
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    return Models(path=None, unet=unet, sdxl=False, alphas_cumprod=sched.alphas_cumprod.float(),
                  prediction_type=prediction_type, scaling=0.18215, shift=0.0, vae_factor=2,
                  device=torch.device("cpu"), dtype=torch.float32), sched


class _Spy(torch.nn.Module):
    """Stands in for the UNet+adapter: records its inputs and predicts zeros (loss = mean(target^2))."""

    def forward(self, noisy, t, text, image, added=None):
        self.seen = (noisy, t, text, image)
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_targets_the_schedulers_prediction_type(prediction_type):
    m, sched = _models(None, prediction_type)
    cfg = TrainConfig(drop_image=0, drop_text=0, drop_both=0)
    feats = {"latent_mean": torch.randn(4, 4, 8, 8), "latent_std": torch.rand(4, 4, 8, 8) * 0.1,
             "text": torch.randn(4, 7, 32), "image": torch.randn(4, 48)}
    uncond = {"text": torch.zeros(1, 7, 32), "image": torch.zeros(1, 48)}
    d = step_draws(torch.Generator().manual_seed(0), 0, 5, 4, (4, 8, 8), 1000, slice(0, 4))
    spy = _Spy()
    loss = loss_for(spy, m, cfg, feats, uncond, d)
    x0 = (feats["latent_mean"] + feats["latent_std"] * d["vae_eps"]) * 0.18215
    assert torch.allclose(spy.seen[0], sched.add_noise(x0, d["noise"], d["t"]), atol=1e-6)  # diffusers as oracle
    target = d["noise"] if prediction_type == "epsilon" else sched.get_velocity(x0, d["noise"], d["t"])
    assert torch.allclose(loss, target.pow(2).mean(), rtol=1e-5)


def test_one_draw_drops_image_text_or_both_at_five_percent_each():
    m, _ = _models(None, "epsilon")
    n = 8000
    feats = {"latent_mean": torch.zeros(n, 4, 1, 1), "latent_std": torch.zeros(n, 4, 1, 1),
             "text": torch.ones(n, 1, 2), "image": torch.ones(n, 3)}
    uncond = {"text": torch.zeros(1, 1, 2), "image": torch.zeros(1, 3)}
    d = step_draws(torch.Generator().manual_seed(0), 0, 0, n, (4, 1, 1), 1000, slice(0, n))
    spy = _Spy()
    loss_for(spy, m, TrainConfig(), feats, uncond, d)
    text_dropped = spy.seen[2].flatten(1).eq(0).all(1)
    image_dropped = spy.seen[3].eq(0).all(1)
    rates = [float(mask.float().mean()) for mask in
             (image_dropped & ~text_dropped, text_dropped & ~image_dropped, image_dropped & text_dropped)]
    assert all(0.04 < r < 0.06 for r in rates), rates
    assert spy.seen[2].flatten(1).eq(1).all(1).logical_or(text_dropped).all()  # kept rows untouched


def test_only_the_adapter_gets_gradients_and_kv_start_as_text_kv():
    unet = tiny_unet("sd15")
    encoder = tiny_image_encoder()
    adapter = new_adapter(unet, "global", embed_dim=encoder.config.projection_dim)
    for layer in unet_layers(unet):
        if layer.cross_dim is not None:
            attn = unet.get_submodule(layer.name[: -len(".processor")])
            assert torch.equal(adapter.ip_adapter[str(layer.index)].to_k_ip.weight, attn.to_k.weight)
            assert torch.equal(adapter.ip_adapter[str(layer.index)].to_v_ip.weight, attn.to_v.weight)
    unet.requires_grad_(False)
    attach(unet, adapter)
    adapter.requires_grad_(True)
    model = Trainee(unet, adapter)
    m, _ = _models(unet, "epsilon")
    feats = {"latent_mean": torch.randn(2, 4, 8, 8), "latent_std": torch.zeros(2, 4, 8, 8),
             "text": torch.randn(2, 7, 32), "image": torch.randn(2, 48)}
    uncond = {"text": torch.zeros(1, 7, 32), "image": torch.zeros(1, 48)}
    d = step_draws(torch.Generator().manual_seed(0), 0, 1, 2, (4, 8, 8), 1000, slice(0, 2))
    loss_for(model, m, TrainConfig(), feats, uncond, d).backward()
    own = {id(p) for p in adapter.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in unet.parameters() if id(p) not in own)
    grads = [p.grad.clone() for p in adapter.parameters()]

    # gradient checkpointing: same gradients (the image K/V are computed before, outside the checkpointed blocks)
    adapter.zero_grad(set_to_none=True)
    unet.enable_gradient_checkpointing()
    unet.train()
    loss_for(model, m, TrainConfig(), feats, uncond, d).backward()
    for g, p in zip(grads, adapter.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- cache and output
def test_cached_run_matches_uncached_and_writes_the_official_file(dataset, tmp_path):
    plain = train(config(dataset, tmp_path / "plain", max_steps=3))
    cache_dir = tmp_path / "cache"
    cached = train(config(dataset, tmp_path / "cached", max_steps=3, cache=str(cache_dir), cache_shard_size=5))
    assert plain.name == "ip-adapter.safetensors" and cached.is_file()
    assert max_diff(weights(plain), weights(cached)) < 1e-5
    cfg, tensors = read_checkpoint(cached)
    assert cfg.kind == "global" and cfg.num_tokens == 4 and cfg.num_layers == 16
    assert set(tensors) == set(weights(plain))
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in tensors)
    # it trained: the image K/V moved away from the text K/V they started from
    fresh = new_adapter(tiny_unet("sd15"), "global", embed_dim=48)
    assert max_diff(fresh.state_dict(), {k: tensors[k] for k in fresh.state_dict()}) > 1e-5
    # the checkpoint folder holds the same official file
    (step, folder), = checkpoints(tmp_path / "cached")
    assert step == 3 and max_diff(weights(folder / "ip-adapter.safetensors"), weights(cached)) == 0

    # the cache: 3 shards of 5 items; reused, and a missing shard is rebuilt alone
    (sub,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    shards = sorted(sub.glob("shard-*.safetensors"))
    assert len(shards) == 3 and (sub / "meta.json").is_file()
    meta = json.loads((sub / "meta.json").read_text())
    store = FeatureCache(cache_dir, {k: v for k, v in meta.items() if k not in ("version", "num_items", "shard_size")},
                         meta["num_items"], meta["shard_size"])
    assert store.dir == sub
    items = np.array([11, 0, 6, 4])  # across all three shards
    memory = store.open("cpu", in_memory=True).gather(0, items)
    mapped = store.open("cpu", in_memory=False).gather(0, items)
    assert memory.keys() == mapped.keys() and all(torch.equal(memory[k], mapped[k]) for k in memory)
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    again = train(config(dataset, tmp_path / "again", max_steps=3, cache=str(cache_dir), cache_shard_size=5))
    assert max_diff(weights(again), weights(cached)) == 0
    assert shards[1].is_file() and all(p.stat().st_mtime_ns == stamps[p] for p in (shards[0], shards[2]))
    other = train(config(dataset, tmp_path / "other", max_steps=1, cache=str(cache_dir), cache_shard_size=5,
                         random_flip=True))  # other inputs: a second fingerprint folder beside the first
    assert other.is_file() and len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2


def test_resume_reaches_the_weights_of_an_unbroken_run(dataset, tmp_path):
    recipe = dict(max_steps=5, save_every=2, grad_accum=2, warmup_steps=3, ema_decay=0.9, max_grad_norm=0.5,
                  random_flip=True, cache=str(tmp_path / "cache"), lr=1e-3)
    straight = train(config(dataset, tmp_path / "straight", **recipe))
    recipe["max_steps"] = 3
    train(config(dataset, tmp_path / "broken", **recipe))
    assert [s for s, _ in checkpoints(tmp_path / "broken")] == [2, 3]
    recipe["max_steps"] = 5
    resumed = train(config(dataset, tmp_path / "broken", resume=True, **recipe))
    assert max_diff(weights(straight), weights(resumed)) <= 1e-6
    state = torch.load(checkpoints(tmp_path / "broken")[-1][1] / "state.pt", weights_only=True)
    assert state["step"] == 5 and state["batches"] == 10 and len(state["optimizer"]["state"]) > 0
    assert "resumed from" in (tmp_path / "broken" / "train.log").read_text()


@pytest.mark.parametrize("kind", ["plus", "full", "faceid"])
def test_every_kind_trains_to_its_official_layout(kind, tmp_path):
    data = write_dataset(tmp_path / "data", n=6, faces=True)
    extra = {"adapter": {"resampler_depth": 1}} if kind == "plus" else {}
    out = train(config(data, tmp_path / "out", kind=kind, max_steps=2, cache=str(tmp_path / "cache"), **extra))
    cfg, tensors = read_checkpoint(out)
    assert cfg.kind == kind
    assert cfg.num_tokens == {"plus": 16, "full": 17, "faceid": 4}[kind]  # full: 16 patches + CLS
    assert cfg.embed_dim == {"plus": 64, "full": 64, "faceid": 512}[kind]
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_sdxl_buckets_size_and_crop_conditioning(tmp_path):
    data = write_dataset(tmp_path / "data", n=9, aspects=True)
    cache = tmp_path / "cache"
    out = train(config(data, tmp_path / "out", shape="sdxl", max_steps=3, cache=str(cache)))
    cfg, _ = read_checkpoint(out)
    assert cfg.num_layers == 70 and cfg.cross_attention_dim == 64
    from safetensors.torch import load_file

    (shard,) = next(p for p in cache.iterdir() if p.is_dir()).glob("shard-*.safetensors")
    cached = load_file(str(shard))
    shapes = {k.split("@")[1]: tuple(v.shape[-2:]) for k, v in cached.items() if k.startswith("latent_mean")}
    assert len(shapes) == 3  # square, wide and tall images landed in three buckets
    assert any(h > w for h, w in shapes.values()) and any(w > h for h, w in shapes.values())
    time_ids = torch.cat([v.reshape(-1, 6) for k, v in cached.items() if k.startswith("time_ids")])
    originals = {tuple(r[:2].int().tolist()) for r in time_ids}
    assert originals == {(16, 16), (12, 28), (28, 12)}  # the original sizes condition the UNet
    assert "pooled@0" in cached or any(k.startswith("pooled@") for k in cached)


# ---------------------------------------------------------------------------------------- validation, precision
def test_validation_logs_images_and_clip_i(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    images = [str(dataset.parent / "000.png"), str(dataset.parent / "001.png")]
    out = tmp_path / "out"
    train(config(dataset, out, max_steps=2, validate_every=2, validation_images=images, validation_steps=2,
                 tensorboard=True, cache=str(tmp_path / "cache")))
    assert sorted(p.name for p in (out / "validation" / "step-000002").iterdir()) == ["00.png", "01.png"]
    log = (out / "train.log").read_text()
    score = float(log.split("CLIP-I ")[1].split()[0])
    assert -1.0 <= score <= 1.0
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_bf16_keeps_the_adapter_in_fp32(dataset, tmp_path):
    out = train(config(dataset, tmp_path / "out", max_steps=2, mixed_precision="bf16"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights(out).values())


# ---------------------------------------------------------------------------------------- interruption (Ctrl-C)
def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(dataset, tmp_path):
    out = tmp_path / "out"
    fired = threading.Event()

    def interrupt_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "step-000002").is_dir():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        fired.set()

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when started in the background
    threading.Thread(target=interrupt_after_first_checkpoint, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        train(config(dataset, out, max_steps=10_000, save_every=2))
    assert fired.is_set()
    steps = [s for s, _ in checkpoints(out)]
    assert steps[-1] > 2 and steps[-1] < 10_000  # saved where it stopped, not only at the save interval
    assert "interrupted at step" in (out / "train.log").read_text()
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back
    final = train(config(dataset, out, max_steps=steps[-1] + 1, save_every=2, resume=True))
    assert final.is_file()


# ---------------------------------------------------------------------------------------------- config and CLI
def test_config_file_then_flags(tmp_path, dataset):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"_comment": "x", "model": "m", "data": "d", "output": "o", "lr": 3e-4,
                                "batch_size": 4, "adam_betas": [0.9, 0.99]}))
    args = cli.build_parser().parse_args(["train", "--config", str(path), "--batch-size", "2", "--cache", "c",
                                          "--set", "ema_decay=0.99", "--set", "validation_prompt=a cat", "--resume"])
    from ipadapter.cli.train import config_from_args

    cfg = config_from_args(args)
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.cache, cfg.ema_decay, cfg.resume) == ("m", 3e-4, 2, "c", 0.99, True)
    assert cfg.validation_prompt == "a cat" and cfg.adam_betas == (0.9, 0.99)
    path.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(IPAdapterError, match="learning_rate"):
        TrainConfig.from_file(path)
    for bad, match in (({"kind": "faceid-plus"}, "--kind"), ({"batch_size": 0}, "batch_size"),
                       ({"drop_text": 0.7, "drop_image": 0.5}, "drop_"), ({"resolution": 30}, "multiple of 8")):
        with pytest.raises(IPAdapterError, match=match):
            TrainConfig(model="m", data="d", output="o", **bad).check()


def test_cli_train_and_its_errors(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", str(model_dir()), "--data", str(dataset), "--output", str(out),
                   "--max-steps", "2", "--batch-size", "2", "--resolution", "16", "--save-every", "1", "--no-cache",
                   "--set", "tensorboard=false", "--set", "progress=false"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out / "ip-adapter.safetensors")
    assert [s for s, _ in checkpoints(out)] == [1, 2]
    rc = cli.main(["train", "--model", str(tmp_path), "--data", str(dataset), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a diffusers model folder" in err
    from ipadapter import embedded_model
    from ipadapter.cli.train import config_from_args

    args = cli.build_parser().parse_args(["train", "--data", str(dataset), "--output", str(out)])
    assert config_from_args(args).model == str(embedded_model()[0])  # no --model: the embedded model, as generate


def test_prompt_images_reach_the_encoder_in_cached_and_uncached_runs(dataset, tmp_path):
    items = json.loads(dataset.read_text())
    folder = dataset.parent
    same = [{**it, "prompt_image_file": it["image_file"]} for it in items]  # each image its own prompt
    other = [{**it, "prompt_image_file": items[(i + 1) % len(items)]["image_file"]} for i, it in enumerate(items)]
    for name, entries in (("same", same), ("other", other)):
        (folder / f"{name}.json").write_text(json.dumps(entries))
    plain = weights(train(config(dataset, tmp_path / "plain", max_steps=2)))
    own = weights(train(config(folder / "same.json", tmp_path / "same", max_steps=2)))
    assert max_diff(plain, own) == 0  # naming the image itself as the prompt is the paper's recipe
    shifted = train(config(folder / "other.json", tmp_path / "other", max_steps=2))
    assert max_diff(plain, weights(shifted)) > 1e-6  # other prompt images: other image features, other weights
    cached = train(config(folder / "other.json", tmp_path / "cached", max_steps=2, cache=str(tmp_path / "c")))
    assert max_diff(weights(shifted), weights(cached)) < 1e-5
    plain_cached = train(config(dataset, tmp_path / "plain-cached", max_steps=2, cache=str(tmp_path / "c")))
    assert max_diff(plain, weights(plain_cached)) < 1e-5  # a second fingerprint, not the prompt-image features
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 2


# ------------------------------------------------------------------------------------------- image encoder
def test_an_encoder_of_another_size_than_the_models_feature_extractor_trains_as_generate_reads_it(dataset, tmp_path,
                                                                                                  capsys):
    """--image-encoder DIR (224 px, no preprocessor config) on a model whose feature_extractor/ is 32 px: training
    preprocesses as generation does (core.encoders.encoder_processor), so it trains instead of crashing."""
    from ipadapter.core.encoders import ImageEncoder, encoder_processor
    from ipadapter.training.train import clip_processor

    encoder_dir = tmp_path / "encoder224"
    tiny_image_encoder(image_size=224, patch=32).save_pretrained(str(encoder_dir))
    cfg = config(dataset, tmp_path / "out", image_encoder=str(encoder_dir), max_steps=1, kind="plus")
    fallback = ImageEncoder.from_pretrained(model_dir() / "image_encoder").processor  # the model's 32 px one
    assert fallback.crop_size["height"] == 32
    assert encoder_processor(encoder_dir, fallback=fallback).crop_size["height"] == 224  # what generate uses
    assert clip_processor(cfg, _models_of(cfg)).crop_size["height"] == 224
    rc = cli.main(["train", "--model", cfg.model, "--data", cfg.data, "--output", cfg.output, "--kind", "plus",
                   "--image-encoder", str(encoder_dir), "--max-steps", "1", "--batch-size", "2", "--resolution", "16",
                   "--no-cache", "--set", "progress=false", "--set", "tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    assert read_checkpoint(tmp_path / "out" / "ip-adapter.safetensors")[0].embed_dim == 64


def _models_of(cfg: TrainConfig):
    from ipadapter.training.train import load_models

    return load_models(cfg, torch.device("cpu"), torch.float32)


def test_init_adapter_fine_tunes_a_file_and_refuses_one_that_does_not_fit(dataset, tmp_path):
    """init_adapter: the run starts from the file's weights (two 2-step runs = one 4-step run's start, not a new
    adapter's); a file of another kind is one clear error."""
    first = train(config(dataset, tmp_path / "a", max_steps=2, lr=1e-3))
    fresh = train(config(dataset, tmp_path / "b", max_steps=2, lr=1e-3))
    tuned = train(config(dataset, tmp_path / "c", max_steps=2, lr=1e-3, init_adapter=str(first)))
    assert max_diff(weights(first), weights(fresh)) == 0  # seeded: the same new adapter, the same steps
    assert max_diff(weights(tuned), weights(first)) > 0
    assert max_diff(weights(tuned), weights(first)) < max_diff(weights(tuned), weights(new_start(dataset, tmp_path)))
    plus = train(config(dataset, tmp_path / "p", kind="plus", max_steps=1))
    with pytest.raises(IPAdapterError, match="do not fit a new global adapter"):
        train(config(dataset, tmp_path / "d", max_steps=1, init_adapter=str(plus)))


def test_projection_lr_moves_the_image_projection_at_its_own_rate(dataset, tmp_path):
    """projection_lr: the image projection (image_proj.*) gets its own learning rate, the K/V layers keep lr.
    One step from the same seed: with projection_lr ~0 the projection stays where a new adapter starts while the
    K/V take the very step of a plain run; a bad value is one clear error."""
    plain = weights(train(config(dataset, tmp_path / "a", max_steps=1, lr=1e-3, warmup_steps=0)))
    held = weights(train(config(dataset, tmp_path / "b", max_steps=1, lr=1e-3, warmup_steps=0, projection_lr=1e-12)))
    start = weights(new_start(dataset, tmp_path))
    part = lambda w, prefix: {k: v for k, v in w.items() if k.startswith(prefix)}  # noqa: E731
    assert max_diff(part(held, "ip_adapter."), part(plain, "ip_adapter.")) < 1e-7
    assert max_diff(part(held, "image_proj."), part(start, "image_proj.")) < 1e-7
    assert max_diff(part(plain, "image_proj."), part(start, "image_proj.")) > 1e-5
    with pytest.raises(IPAdapterError, match="projection_lr = -1"):
        TrainConfig(data=str(dataset), model="m", output=str(tmp_path / "c"), projection_lr=-1).check()


@pytest.mark.parametrize("kind, cached", [("plus", False), ("plus", True), ("full", False)])
def test_projection_pretrain_fits_a_new_resampler_to_the_encoders_embedding(dataset, tmp_path, kind, cached):
    """projection_pretrain: before the first step a new plus (or full) adapter's projection learns to predict the
    encoder's projected embedding from the patch states (the logged cosine distance falls by more than half), with
    or without the feature cache; it touches only the projection (one later step at lr ~0 leaves the K/V as a new
    adapter's); settings that do not fit are one clear error each."""
    cache = {"cache": str(tmp_path / "cache")} if cached else {}
    plain = weights(train(config(dataset, tmp_path / "a", kind=kind, max_steps=1, lr=1e-12, warmup_steps=0)))
    out = tmp_path / "b"
    pre = weights(train(config(dataset, out, kind=kind, max_steps=1, lr=1e-12, warmup_steps=0,
                               projection_pretrain=60, **cache)))
    part = lambda w, prefix: {k: v for k, v in w.items() if k.startswith(prefix)}  # noqa: E731
    assert max_diff(part(pre, "ip_adapter."), part(plain, "ip_adapter.")) < 1e-7
    assert max_diff(part(pre, "image_proj."), part(plain, "image_proj.")) > 1e-3
    line = next(x for x in (out / "train.log").read_text().splitlines() if "projection pretrain" in x)
    first, last = (float(v) for v in line.rsplit("embedding ", 1)[1].split(" -> "))
    assert last < 0.5 * first, line
    for bad, match in [({"projection_pretrain": 5}, "not global"),
                       ({"kind": "plus", "projection_pretrain": -1}, "projection_pretrain = -1"),
                       ({"kind": "plus", "projection_pretrain": 5, "init_adapter": str(out / "ip-adapter.safetensors")},
                        "init_adapter already gives one")]:
        with pytest.raises(IPAdapterError, match=match):
            train(config(dataset, tmp_path / "c", max_steps=1, **bad))


def test_projection_pretrain_says_what_it_lacks(dataset, tmp_path):
    """projection_pretrain with an encoder that has no projected embedding (SigLIP), or with no readable prompt
    image, is one clear error, and no adapter file is written."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    enc = tmp_path / "siglip"
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=32, patch_size=8)).save_pretrained(enc)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(enc)
    out = tmp_path / "a"
    with pytest.raises(IPAdapterError, match="has no projected embedding to fit to"):
        train(config(dataset, out, kind="plus", max_steps=1, projection_pretrain=5, image_encoder=str(enc)))
    assert not (out / "ip-adapter.safetensors").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    items = json.loads(dataset.read_text())
    for item in items:
        (broken / item["image_file"]).write_bytes(b"not an image")
    (broken / "data.json").write_text(json.dumps(items))
    out = tmp_path / "b"
    with pytest.raises(IPAdapterError, match="no readable prompt image in --data"):
        train(config(broken / "data.json", out, kind="plus", max_steps=1, projection_pretrain=5, max_bad_fraction=1.0))
    assert not (out / "ip-adapter.safetensors").exists()


def new_start(dataset, tmp_path):
    """The new adapter a run starts from (0 steps is not a run: 1 step at lr ~0)."""
    return train(config(dataset, tmp_path / "zero", max_steps=1, lr=1e-12, warmup_steps=0))
