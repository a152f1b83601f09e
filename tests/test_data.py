"""Training data: every source format, bad-item accounting, transforms, and the deterministic batch order."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.core.errors import IPAdapterError
from ipadapter.training import data as D


def _png(path, size=(20, 16), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    img.convert(mode).save(path)
    return path


def _tokenizer(tmp_path):
    from ipadapter.testing import tiny_tokenizer

    return tiny_tokenizer(tmp_path / "tok")


# ------------------------------------------------------------------------------------------------ sources
def test_json_list_with_data_root_counts_missing_and_empty_captions(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        _png(root / f"{i}.png", seed=i)
    entries = [{"image_file": f"{i}.png", "text": f"caption {i}"} for i in range(4)]
    entries += [{"image_file": "gone.png", "text": "missing"}, {"image_file": "0.png"}, "junk"]
    entries += [{"image_file": "1.png", "text": "  "}]  # an empty caption is an image-only item, not a bad one
    data = tmp_path / "list.json"
    data.write_text(json.dumps(entries))
    bad = D.BadItems()
    records = D.read_records(data, root, bad)
    assert [r.text for r in records] == [f"caption {i}" for i in range(4)] + [""]
    assert records[0].image.path == str(root / "0.png")
    assert bad.skipped == {"missing file": 1, "no caption": 1, "malformed entry": 1}
    assert "gone.png" in bad.summary(7)
    with pytest.raises(IPAdapterError, match="over the 10% limit"):
        bad.check(7)  # 3 of 7 bad
    bad.check(40)  # 3 of 40 is fine
    with pytest.raises(IPAdapterError, match="--data-root"):
        D.read_records(data, tmp_path / "nowhere")


def test_jsonl_folder_and_face_ids(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", seed=i)
    np.save(tmp_path / "face0.npy", np.ones(512, np.float32))
    lines = [json.dumps({"image_file": "0.png", "text": "a", "face_id": "face0.npy"}), "{not json",
             json.dumps({"image": "1.png", "caption": "b", "face_id": [0.5] * 512})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    bad = D.BadItems()
    records = D.read_records(tmp_path / "d.jsonl", bad=bad)
    assert [r.text for r in records] == ["a", "b"] and bad.skipped == {"malformed entry": 1}
    assert torch.equal(D.load_face(records[0].face), torch.ones(512))
    assert torch.equal(D.load_face(records[1].face), torch.full((512,), 0.5))
    with pytest.raises(D.BadItem, match="bad face embedding"):
        D.load_face([1.0] * 10)

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    _png(folder / "x.png")
    (folder / "x.txt").write_text("a red square\n")
    _png(folder / "sub" / "y.jpg")
    (folder / "sub" / "y.txt").write_text("a blue circle")
    _png(folder / "z.png")  # no caption
    _png(folder / "e.png")
    (folder / "e.txt").write_text("\n")  # an empty caption: kept, as an image-only item
    bad = D.BadItems()
    records = D.read_records(folder, bad=bad)
    assert sorted(r.text for r in records) == ["", "a blue circle", "a red square"]
    assert bad.skipped == {"no caption": 1}


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_are_indexed_and_read_by_offset(tmp_path):
    shards = []
    for s in range(2):
        path = tmp_path / f"train-{s:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (12 + i, 10), (40 * i, 10 * s, 200)).save(buf, format="PNG")
                _add(tf, f"s{s}/{i:04d}.png", buf.getvalue())
                if i == 1:
                    _add(tf, f"s{s}/{i:04d}.json", json.dumps({"caption": f"shard {s} item {i}"}).encode())
                else:
                    _add(tf, f"s{s}/{i:04d}.txt", f"shard {s} item {i}".encode())
            _add(tf, f"s{s}/9999.txt", b"caption without image")
        shards.append(path)
    bad = D.BadItems()
    records = D.read_records(str(tmp_path / "train-*.tar"), bad=bad)
    assert [r.text for r in records] == [f"shard {s} item {i}" for s in range(2) for i in range(3)]
    assert bad.skipped == {"missing file": 2}
    img, mode = D.decode_image(records[4].image)
    assert img.size == (13, 10) and img.getpixel((0, 0)) == (40, 10, 200) and mode is None
    assert len(D.read_records(tmp_path)) == 6  # a folder of shards
    with pytest.raises(IPAdapterError, match="matches no files"):
        D.read_records(str(tmp_path / "nothing-*.tar"))


# ----------------------------------------------------------------------------------------------- decoding
def test_bad_and_odd_images(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(D.BadItem) as e:
        D.decode_image(D.Blob(str(tmp_path / "corrupt.png")))
    assert e.value.reason == "unreadable image"
    with pytest.raises(D.BadItem) as e:
        D.decode_image(D.Blob(str(tmp_path / "gone.png")))
    assert e.value.reason == "missing file"
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("I;16", (8, 8), 65535).save(tmp_path / "deep.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "clear.png")
    for name, mode in (("cmyk.jpg", "CMYK"), ("deep.png", "I;16"), ("clear.png", "LA")):
        img, got = D.decode_image(D.Blob(str(tmp_path / name)))
        assert img.mode == "RGB" and got == mode
    assert D.decode_image(D.Blob(str(tmp_path / "clear.png")))[0].getpixel((0, 0)) == (255, 255, 255)  # on white


def test_crop_resize_flip_and_sdxl_crop_coordinates():
    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half black
    pixels, original, (top, left) = D.crop_to(img, 16, 16)  # shortest side 20 -> 16: 32x16, centre crop
    assert pixels.shape == (3, 16, 16) and original == (20, 40) and (top, left) == (0, 8)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[0, 8, 0] > 0.9 and pixels[0, 8, -1] < -0.9  # red on the left, black on the right
    flipped, _, (_, fleft) = D.crop_to(img, 16, 16, flip=True)
    assert torch.equal(flipped, pixels.flip(-1)) and fleft == 32 - 8 - 16
    _, _, (_, rleft) = D.crop_to(img, 16, 16, crop_x=0.0)
    assert rleft == 0
    wide, _, _ = D.crop_to(img, 16, 32)  # a bucket of the same aspect: no crop at all
    assert wide.shape == (3, 16, 32)


def test_buckets_keep_the_area_and_pick_the_nearest_aspect():
    buckets = D.make_buckets(1024, 8)
    assert (1024, 1024) in buckets and len(buckets) > 10
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and 0.8 < h * w / 1024**2 <= 1.1 and max(h, w) / min(h, w) <= 4
    wide = buckets[D.nearest_bucket(buckets, 600, 1200)]
    assert 1.7 < wide[1] / wide[0] < 2.3
    assert buckets[D.nearest_bucket(buckets, 500, 500)] == (1024, 1024)


# -------------------------------------------------------------------------------------------- batch order
def test_batch_order_is_a_pure_function_of_seed_and_step():
    order = D.BatchOrder(np.zeros(10, np.int64), global_batch=4, seed=3)
    seen = np.concatenate([order.batch(k)[1] for k in range(5)])  # 20 = two epochs of 10
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # reshuffled every epoch
    fresh = D.BatchOrder(np.zeros(10, np.int64), global_batch=4, seed=3)
    assert np.array_equal(fresh.batch(3)[1], order.batch(3)[1])  # no state: a resume can jump to k
    assert not np.array_equal(D.BatchOrder(np.zeros(10, np.int64), 4, seed=4).batch(0)[1], order.batch(0)[1])


def test_batch_order_buckets_and_ranks():
    buckets = np.array([0] * 30 + [1] * 10 + [-1] * 3)  # -1: unusable items never appear
    order = D.BatchOrder(buckets, global_batch=4, seed=0)
    picks = [order.batch(k) for k in range(100)]
    for b, items in picks:
        assert set(buckets[items]) == {b}
    share = np.mean([b == 0 for b, _ in picks])
    assert 0.6 < share < 0.9  # in proportion to the bucket sizes (3:1)
    fresh = D.BatchOrder(buckets, global_batch=4, seed=0)
    assert np.array_equal(fresh.batch(5000)[1], order.batch(5000)[1])  # across the 4096-step blocks
    assert order.fallback(31, 1) == 32 and order.fallback(39, 1) == 30  # next of the same bucket, wrapping


def test_dataset_swaps_a_bad_item_for_the_next_good_one(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "1.png").write_bytes(b"broken")
    records = [D.Record(D.Blob(str(tmp_path / f"{i}.png")), f"item {i}") for i in range(4)]
    tok = _tokenizer(tmp_path)
    order = D.BatchOrder(np.zeros(4, np.int64), 2, seed=0)
    t = D.Transform([(16, 16)], [tok], None, random_flip=True)
    ds = D.ImageTextDataset(records, t, order, np.zeros(4, np.int64))
    sample = ds[(1, 0, 0)]
    assert sample["item"] == 2 and sample["bad"][0][:2] == (1, "unreadable image")
    assert sample["pixels"].shape == (1, 3, 16, 16) and sample["ids"][0].shape == (tok.model_max_length,)
    batch = D.collate([ds[(0, 0, 0)], sample])
    assert batch["pixels"].shape == (2, 3, 16, 16) and len(batch["bad"]) == 1
    cached = ds[(0, -1, -1)]  # caching: both mirror images
    assert cached["pixels"].shape == (2, 3, 16, 16) and torch.equal(cached["pixels"][1], cached["pixels"][0].flip(-1))
    assert ds[(1, -1, -1)]["bad"][0] == "unreadable image"


def test_a_separate_prompt_image_feeds_the_encoder_and_the_target_the_loss(tmp_path):
    from transformers import CLIPImageProcessor

    for i in range(3):
        _png(tmp_path / f"{i}.png", size=(16, 16), seed=i)
    entries = [{"image_file": "0.png", "text": "a", "prompt_image_file": "1.png"},
               {"image_file": "1.png", "text": "b"},
               {"image_file": "2.png", "text": "c", "prompt_image_file": "gone.png"},
               {"image_file": "2.png", "text": "d", "prompt_image_file": 7}]
    (tmp_path / "d.json").write_text(json.dumps(entries))
    bad = D.BadItems()
    records = D.read_records(tmp_path / "d.json", None, bad)
    assert [r.text for r in records] == ["a", "b"]
    assert records[0].prompt.path == str(tmp_path / "1.png") and records[1].prompt is None
    assert bad.skipped == {"missing file": 1, "malformed entry": 1} and "gone.png" in bad.summary(4)

    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    t = D.Transform([(16, 16)], [_tokenizer(tmp_path)], processor)
    ds = D.ImageTextDataset(records, t)
    first, second = ds[(0, -1, -1)], ds[(1, -1, -1)]
    # item 0 denoises 0.png but its encoder input is 1.png's, exactly what item 1 (1.png, no prompt) gets
    assert torch.equal(first["clip"], second["clip"])
    own = D.ImageTextDataset([D.Record(records[0].image, "a")], t)[(0, -1, -1)]
    assert torch.equal(own["pixels"], first["pixels"]) and not torch.equal(own["clip"], first["clip"])
