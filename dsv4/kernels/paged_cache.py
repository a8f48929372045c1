"""Compact paged KV cache for serving many sequences of different lengths from one pool (§2.3.4).

Per layer (heterogeneous, as in `dsv4.cache` but compact):
  window        ring of the last n_win KV records per sequence slot (position t in slot t % n_win)
  entries       compressed KV records (CSA: 1 per 4 tokens, HCA: 1 per 128) in fixed-size blocks
  index_keys    CSA only: the indexer's compressed keys, FP8 (128 E4M3 + fp32 scale, 132 B) or FP4
                (E2M1 + 1 UE8M0 byte per 32 dims, 68 B: the release's format and what `dsv4 info` counts)
  state         the compressors' unfinished-block rows (fp32 projections and gate logits)
KV records are the 584-byte FP8 format of `fp8_kv`. Layers with the same compression ratio hold the
same number of entries per sequence, so they share one block table: block ids are allocated once per
ratio group and index that group's per-layer pools. `used_bytes` counts exactly what the analyser
(`dsv4.analysis.v4_kv_terms`, `dsv4 info`) counts; `allocated_bytes` is the pool itself.
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
    table: torch.Tensor  # (max_seqs, max_blocks) int32, -1 = unallocated
    free: list[int]


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
                                    list(range(n_blocks - 1, -1, -1)))
        self.window = {i: torch.zeros(max_seqs, config.sliding_window, self.entry_bytes, dtype=torch.uint8,
                                      device=dev) for i in self.layer_ids}
        self.entries, self.keys, self.state = {}, {}, {}
        for i, r in self.ratios.items():
            if not r:
                continue
            n_blocks = len(self.groups[r].free)
            self.entries[i] = torch.zeros(n_blocks * block_size, self.entry_bytes, dtype=torch.uint8, device=dev)
            if r == 4:
                self.keys[i] = torch.zeros(n_blocks * block_size, self.key_format.bytes, dtype=torch.uint8,
                                           device=dev)
            self.state[i] = torch.zeros(max_seqs, compressor_state_bytes(config, r) // 4, dtype=torch.float32,
                                        device=dev)

    # ------------------------------------------------------------------ slots and blocks
    def allocate(self) -> int:
        for s in range(self.max_seqs):
            if not self.active[s]:
                self.active[s], self.lengths[s] = True, 0
                return s
        raise CacheFull(f"all {self.max_seqs} sequence slots are in use; free one with `release(slot)`")

    def release(self, slot: int) -> None:
        for g in self.groups.values():
            row = g.table[slot]
            g.free.extend(int(b) for b in row[row >= 0].tolist())
            row.fill_(-1)
        self.active[slot], self.lengths[slot] = False, 0

    def _rows(self, ratio: int, slot: int, start: int, n: int) -> torch.Tensor:
        """Physical rows of entries [start, start + n) of `slot`, allocating blocks as needed."""
        g, bs = self.groups[ratio], self.block_size
        table = g.table[slot]
        for blk in range(start // bs, math.ceil((start + n) / bs)):
            if int(table[blk]) < 0:
                if not g.free:
                    raise CacheFull(f"ratio-{ratio} pool is out of blocks; allocate with larger max_tokens")
                table[blk] = g.free.pop()
        idx = torch.arange(start, start + n, device=table.device)
        return table[idx // bs].long() * bs + idx % bs

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

    def write_entries(self, layer: int, slot: int, entries: torch.Tensor, start: int) -> None:
        """Finished compressed entries (n, D) with indices start.. of `slot`."""
        rows = self._rows(self.ratios[layer], slot, start, entries.shape[0])
        self.entries[layer][rows] = fp8_kv.pack(*fp8_kv.quantize(entries, self.config.qk_rope_head_dim))

    def write_index_keys(self, layer: int, slot: int, keys: torch.Tensor, start: int) -> None:
        rows = self._rows(4, slot, start, keys.shape[0])
        self.keys[layer][rows] = self.quantize_index_keys(keys)

    def quantize_index_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, Di) -> (n, key bytes) uint8: FP8 E4M3 + fp32 scale (amax / 448), or packed FP4 + UE8M0."""
        if self.index_keys == "fp8":
            scale = (keys.float().abs().amax(-1, keepdim=True) / fp8_kv.E4M3_MAX).clamp(min=1e-12)
            q = (keys.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
            return torch.cat((q, scale.view(torch.uint8)), dim=-1)
        from ..quant import quantize_fp4
        packed, scale = quantize_fp4(keys.float())
        return torch.cat((packed.view(torch.uint8), scale.view(torch.uint8)), dim=-1)

    def dequantize_index_keys(self, raw: torch.Tensor) -> torch.Tensor:
        di = self.config.index_head_dim
        if self.index_keys == "fp8":
            return raw[:, :di].view(torch.float8_e4m3fn).float() * raw[:, di:di + 4].contiguous().view(torch.float32)
        from ..quant import dequantize_fp4
        return dequantize_fp4(raw[:, :di // 2].contiguous(), raw[:, di // 2:].contiguous(), dtype=torch.float32)

    def gather_index_keys(self, layer: int, slot: int) -> torch.Tensor:
        n = self.num_entries(layer, slot)
        return self.dequantize_index_keys(self.keys[layer][self._rows(4, slot, 0, n)])

    # ------------------------------------------------------------------ kernel views
    def window_source(self, layer: int, slots: list[int]) -> KVSource:
        D, rd = self.config.head_dim, self.config.qk_rope_head_dim
        n_win = self.config.sliding_window
        nope, rope, scale = fp8_kv.views(self.window[layer].view(-1, self.entry_bytes), D, rd)
        table = torch.tensor(slots, dtype=torch.int32, device=nope.device)[:, None]
        return KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=n_win)

    def entry_source(self, layer: int, slots: list[int]) -> KVSource:
        D, rd = self.config.head_dim, self.config.qk_rope_head_dim
        nope, rope, scale = fp8_kv.views(self.entries[layer], D, rd)
        table = self.groups[self.ratios[layer]].table[slots].contiguous()
        return KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=self.block_size)

    def gather_entries(self, layer: int, slot: int, dtype=torch.bfloat16) -> torch.Tensor:
        """Reference read: entries of `slot` dequantised to (N, D)."""
        n = self.num_entries(layer, slot)
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
        pools = [*self.window.values(), *self.entries.values(), *self.keys.values(), *self.state.values()]
        tables = [g.table for g in self.groups.values()]
        return sum(t.numel() * t.element_size() for t in pools + tables)
