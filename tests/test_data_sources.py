"""Training data through the field's libraries: webdataset shards (plain, gzipped, globs, brace lists, pipe:) and
Hugging Face datasets (imagefolder with metadata.jsonl, save_to_disk folders, parquet, streaming)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter.core.errors import IPAdapterError
from ipadapter.training import data as D
from ipadapter.training.train import checkpoints, train
from train_support import config, max_diff, weights

N = 12


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray((rng.random((18 + i % 5, 16 + i % 3, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n: int = N, per_shard: int = 4, gz: bool = False, bad: bool = False) -> list[Path]:
    """webdataset shards of n items (key.png + key.txt, every third caption as key.json); with ``bad``, one
    empty caption and one image member that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"train-{s // per_shard:03d}.tar{'.gz' if gz else ''}"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(s, min(s + per_shard, n)):
                _add(tf, f"{i:04d}.png", b"not an image" if bad and i == 1 else _png(i))
                caption = f"picture {i}"
                if bad and i == 2:  # no caption at all (an empty one is a valid image-only item)
                    continue
                if i % 3 == 0:
                    _add(tf, f"{i:04d}.json", json.dumps({"caption": caption}).encode())
                else:
                    _add(tf, f"{i:04d}.txt", caption.encode())
        path.write_bytes(gzip.compress(buf.getvalue()) if gz else buf.getvalue())
        paths.append(path)
    return paths


def _texts(records) -> list[str]:
    return [r.text for r in records]


def _images(records) -> list[bytes]:
    return [r.image.read() for r in records]


EXPECTED = [f"picture {i}" for i in range(N)]


def test_webdataset_shards_plain_gzipped_globs_braces_and_pipes_give_the_same_items(tmp_path):
    plain = write_shards(tmp_path / "plain")
    write_shards(tmp_path / "gz", gz=True)
    source = D.Source(cache_dir=str(tmp_path / "cache"))
    ways = {
        "folder": str(tmp_path / "plain"),
        "glob": str(tmp_path / "plain" / "train-*.tar"),
        "braces": str(tmp_path / "gz" / "train-{000..002}.tar.gz"),
        "gz folder": str(tmp_path / "gz"),
        "pipe": "::".join(f"pipe:cat {p}" for p in plain),
    }
    reference = D.read_records(ways["folder"], source=source)
    assert _texts(reference) == EXPECTED
    assert _images(reference) == [_png(i) for i in range(N)]
    for name, data in ways.items():
        records = D.read_records(data, source=source)
        assert _texts(records) == EXPECTED, name
        assert _images(records) == _images(reference), name
    assert len(list((tmp_path / "cache").glob("shard-*.tar"))) == 6  # 3 gzipped + 3 piped, written once
    again = D.read_records(ways["braces"], source=source)
    assert _images(again) == _images(reference)


def test_bad_items_in_shards_are_skipped_and_counted(tmp_path):
    write_shards(tmp_path / "s", gz=True, bad=True)
    bad = D.BadItems()
    records = D.read_records(str(tmp_path / "s"), bad=bad, source=D.Source(cache_dir=str(tmp_path / "c")))
    assert len(records) == N - 1 and bad.skipped == {"no caption": 1}
    with pytest.raises(D.BadItem, match="unreadable image"):  # counted when the trainer decodes it
        D.decode_image(next(r.image for r in records if r.name.endswith(":0001")))
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(IPAdapterError, match="broken.tar.gz"):
        D.read_records(str(broken), source=D.Source(cache_dir=str(tmp_path / "c")))
    with pytest.raises(IPAdapterError, match="matches no files"):
        D.read_records(str(tmp_path / "none-*.tar"))


def test_two_processes_get_disjoint_items_that_cover_each_epoch(tmp_path):
    write_shards(tmp_path / "s", gz=True)
    records = D.read_records(str(tmp_path / "s"), source=D.Source(cache_dir=str(tmp_path / "c")))
    order = D.BatchOrder(np.zeros(len(records), dtype=np.int64), global_batch=4, seed=0)
    b = 2  # per process
    seen = []
    for k in range(len(records) // 4):  # one epoch
        _, items = order.batch(k)
        rank0, rank1 = set(items[:b]), set(items[b:])
        assert not rank0 & rank1
        seen += list(items)
    assert sorted(seen) == list(range(len(records)))


def _imagefolder(folder: Path, n: int = N, bad: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(_png(i))
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "caption": None if bad and i == 2 else f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _parquet(path: Path, n: int = N) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict({"picture": [{"bytes": _png(i), "path": None} for i in range(n)],
                                     "words": [f"picture {i}" for i in range(n)]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "words": datasets.Value("string")}))
    ds.to_parquet(str(path))
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_datasets_imagefolder_parquet_and_streaming(tmp_path, hf_cache):
    folder = _imagefolder(tmp_path / "imgs", bad=True)
    bad = D.BadItems()
    records = D.read_records(str(folder), bad=bad)
    assert _texts(records) == [t for i, t in enumerate(EXPECTED) if i != 2] and bad.skipped == {"no caption": 1}
    assert _images(records) == [_png(i) for i in range(N) if i != 2]
    parquet = _parquet(tmp_path / "train.parquet")
    source = D.Source(image_column="picture", caption_column="words", cache_dir=str(tmp_path / "c"))
    records = D.read_records(str(parquet), source=source)
    assert _texts(records) == EXPECTED and _images(records) == [_png(i) for i in range(N)]
    streamed = D.read_records(str(parquet), source=D.Source("picture", "words", True, str(tmp_path / "c")))
    assert _texts(streamed) == EXPECTED and _images(streamed) == [_png(i) for i in range(N)]
    with pytest.raises(IPAdapterError, match="caption_column"):
        D.read_records(str(parquet), source=D.Source(image_column="picture"))
    with pytest.raises(IPAdapterError, match="no column 'photo'"):
        D.read_records(str(parquet), source=D.Source(image_column="photo", caption_column="words"))


def _resumes_exactly(data: str, tmp_path: Path, **extra) -> None:
    recipe = dict(max_steps=4, save_every=2, lr=1e-3, random_flip=True, **extra)
    straight = train(config(Path(data), tmp_path / "straight", **recipe))
    train(config(Path(data), tmp_path / "broken", **{**recipe, "max_steps": 2}))
    assert [s for s, _ in checkpoints(tmp_path / "broken")] == [2]
    resumed = train(config(Path(data), tmp_path / "broken", resume=True, **recipe))
    assert max_diff(weights(straight), weights(resumed)) <= 1e-6
    assert "resumed from" in (tmp_path / "broken" / "train.log").read_text()


@pytest.mark.slow
def test_gzipped_webdataset_trains_and_resumes_exactly(tmp_path):
    write_shards(tmp_path / "s", gz=True)
    _resumes_exactly(str(tmp_path / "s" / "train-{000..002}.tar.gz"), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["imagefolder", "parquet"])
def test_datasets_train_and_resume_exactly(tmp_path, hf_cache, form):
    if form == "imagefolder":
        data = str(_imagefolder(tmp_path / "imgs"))
        _resumes_exactly(data, tmp_path)
    else:
        data = str(_parquet(tmp_path / "train.parquet"))
        _resumes_exactly(data, tmp_path, image_column="picture", caption_column="words")


def test_shard_cache_is_written_atomically(tmp_path):
    write_shards(tmp_path / "s", gz=True, n=4)
    cache = tmp_path / "c"
    D.read_records(str(tmp_path / "s"), source=D.Source(cache_dir=str(cache)))
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []
    shutil.rmtree(cache)
