"""`ipadapter eval`: metric functions against hand computations, the data readers, the batched runner against
single generations, and the CLI end to end on tiny random models (a tiny random CLIPModel is the judge)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_image
from ipadapter.cli import main
from ipadapter.core.errors import IPAdapterError
from ipadapter.evaluation.evaluate import ClipScorer, EvalSettings, Pair, clip_i, clip_t, evaluate, sample_seed
from ipadapter.evaluation.evaluate import read_pairs as _read_pairs
from ipadapter.generation.pipeline import load
from ipadapter.testing import random_adapter, tiny_pipeline, tiny_tokenizer
from ipadapter.world import shapes as world
from ipadapter.world.judge import (
    FAMILIES,
    REPORT_SEED,
    TUNING_SEED,
    WorldJudge,
    attribute_accuracy,
    contradiction_pairs,
    expected_attributes,
    is_world_image,
    world_pairs,
)

FAST = EvalSettings(samples=2, steps=2, guidance=5.0, batch_size=2)
JUDGE = WorldJudge()  # the world's attribute judge, a plug-in of evaluate


def read_pairs(*args, **kwargs):
    """read_pairs with the world judge (it gives world images their true attributes)."""
    return _read_pairs(*args, judge=WorldJudge(), **kwargs)


def tiny_clip_folder(folder: Path) -> Path:
    """A random contrastive CLIPModel with its tokenizer and image processor, saved as a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = tiny_tokenizer(folder)
    torch.manual_seed(5)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipScorer:
    return ClipScorer.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory) -> Path:
    """Held-out world images in the official JSON format (with samples.json: the true attributes)."""
    return world.write_dataset(tmp_path_factory.mktemp("world"), 4, seed=world.EVAL_SEED, partial_captions=False,
                               progress=False)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny SD 1.5-shaped model folder, random global adapter file for it)."""
    root = tmp_path_factory.mktemp("model")
    pipe = tiny_pipeline("sd15", folder=root / "model")
    adapter = root / "ip-adapter.safetensors"
    random_adapter(pipe.unet, "global", encoder=pipe.image_encoder).save(adapter)
    return root / "model", adapter


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------------ metrics
def test_clip_i_of_identical_images_is_one_and_of_different_ones_less(clip):
    a, b = random_image(0), random_image(1)
    same = clip_i([a, b], [a.copy(), b.copy()], clip)
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    assert clip_i([a], [b], clip).item() < 0.9999


def test_clip_i_and_clip_t_are_cosines_of_the_clip_model_features(clip, clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = CLIPImageProcessor.from_pretrained(str(clip_dir))
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    gen, ref = [random_image(2), random_image(3)], [random_image(4), random_image(5)]
    captions = ["a red circle", "a blue square on a black background"]

    def image_features(images):
        out = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
        return out if torch.is_tensor(out) else out.pooler_output

    with torch.no_grad():
        g, r = image_features(gen), image_features(ref)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        t = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        t = t if torch.is_tensor(t) else t.pooler_output
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(clip_i(gen, ref, clip), cos(g, r), atol=1e-5)
    assert torch.allclose(clip_t(gen, captions, clip), cos(g, t), atol=1e-5)
    with pytest.raises(ValueError, match="2 generated images for 1 captions"):
        clip_t(gen, captions[:1], clip)


def test_attribute_accuracy_reads_world_images_against_expectations():
    samples = world.samples(6, world.EVAL_SEED)
    images = [world.draw(s) for s in samples]
    truth = [{"background": s.background, "colour": s.colour, "shape": s.shape} for s in samples]
    assert attribute_accuracy(images, truth) == {"background": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0, "n": 6}
    wrong = [dict(t) for t in truth]
    for t in wrong[:3]:  # three of six backgrounds are expected to be something the image does not show
        t["background"] = next(c for c in world.COLOURS if c not in (t["background"], t["colour"]))
    wrong[5]["shape"] = None  # not expected: left out of the shape count only
    acc = attribute_accuracy(images, wrong)
    assert acc["background"] == 0.5 and acc["colour"] == 1.0 and acc["shape"] == 1.0 and acc["all"] == 0.5


def test_expected_attributes_follow_the_text_where_it_names_them():
    truth = {"background": "yellow", "colour": "magenta", "shape": "triangle"}
    assert expected_attributes(truth, "") == truth
    assert expected_attributes(truth, "on a black background") == {**truth, "background": "black"}
    assert expected_attributes(truth, "a red circle") == {**truth, "colour": "red", "shape": "circle"}
    assert expected_attributes(None, "a red circle") is None


# ---------------------------------------------------------------------------------------------------- data
def test_read_pairs_official_json_with_world_truth_and_data_root(world_data, tmp_path):
    pairs = read_pairs(world_data)
    records = json.loads(world_data.read_text())
    truth = json.loads((world_data.parent / "samples.json").read_text())
    assert [p.caption for p in pairs] == [r["text"] for r in records]
    assert [p.name for p in pairs] == [r["image_file"] for r in records]
    assert [p.truth for p in pairs] == [{k: t[k] for k in ("background", "colour", "shape")} for t in truth]
    assert pixels(pairs[0].image).tolist() == pixels(world.draw(world.samples(1, world.EVAL_SEED)[0])).tolist()
    assert len(read_pairs(world_data, limit=2)) == 2
    moved = tmp_path / "elsewhere.json"
    moved.write_text(world_data.read_text())
    with pytest.raises(IPAdapterError, match="missing file"):
        read_pairs(moved)
    elsewhere = read_pairs(moved, data_root=world_data.parent)
    assert [p.truth for p in elsewhere] == [p.truth for p in pairs]  # no samples.json here: read from the pixels


def test_read_pairs_jsonl_and_folder_with_txt_captions(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    random_image(1).save(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("a cat\n")
    with pytest.raises(IPAdapterError, match="no caption"):  # b.jpg has no caption: nothing is skipped quietly
        read_pairs(tmp_path)
    (tmp_path / "b.txt").write_text("a dog")
    pairs = read_pairs(tmp_path)
    assert [(p.name, p.caption, p.truth) for p in pairs] == [("a.png", "a cat", None), ("b.jpg", "a dog", None)]
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"image": "a.png", "caption": "one"}\n\n{"file_name": "b.jpg", "text": "two"}\n')
    assert [p.caption for p in read_pairs(lines)] == ["one", "two"]
    s = world.samples(1, 3)[0]
    world.draw(s).save(tmp_path / "w.png")  # a clean world image without samples.json: parsed exactly
    lines.write_text('{"image_file": "w.png", "text": "x"}\n')
    assert read_pairs(lines)[0].truth == {"background": s.background, "colour": s.colour, "shape": s.shape}


OK = '{"image_file": "a.png", "text": "fine"}'


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", "no usable items"),
    (f'[{OK}, {{"text": "x"}}]', "malformed entry"),
    (f'[{OK}, {{"image_file": "missing.png", "text": "x"}}]', "missing file"),
    (f'[{OK}, {{"image_file": "a.png", "text": ""}}]', "empty caption"),
    (f'[{OK}, {{"image_file": "broken.png", "text": "x"}}]', "unreadable image"),
])
def test_read_pairs_refuses_bad_data_with_a_one_line_message(tmp_path, content, message):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = tmp_path / "data.json"
    bad.write_text(content)
    with pytest.raises(IPAdapterError, match=message) as e:
        read_pairs(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_read_pairs_refuses_missing_data(tmp_path):
    with pytest.raises(IPAdapterError, match="no such file or folder"):
        read_pairs(tmp_path / "nothing.json")


def test_world_pairs_are_held_out_and_world_images_are_recognised():
    pairs = world_pairs(3)
    train = {world.draw(s).tobytes() for s in world.samples(200, world.TRAIN_SEED)}
    assert all(p.image.tobytes() not in train for p in pairs)
    assert all(is_world_image(p.image) for p in pairs)
    assert not is_world_image(random_image(0, size=(64, 64)))


def test_contradiction_pairs_name_one_attribute_against_the_image_over_the_whole_palette():
    """Image + text families: the text names exactly its family's attribute, with a value the image does not show
    (and one a world image can show: never the other colour); held out and separate from the tuning prompts."""
    train = {world.draw(s).tobytes() for s in world.samples(200, world.TRAIN_SEED)}
    seen = set()
    for family in FAMILIES:
        pairs = contradiction_pairs(family, 60)
        assert pairs == contradiction_pairs(family, 60)  # seeded
        tuning = {p.image.tobytes() for p in contradiction_pairs(family, 60, seed=TUNING_SEED)}
        for p in pairs:
            named = world.caption_attributes(p.prompt)
            assert [k for k, v in named.items() if v] == [family] and named[family] != p.truth[family]
            wanted = JUDGE.expected(p.truth, p.prompt)
            assert wanted[family] == named[family] and wanted["background"] != wanted["colour"]
            assert {k: v for k, v in wanted.items() if k != family} == {k: v for k, v in p.truth.items()
                                                                         if k != family}
            assert world.caption_attributes(p.caption) == wanted and is_world_image(p.image)
            assert p.image.tobytes() not in train and p.image.tobytes() not in tuning
            seen.update((p.truth["background"], p.truth["colour"]))
    assert seen == set(world.COLOURS) and REPORT_SEED != TUNING_SEED
    with pytest.raises(ValueError, match="one of background, colour, shape"):
        contradiction_pairs("size", 1)


def test_a_pairs_own_prompt_is_its_text_and_the_caption_stays_the_clip_t_reference():
    pair = Pair(random_image(0), "a red circle on a black background", "p", prompt="on a black background")
    assert EvalSettings().text_for(pair) == "on a black background"
    assert EvalSettings(prompt_from_caption=True).text_for(pair) == pair.caption
    assert EvalSettings(prompt="a square").text_for(Pair(random_image(0), "x")) == "a square"


# -------------------------------------------------------------------------------------------------- runner
def test_batched_evaluation_equals_one_generation_per_image(sd15_pipe, adapter_file, clip):
    """Prompt i, sample k of a batched run is the image ip.generate makes alone with seed(i, k)."""
    pairs = [Pair(random_image(10 + i, size=(32, 32)), f"caption {i}", f"p{i}") for i in range(3)]
    ip = load(sd15_pipe, adapter_file("sd15", "global"))
    try:
        result = evaluate(ip, pairs, clip, FAST, keep_images=True)
        for i in range(3):
            for k in range(FAST.samples):
                alone = ip.generate(images=[pairs[i].image], prompt="", scale=1.0, num_inference_steps=FAST.steps,
                                    guidance_scale=FAST.guidance, seed=sample_seed(0, i, k, FAST.samples))[0]
                assert np.abs(pixels(result.images[i][k]) - pixels(alone)).max() <= 1, (i, k)
        # the image prompt matters (the check above would pass for an adapter that did nothing)
        other = ip.generate(images=[pairs[0].image], prompt="", scale=1.0, num_inference_steps=FAST.steps,
                            guidance_scale=FAST.guidance, seed=sample_seed(0, 1, 0, FAST.samples))[0]
        assert np.abs(pixels(result.images[1][0]) - pixels(other)).max() > 2  # batching drift stays <= 1
    finally:
        ip.detach()
    assert [(r["index"], r["sample"]) for r in result.records] == [(i, k) for i in range(3) for k in range(2)]
    assert result.metrics["n_images"] == 6 and result.metrics["n_prompts"] == 3
    ci = clip_i(result.images[2], [pairs[2].image] * 2, clip).tolist()
    assert [r["clip_i"] for r in result.records[4:]] == pytest.approx(ci, abs=1e-6)
    assert result.metrics["clip_i"] == pytest.approx(np.mean([r["clip_i"] for r in result.records]))
    assert "background" not in result.metrics  # not world images: no attribute accuracy


def test_scale_zero_is_the_text_only_baseline_and_world_attributes_are_scored(sd15_pipe, adapter_file, clip):
    pairs = world_pairs(2)
    ip = load(sd15_pipe, adapter_file("sd15", "global"))
    try:
        settings = EvalSettings(samples=1, steps=2, guidance=5.0, prompt="a red circle", scale=0.0)
        zero = evaluate(ip, pairs, clip, settings, keep_images=True, judge=JUDGE)
        full = evaluate(ip, pairs, clip, EvalSettings(samples=1, steps=2, guidance=5.0, prompt="a red circle",
                                                      scale=1.0), keep_images=True, judge=JUDGE)
    finally:
        ip.detach()
    text = evaluate(sd15_pipe, pairs, clip, EvalSettings(samples=1, steps=2, guidance=5.0, prompt="a red circle",
                                                         text_only=True), keep_images=True, judge=JUDGE)
    for a, b in zip(zero.images, text.images):
        assert pixels(a[0]).tolist() == pixels(b[0]).tolist()
    assert any(np.abs(pixels(a[0]) - pixels(b[0])).max() > 8 for a, b in zip(full.images, text.images))
    assert zero.metrics == text.metrics
    for metrics in (zero.metrics, text.metrics):
        assert {"background", "colour", "shape", "all"} <= set(metrics) and metrics["attributes_n"] == 2
    rec = text.records[0]
    assert rec["expected"] == {**pairs[0].truth, "colour": "red", "shape": "circle"}  # text names them
    assert set(rec["parsed"]) == {"background", "colour", "shape"}
    with pytest.raises(IPAdapterError, match="needs a pipeline with an adapter"):
        evaluate(sd15_pipe, pairs, clip, FAST)


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_eval_writes_results_json(model_files, world_data, clip_dir, tmp_path, capsys):
    model, adapter = model_files
    out = tmp_path / "results.json"
    saved = tmp_path / "images"
    rc = main(["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(world_data), "--clip",
               str(clip_dir), "--samples", "2", "--steps", "2", "--guidance", "5", "--num-prompts", "3",
               "--batch-size", "2", "--seed", "7", "--out", str(out), "--save-images", str(saved),
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CLIP-I" in printed and "shape colour" in printed and "6 (3 prompts)" in printed
    data = json.loads(out.read_text())
    assert data["metrics"]["n_images"] == 6 and data["metrics"]["attributes_n"] == 6
    assert 0.0 <= data["metrics"]["background"] <= 1.0
    assert -1.0 <= data["metrics"]["clip_i"] <= 1.0 and -1.0 <= data["metrics"]["clip_t"] <= 1.0
    assert [r["seed"] for r in data["per_sample"]] == [7 + i * 2 + k for i in range(3) for k in range(2)]
    assert data["settings"]["adapter"] == str(adapter) and data["settings"]["scale"] is None
    assert len(list(saved.glob("*.png"))) == 6

    base = tmp_path / "baseline.json"
    assert main(["eval", "--model", str(model), "--text-only", "--data", str(world_data), "--clip", str(clip_dir),
                 "--samples", "1", "--steps", "2", "--num-prompts", "2", "--out", str(base), "--device", "cpu"]) == 0
    baseline = json.loads(base.read_text())
    assert baseline["settings"]["text_only"] and baseline["settings"]["adapter"] is None
    assert baseline["metrics"]["n_images"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--data", "nowhere.json"], "--data nowhere.json: no such file"),
    (["--prompt", "a cat", "--prompt-from-caption"], "exclude each other"),
    (["--clip", "TMP"], "not a CLIPModel folder (no config.json)"),
    (["--adapter", "missing.safetensors"], "--adapter missing.safetensors: no such file"),
])
def test_cli_eval_bad_input_is_one_line_and_writes_nothing(model_files, world_data, tmp_path, capsys, extra,
                                                           message):
    model, adapter = model_files
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(world_data), "--steps", "1",
            "--samples", "1", "--out", str(out), "--device", "cpu", "--clip", str(tmp_path / "noclip")]
    rc = main(args + [str(tmp_path) if a == "TMP" else a for a in extra])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err


@pytest.mark.slow  # two fresh interpreters load torch + the models: ~15-30 s on 2 cores
def test_two_processes_split_the_prompts_and_gather_the_same_results(model_files, world_data, clip_dir, tmp_path):
    """torchrun with 2 CPU processes: every process takes every 2nd prompt; the gathered JSON is the 1-process one."""
    import os
    import subprocess
    import sys

    model, adapter = model_files
    args = ["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(world_data), "--clip",
            str(clip_dir), "--samples", "1", "--steps", "1", "--num-prompts", "3", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    two = tmp_path / "two.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "ipadapter.cli", *args, "--out", str(two)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("CLIP-I") == 1  # only the main process reports
    one = tmp_path / "one.json"
    assert main([*args, "--out", str(one)]) == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["settings"]["processes"] == 2 and a["settings"]["processes"] == 1
    assert [r["index"] for r in b["per_sample"]] == [0, 1, 2]
    for x, y in zip(a["per_sample"], b["per_sample"]):
        assert x["seed"] == y["seed"] and x["parsed"] == y["parsed"]
        assert x["clip_i"] == pytest.approx(y["clip_i"], abs=1e-5)


def test_world_folder_clip_is_assembled_from_the_pipeline_towers(tmp_path):
    """A world model folder (text_encoder + image_encoder + text_projection.safetensors) scores as one CLIP."""
    from safetensors.torch import save_file

    pipe = tiny_pipeline("sd15", folder=tmp_path)
    text_width, proj = pipe.text_encoder.config.hidden_size, pipe.image_encoder.config.projection_dim
    torch.manual_seed(0)
    weight = torch.randn(proj, text_width)
    save_file({"text_projection.weight": weight, "logit_scale": torch.tensor([2.0])},
              str(tmp_path / "text_projection.safetensors"))
    scorer = ClipScorer.from_pretrained(tmp_path)
    images, texts = [random_image(0), random_image(1)], ["a red circle", "a blue square"]
    with torch.no_grad():
        pixels_in = pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
        img = pipe.image_encoder(pixels_in).image_embeds
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt")
        pooled = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask).pooler_output
    norm = torch.nn.functional.normalize
    assert torch.allclose(scorer.image_embeds(images), norm(img, dim=-1), atol=1e-5)
    assert torch.allclose(scorer.text_embeds(texts), norm(pooled @ weight.T, dim=-1), atol=1e-5)


def test_world_report_quick_run_writes_every_output(model_files, clip_dir, tmp_path, capsys):
    """benchmarks/world_report.py --quick on tiny random models: it runs end to end and the files hold its numbers."""
    import importlib.util

    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "world_report.py"
    spec = importlib.util.spec_from_file_location("world_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    model, adapter = model_files
    simple = tmp_path / "simple.safetensors"
    from ipadapter.generation.pipeline import load_pipeline

    pipe = load_pipeline(model)
    random_adapter(pipe.unet, "global", encoder=pipe.image_encoder, seed=3, attention="concat").save(simple)
    out = tmp_path / "report"
    assert report.main(["--quick", "--model", str(model), "--adapters", f"global={adapter}", f"simple={simple}",
                        "--clip", str(clip_dir), "--out-dir", str(out), "--device", "cpu", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "world_results.json").read_text())
    assert set(data["image_only"]) == {"global", "simple"} and data["adapters"]["simple"]["attention"] == "concat"
    assert set(data["image_text"]) == {"global", "simple", "text_only"}
    assert data["image_only"]["global"]["n_images"] == report.QUICK["prompts"] * report.QUICK["samples"]
    families = data["image_text"]["global"]
    assert set(families) == {"background", "colour", "shape", "mean"}
    assert families["shape"]["n_images"] == report.QUICK["family_prompts"] * report.QUICK["family_samples"]
    assert families["mean"]["all"] == pytest.approx(sum(families[f]["all"] for f in report.FAMILIES) / 3)
    assert [p["scale"] for p in data["sweep"]["global"]] == report.QUICK["scales"] and "simple" not in data["sweep"]
    assert data["scale_zero"]["bit_exact"] == data["scale_zero"]["images"] == report.QUICK["exact_prompts"]
    assert data["targets"]["checks"]["scale 0 == text-only, bit for bit"] is True
    scans = data["image_text_scales"]
    assert set(scans) == {"global"} and [p["scale"] for p in scans["global"]] == report.QUICK["family_scales"]
    assert all(0 <= p["mean"] <= 1 for p in scans["global"]) and "| global (the paper's recipe), " in data["markdown"]
    assert {k for k in data["targets"]["checks"] if k.startswith("image + text")} == {
        f"image + text at {report.IMAGE_TEXT_SCALE}: all three as wanted >= 90% in every family ({n})"
        for n in ("global", "simple")}
    assert (out / "world_results.md").read_text().strip() == data["markdown"] and data["markdown"] in printed
    assert set(data["layout"]) == {"global", "simple", "text_only"} and "| size r |" in data["markdown"]
    assert all(m["n"] == data["image_only"]["global"]["n_images"] for m in data["layout"].values())
    for name in ("clip_scale_sweep.png", "world_grid.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _world_model() -> Path | None:
    import os

    from ipadapter.generation.pipeline import EMBEDDED_MODEL

    folder = Path(os.environ.get("IPADAPTER_WORLD_MODEL") or EMBEDDED_MODEL)
    return folder if (folder / "model_index.json").is_file() else None


@pytest.mark.slow  # trains an adapter for 60 steps on the world base model: ~40 s on 2 cores
@pytest.mark.skipif(_world_model() is None, reason="no world base model (the embedded world_model/ is not built; "
                                                   "IPADAPTER_WORLD_MODEL=DIR points at another)")
def test_a_quickly_trained_adapter_beats_the_text_only_baseline(tmp_path):
    """60 steps of `train` on the world base model, then `evaluate` on held-out prompts: the image prompt must
    bring the generations closer to the prompt images than the empty-prompt baseline."""
    from ipadapter.generation.pipeline import load_pipeline
    from ipadapter.training.train import TrainConfig, train

    model = _world_model()
    data = world.write_dataset(tmp_path / "data", 128, seed=world.TRAIN_SEED, partial_captions=False, progress=False)
    adapter = train(TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "run"), kind="global",
                                max_steps=60, batch_size=16, lr=1e-3, drop_text=0.5, progress=False,
                                tensorboard=False, device="cpu", save_every=1000))
    pairs = world_pairs(12)  # held out: EVAL_SEED, never the training stream
    clip = ClipScorer.from_pretrained(model)
    pipe = load_pipeline(model)
    quick = dict(samples=1, steps=8, guidance=5.0, batch_size=12)
    baseline = evaluate(pipe, pairs, clip, EvalSettings(text_only=True, **quick), judge=JUDGE).metrics
    ip = load(pipe, adapter)
    try:
        trained = evaluate(ip, pairs, clip, EvalSettings(**quick), judge=JUDGE).metrics
    finally:
        ip.detach()
    assert trained["clip_i"] > baseline["clip_i"] + 0.05, (trained, baseline)
    assert trained["background"] >= baseline["background"], (trained, baseline)
