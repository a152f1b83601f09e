"""Training data: records from disk, image transforms, bad-item accounting, and a deterministic batch order.

A batch goes: :func:`read_records` (what the data file lists) -> :class:`BatchOrder` (which items form global
batch ``k``, a pure function of the seed and ``k``, so a resumed run sees exactly the batches it would have seen)
-> :class:`ImageTextDataset` (decode, resize, crop, tokenize; a bad item is swapped for the next good one of the
same shape and counted) -> the trainer's encoders (``train.py``).

Sources: the official JSON list (``[{"image_file": ..., "text": ...}]`` with a data root), JSONL, a folder of
images with same-name ``.txt`` captions, webdataset shards (``key.jpg`` + ``key.txt``/``key.json``; read with the
``webdataset`` package: ``.tar``/``.tar.gz``, globs, brace lists ``shards-{000..009}.tar``, ``pipe:`` commands),
and Hugging Face ``datasets`` (an imagefolder with ``metadata.jsonl``, a ``save_to_disk`` folder, ``.parquet``
files; ``streaming`` too), with configurable image/caption columns (:class:`Source`).
Every source becomes a list of :class:`Record` with random access, because the batch order is a pure function
of the item index (exact resume, and 1 process x batch 2b = 2 processes x batch b). Compressed and remote shards
and streamed datasets are therefore written once, uncompressed, into a local shard cache (``Source.cache_dir``)
and read from there by offset; local ``.tar`` shards and memory-mapped Arrow datasets are read in place.
FaceID data gives a 512-d face-ID embedding per item (``"face_id"``: a ``.npy``/``.safetensors``/``.pt`` path or
a list of numbers; ``key.npy`` beside the image in folders and shards).
JSON/JSONL items may also name a separate prompt image (``"prompt_image_file"``): the image encoder then sees
it while the diffusion loss is on ``image_file`` (reference -> target pairs, as face adapters train on a face
crop of the picture they denoise). Without it the encoder sees the training image itself (the paper's recipe).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.encoders import MAX_PIXELS, to_rgb
from ..core.errors import IPAdapterError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FACE_EXTS = (".npy", ".safetensors", ".pt", ".bin")
MAX_BAD_FRACTION = 0.10


@dataclass(frozen=True)
class Blob:
    """Bytes on disk: a whole file, or ``size`` bytes at ``offset`` inside one (a tar member)."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)

    @property
    def name(self) -> str:
        return self.path if self.offset < 0 else f"{self.path}@{self.offset}"

    def exists(self) -> bool:
        return self.offset >= 0 or os.path.isfile(self.path)


@dataclass
class Record:
    """One training item as the data file lists it."""

    image: Blob
    text: str
    face: Blob | list | None = None
    key: str = ""  # a name for messages
    prompt: Blob | None = None  # the image encoder's input when it is not ``image`` itself

    @property
    def name(self) -> str:
        return self.key or self.image.name


