"""Compact paged KV cache for serving many sequences of different lengths from one pool (§2.3.4).

Per layer (heterogeneous, as in `dsv4.cache` but compact):
  window        ring of the last n_win KV records per sequence slot (position t in slot t % n_win)
  entries       compressed KV records (CSA: 1 per 4 tokens, HCA: 1 per 128) in fixed-size blocks
  index_keys    CSA only: the indexer's compressed keys, FP8 (128 E4M3 + fp32 scale, 132 B) or FP4
                (E2M1 + 1 UE8M0 byte per 32 dims, 68 B: the release's format and what `dsv4 info` counts),
                held as two planes of the same rows, payloads (`keys`, 128 / 64 B) and scales
                (`key_scales`, 4 B): a 132-byte row would leave the payload only 4-byte aligned, so the
                indexer's loads could not vectorise (on the H100 its decode scoring ran at ~1 TB/s over such
                rows, while 256-byte bf16 rows moved twice the bytes in the same time, RESULTS.md "Decode
                kernels v2"). Exported / loaded slots still carry whole 132 / 68-byte records.
  state         the compressors' unfinished-block rows (fp32 projections and gate logits)
KV records are the 584-byte FP8 format of `fp8_kv`. Layers with the same compression ratio hold the
same number of entries per sequence, so they share one block table: block ids are allocated once per
ratio group and index that group's per-layer pools. `used_bytes` counts exactly what the analyser
(`dsv4.analysis.v4_kv_terms`, `dsv4 info`) counts; `allocated_bytes` is the pool itself.

Decode writes are graph-safe (`dsv4.engine.graphs`): slots and positions come as device tensors, every row
of the batch writes (a row that finishes no compressed entry writes its would-be entry to the group's
scratch row, one row past the blocks, which nothing reads), and blocks are allocated beforehand on the
host (`reserve`), so a captured step only reads the block tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..analysis import indexer_key_format, v4_kv_format
from ..config import Config
from . import fp8_kv
from .sparse_attn import KVSource


class CacheFull(RuntimeError):
    pass


def compressor_state_bytes(config: Config, ratio: int) -> int:
    """Unfinished-block state: fp32 KV and gate rows (coff * m, coff * c), coff = 2 for CSA's overlap."""
    coff = 2 if ratio == 4 else 1
    out = 2 * (coff * ratio) * (coff * config.head_dim) * 4
    if ratio == 4:
        out += 2 * (2 * ratio) * (2 * config.index_head_dim) * 4
    return out


@dataclass
class _Group:
    ratio: int
    table: torch.Tensor  # (max_seqs, max_blocks) int32, -1 = unallocated (what the kernels read)
    free: list[int]
    host: list[list[int]]  # the same table on the host: allocation never waits for the device
    scratch_row: int  # pool row past every block: where decode sends the entries of rows that finish none


