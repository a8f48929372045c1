"""The paged decode step as a CUDA graph, applied from outside the model (STYLE rule 2).

One decode step of the 43-layer Flash-shaped model launches ~9,400 kernels for ~34 ms of GPU work: the step
is bound by the CPU launching them (benchmarks/RESULTS.md, long-context decode). `DecodeGraphs` captures the
step once per (batch size, capacity bucket) and replays it, so a step costs one graph launch. Batch sizes are
padded to powers of two (dummy rows on a free slot, when one is free), so a serving engine whose batch grows
and shrinks request by request captures a handful of graphs, not one per size.

What a captured step reads that changes between steps sits in static device tensors written in place before
each replay: the token ids (B, 1), the slots (B,), the positions (B, 1), and the pool's block tables (blocks
are allocated on the host before the replay, `PagedBatch.reserve_decode`, so the graph only reads them). The
step itself (`dsv4.paged._decode`) runs the same ops for every row whatever its position. The one host number
it uses, `PagedBatch.max_len` (a bound on every row's position + 1, which sizes the kernels' grids; the
kernels mask by each row's device count), is fixed per graph: the next power of two of the longest row, at
least `min_bucket`. Host bookkeeping (`pool.lengths`, block allocation) stays outside the graph.

Without CUDA (or `enabled=False`, or a kernel backend whose decode path is not graph-safe) the runner runs
the very same step eagerly, so CPU tests exercise the code the graph captures. Every graph allocates from
one shared memory pool; they never run concurrently, and each keeps its own output alive.

Capture refuses a step that synchronises with the host (`.item()`, `.tolist()`, ...): before capturing, the
runner replays the step once under `torch.cuda.set_sync_debug_mode("error")` and, if an op synchronises,
names the module and the source line, warns, and decodes that batch shape eagerly from then on
(`strict=True` raises `GraphCaptureError` instead).
"""

from __future__ import annotations

import logging
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels.paged_cache import PagedKVCache
from ..model import Transformer
from ..paged import PagedBatch

log = logging.getLogger(__name__)


class GraphCaptureError(RuntimeError):
    """The decode step cannot be captured as a CUDA graph (the message names the module and the op)."""


