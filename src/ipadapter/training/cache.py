"""Feature cache: VAE latents, text embeddings and image-encoder features computed once; then a step costs only
the UNet.

Layout (one folder per fingerprint, so caches for other models, data or sizes sit side by side and are reused)::

    DIR/<fingerprint>/meta.json              what was cached, from what (human readable)
    DIR/<fingerprint>/uncond.safetensors     the dropped-condition features: empty caption, dropped image
    DIR/<fingerprint>/shard-00000.safetensors
                                             items [s*S, (s+1)*S): "<name>@<bucket>" tensors stacked per image
                                             shape, "item@<bucket>" their item indices; metadata lists bad items

Shards are written atomically (temporary name, then rename) and skipped when present, so an interrupted build
resumes where it stopped; with several processes each builds every ``world``-th shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.errors import IPAdapterError
from ..core.files import atomic_write

Tensors = dict[str, torch.Tensor]
#: ``encode(items) -> ({bucket: {name: tensor [n, ...], "item": [n]}}, [(item, reason, name, detail), ...])``
EncodeFn = Callable[[list[int]], tuple[dict[int, Tensors], list]]
VERSION = 1


def fingerprint(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(tensors: Tensors, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


class FeatureCache:
    """A cache folder for one fingerprint (``info``: everything the cached features depend on)."""

    def __init__(self, root: str | os.PathLike, info: dict, num_items: int, shard_size: int = 1024):
        self.info = {"version": VERSION, **info, "num_items": num_items, "shard_size": shard_size}
        self.dir = Path(root) / fingerprint(self.info)
        self.num_items, self.shard_size = num_items, shard_size

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_path(self, s: int) -> Path:
        return self.dir / f"shard-{s:05d}.safetensors"

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    @property
    def complete(self) -> bool:
        return (self.dir / "uncond.safetensors").is_file() and not self.missing()

    def build(self, encode: EncodeFn, uncond: Callable[[], Tensors], rank: int = 0, world: int = 1,
              progress: Callable[[int, int], None] | None = None) -> None:
        """Encode and write this rank's missing shards (every ``world``-th one); the caller then waits for all."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IPAdapterError(f"--cache {self.dir.parent}: cannot create the cache folder ({e})") from None
        if rank == 0:
            (self.dir / "meta.json").write_text(json.dumps(self.info, indent=1, sort_keys=True, default=str) + "\n")
            if not (self.dir / "uncond.safetensors").is_file():
                _atomic_save(uncond(), self.dir / "uncond.safetensors")
        todo = [s for s in self.missing() if s % world == rank]
        for n, s in enumerate(todo):
            items = list(range(s * self.shard_size, min((s + 1) * self.shard_size, self.num_items)))
            groups, bad = encode(items)
            tensors = {f"{name}@{b}": t for b, group in groups.items() for name, t in group.items()}
            _atomic_save(tensors, self.shard_path(s), {"bad": json.dumps(bad)})
            if progress is not None:
                progress(n + 1, len(todo))

    def open(self, device: torch.device | str = "cpu", in_memory: bool = True) -> CachedFeatures:
        if not self.complete:
            raise IPAdapterError(f"{self.dir}: the feature cache is incomplete ({len(self.missing())} shards missing)")
        return CachedFeatures(self, torch.device(device), in_memory)

    def nbytes(self) -> int:
        return sum(self.shard_path(s).stat().st_size for s in range(self.num_shards))


class CachedFeatures:
    """Read side: ``gather(bucket, items)`` returns the cached tensors of those items as one batch.

    In memory (on the training device when it fits) a gather is one ``index_select`` per tensor; otherwise rows
    are read from the memory-mapped shards.
    """

    def __init__(self, cache: FeatureCache, device: torch.device, in_memory: bool):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.device = device
        self.bucket_of = np.full(cache.num_items, -1, dtype=np.int64)
        self.row_of = np.full(cache.num_items, -1, dtype=np.int64)
        self.bad: list = []
        self.uncond = {k: v.to(device) for k, v in load_file(str(cache.dir / "uncond.safetensors")).items()}
        parts: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._lazy: dict[int, list[tuple[object, int]]] = {}  # bucket -> [(shard handle, rows)] (not in memory)
        self._lazy_names: dict[int, list[str]] = {}
        counts: dict[int, int] = {}
        for s in range(cache.num_shards):
            handle = safe_open(str(cache.shard_path(s)), framework="pt")
            self.bad += json.loads((handle.metadata() or {}).get("bad", "[]"))
            keys = list(handle.keys())
            for key in keys:
                name, b = key.rsplit("@", 1)
                b = int(b)
                if name != "item":
                    continue
                items = handle.get_tensor(key).numpy()
                start = counts.get(b, 0)
                self.bucket_of[items] = b
                self.row_of[items] = np.arange(start, start + len(items))
                counts[b] = start + len(items)
                names = [k.rsplit("@", 1)[0] for k in keys if k.endswith(f"@{b}") and not k.startswith("item@")]
                if in_memory:
                    group = parts.setdefault(b, {})
                    for nm in names:
                        group.setdefault(nm, []).append(handle.get_tensor(f"{nm}@{b}"))
                else:
                    self._lazy.setdefault(b, []).append((handle, len(items)))
                    self._lazy_names[b] = names
        self.tensors = {b: {nm: torch.cat(ts).to(device) for nm, ts in group.items()} for b, group in parts.items()}
        self.in_memory = in_memory

    def gather(self, bucket: int, items: np.ndarray) -> Tensors:
        rows = self.row_of[items]
        if self.in_memory:
            index = torch.from_numpy(rows).to(self.device, non_blocking=True)
            return {nm: t.index_select(0, index) for nm, t in self.tensors[bucket].items()}
        out: dict[str, list[torch.Tensor]] = {nm: [] for nm in self._lazy_names[bucket]}
        bounds = np.cumsum([0] + [n for _, n in self._lazy[bucket]])
        for r in rows:
            s = int(np.searchsorted(bounds, r, side="right") - 1)
            handle = self._lazy[bucket][s][0]
            for nm in out:
                out[nm].append(handle.get_slice(f"{nm}@{bucket}")[int(r - bounds[s])])
        return {nm: torch.stack(ts).to(self.device, non_blocking=True) for nm, ts in out.items()}