class BadItem(Exception):
    """An item that cannot be used; ``reason`` is one of a few short categories."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class BadItems:
    """Counts of skipped items by reason (with a few examples), and of images converted from odd modes."""

    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    items: set = field(default_factory=set)  # indices, so an item seen again is not counted twice

    def add(self, reason: str, name: str, index: int | None = None, detail: str = "") -> None:
        if index is not None:
            if index in self.items:
                return
            self.items.add(index)
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(f"{name}{': ' + detail if detail else ''}")

    def add_mode(self, mode: str, index: int) -> None:
        key = ("mode", index)
        if key not in self.items:
            self.items.add(key)
            self.converted[mode] += 1

    @property
    def count(self) -> int:
        return sum(self.skipped.values())

    def summary(self, total: int) -> str:
        parts = [f"{n} {reason}" for reason, n in self.skipped.most_common()]
        text = f"skipped {self.count} of {total} items" + (f" ({', '.join(parts)})" if parts else "")
        if self.converted:
            text += "; converted to RGB: " + ", ".join(f"{n} {mode}" for mode, n in self.converted.most_common())
        for reason, shown in self.examples.items():
            text += f"\n  {reason}: " + "; ".join(shown)
        return text

    def check(self, total: int, limit: float = MAX_BAD_FRACTION, source: str = "data") -> None:
        """Stop with a clear error when more than ``limit`` of the items are bad."""
        if total and self.count > limit * total:
            raise IPAdapterError(
                f"{source}: {self.count} of {total} items are unusable ({self.count / total:.0%}, over the "
                f"{limit:.0%} limit) - {self.summary(total).splitlines()[0]}; fix the data or the paths "
                "(--data-root) and run again"
            )


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Source:
    """How to read a data set beyond its path (TrainConfig's ``image_column``, ``caption_column``, ...)."""

    image_column: str | None = None  # datasets: default the first of image, img, jpg, png, image_file, file_name
    caption_column: str | None = None  # default the first of text, caption, prompt, txt
    streaming: bool = False  # datasets: iterate (load_dataset(streaming=True)) instead of memory-mapping
    cache_dir: str | None = None  # where compressed/remote shards and streamed items are kept uncompressed

    @classmethod
    def of(cls, cfg) -> Source:
        """From a TrainConfig (or anything with these fields); the cache defaults to OUTPUT/data-cache."""
        cache = getattr(cfg, "data_cache", None) or (os.path.join(cfg.output, "data-cache") if getattr(
            cfg, "output", "") else None)
        return cls(getattr(cfg, "image_column", None), getattr(cfg, "caption_column", None),
                   bool(getattr(cfg, "streaming", False)), cache)


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)


def read_records(data: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 bad: BadItems | None = None, source: Source | None = None) -> list[Record]:
    """The items ``data`` lists; entries without a caption or a file are counted in ``bad`` and left out.

    ``data``: a ``.json`` list or ``.jsonl`` file (paths relative to ``data_root``, default the file's folder),
    a folder of images with same-name ``.txt`` captions, webdataset shards (a folder of them, one file, a glob
    ``"shards/train-*.tar"``, a brace list ``"shards/train-{000..009}.tar.gz"``, ``"pipe:aws s3 cp s3://... -"``),
    a Hugging Face dataset (a folder with ``metadata.jsonl``/``metadata.csv``: an imagefolder; a
    ``save_to_disk`` folder; ``.parquet`` files or a folder of them).
    """
    bad = bad if bad is not None else BadItems()
    source = source or Source()
    text = str(data)
    if text.startswith("pipe:") or "{" in text or any(ch in text for ch in "*?["):
        records = _pattern_records(text, bad, source)
    else:
        path = Path(data)
        if not path.exists():
            raise IPAdapterError(f"--data {path}: no such file or folder; give a .json/.jsonl list, a folder of "
                                 "images with .txt captions, or .tar shards")
        name = path.name.lower()
        if path.is_dir():
            shards = sorted(str(p) for p in path.iterdir() if p.name.lower().endswith(SHARD_SUFFIXES))
            if shards:
                records = _shard_records(shards, bad, source)
            elif _is_hf_folder(path):
                records = _hf_records(str(path), bad, source)
            else:
                records = _folder_records(path, bad)
        elif name.endswith(SHARD_SUFFIXES):
            records = _shard_records([str(path)], bad, source)
        elif name.endswith(PARQUET_SUFFIXES):
            records = _hf_records(str(path), bad, source)
        elif path.suffix in (".json", ".jsonl"):
            root = Path(data_root) if data_root is not None else path.parent
            if not root.is_dir():
                raise IPAdapterError(f"--data-root {root}: no such folder")
            records = _list_records(path, root, bad)
        else:
            raise IPAdapterError(f"--data {path}: unknown data file type {path.suffix!r}; use .json, .jsonl, "
                                 ".tar/.tar.gz shards, .parquet or a folder")
    if not records:
        raise IPAdapterError(f"--data {data}: no usable items found ({bad.summary(bad.count).splitlines()[0]})")
    return records


