import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter.world import build as world_build
from ipadapter.world import shapes as world
from ipadapter.world.parse import parse


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_base")
    summary = world_build.build(out, device="cpu", quick=True, seed=0, progress=False)
    return out, summary


def test_word_bpe_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    world_build.make_tokenizer(tmp_path / "src")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "src"), model_max_length=16)
    world_build.check_tokenizer(tok)
    for text in world.all_captions():
        ids = tok(text).input_ids
        assert len(ids) == len(text.split()) + 2 and tok.unk_token_id not in ids[1:-1]


def test_multi_positive_matches():
    img = torch.tensor([[0, 1, 2], [3, 1, 0]])
    cap = torch.tensor([[0, 1, 2], [-1, 1, -1]])  # full caption of image 0; "a green shape"
    m = world_build.matches(img, cap)
    assert m.tolist() == [[True, True], [False, True]]
    e = torch.randn(2, 8)
    loss = world_build.multi_positive_clip_loss(e, e, m, torch.tensor(2.0))
    assert torch.isfinite(loss)


def test_config_overrides():
    cfg = world_build.make_config(quick=True, unet_steps=3)
    assert cfg.unet_steps == 3 and cfg.pool_train == world_build.QUICK["pool_train"]
    with pytest.raises(TypeError):
        world_build.make_config(no_such_parameter=1)


def test_quick_build_loads_and_generates(built):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out, summary = built
    index = json.loads((out / "model_index.json").read_text())
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "feature_extractor"):
        assert comp in index and (out / comp).is_dir()
    assert summary["sizes_mb"]["total"] < 32.0
    assert summary["unet"]["cross_attention_layers"] >= 5
    assert summary["unet_tune"]["steps"] == world_build.QUICK["unet_tune_steps"]  # the partial-caption stage ran
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a black background", num_inference_steps=3, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    enc = CLIPVisionModelWithProjection.from_pretrained(str(out / "image_encoder"))
    proc = CLIPImageProcessor.from_pretrained(str(out / "feature_extractor"))
    im = world.draw(world.samples(1, 5)[0])
    pix = proc(images=im, return_tensors="pt").pixel_values
    assert pix.shape == (1, 3, enc.config.image_size, enc.config.image_size)
    ours = world_build.to_clip(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None])
    assert torch.allclose(pix, ours, atol=1e-4)  # training saw exactly what the processor gives
    assert enc(pixel_values=pix).image_embeds.shape == (1, enc.config.projection_dim)


def test_evaluate_base_reports_fractions(built):
    out, _ = built
    res = world_build.evaluate_base(out, n=2, steps=2, progress=False)
    assert res["n"] == 2 and 0.0 <= res["colour_right"] <= 1.0 and 0.0 <= res["shape_right"] <= 1.0
    assert 0.0 <= res["colour_alone_right"] <= 1.0


def test_tune_base_continues_a_built_folder(built, tmp_path):
    """The optional second UNet stage on a folder built without it: its UNet trained on in place (from the saved
    weights), its settings from the folder's record, which gains the stage's; a second run is a further stage,
    recorded beside the first."""
    import shutil

    from safetensors.torch import load_file

    from ipadapter.core.errors import IPAdapterError

    out, summary = built
    copy = tmp_path / "world"
    shutil.copytree(out, copy)
    record = json.loads((copy / "world_build.json").read_text())
    record.pop("unet_tune")  # as the shipped base's first build wrote it
    (copy / "world_build.json").write_text(json.dumps(record))
    weights = "unet/diffusion_pytorch_model.safetensors"
    before = load_file(copy / weights)
    tuned = world_build.tune_base(copy, 2, eval_samples=0, progress=False)
    after = load_file(copy / weights)
    assert tuned["unet_tune"]["steps"] == 2 and tuned["config"]["pool_train"] == summary["config"]["pool_train"]
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-2  # trained on, not a fresh UNet
    assert json.loads((copy / "world_build.json").read_text())["unet_tune"]["steps"] == 2
    assert not (copy / "_unet_tuned").exists()
    assert "_name_or_path" not in json.loads((copy / "unet" / "config.json").read_text())
    again = world_build.tune_base(copy, 3, seed=1, eval_samples=0, progress=False)
    further = load_file(copy / weights)
    assert any(not torch.equal(after[k], further[k]) for k in after)
    assert again["unet_tune"]["steps"] == 2 and again["config"]["unet_tune_steps"] == 2  # the first, kept
    assert [(s["steps"], s["seed"]) for s in again["unet_tune_more"]] == [(3, 1)]
    assert json.loads((copy / "world_build.json").read_text())["unet_tune_more"][0]["steps"] == 3
    with pytest.raises(IPAdapterError, match="no world_build.json"):
        world_build.tune_base(tmp_path / "nothing", progress=False)