def decode_step(model: Transformer, ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """`Transformer.forward` over a decode `PagedBatch` whose device inputs are set, without its host checks
    and bookkeeping (they sync with the device, and run outside the graph): ids (B, 1) -> logits (B, 1, V)."""
    return model.logits(model.streams(ids, batch))


def capacity_bucket(n: int, min_bucket: int, limit: int) -> int:
    """The grid bound a graph is captured for: the next power of two >= n, at least `min_bucket`, at most
    `limit` (max_position_embeddings: no position reaches it)."""
    return min(max(min_bucket, 1 << max(0, n - 1).bit_length()), limit)


@dataclass
class _Step:
    """A batch shape's static inputs (and, once captured, its graph and output)."""
    batch: PagedBatch  # pos (B, 1), slot_ids (B,), max_len = the bucket
    ids: torch.Tensor  # (B, 1)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # (B, 1, V), written by each replay
    eager: bool = False  # capture was refused: run eagerly


class DecodeGraphs:
    def __init__(self, model: Transformer, pool: PagedKVCache, enabled: bool | None = None, min_bucket: int = 4096,
                 strict: bool = False, pad_batches: bool | None = None):
        """enabled: None = on when the model is on CUDA. min_bucket: the smallest grid bound (fewer graphs for
        short contexts). strict: a step that cannot be captured raises `GraphCaptureError` instead of running
        eagerly with a warning. pad_batches: pad the batch to a power of two on a free slot (None: when
        graphs are enabled)."""
        self.model, self.pool = model, pool
        self.device = model.embed.weight.device
        self.enabled = self.device.type == "cuda" if enabled is None else enabled
        if self.enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        self.min_bucket, self.strict = min_bucket, strict
        self.pad_batches = self.enabled if pad_batches is None else pad_batches
        self.steps: dict[tuple[int, int], _Step] = {}
        self.mem_pool = None  # one graph memory pool shared by every capture
        self.failure: str | None = None  # why the last refused capture was refused

    @torch.inference_mode()  # static inputs and outputs are inference tensors, created and written in it
    def __call__(self, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One decode step: ids (B, 1) on the model's device, row b continuing `slots[b]` -> logits (B, 1, V)."""
        max_positions = self.model.config.max_position_embeddings
        batch = PagedBatch(self.pool, list(slots))
        batch.check(ids, max_positions)
        starts = batch.starts()
        B, bucket = len(slots), capacity_bucket(max(starts) + 1, self.min_bucket, max_positions)
        # Batch sizes are padded to powers of two (a handful of graphs, not one per size) with rows that decode
        # a dummy token at position 0 of a free slot: they write only that slot's window row 0 and compressor
        # state (a free slot holds no data; `allocate` clears it) and finish no compression block.
        pad_slot = next((s for s in range(self.pool.max_seqs) if not self.pool.active[s]), None) \
            if self.pad_batches else None
        rows = B if pad_slot is None else min(1 << (B - 1).bit_length(), self.pool.max_seqs)
        pad = rows - B
        step = self.steps.get((rows, bucket)) or self._new_step(rows, bucket)
        # This step's inputs into the static tensors, the blocks it writes allocated: all before the replay.
        step.ids[:B].copy_(ids)
        step.ids[B:].zero_()
        step.batch.slot_ids.copy_(torch.tensor(slots + [pad_slot] * pad), non_blocking=True)
        step.batch.pos.copy_(torch.tensor(starts + [0] * pad)[:, None], non_blocking=True)
        step.batch.slots = batch.slots + [pad_slot] * pad  # read by the reference backend's (eager) attention
        batch.reserve_decode()
        graphable = self._graphable()
        if graphable and step.graph is None and not step.eager:
            self._capture(step)
        if graphable and step.graph is not None:
            step.graph.replay()
            logits = step.logits[:B].clone()  # the next replay overwrites the graph's output
        else:
            logits = decode_step(self.model, step.ids, step.batch)[:B]
        batch.pos = step.batch.pos
        batch.advance()
        return logits

    def _graphable(self) -> bool:
        """Whether the step under the current kernel backend is graph-safe: the decode kernels on the pool's
        blocks (the reference attention reads host lists) with FP8 index keys (FP4 takes the reference)."""
        return self.enabled and kernels.use_triton(self.model.embed.weight) and self.pool.index_keys == "fp8"

    def _new_step(self, B: int, bucket: int) -> _Step:
        dev = self.device
        batch = PagedBatch(self.pool, [], pos=torch.zeros(B, 1, dtype=torch.long, device=dev),
                           slot_ids=torch.zeros(B, dtype=torch.long, device=dev), max_len=bucket)
        step = self.steps[(B, bucket)] = _Step(batch, torch.zeros(B, 1, dtype=torch.long, device=dev))
        return step

    def _capture(self, step: _Step) -> None:
        """Warm up on a side stream (as torch.cuda.graphs requires: lazy initialisation, Triton compilation),
        check the step never synchronises with the host, then capture it. The warm-up runs really write the
        pool: the compressor state rows of the batch's slots are restored after each (the CSA overlap rows
        would otherwise be advanced twice); window rows and entries are rewritten identically by the replay."""
        saved = self._save_state(step.batch.slot_ids)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                decode_step(self.model, step.ids, step.batch)
                self._restore_state(step.batch.slot_ids, saved)
                with _find_host_sync(self.model):
                    decode_step(self.model, step.ids, step.batch)
                self._restore_state(step.batch.slot_ids, saved)
        except GraphCaptureError as e:
            torch.cuda.current_stream().wait_stream(side)
            self._restore_state(step.batch.slot_ids, saved)
            self._refuse(step, str(e))
            return
        torch.cuda.current_stream().wait_stream(side)
        if self.mem_pool is None:
            self.mem_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the engine captures on its own thread while others may use CUDA.
            with torch.cuda.graph(graph, pool=self.mem_pool, capture_error_mode="thread_local"):
                step.logits = decode_step(self.model, step.ids, step.batch)
        except RuntimeError as e:
            self._refuse(step, f"capture failed: {e}")
            return
        step.graph = graph
        log.info("captured the decode step: batch %d, grid bound %d", step.ids.shape[0], step.batch.max_len)

    def _refuse(self, step: _Step, why: str) -> None:
        self.failure = why
        if self.strict:
            raise GraphCaptureError(why)
        step.eager = True
        warnings.warn(f"decode step not captured as a CUDA graph, running eagerly: {why}", RuntimeWarning,
                      stacklevel=3)

    def _save_state(self, slot_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return {i: st[slot_ids] for i, st in self.pool.state.items()}  # advanced indexing: copies

    def _restore_state(self, slot_ids: torch.Tensor, saved: dict[int, torch.Tensor]) -> None:
        for i, rows in saved.items():
            self.pool.state[i][slot_ids] = rows


@contextmanager
def _find_host_sync(model: torch.nn.Module):
    """Run a CUDA step with host synchronisation as an error; one raises `GraphCaptureError` naming the
    innermost module running and the source line of the op (a graph cannot capture a sync)."""
    running: list[str] = []  # the modules whose forward is under way, outermost first

    def leave(mod, args, out) -> None:  # a forward hook returning something would replace the output
        running.pop()
    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: running.append(name)))
        hooks.append(m.register_forward_hook(leave))
    previous = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        raise GraphCaptureError(describe_failure(model, running, e)) from e
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(previous)
        for h in hooks:
            h.remove()


def describe_failure(model: torch.nn.Module, running: list[str], error: BaseException) -> str:
    """'<module path> (<class>) at <file>:<line> `<code>`: <error>', the innermost dsv4 frame of the error."""
    where = running[-1] if running else "<model>"
    cls = type(model.get_submodule(where)).__name__ if running else type(model).__name__
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/dsv4/" in f.filename.replace("\\", "/")]
    line = f" at dsv4/{frames[-1].filename.split('/dsv4/')[-1]}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"module {where} ({cls}){line} synchronises with the host ({first}); a CUDA graph cannot capture "
            f"that: make the op sync-free")