def _entry_record(entry: object, root: Path, where: str, bad: BadItems) -> Record | None:
    if not isinstance(entry, dict):
        bad.add("malformed entry", where)
        return None
    file = entry.get("image_file", entry.get("image", entry.get("file_name")))
    caption = entry.get("text", entry.get("caption"))
    if not isinstance(file, str) or not file:
        bad.add("malformed entry", where, detail="no image_file")
        return None
    image = Blob(str(root / file))
    if not isinstance(caption, str):  # "" is a caption: an image-only item (training drops text 5% anyway)
        bad.add("no caption", image.path)
        return None
    if not image.exists():
        bad.add("missing file", image.path)
        return None
    face = entry.get("face_id", entry.get("id_embed_file"))
    if isinstance(face, str):
        face = Blob(str(root / face))
    prompt = entry.get("prompt_image_file", entry.get("prompt_image"))
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            bad.add("malformed entry", where, detail="prompt_image_file is not a file name")
            return None
        prompt = Blob(str(root / prompt))
        if not prompt.exists():
            bad.add("missing file", prompt.path)
            return None
    return Record(image, caption.strip(), face, prompt=prompt)


def _list_records(path: Path, root: Path, bad: BadItems) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IPAdapterError(f"--data {path}: cannot read it ({e})") from None
    records = []
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise IPAdapterError(f"--data {path}: not valid JSON ({e.msg} at line {e.lineno}); expected "
                                 '[{"image_file": ..., "text": ...}, ...]') from None
        if not isinstance(entries, list):
            raise IPAdapterError(f'--data {path}: expected a JSON list [{{"image_file": ..., "text": ...}}, ...]')
        for i, entry in enumerate(entries):
            if (r := _entry_record(entry, root, f"{path} item {i}", bad)) is not None:
                records.append(r)
        return records
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            bad.add("malformed entry", f"{path} line {n}")
            continue
        if (r := _entry_record(entry, root, f"{path} line {n}", bad)) is not None:
            records.append(r)
    return records


def _folder_records(folder: Path, bad: BadItems) -> list[Record]:
    records = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        caption = image.with_suffix(".txt")
        if not caption.is_file():  # an empty .txt is a caption (an image-only item); no .txt is an oversight
            bad.add("no caption", str(image))
            continue
        text = caption.read_text(encoding="utf-8", errors="replace").strip()
        face = next((Blob(str(image.with_suffix(e))) for e in FACE_EXTS if image.with_suffix(e).is_file()), None)
        records.append(Record(Blob(str(image)), text, face))
    return records


def _tar_records(shards: list[str], bad: BadItems, label: str | None = None) -> list[Record]:
    """Index uncompressed shards by their member headers (grouped by webdataset's key rule); members are then read
    by offset. ``label``: the name messages use (the original URL of a cached shard)."""
    from webdataset.tariterators import base_plus_ext

    records = []
    for shard in shards:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tf:  # uncompressed: members are read by offset
                for m in tf:
                    if not m.isfile() or os.path.basename(m.name).startswith("."):
                        continue
                    stem, ext = base_plus_ext(m.name)
                    if stem is not None:
                        groups.setdefault(stem, {})[ext.lower()] = m
        except (tarfile.TarError, OSError) as e:
            raise IPAdapterError(f"--data {label or shard}: not a readable .tar shard ({e})") from None
        for key, members in groups.items():
            name = f"{label or shard}:{key}"
            if "bad" in members:
                reason, _, detail = Blob(shard, members["bad"].offset_data, members["bad"].size).read().decode(
                    "utf-8", "replace").partition("\t")
                bad.add(reason, name, detail=detail)
                continue
            image = next((members[e] for e in ("jpg", "jpeg", "png", "webp", "bmp", "img") if e in members), None)
            if image is None:
                bad.add("missing file", name, detail="no image member")
                continue
            text = None
            if "txt" in members:
                text = Blob(shard, members["txt"].offset_data, members["txt"].size).read().decode("utf-8", "replace")
            elif "json" in members:
                try:
                    meta = json.loads(Blob(shard, members["json"].offset_data, members["json"].size).read())
                    found = meta.get("text", meta.get("caption")) if isinstance(meta, dict) else None
                    text = str(found) if found is not None else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    text = None
            if text is None:  # "" is a caption (an image-only item); none at all is not
                bad.add("no caption", name)
                continue
            face = Blob(shard, members["npy"].offset_data, members["npy"].size) if "npy" in members else None
            records.append(Record(Blob(shard, image.offset_data, image.size), text.strip(), face, key=name))
    return records