class PagedKVCache:
    def __init__(self, config: Config, max_seqs: int, max_tokens: int, block_size: int = 64,
                 index_keys: str = "fp8", device: torch.device | str = "cpu", layers: list[int] | None = None):
        """Room for `max_tokens` tokens summed over sequences (pools sized for that), `max_seqs` slots."""
        self.config, self.block_size, self.max_seqs = config, block_size, max_seqs
        self.layer_ids = list(range(config.num_hidden_layers)) if layers is None else layers
        self.ratios = {i: config.layer_ratios[i] for i in self.layer_ids}
        self.entry_bytes = v4_kv_format(config).bytes
        assert self.entry_bytes == fp8_kv.record_bytes(config.head_dim, config.qk_rope_head_dim)
        self.key_format = indexer_key_format(config, index_keys)
        self.index_keys = index_keys
        self.lengths = [0] * max_seqs  # tokens consumed per slot
        self.active = [False] * max_seqs
        dev = torch.device(device)
        self.groups: dict[int, _Group] = {}
        for r in sorted({r for r in self.ratios.values() if r}):
            n_blocks = math.ceil(max_tokens / r / block_size) + max_seqs
            max_per_seq = math.ceil(config.max_position_embeddings / r / block_size)
            self.groups[r] = _Group(r, torch.full((max_seqs, max_per_seq), -1, dtype=torch.int32, device=dev),
                                    list(range(n_blocks - 1, -1, -1)), [[] for _ in range(max_seqs)],
                                    scratch_row=n_blocks * block_size)
        self.window = {i: torch.zeros(max_seqs, config.sliding_window, self.entry_bytes, dtype=torch.uint8,
                                      device=dev) for i in self.layer_ids}
        self.entries, self.keys, self.key_scales, self.state = {}, {}, {}, {}
        scale_bytes = self.key_format.scale_bytes
        for i, r in self.ratios.items():
            if not r:
                continue
            rows = self.groups[r].scratch_row + 1
            self.entries[i] = torch.zeros(rows, self.entry_bytes, dtype=torch.uint8, device=dev)
            if r == 4:
                self.keys[i] = torch.zeros(rows, self.key_format.bytes - scale_bytes, dtype=torch.uint8, device=dev)
                self.key_scales[i] = torch.zeros(rows, scale_bytes, dtype=torch.uint8, device=dev)
            self.state[i] = torch.zeros(max_seqs, compressor_state_bytes(config, r) // 4, dtype=torch.float32,
                                        device=dev)

    # ------------------------------------------------------------------ slots and blocks
    def allocate(self) -> int:
        for s in range(self.max_seqs):
            if not self.active[s]:
                self.active[s], self.lengths[s] = True, 0
                for st in self.state.values():  # a free slot may hold a decode graph's padding rows
                    st[s].zero_()
                return s
        raise CacheFull(f"all {self.max_seqs} sequence slots are in use; free one with `release(slot)`")

    def release(self, slot: int) -> None:
        for g in self.groups.values():
            g.free.extend(reversed(g.host[slot]))
            g.host[slot] = []
            g.table[slot].fill_(-1)
        self.active[slot], self.lengths[slot] = False, 0
        for st in self.state.values():
            st[slot].zero_()

    def _allocate_blocks(self, ratio: int, slot: int, n: int) -> list[int]:
        """Blocks for entries [0, n) of `slot` (allocated as needed) -> the slot's host block list."""
        g, bs = self.groups[ratio], self.block_size
        host = g.host[slot]
        need = math.ceil(n / bs)
        if need > g.table.shape[1]:
            raise CacheFull(f"slot {slot}: {n} ratio-{ratio} entries exceed max_position_embeddings")
        if need > len(host):
            if need - len(host) > len(g.free):
                raise CacheFull(f"ratio-{ratio} pool is out of blocks ({len(g.free)} free, "
                                f"{need - len(host)} needed); make the pool larger (max_tokens)")
            first = len(host)
            host.extend(g.free.pop() for _ in range(need - first))
            g.table[slot, first:need] = torch.tensor(host[first:need], dtype=torch.int32).to(g.table.device,
                                                                                          non_blocking=True)
        return host

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Blocks for every entry `slot` holds once it has consumed `n_tokens` tokens, in every ratio group:
        decode calls it before the step, so the step (maybe a replayed CUDA graph) only reads the tables."""
        for r in self.groups:
            self._allocate_blocks(r, slot, n_tokens // r)

    def _rows(self, ratio: int, slot: int, start: int, n: int) -> torch.Tensor:
        """Physical rows of entries [start, start + n) of `slot`, allocating blocks as needed."""
        bs, dev = self.block_size, self.groups[ratio].table.device
        host = self._allocate_blocks(ratio, slot, start + n)
        need = math.ceil((start + n) / bs)
        blocks = torch.tensor(host[start // bs:need], dtype=torch.long).to(dev, non_blocking=True)
        idx = torch.arange(start, start + n, device=dev)
        return blocks[idx // bs - start // bs] * bs + idx % bs

    def num_entries(self, layer: int, slot: int) -> int:
        r = self.ratios[layer]
        return self.lengths[slot] // r if r else 0

    # ------------------------------------------------------------------ writes
    def write_window(self, layer: int, slot: int, kv: torch.Tensor, start_pos: int) -> None:
        """kv (n, D) at positions start_pos.. -> the ring (only the last n_win are kept)."""
        n_win = self.config.sliding_window
        kv, start_pos = kv[-n_win:], start_pos + max(0, kv.shape[0] - n_win)
        slots = torch.arange(start_pos, start_pos + kv.shape[0], device=kv.device) % n_win
        self.window[layer][slot, slots] = fp8_kv.pack(*fp8_kv.quantize(kv, self.config.qk_rope_head_dim))

    def write_window_tokens(self, layer: int, slots: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor) -> None:
        """Decode: one token per sequence, kv (B, D) at `positions` (B,) -> the rings of `slots` (B,) (device)."""
        n_win = self.config.sliding_window
        rows = slots * n_win + positions % n_win
        self.window[layer].view(-1, self.entry_bytes)[rows] = fp8_kv.pack(*fp8_kv.quantize(kv, self.config.qk_rope_head_dim))

    def read_window(self, layer: int, slot: int, end: int, n: int, dtype=torch.bfloat16) -> torch.Tensor:
        """Reference read: the ring's tokens at positions [end - n, end), dequantised, oldest first (n < n_win)."""
        n_win = self.config.sliding_window
        assert n <= n_win and n <= end, (n, n_win, end)
        rows = torch.arange(end - n, end, device=self.window[layer].device) % n_win
        D, rd = self.config.head_dim, self.config.qk_rope_head_dim
        return fp8_kv.dequantize(*fp8_kv.views(self.window[layer][slot, rows], D, rd), dtype=dtype)

    def compressor_state(self, layer: int, indexer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 views (max_seqs, rows, width) of a compressor's unfinished-block state: KV rows and gate logits.
        Rows [0, ratio): the unfinished block's tokens by position % ratio (raw projections, gate without the
        slot bias); CSA also keeps rows [ratio, 2 ratio) = series a of the last finished block (first
        `dim` columns, gate with the slot bias: what the next block's overlap reads, `Compressor.forward`)."""
        r, c = self.ratios[layer], self.config
        coff = 2 if r == 4 else 1
        dim = c.index_head_dim if indexer else c.head_dim
        size = (coff * r) * (coff * dim)
        start = 2 * (coff * r) * (coff * c.head_dim) if indexer else 0
        flat = self.state[layer][:, start:start + 2 * size]
        kv, gate = flat.view(self.max_seqs, 2, coff * r, coff * dim).unbind(1)
        return kv, gate

    def write_entries(self, layer: int, slot: int, entries: torch.Tensor, start: int) -> None:
        """Finished compressed entries (n, D) with indices start.. of `slot`."""
        self._store(layer, self._rows(self.ratios[layer], slot, start, entries.shape[0]), entries, index_keys=False)

    def write_index_keys(self, layer: int, slot: int, keys: torch.Tensor, start: int) -> None:
        self._store(layer, self._rows(4, slot, start, keys.shape[0]), keys, index_keys=True)

    def write_finished(self, layer: int, slots: torch.Tensor, indices: torch.Tensor, finished: torch.Tensor,
                       x: torch.Tensor, index_keys: bool = False) -> None:
        """Decode, every row alike: row b of x (B, D) is entry indices[b] of slots[b] (a compressed entry, or an
        index key) where finished[b]; the other rows go to the scratch row. All (B,) device tensors; the
        blocks must be allocated (`reserve`)."""
        g, bs = self.groups[4 if index_keys else self.ratios[layer]], self.block_size
        w = indices.clamp(min=0)  # unfinished rows may point before entry 0; their row is discarded anyway
        rows = torch.where(finished, g.table[slots, w // bs].long() * bs + w % bs, g.scratch_row)
        self._store(layer, rows, x, index_keys)

    def _store(self, layer: int, rows: torch.Tensor, x: torch.Tensor, index_keys: bool) -> None:
        """x (n, D) -> its stored format at pool `rows`: index keys in this cache's key format, KV entries as
        the 584-byte FP8 record."""
        if index_keys:
            self._write_key_records(layer, rows, self.quantize_index_keys(x))
        else:
            self.entries[layer][rows] = fp8_kv.pack(*fp8_kv.quantize(x, self.config.qk_rope_head_dim))

    def key_records(self, layer: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """Whole index-key records (n, key bytes) of pool `rows`: payload then scale, `fp8_kv`'s format."""
        return torch.cat((self.keys[layer][rows], self.key_scales[layer][rows]), dim=-1)

    def _write_key_records(self, layer: int, rows: torch.Tensor, raw: torch.Tensor) -> None:
        split = self.keys[layer].shape[1]
        self.keys[layer][rows] = raw[:, :split]
        self.key_scales[layer][rows] = raw[:, split:]

    def quantize_index_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, Di) -> (n, key bytes) uint8 (`fp8_kv.quantize_index_keys` in this cache's format)."""
        return fp8_kv.quantize_index_keys(keys, self.index_keys)

    def dequantize_index_keys(self, raw: torch.Tensor) -> torch.Tensor:
        return fp8_kv.dequantize_index_keys(raw, self.config.index_head_dim, self.index_keys)

    def gather_index_keys(self, layer: int, slot: int, n: int | None = None) -> torch.Tensor:
        """Reference read: the first `n` (default: all finished) index keys of `slot`, fp32 (n, Di)."""
        n = self.num_entries(layer, slot) if n is None else n
        return self.dequantize_index_keys(self.key_records(layer, self._rows(4, slot, 0, n)))

    def key_source(self, layer: int, slots: torch.Tensor | list[int]):
        """The indexer decode kernel's view of the FP8 keys (`indexer_decode.KeySource`)."""
        from .indexer_decode import KeySource
        if self.index_keys != "fp8":
            raise NotImplementedError("the indexer decode kernel reads FP8 keys; FP4 keys take the reference path")
        return KeySource(main=self.keys[layer].view(torch.float8_e4m3fn),
                         scale=self.key_scales[layer].view(torch.float32)[:, 0],
                         table=self.groups[4].table[slots].contiguous(), block_size=self.block_size)

    # ------------------------------------------------------------------ kernel views
    # `slots`: the batch's slots, a (B,) device tensor (decode: no host copy) or a list.
    def window_source(self, layer: int, slots: torch.Tensor | list[int]) -> KVSource:
        D, rd = self.config.head_dim, self.config.qk_rope_head_dim
        n_win = self.config.sliding_window
        nope, rope, scale = fp8_kv.views(self.window[layer].view(-1, self.entry_bytes), D, rd)
        table = torch.as_tensor(slots, dtype=torch.int32, device=nope.device)[:, None]
        return KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=n_win)

    def entry_source(self, layer: int, slots: torch.Tensor | list[int]) -> KVSource:
        D, rd = self.config.head_dim, self.config.qk_rope_head_dim
        nope, rope, scale = fp8_kv.views(self.entries[layer], D, rd)
        table = self.groups[self.ratios[layer]].table[slots].contiguous()
        return KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=self.block_size)

    def gather_entries(self, layer: int, slot: int, dtype=torch.bfloat16, n: int | None = None) -> torch.Tensor:
        """Reference read: the first `n` (default: all finished) entries of `slot` dequantised to (n, D)."""
        n = self.num_entries(layer, slot) if n is None else n
        rows = self._rows(self.ratios[layer], slot, 0, n)
        D, rd = self.config.head_dim, self.config.qk_rope_head_dim
        return fp8_kv.dequantize(*fp8_kv.views(self.entries[layer][rows], D, rd), dtype=dtype)

    # ------------------------------------------------------------------ accounting
    def used_bytes(self, slot: int) -> dict[str, int]:
        """Bytes this sequence occupies, by kind (the analyser's terms, `dsv4.analysis.v4_kv_terms`)."""
        ctx, c = self.lengths[slot], self.config
        out = {"window": 0, "compressed": 0, "indexer_keys": 0, "compressor_state": 0}
        for i in self.layer_ids:
            r = self.ratios[i]
            out["window"] += min(ctx, c.sliding_window) * self.entry_bytes
            if r:
                out["compressed"] += (ctx // r) * self.entry_bytes
                out["compressor_state"] += compressor_state_bytes(c, r)
            if r == 4:
                out["indexer_keys"] += (ctx // r) * self.key_format.bytes
        return out

    def allocated_bytes(self) -> int:
        pools = [*self.window.values(), *self.entries.values(), *self.keys.values(), *self.key_scales.values(),
                 *self.state.values()]
        tables = [g.table for g in self.groups.values()]
        return sum(t.numel() * t.element_size() for t in pools + tables)

    # ------------------------------------------------------------------ export / load (prefix caching)
    def export(self, slot: int) -> dict[str, torch.Tensor]:
        """Copies of what `slot` holds after its `lengths[slot]` tokens: per layer the window ring (n_win, rec),
        the FP8 records of its finished entries (n // ratio, rec) and their index keys, the compressor state
        row; plus the length. `load` writes them into a fresh slot, which then continues byte for byte as this
        one would. The ring is copied whole: positions map to ring rows by position, not by slot."""
        n = self.lengths[slot]
        out = {"length": torch.tensor(n, dtype=torch.int64)}
        for i in self.layer_ids:
            out[f"window.{i}"] = self.window[i][slot].clone()
            r = self.ratios[i]
            if r:
                rows = self._rows(r, slot, 0, n // r)
                out[f"entries.{i}"] = self.entries[i][rows]  # advanced indexing: a copy
                if r == 4:
                    out[f"keys.{i}"] = self.key_records(i, rows)
                out[f"state.{i}"] = self.state[i][slot].clone()
        return out

    def load(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `export` into an allocated, empty slot (allocating its blocks). Everything is checked
        before anything is written: tensors of another layout (layers, formats, index-key kind) raise
        ValueError and leave the slot empty; CacheFull (out of blocks) leaves it with length 0."""
        if not self.active[slot] or self.lengths[slot]:
            raise ValueError(f"cache slot {slot} must be allocated and empty to load into")
        if "length" not in tensors:
            raise ValueError("exported cache tensors have no 'length'")
        n = int(tensors["length"])
        want = {}
        for i in self.layer_ids:
            want[f"window.{i}"] = self.window[i][slot].shape
            r = self.ratios[i]
            if r:
                want[f"entries.{i}"] = (n // r, self.entry_bytes)
                if r == 4:
                    want[f"keys.{i}"] = (n // r, self.key_format.bytes)
                want[f"state.{i}"] = self.state[i][slot].shape
        got = {k: tuple(v.shape) for k, v in tensors.items() if k != "length"}
        if got.keys() != want.keys():
            diff = sorted(got.keys() ^ want.keys())
            raise ValueError(f"exported cache tensors do not fit this pool's layers: {diff[:4]} differ")
        for k, shape in want.items():
            dtype = torch.float32 if k.startswith("state.") else torch.uint8
            if got[k] != tuple(shape) or tensors[k].dtype != dtype:
                raise ValueError(f"exported cache tensor {k}: {got[k]} {tensors[k].dtype}, this pool holds "
                                 f"{tuple(shape)} {dtype} (another record or index-key format?)")
        if n > self.config.max_position_embeddings:
            raise ValueError(f"exported cache of {n} tokens exceeds max_position_embeddings")
        rows = {r: self._rows(r, slot, 0, n // r) for r in self.groups}  # CacheFull here, before any write
        for i in self.layer_ids:
            self.window[i][slot] = tensors[f"window.{i}"].to(self.window[i].device)
            r = self.ratios[i]
            if r:
                self.entries[i][rows[r]] = tensors[f"entries.{i}"].to(rows[r].device)
                if r == 4:
                    self._write_key_records(i, rows[r], tensors[f"keys.{i}"].to(rows[r].device))
                self.state[i][slot] = tensors[f"state.{i}"].to(rows[r].device)
        self.lengths[slot] = n