def test_tune_flag_on_a_folder_without_a_build_record_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        world_build._main(["--out", str(tmp_path / "nothing"), "--tune", "2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "no world_build.json" in err


def test_parse_reads_a_decoded_latent_round_trip_shape():
    # the parser accepts what the pipeline returns (PIL) and numpy float output alike
    s = world.samples(1, 9)[0]
    im = world.draw(s)
    assert parse(im) == parse(np.asarray(im, dtype=np.float32) / 255.0)


@pytest.mark.slow
def test_world_build_quick_trains_every_adapter_and_generate_finds_them_by_name(tmp_path, capsys):
    """`ipadapter world build --quick`: base + all adapters through the trainer; `--adapters` retrains one."""
    from ipadapter import cli
    from ipadapter.core.checkpoint import read_checkpoint
    from ipadapter.world.family import ADAPTERS, SD3_ADAPTERS, SD3_SETTINGS, sd3_folder

    out = tmp_path / "family"
    assert cli.main(["world", "build", "--out", str(out), "--quick"]) == 0
    family = json.loads((out / "world_family.json").read_text())
    assert set(family["adapters"]) == set(ADAPTERS)
    for name, (kind, extra, variant) in ADAPTERS.items():
        cfg, _ = read_checkpoint(out / name)
        assert cfg.kind == kind and family["adapters"][name]["data"] == variant
        assert cfg.attention == extra.get("attention", "decoupled")
    before = {n: (out / n).read_bytes() for n in ADAPTERS}
    assert cli.main(["world", "build", "--out", str(out), "--quick", "--skip-base", "--adapter-steps", "2",
                     "--adapters", "ip-adapter_pairs.safetensors"]) == 0
    again = json.loads((out / "world_family.json").read_text())["adapters"]
    assert again["ip-adapter_pairs.safetensors"]["steps"] == 2 and again["ip-adapter_global.safetensors"]["steps"] == 4
    assert (out / "ip-adapter_pairs.safetensors").read_bytes() != before["ip-adapter_pairs.safetensors"]
    assert all((out / n).read_bytes() == before[n] for n in ADAPTERS if n != "ip-adapter_pairs.safetensors")
    # the transformer member beside it: an SD3 folder on the same parts, its time-plus adapters by the same trainer
    sd3 = sd3_folder(out)
    index = json.loads((sd3 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert (sd3 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    sd3_family = json.loads((sd3 / "world_family.json").read_text())["adapters"]
    assert set(sd3_family) == set(SD3_ADAPTERS)
    for name in SD3_ADAPTERS:
        cfg, _ = read_checkpoint(sd3 / name)
        assert cfg.kind == "time-plus" and cfg.encoder == "clip" and cfg.num_tokens == SD3_SETTINGS["num_tokens"]
    capsys.readouterr()
    # an adapter named without a folder is looked up in --model, as diffusers' weight_name
    image = tmp_path / "prompt.png"
    world.draw(world.samples(1, 3)[0]).save(image)
    png = tmp_path / "out.png"
    assert cli.main(["generate", "--model", str(out), "--adapter", "ip-adapter_pairs.safetensors", "--image",
                     str(image), "--steps", "2", "-o", str(png)]) == 0
    assert png.is_file()
    assert cli.main(["generate", "--model", str(sd3), "--adapter", "ip-adapter.safetensors", "--image",
                     str(image), "--prompt", "a circle", "--steps", "2", "-o", str(png)]) == 0
    with pytest.raises(SystemExit) as e:  # a bad flag: argparse's one line, exit 2
        cli.main(["world", "build", "--out", str(out), "--adapters", "ip-adapter_nope.safetensors"])
    assert e.value.code == 2 and "ip-adapter_nope.safetensors" in capsys.readouterr().err


def test_an_adapters_later_runs_continue_it_each_on_its_own_data(built, monkeypatch):
    """family.TRAINING's "then": each run starts from the one before; a {"steps", "data"} run trains on that DATA
    variant (the default's: "contra_image"), a bare count on the adapter's own; a run's other keys are its own
    trainer settings (the default's last run: a cosine learning rate); the record keeps them."""
    import ipadapter.training.train as trainer
    from ipadapter.world import family

    out, _ = built
    runs, real = [], trainer.train

    def spy(cfg):
        items = json.loads(Path(cfg.data).read_text())
        runs.append((cfg.max_steps, sum(not item["text"] for item in items) / len(items),
                     Path(cfg.init_adapter).parent.name if cfg.init_adapter else None, cfg.lr_schedule))
        return real(cfg)

    monkeypatch.setattr(trainer, "train", spy)
    name = "ip-adapter_then.safetensors"
    later = [1, {"steps": 3, "data": "contra_image"}, {"steps": 2, "data": "contra_image", "lr_schedule": "cosine"}]
    training = {name: {"steps": 2, "drop_text": 0.0, "then": later}}
    summary = family.train_adapters(out, {name: ("global", {}, "contra")}, training, {}, 2, 4, 64, False, 0, "cpu",
                                    False, [name], None)
    assert [run[0] for run in runs] == [2, 1, 3, 2]
    # each starts from the one before (its output folder)
    assert runs[1][2] == name and runs[2][2] == f"{name}-2" and runs[3][2] == f"{name}-3"
    # image-only items (empty caption): 1/8 + 7/8 x ... of "contra", more in "contra_image"
    assert runs[0][1] == runs[1][1] < runs[2][1] == runs[3][1]
    assert [run[3] for run in runs] == ["constant"] * 3 + ["cosine"]  # only the run that names it
    assert summary[name]["then"] == later and (out / name).is_file()