def _pattern_records(text: str, bad: BadItems, source: Source) -> list[Record]:
    """Shards (or parquet files) named by a brace list, a glob or ``pipe:`` commands (webdataset's URL rules)."""
    from webdataset.shardlists import expand_urls

    urls: list[str] = []
    for url in expand_urls(text):
        if not url.startswith("pipe:") and any(ch in url for ch in "*?["):
            matched = sorted(glob.glob(url))
            if not matched:
                raise IPAdapterError(f"--data {url}: the pattern matches no files")
            urls += matched
        else:
            urls.append(url)
    if all(u.lower().endswith(PARQUET_SUFFIXES) for u in urls):
        return _hf_records(urls, bad, source)
    return _shard_records(urls, bad, source)


def _shard_records(urls: list[str], bad: BadItems, source: Source) -> list[Record]:
    """Local uncompressed shards are indexed in place; compressed or piped ones are read with ``webdataset`` once
    into the shard cache (uncompressed), then indexed like local ones."""
    records = []
    for url in urls:
        local = not url.startswith("pipe:") and os.path.isfile(url)
        if not url.startswith("pipe:") and not local:
            raise IPAdapterError(f"--data {url}: no such shard")
        if local and url.lower().endswith(".tar"):
            records += _tar_records([url], bad)
        else:
            records += _tar_records([_cached_shard(url, source)], bad, label=url)
    return records


def _cache_folder(source: Source) -> Path:
    import tempfile

    folder = Path(source.cache_dir) if source.cache_dir else Path(tempfile.gettempdir()) / "ipadapter-data-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cache_name(url: str, prefix: str) -> str:
    import hashlib

    stamp = url
    if os.path.isfile(url):  # a changed local file gets a new cache entry
        st = os.stat(url)
        stamp = f"{os.path.abspath(url)}|{st.st_size}|{st.st_mtime_ns}"
    return f"{prefix}-{hashlib.sha1(stamp.encode()).hexdigest()[:20]}.tar"


def _cached_shard(url: str, source: Source) -> str:
    """``url`` (a .tar.gz, a pipe: command ...) as an uncompressed local tar, written once."""
    import webdataset as wds

    path = _cache_folder(source) / _cache_name(url, "shard")
    if path.is_file():
        return str(path)
    try:
        samples = wds.WebDataset(url, shardshuffle=False, empty_check=False)
        with _TarWriter(path) as out:
            for sample in samples:
                key = sample["__key__"]
                for ext, value in sample.items():
                    if not ext.startswith("__") and isinstance(value, bytes):
                        out.add(f"{key}.{ext}", value)
    except IPAdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken archive or a failing command is bad input
        raise IPAdapterError(f"--data {url}: cannot read it as webdataset shard ({' '.join(str(e).split())[:120]})") \
            from None
    return str(path)


