"""Prefix cache: the cache state after a block-aligned prompt prefix, reused by later prompts that share it.

The V4 cache after n tokens is a set of tensors (window ring, compressed entries, unfinished-block state).
At a length that is a multiple of every compression ratio (128 for CSA m=4 / HCA m'=128) no block is
half-full, so the state is a clean function of the prefix alone: we snapshot it there, keyed by a chained
hash of the token ids (key_k = sha256(key_{k-1} || ids of block k), key_0 = the model fingerprint), so
a lookup walks one prompt once. Entries live in memory (LRU by bytes) and, if a folder is given, on disk
as safetensors files written atomically (temporary file + rename) by a background thread, so they survive
a restart. A file that cannot be read is deleted and treated as a miss.

A store holds one layout: "reference" (a model-dtype `KVCache`) or "paged" (a slot of the FP8 pool,
`PagedKVCache.export`). The engine's fingerprint names the layout, so one folder never serves the other.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..cache import KVCache
from ..config import Config
from . import cache_ops


@dataclass
class PrefixEntry:
    cache: KVCache | dict[str, torch.Tensor]  # a KVCache, or a pool slot's `PagedKVCache.export`
    hidden: torch.Tensor | None  # (1, 1, n_hc, d) trunk streams of the last prefix token (MTP drafting)

    @property
    def length(self) -> int:
        return self.cache.length if isinstance(self.cache, KVCache) else int(self.cache["length"])

    def nbytes(self) -> int:
        h = 0 if self.hidden is None else self.hidden.numel() * self.hidden.element_size()
        if isinstance(self.cache, KVCache):
            return self.cache.nbytes() + h
        return sum(t.numel() * t.element_size() for t in self.cache.values()) + h


def block_keys(fingerprint: str, ids: list[int], block: int) -> list[str]:
    """keys[k - 1] identifies ids[:k * block] (whole blocks only)."""
    h = hashlib.sha256(fingerprint.encode())
    keys = []
    for k in range(len(ids) // block):
        block_ids = torch.tensor(ids[k * block:(k + 1) * block], dtype=torch.int32)
        h = hashlib.sha256(h.digest() + block_ids.numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


class PrefixStore:
    def __init__(self, config: Config, max_bytes: int, disk_dir: str | Path | None = None,
                 device: torch.device | str = "cpu", max_disk_bytes: int | None = None, layout: str = "reference"):
        if layout not in ("reference", "paged"):
            raise ValueError(f"layout={layout!r}: choose 'reference' or 'paged'")
        self.config, self.max_bytes, self.device, self.layout = config, max_bytes, device, layout
        self.max_disk_bytes = max_disk_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._mem: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = {"stores": 0, "disk_writes": 0, "disk_loads": 0, "evictions": 0, "disk_errors": 0}
        self._writes: queue.Queue | None = None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._writes = queue.Queue()
            threading.Thread(target=self._writer, name="dsv4-prefix-writer", daemon=True).start()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: str) -> bool:
        return key in self._mem or (self.disk_dir is not None and self._path(key).exists())

    def _path(self, key: str) -> Path:
        return self.disk_dir / f"{key}.safetensors"

    def get(self, key: str) -> PrefixEntry | None:
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                return entry
        if self.disk_dir is None or not self._path(key).exists():
            return None
        entry = self._load(key)
        if entry is not None:
            self._insert(key, entry)
        return entry

    def put(self, key: str, entry: PrefixEntry) -> None:
        """Store a deep copy (the request keeps decoding on its own cache; an export is a copy already)."""
        if key in self._mem:
            return
        cache = cache_ops.clone(entry.cache) if isinstance(entry.cache, KVCache) else entry.cache
        entry = PrefixEntry(cache, None if entry.hidden is None else entry.hidden.detach().clone())
        self.stats["stores"] += 1
        self._insert(key, entry)
        if self._writes is not None and not self._path(key).exists():
            self._writes.put((key, entry))

    def discard(self, key: str) -> None:
        """Forget an entry that turned out unusable (memory and disk)."""
        with self._lock:
            entry = self._mem.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes()
        if self.disk_dir is not None:
            self._path(key).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued disk write is done."""
        if self._writes is not None:
            self._writes.join()

    def _insert(self, key: str, entry: PrefixEntry) -> None:
        size = entry.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            self._mem[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._mem.popitem(last=False)
                self._bytes -= old.nbytes()
                self.stats["evictions"] += 1

    def _load(self, key: str) -> PrefixEntry | None:
        path = self._path(key)
        try:
            tensors = load_file(str(path))
            hidden = tensors.pop("hidden", None)
            if self.layout == "reference":
                cache = cache_ops.from_tensors(self.config, tensors, self.device)
            else:  # checked in full against the pool by `PagedKVCache.load`
                int(tensors["length"])
                cache = {k: v.to(self.device) for k, v in tensors.items()}
        except (SafetensorError, OSError, ValueError, KeyError):
            self.stats["disk_errors"] += 1
            path.unlink(missing_ok=True)  # corrupt or from another layout: a miss, and never again
            return None
        self.stats["disk_loads"] += 1
        return PrefixEntry(cache, None if hidden is None else hidden.to(self.device))

    def _writer(self) -> None:
        while True:
            key, entry = self._writes.get()
            try:
                if isinstance(entry.cache, KVCache):
                    tensors = cache_ops.to_tensors(entry.cache)
                else:
                    tensors = {k: v.contiguous().cpu() for k, v in entry.cache.items()}
                if entry.hidden is not None:
                    tensors["hidden"] = entry.hidden.contiguous().cpu()
                path = self._path(key)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, str(tmp))
                os.replace(tmp, path)  # atomic: a reader sees the whole file or none
                self.stats["disk_writes"] += 1
                self._trim_disk()
            except OSError:
                self.stats["disk_errors"] += 1
            finally:
                self._writes.task_done()

    def _trim_disk(self) -> None:
        if self.max_disk_bytes is None:
            return
        files = sorted(self.disk_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_disk_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
