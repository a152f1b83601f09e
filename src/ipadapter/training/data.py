"""Training data: records from disk, image transforms, bad-item accounting, and a deterministic batch order.

A batch goes: :func:`read_records` (what the data file lists) -> :class:`BatchOrder` (which items form global
batch ``k``, a pure function of the seed and ``k``, so a resumed run sees exactly the batches it would have seen)
-> :class:`ImageTextDataset` (decode, resize, crop, tokenize; a bad item is swapped for the next good one of the
same shape and counted) -> the trainer's encoders (``train.py``).

Sources: the official JSON list (``[{"image_file": ..., "text": ...}]`` with a data root), JSONL, a folder of
images with same-name ``.txt`` captions, and webdataset ``.tar`` shards (``key.jpg`` + ``key.txt``/``key.json``).
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
def read_records(data: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 bad: BadItems | None = None) -> list[Record]:
    """The items ``data`` lists; entries without a caption or a file are counted in ``bad`` and left out.

    ``data``: a ``.json`` list or ``.jsonl`` file (paths relative to ``data_root``, default the file's folder),
    a folder of images with same-name ``.txt`` captions, a folder of ``.tar`` shards, a ``.tar`` file, or a
    glob pattern of shards (``"shards/train-*.tar"``).
    """
    bad = bad if bad is not None else BadItems()
    text = str(data)
    if any(ch in text for ch in "*?["):
        shards = sorted(glob.glob(text))
        if not shards:
            raise IPAdapterError(f"--data {text}: the pattern matches no files")
        records = _tar_records(shards, bad)
    else:
        path = Path(data)
        if not path.exists():
            raise IPAdapterError(f"--data {path}: no such file or folder; give a .json/.jsonl list, a folder of "
                                 "images with .txt captions, or .tar shards")
        if path.is_dir():
            shards = sorted(str(p) for p in path.glob("*.tar"))
            records = _tar_records(shards, bad) if shards else _folder_records(path, bad)
        elif path.suffix == ".tar":
            records = _tar_records([str(path)], bad)
        elif path.suffix in (".json", ".jsonl"):
            root = Path(data_root) if data_root is not None else path.parent
            if not root.is_dir():
                raise IPAdapterError(f"--data-root {root}: no such folder")
            records = _list_records(path, root, bad)
        else:
            raise IPAdapterError(f"--data {path}: unknown data file type {path.suffix!r}; use .json, .jsonl, .tar or "
                                 "a folder")
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


def _tar_records(shards: list[str], bad: BadItems) -> list[Record]:
    """Index webdataset shards by reading their member headers; members are then read by offset."""
    records = []
    for shard in shards:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tf:  # uncompressed shards only: members are read by offset
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    groups.setdefault(os.path.join(os.path.dirname(m.name), stem), {})[ext.lower()] = m
        except (tarfile.TarError, OSError) as e:
            raise IPAdapterError(f"--data {shard}: not a readable uncompressed .tar shard ({e})") from None
        for key, members in groups.items():
            name = f"{shard}:{key}"
            image = next((members[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in members), None)
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