class _TarWriter:
    """An uncompressed tar written to ``path.tmp-PID`` and renamed into place only when complete."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f"{path.name}.tmp-{os.getpid()}")

    def __enter__(self) -> _TarWriter:
        self.tar = tarfile.open(self.tmp, "w")
        return self

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def __exit__(self, kind, value, tb) -> None:
        self.tar.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()


# ------------------------------------------------------------------------------------ Hugging Face datasets
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_file", "file_name")
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt")


def _is_hf_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("metadata.jsonl", "metadata.csv", "metadata.parquet",
                                                    "dataset_info.json", "state.json", "dataset_dict.json")) or \
        any(p.suffix == ".parquet" for p in path.iterdir())


def _hf_dataset(data: str | list[str], streaming: bool):
    """A ``datasets`` Dataset / IterableDataset (the train split) from a folder or parquet file(s)."""
    import datasets

    path = Path(data) if isinstance(data, str) else None
    try:
        if path is not None and path.is_dir() and any((path / n).is_file() for n in
                                                      ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return ds.to_iterable_dataset() if streaming else ds
        if path is not None and path.is_dir() and not any((path / n).is_file() for n in
                                                          ("metadata.jsonl", "metadata.csv", "metadata.parquet")):
            data = sorted(str(p) for p in path.glob("*.parquet"))
        if isinstance(data, list) or str(data).endswith(PARQUET_SUFFIXES):
            return datasets.load_dataset("parquet", data_files=data, split="train", streaming=streaming)
        return datasets.load_dataset("imagefolder", data_dir=str(data), split="train", streaming=streaming)
    except IPAdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken folder or file is bad input
        raise IPAdapterError(f"--data {data}: cannot read it as a Hugging Face dataset "
                             f"({' '.join(str(e).split())[:140]})") from None


def _columns(names: list[str], source: Source, where: str) -> tuple[str, str]:
    def pick(given, defaults, what, flag):
        if given is not None:
            if given not in names:
                raise IPAdapterError(f"--data {where}: no column {given!r} ({flag}); it has {', '.join(names)}")
            return given
        found = next((c for c in defaults if c in names), None)
        if found is None:
            raise IPAdapterError(f"--data {where}: no {what} column among {', '.join(names)}; name it with "
                                 f"--set {flag}=COLUMN")
        return found

    return (pick(source.image_column, IMAGE_COLUMNS, "image", "image_column"),
            pick(source.caption_column, CAPTION_COLUMNS, "caption", "caption_column"))


def _hf_records(data: str | list[str], bad: BadItems, source: Source) -> list[Record]:
    """Rows of a Hugging Face dataset: memory-mapped rows read in place, or (streaming) written once to the cache."""
    import datasets

    where = data if isinstance(data, str) else f"{data[0]} (+{len(data) - 1})"
    ds = _hf_dataset(data, source.streaming)
    names = list(ds.column_names or ds.features or [])
    image_col, caption_col = _columns(names, source, where)
    if isinstance((ds.features or {}).get(image_col), datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    root = Path(data) if isinstance(data, str) and Path(data).is_dir() else Path(str(where)).parent
    if source.streaming:
        return _streamed_records(ds, image_col, caption_col, root, str(where), bad, source)
    captions = ds[caption_col]
    records = []
    for i, caption in enumerate(captions):
        name = f"{where} row {i}"
        if not isinstance(caption, str):  # an empty caption is an image-only item; a missing one is bad
            bad.add("no caption", name)
            continue
        records.append(Record(RowBlob(ds, i, image_col, str(root)), caption.strip(), key=name))
    return records


def _streamed_records(ds, image_col: str, caption_col: str, root: Path, where: str, bad: BadItems,
                      source: Source) -> list[Record]:
    path = _cache_folder(source) / _cache_name(f"{where}|{image_col}|{caption_col}", "stream")
    if not path.is_file():
        with _TarWriter(path) as out:
            for i, row in enumerate(ds):
                caption = row.get(caption_col)
                try:
                    image = _row_image(row.get(image_col), str(root))
                except BadItem as e:
                    out.add(f"{i:09d}.bad", f"{e.reason}\t{e.detail}".encode())
                    continue
                out.add(f"{i:09d}.img", image)
                if isinstance(caption, str):  # no .txt: a missing caption, counted as bad by the tar reader
                    out.add(f"{i:09d}.txt", caption.encode())
    return _tar_records([str(path)], bad, label=where)


def _row_image(value, root: str) -> bytes:
    """Image bytes from a row's image cell: {"bytes", "path"} (datasets.Image), a path, or bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        file = value if os.path.isabs(value) else os.path.join(root, value)
        try:
            with open(file, "rb") as f:
                return f.read()
        except OSError:
            raise BadItem("missing file", file) from None
    raise BadItem("missing file", "no image in the row")


@dataclass(frozen=True)
class RowBlob:
    """The image of row ``row`` of a memory-mapped ``datasets.Dataset`` (picklable: Arrow files are mapped)."""

    dataset: object
    row: int
    column: str
    root: str
    offset: int = 0  # read through read(), like a tar member

    def read(self) -> bytes:
        return _row_image(self.dataset[self.row][self.column], self.root)

    @property
    def path(self) -> str:
        return f"row {self.row}"

    @property
    def name(self) -> str:
        return f"row {self.row}"

    def exists(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------- transforms
def decode_image(blob: Blob) -> tuple[Image.Image, str | None]:
    """(RGB image, the odd mode it was converted from or None); :class:`BadItem` if it cannot be used."""
    try:
        data = blob.read()
    except OSError as e:
        raise BadItem("missing file", str(e)) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadItem("image too large", f"{img.width}x{img.height}")
            img = ImageOps.exif_transpose(img)
            img.load()
            mode = img.mode
            rgb = to_rgb(img, blob.name)
    except BadItem:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure (truncated, not an image, bomb) is a bad item
        raise BadItem("unreadable image", " ".join(str(e).split())[:80]) from None
    return rgb, (mode if mode != "RGB" else None)


def load_face(face: Blob | list | None) -> torch.Tensor:
    """A face-ID embedding [512] from a file or a list; :class:`BadItem` when missing or malformed."""
    if face is None:
        raise BadItem("missing face embedding")
    try:
        if isinstance(face, list):
            t = torch.tensor(face, dtype=torch.float32)
        else:
            data = face.read()
            suffix = Path(face.path).suffix if face.offset < 0 else ".npy"
            if suffix == ".npy":
                t = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
            elif suffix == ".safetensors":
                from safetensors.torch import load as load_st

                tensors = load_st(data)
                t = tensors.get("face_embeds", next(iter(tensors.values()))).float()
            else:
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                t = (obj if torch.is_tensor(obj) else torch.as_tensor(obj)).float()
    except BadItem:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadItem("bad face embedding", " ".join(str(e).split())[:80]) from None
    t = t.reshape(-1)
    if t.numel() != 512 or not torch.isfinite(t).all():
        raise BadItem("bad face embedding", f"{t.numel()} values, expected 512 finite numbers")
    return t


def make_buckets(resolution: int, multiple: int = 8, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) sizes of about ``resolution``**2 pixels, multiples of ``multiple``, aspect up to 4:1."""
    step = max(multiple, (resolution // 16) // multiple * multiple)
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = resolution + step
    while True:
        h = int(area / w) // step * step
        if h < step or w / h > max_ratio:
            break
        buckets.add((h, w))
        buckets.add((w, h))
        w += step
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> int:
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


def crop_to(img: Image.Image, height: int, width: int, crop_y: float = 0.5, crop_x: float = 0.5,
            flip: bool = False) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shortest side to cover ``height``x``width``, crop (0.5, 0.5 = centre), optionally mirror.

    Returns (pixels [3, height, width] in [-1, 1], original (h, w), crop top-left (SDXL's conditioning)).
    """
    original = (img.height, img.width)
    scale = max(height / img.height, width / img.width)
    rh, rw = max(height, round(img.height * scale)), max(width, round(img.width * scale))
    img = img.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0)
    top, left = round((rh - height) * crop_y), round((rw - width) * crop_x)
    img = img.crop((left, top, left + width, top + height))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - width  # the crop as seen in the mirrored picture
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, original, (top, left)


# --------------------------------------------------------------------------------------------- batch order
class BatchOrder:
    """Which items form global batch ``k``: a pure function of (seed, k), so resuming at ``k`` is exact.

    Every bucket (one per image shape; a single one without multi-aspect buckets) is an endless stream of its
    items, reshuffled each epoch; batch ``k`` takes the next ``global_batch`` items of one bucket, the bucket
    drawn in proportion to its size. Rank ``r`` of ``world`` uses rows ``r*b ... (r+1)*b`` of the global batch,
    so a run on 2 processes with batch b sees the very items (and draws) of 1 process with batch 2b.
    """

    BLOCK = 4096

    def __init__(self, buckets: np.ndarray, global_batch: int, seed: int):
        self.global_batch, self.seed = int(global_batch), int(seed)
        buckets = np.asarray(buckets)
        self.ids = [b for b in np.unique(buckets) if b >= 0]
        if not self.ids:
            raise IPAdapterError("no usable training items")
        self.members = {int(b): np.flatnonzero(buckets == b) for b in self.ids}
        sizes = np.array([len(self.members[int(b)]) for b in self.ids], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self._perm: dict[tuple[int, int], np.ndarray] = {}
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _choice(self, k: int) -> tuple[int, int]:
        """(bucket of batch k, how many earlier batches came from that bucket)."""
        if len(self.ids) == 1:
            return int(self.ids[0]), k
        block, offset = divmod(k, self.BLOCK)
        for j in range(len(self._blocks), block + 1):  # blocks are built in order; each needs the counts before it
            before = self._blocks[j - 1][1] + np.bincount(self._blocks[j - 1][0], minlength=len(self.ids)) if j else \
                np.zeros(len(self.ids), dtype=np.int64)
            rng = np.random.default_rng([self.seed, 17, j])
            self._blocks[j] = (rng.choice(len(self.ids), size=self.BLOCK, p=self.weights), before)
        picks, before = self._blocks[block]
        b = int(picks[offset])
        return int(self.ids[b]), int(before[b] + np.count_nonzero(picks[:offset] == b))

    def _epoch(self, bucket: int, epoch: int) -> np.ndarray:
        key = (bucket, epoch)
        if key not in self._perm:
            if len(self._perm) > 64:
                self._perm.clear()
            members = self.members[bucket]
            self._perm[key] = members[np.random.default_rng([self.seed, bucket, epoch]).permutation(len(members))]
        return self._perm[key]

    def batch(self, k: int) -> tuple[int, np.ndarray]:
        """(bucket, item indices [global_batch]) of global batch ``k``."""
        bucket, count = self._choice(k)
        n = len(self.members[bucket])
        start = count * self.global_batch
        out = np.empty(self.global_batch, dtype=np.int64)
        for i in range(self.global_batch):  # runs across epoch ends (tiny buckets) without dropping items
            epoch, pos = divmod(start + i, n)
            out[i] = self._epoch(bucket, epoch)[pos]
        return bucket, out

    def fallback(self, item: int, attempt: int) -> int:
        """The ``attempt``-th stand-in for a bad item: the next items of the same bucket (same shape)."""
        for members in self.members.values():
            pos = np.searchsorted(members, item)
            if pos < len(members) and members[pos] == item:
                return int(members[(pos + attempt) % len(members)])
        return item


def augment_draws(seed: int, k: int, global_batch: int) -> np.ndarray:
    """[global_batch, 3] uniforms for batch ``k``: flip, crop y, crop x (same on every rank, every resume)."""
    return np.random.default_rng([seed, k, 7]).random((global_batch, 3))


# ------------------------------------------------------------------------------------------------ dataset
@dataclass
class Transform:
    """How an item becomes tensors: sizes, augmentation and tokenizers (picklable, for loader workers)."""

    buckets: list[tuple[int, int]]
    tokenizers: list  # one (SD 1.x) or two (SDXL)
    clip_processor: object | None = None  # None: the kind does not read CLIP features
    face: bool = False
    random_crop: bool = False
    random_flip: bool = False
    seed: int = 0


class ImageTextDataset(torch.utils.data.Dataset):
    """Decodes items into model inputs. Keys are ``(item, k, row)`` for training, ``(item, -1, -1)`` to cache.

    Training: a bad item is replaced by the next good one of its bucket (so batches keep their size on every
    rank) and reported in ``"bad"``. Caching: centre crop, both mirror images when flipping is on, and a bad
    item comes back as ``None`` with its reason.
    """

    def __init__(self, records: list[Record], transform: Transform, order: BatchOrder | None = None,
                 bucket_of: np.ndarray | None = None):
        self.records, self.t, self.order = records, transform, order
        self.bucket_of = bucket_of

    def __len__(self) -> int:
        return len(self.records)

    def load(self, item: int, draws: np.ndarray | None, bucket: int | None) -> dict:
        rec = self.records[item]
        t = self.t
        img, mode = decode_image(rec.image)
        if bucket is None:
            bucket = nearest_bucket(t.buckets, img.height, img.width) if len(t.buckets) > 1 else 0
        h, w = t.buckets[bucket]
        out: dict = {"item": item, "bucket": bucket, "mode": mode}
        if draws is None:  # caching: centre crop, and the mirror image too when flipping is on
            variants = [crop_to(img, h, w, flip=f) for f in ((False, True) if t.random_flip else (False,))]
        else:
            flip = t.random_flip and draws[0] < 0.5
            cy, cx = (draws[1], draws[2]) if t.random_crop else (0.5, 0.5)
            variants = [crop_to(img, h, w, cy, cx, flip)]
        out["pixels"] = torch.stack([v[0] for v in variants])  # [V, 3, h, w]
        out["time_ids"] = torch.tensor([[*v[1], *v[2], h, w] for v in variants], dtype=torch.float32)
        out["ids"] = [tok(rec.text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids[0] for tok in t.tokenizers]
        if t.clip_processor is not None:  # the encoder sees the whole picture, as in the original recipe
            prompt = img if rec.prompt is None else decode_image(rec.prompt)[0]
            out["clip"] = t.clip_processor(images=[prompt], return_tensors="pt").pixel_values[0]
        if t.face:
            out["face"] = load_face(rec.face)
        return out

    def __getitem__(self, key: tuple[int, int, int]) -> dict | None:
        item, k, row = key
        if k < 0:
            try:
                return self.load(item, None, None)
            except BadItem as e:
                return {"item": item, "bad": (e.reason, self.records[item].name, e.detail)}
        draws = augment_draws(self.t.seed, k, self.order.global_batch)[row]
        bucket = int(self.bucket_of[item]) if self.bucket_of is not None else None
        bad = []
        for attempt in range(1, 64):
            try:
                out = self.load(item, draws, bucket)
                out["bad"] = bad
                return out
            except BadItem as e:
                bad.append((item, e.reason, self.records[item].name, e.detail))
                item = self.order.fallback(key[0], attempt)
        raise IPAdapterError(f"{self.records[key[0]].name}: this item and the 63 after it in its bucket are all "
                             "unusable; check the data")


def collate(samples: list[dict]) -> dict:
    """Stack training samples (one bucket, one variant each) into a batch dict of tensors."""
    out = {
        "pixels": torch.cat([s["pixels"] for s in samples]),
        "time_ids": torch.cat([s["time_ids"] for s in samples]),
        "ids": [torch.stack([s["ids"][j] for s in samples]) for j in range(len(samples[0]["ids"]))],
        "bad": [b for s in samples for b in s["bad"]],
        "modes": [(s["item"], s["mode"]) for s in samples if s["mode"]],
    }
    if "clip" in samples[0]:
        out["clip"] = torch.stack([s["clip"] for s in samples])
    if "face" in samples[0]:
        out["face"] = torch.stack([s["face"] for s in samples])
    return out


def scan_buckets(records: list[Record], buckets: list[tuple[int, int]], bad: BadItems) -> np.ndarray:
    """Bucket of every item from its image header (uncached multi-aspect training); -1 for unreadable files."""
    out = np.full(len(records), -1, dtype=np.int64)
    for i, rec in enumerate(records):
        try:
            with Image.open(io.BytesIO(rec.image.read()) if rec.image.offset >= 0 else rec.image.path) as img:
                w, h = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation swaps the sides
                    w, h = h, w
            out[i] = nearest_bucket(buckets, h, w)
        except Exception as e:  # noqa: BLE001
            bad.add("unreadable image", rec.name, i, " ".join(str(e).split())[:80])
    return out
