"""The serving engine: many requests decoded together over one paged KV pool (continuous batching).

One background thread owns the model and loops:
  1. admit waiting requests while the batch and the KV pool allow (looking up the prefix cache),
  2. prefill: one chunk of each prefilling request (requests whose chunks have equal length share a
     forward; chunk ends are fixed multiples of `prefill_chunk`, so chunking never depends on the batch),
  3. decode: one forward over every running request, each row continuing its own sequence at its own
     position, then per-row sampling, stop checks, events.
Requests join and leave between iterations. Everything a caller needs is the public API below
(`Engine.submit` / `generate` / `stats`, `RequestHandle`, `Event`); the HTTP server uses nothing else.

KV cache (`EngineConfig.kv_cache`): "paged" (default) keeps every request in a slot of one compact FP8
pool (`dsv4.kernels.paged_cache.PagedKVCache`, §2.3.4), sized once from the KV budget; a decode step is
one forward over `PagedBatch(pool, slots)`, whose kernels read the pool's blocks. A request is admitted
only when the pool's unreserved blocks cover its worst case (prompt + max_tokens), so a running request
never runs out of blocks. On a GPU the paged decode step is a replayed CUDA graph per (batch size, context
bucket) (`EngineConfig.decode_graphs`, `dsv4.engine.graphs`): eager decode is bound by kernel launches.
"reference" keeps one model-dtype `KVCache` per request and loops attention per sequence (slow on a GPU);
speculative decoding always runs on it (see below).

Speculative decoding (MTP, §2 of the report; greedy requests): the MTP block drafts the token after the
pending one, the trunk verifies [pending, draft] in one 2-token forward. Accepted: two tokens for one
trunk forward. Rejected: the trunk's own token is kept (what plain decoding would have produced), the
trunk cache is restored from a snapshot taken before the verify and the pending token is fed again.
The MTP cache never sees a rejected draft: it consumes (h_i, t_{i+1}) pairs only once t_{i+1} is final.
The restore is free on `KVCache`s (a forward replaces their tensors, `cache_ops`); the paged pool is
written in place and the MTP block keeps its window in a `KVCache` only, so `speculative=True` switches
the engine to kv_cache="reference".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..generate import SamplingParams, sample, token_logprobs
from ..model import Transformer
from ..paged import PagedBatch
from . import cache_ops
from .graphs import DecodeGraphs
from .prefix import PrefixEntry, PrefixStore, block_keys
from .text import TextStream

log = logging.getLogger("dsv4.engine")


class EngineError(Exception):
    """Base of the engine's errors."""


class RequestRejected(EngineError, ValueError):
    """The request cannot run as asked; `code` says why (OpenAI-style), the message what to change."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class EngineClosed(EngineError):
    """The engine was shut down."""


@dataclass
class EngineConfig:
    max_batch: int = 64  # requests decoded together (= slots of the paged pool)
    prefill_chunk: int = 512  # tokens per prefill forward; a multiple of the prefix block
    prefill_tokens_per_step: int = 2048  # prefill tokens per iteration, so decoding rows keep moving
    kv_cache: str = "paged"  # "paged": one FP8 pool, one forward per decode step; "reference": a KVCache each
    kv_block_size: int = 64  # compressed entries per block of the paged pool
    kv_budget_bytes: int | None = None  # paged: the pool's size; reference: KV reserved by running requests;
    # None = a share of free memory
    prefix_cache_bytes: int = 1 << 30  # in-memory prefix store (LRU by bytes); 0 = no prefix caching
    prefix_dir: str | None = None  # on-disk prefix store (survives restarts); None = memory only
    prefix_disk_bytes: int | None = None  # cap of the on-disk store (oldest files go first)
    speculative: bool = False  # MTP speculative decoding for greedy requests
    decode_graphs: bool | None = None  # paged decode as replayed CUDA graphs; None = on when the model is on CUDA
    batch_invariant: bool = False  # every forward has batch 1: a request's tokens never depend on the others
    max_waiting: int = 4096  # queued requests beyond this are refused


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token, logprob), k = params.logprobs


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass
class Event:
    """One streaming update. While running: one new token and the text it released. Last event:
    `finish_reason` set ("stop", "length", "cancelled", "error"), `usage` filled."""
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    error: str | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]  # generated ids, a final stop token included
    text: str  # without a stop token / stop string
    finish_reason: str
    stop_reason: int | str | None
    logprobs: list[TokenLogprob]
    usage: Usage
    error: str | None = None


class RequestHandle:
    """What `Engine.submit` returns: iterate `events()`, wait for `result()`, or `cancel()`."""

    def __init__(self, request_id: str, engine: "Engine"):
        self.id = request_id
        self._engine = engine
        self._events: queue.Queue[Event] = queue.Queue()
        self._done = threading.Event()
        self._tokens: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._final: Event | None = None

    def _push(self, ev: Event) -> None:
        self._tokens += ev.token_ids
        self._text.append(ev.text)
        self._logprobs += ev.logprobs
        self._events.put(ev)
        if ev.finished:
            self._final = ev
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating and free the request's slot (a last event with finish_reason 'cancelled')."""
        self._engine._cancel(self.id)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        f = self._final
        return Completion(self.id, self._tokens, "".join(self._text), f.finish_reason, f.stop_reason,
                          self._logprobs, f.usage, f.error)


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    on_event: Callable[[Event], None] | None
    reserved: int  # bytes: reference, the KVCache estimate; paged, the bytes of the pool blocks in `blocks`
    blocks: dict[int, int]  # paged: pool blocks reserved per compression ratio (the worst case)
    spec: bool
    text: TextStream | None
    generator: torch.Generator | None
    submitted: float
    cache: KVCache | None = None  # reference
    slot: int | None = None  # paged
    pos: int = 0  # prompt tokens the trunk has consumed
    cached: int = 0  # of which from the prefix cache
    pending: int | None = None  # last generated token, emitted but not yet fed to the trunk
    hidden: torch.Tensor | None = None  # (1, 1, n_hc, d) trunk streams of the last fed token (MTP input)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    first_token_at: float | None = None


def default_drafter(mtp_logits: torch.Tensor, contexts: list[list[int]]) -> list[int]:
    """MTP logits (B, V) of the token after each row's pending token -> draft ids (greedy)."""
    return mtp_logits.argmax(dim=-1).tolist()


def model_fingerprint(model: Transformer) -> str:
    """Identifies config + weights for the on-disk prefix store (a store never serves another model):
    the config, the dtype and a few weight rows."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(model.embed.weight.dtype).encode())
    for p in (model.embed.weight, model.head.weight, model.layers[0].attn.wkv.weight, model.layers[-1].attn.wkv.weight):
        h.update(p.detach()[:2].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 8 << 30


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 drafter: Callable[[torch.Tensor, list[list[int]]], list[int]] | None = None):
        """model: an eval-mode `Transformer`; decode: token ids -> text (needed for text output and stop
        strings); drafter: turns MTP logits into draft ids (default greedy; tests plug in oracles)."""
        self.model = model.eval()
        self.config = cfg = config or EngineConfig()
        c = model.config
        self.device = model.embed.weight.device
        self.vocab_size = c.vocab_size
        self.max_context = c.max_position_embeddings
        self.decode = decode
        self.drafter = drafter or default_drafter
        ratios = [r for r in c.layer_ratios if r] or [1]
        self.block = math.lcm(*ratios)  # prefix-cache granularity: every compressor at a block boundary
        if cfg.prefill_chunk % self.block:
            raise ValueError(f"prefill_chunk={cfg.prefill_chunk} must be a multiple of {self.block} (the lcm "
                             f"of the compression ratios), so chunk ends can be prefix-cache points")
        if cfg.speculative and not c.num_nextn_predict_layers:
            raise ValueError("speculative decoding needs an MTP block (num_nextn_predict_layers >= 1)")
        if cfg.kv_cache not in ("paged", "reference"):
            raise ValueError(f"kv_cache={cfg.kv_cache!r}: choose 'paged' or 'reference'")
        self.kv_cache = cfg.kv_cache
        if cfg.speculative and self.kv_cache == "paged":
            log.info("speculative decoding rolls rejected drafts back, which the in-place paged pool cannot: "
                     "using kv_cache='reference'")
            self.kv_cache = "reference"
        self.element_size = model.embed.weight.element_size()
        self.kv_budget = cfg.kv_budget_bytes if cfg.kv_budget_bytes is not None else _default_budget(self.device)
        self.pool, self.pool_tokens = None, 0
        if self.kv_cache == "paged":
            self.pool, self.pool_tokens = cache_ops.paged_pool(c, self.kv_budget, cfg.max_batch, cfg.kv_block_size,
                                                               self.device)
            self._total_blocks = {r: len(g.free) for r, g in self.pool.groups.items()}
            self._free_blocks = dict(self._total_blocks)  # not reserved by admitted requests
            # Pool bytes of one block of each ratio group, summed over the group's layers (records + index keys).
            self._block_bytes = {r: 0 for r in self.pool.groups}
            for i, r in self.pool.ratios.items():
                if r:
                    keys = self.pool.key_format.bytes if i in self.pool.keys else 0
                    self._block_bytes[r] += (self.pool.entry_bytes + keys) * self.pool.block_size
            log.info("paged KV pool: %d slots, %d tokens, %.1f MiB of a %.1f MiB budget", cfg.max_batch,
                     self.pool_tokens, self.pool.allocated_bytes() / 2**20, self.kv_budget / 2**20)
            enabled = self.device.type == "cuda" if cfg.decode_graphs is None else cfg.decode_graphs
            self.decode_step = DecodeGraphs(model, self.pool, enabled=enabled)
        # The layout is part of the fingerprint: a prefix store never serves a snapshot of the other kind.
        self.fingerprint = model_fingerprint(model) + ("-mtp" if cfg.speculative else "") + \
            (f"-paged-{self.pool.index_keys}" if self.pool is not None else "")
        self.prefix: PrefixStore | None = None
        if cfg.prefix_cache_bytes > 0:
            disk = os.path.join(cfg.prefix_dir, self.fingerprint) if cfg.prefix_dir else None
            self.prefix = PrefixStore(c, cfg.prefix_cache_bytes, disk, self.device, cfg.prefix_disk_bytes,
                                      layout=self.kv_cache)
        self._cv = threading.Condition()
        self._incoming: list[_Request] = []
        self._cancels: set[str] = set()
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []
        self._reserved = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._counters = {k: 0 for k in (
            "requests_submitted", "requests_rejected", "prompt_tokens", "generation_tokens", "prefix_queries",
            "prefix_hits", "prefix_hit_tokens", "spec_drafted", "spec_accepted", "forward_passes", "steps")}
        self._finished: dict[str, int] = {}
        self._ttft_sum, self._ttft_count = 0.0, 0

    # ------------------------------------------------------------------ public API
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10) -> None:
        """Stop the loop; unfinished requests end with finish_reason 'cancelled'."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.prefix is not None:
            self.prefix.flush()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None, request_id: str | None = None) -> RequestHandle:
        """Queue a request; returns at once. Raises `RequestRejected` if it can never run (empty or too
        long prompt, ids outside the vocabulary, more KV cache than the budget, stop strings without a
        tokenizer). `on_event` is called on the engine thread for every `Event`; it must not block."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        reserved, blocks = self._reservation(len(prompt), params.max_new_tokens)
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        text = TextStream(self.decode, params.stop) if self.decode is not None else None
        handle = RequestHandle(rid, self)
        spec = self.config.speculative and params.temperature == 0
        req = _Request(rid, prompt, params, handle, on_event, reserved, blocks, spec, text, generator,
                       time.monotonic())
        with self._cv:
            if self._closing:
                raise EngineClosed("the engine is shut down")
            if len(self._waiting) + len(self._incoming) >= self.config.max_waiting:
                raise RequestRejected(f"{self.config.max_waiting} requests are already waiting; retry later",
                                      code="server_overloaded")
            self._incoming.append(req)
            self._counters["requests_submitted"] += 1
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return handle

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 timeout: float | None = None) -> Completion:
        return self.submit(prompt_ids, params).result(timeout)

    def stats(self) -> dict:
        """Counters and gauges for monitoring (the server's /metrics)."""
        out = dict(self._counters)
        active = list(self._active)
        if self.pool is None:
            used = sum(r.cache.nbytes() for r in active if r.cache is not None)
        else:  # what the sequences occupy (the analyser's terms), not the pool's preallocated capacity
            slots = [r.slot for r in active]  # read once: the engine thread may release one meanwhile
            used = sum(sum(self.pool.used_bytes(s).values()) for s in slots if s is not None)
        out.update(running=len(active), waiting=len(self._waiting) + len(self._incoming),
                   kv_cache=self.kv_cache, kv_reserved_bytes=self._reserved, kv_budget_bytes=self.kv_budget,
                   kv_used_bytes=used, ttft_seconds_sum=self._ttft_sum, ttft_count=self._ttft_count,
                   finished=dict(self._finished))
        if self.pool is not None:
            out.update(kv_pool_bytes=self.pool.allocated_bytes(), kv_pool_tokens=self.pool_tokens,
                       kv_pool_slots=self.pool.max_seqs, kv_pool_slots_used=sum(self.pool.active))
        if self.prefix is not None:
            out.update(prefix_store_entries=len(self.prefix), prefix_store_bytes=self.prefix.nbytes,
                       **{f"prefix_{k}": v for k, v in self.prefix.stats.items()})
        d = out["spec_drafted"]
        out["spec_accept_rate"] = out["spec_accepted"] / d if d else 0.0
        return out

    # ------------------------------------------------------------------ validation, cancellation
    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise RequestRejected("the prompt is empty", param="prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"{len(bad)} prompt token ids are outside the vocabulary of {self.vocab_size} "
                                  f"(first: {bad[0]})", param="prompt")
        if params.max_new_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1", param="max_tokens")
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise RequestRejected(
                f"this model's context is {self.max_context} tokens; the prompt has {len(prompt)} and "
                f"max_tokens is {params.max_new_tokens}: shorten the prompt or lower max_tokens",
                code="context_length_exceeded", param="max_tokens")
        if params.stop and self.decode is None:
            raise RequestRejected("stop strings need a tokenizer; this engine has none", param="stop")

    def _reservation(self, n_prompt: int, max_new: int) -> tuple[int, dict[int, int]]:
        """KV a request may need at most -> (bytes, pool blocks per ratio); RequestRejected if it can never fit.
        The worst case counts prompt + max_tokens tokens (one more than a sequence ever feeds)."""
        n = n_prompt + max_new
        ask = f"a prompt of {n_prompt} tokens + max_tokens={max_new}"
        fix = "shorten the prompt, lower max_tokens or raise the budget (--kv-budget-gib)"
        if self.pool is None:
            reserved = cache_ops.estimate_bytes(self.model.config, n, self.element_size)
            if reserved > self.kv_budget:
                self._counters["requests_rejected"] += 1
                raise RequestRejected(
                    f"{ask} needs {reserved / 2**20:.1f} MiB of KV cache, more than the engine's budget of "
                    f"{self.kv_budget / 2**20:.1f} MiB; {fix}", code="context_length_exceeded", param="messages")
            return reserved, {}
        bs = self.pool.block_size
        blocks = {r: math.ceil(n // r / bs) for r in self._total_blocks}  # blocks of finished entries
        for r, b in blocks.items():
            if b > self._total_blocks[r]:
                self._counters["requests_rejected"] += 1
                raise RequestRejected(
                    f"{ask} needs {b} blocks of {bs} ratio-{r} entries in the paged KV cache pool, which holds "
                    f"{self._total_blocks[r]} ({self.pool_tokens} tokens, {self.pool.allocated_bytes() / 2**20:.1f} "
                    f"MiB); {fix}", code="context_length_exceeded", param="messages")
        return sum(b * self._block_bytes[r] for r, b in blocks.items()), blocks

    def _cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify_all()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._closing or self._incoming or self._cancels or self._active or self._admissible()):
                        self._cv.wait()
                    if self._closing:
                        break
                    self._waiting += self._incoming
                    self._incoming = []
                    cancels, self._cancels = self._cancels, set()
                try:
                    self._step(cancels)
                except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                    log.exception("engine step failed")
                    for r in list(self._active):
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
        for r in self._waiting + self._incoming + list(self._active):
            self._finish(r, "cancelled")

    def _admissible(self) -> bool:
        if not self._waiting or len(self._active) >= self.config.max_batch:
            return False
        r = self._waiting[0]
        if self.pool is None:
            return self._reserved + r.reserved <= self.kv_budget
        return all(b <= self._free_blocks[k] for k, b in r.blocks.items())

    def _step(self, cancels: set[str]) -> None:
        self._counters["steps"] += 1
        for r in [r for r in self._waiting + self._active if r.id in cancels or r.cancelled]:
            self._finish(r, "cancelled")
        while self._admissible():
            r = self._waiting.pop(0)
            self._reserved += r.reserved
            for k, b in r.blocks.items():
                self._free_blocks[k] -= b
            self._active.append(r)
            if self.pool is None:
                r.cache = self.model.new_cache()
            else:
                r.slot = self.pool.allocate()  # max_batch slots: one is free while fewer requests run
            self._lookup_prefix(r)
        self._prefill()
        self._decode()

    def _groups(self, rows: list) -> list[list]:
        return [[r] for r in rows] if self.config.batch_invariant else ([rows] if rows else [])

    def _forward(self, ids: torch.Tensor, rows: list[_Request], hidden: bool, last_only: bool = False):
        """One forward; row b continues rows[b]'s sequence (its pool slot, or its KVCache)."""
        self._counters["forward_passes"] += 1
        cache = [r.cache for r in rows] if self.pool is None else PagedBatch(self.pool, [r.slot for r in rows])
        return self.model(ids, cache, return_hidden=hidden, last_only=last_only)

    def _length(self, r: _Request) -> int:
        return r.cache.length if self.pool is None else self.pool.lengths[r.slot]

    # ------------------------------------------------------------------ prefill
    def _lookup_prefix(self, r: _Request) -> None:
        if self.prefix is None:
            return
        self._counters["prefix_queries"] += 1
        usable = (len(r.prompt) - 1) // self.block * self.block  # the last prompt token is always fed
        for k, key in reversed(list(enumerate(block_keys(self.fingerprint, r.prompt[:usable], self.block), 1))):
            if self.config.batch_invariant and (k * self.block) % self.config.prefill_chunk:
                continue  # only chunk-aligned points: the chunking after a hit equals that of a miss
            entry = self.prefix.get(key)
            if entry is None or (entry.hidden is None and self.config.speculative):
                continue
            if self.pool is None:
                r.cache = cache_ops.snapshot(entry.cache)
            else:
                try:
                    self.pool.load(r.slot, entry.cache)  # within the request's reserved blocks
                except ValueError as e:  # a snapshot that does not fit this pool: a miss, and never again
                    log.warning("prefix entry %s unusable (%s); dropped", key[:12], e)
                    self.prefix.discard(key)
                    continue
            r.hidden = entry.hidden
            r.pos = r.cached = entry.length
            self._counters["prefix_hits"] += 1
            self._counters["prefix_hit_tokens"] += r.pos
            return

    def _chunk_end(self, r: _Request) -> int:
        n, s, C = len(r.prompt), r.pos, self.config.prefill_chunk
        e = min(n, (s // C + 1) * C)
        last_point = (n - 1) // self.block * self.block  # snapshot the longest reusable prefix too
        if self.prefix is not None and not self.config.batch_invariant and s < last_point < e:
            e = last_point
        return e

    def _prefill(self) -> None:
        rows = [r for r in self._active if r.pending is None]
        budget, chosen = self.config.prefill_tokens_per_step, {}
        for r in rows:  # FIFO; equal chunk lengths share a forward
            n = self._chunk_end(r) - r.pos
            if n > budget and chosen:
                break
            budget -= n
            chosen.setdefault(n, []).append(r)
        for n, group in chosen.items():
            for g in self._groups(group):
                self._prefill_chunk(g, n)

    def _prefill_chunk(self, rows: list[_Request], n: int) -> None:
        ids = torch.tensor([r.prompt[r.pos:r.pos + n] for r in rows], device=self.device)
        out = self._forward(ids, rows, hidden=self.config.speculative, last_only=True)
        logits, hidden = out if self.config.speculative else (out, None)
        for i, r in enumerate(rows):
            s, r.pos = r.pos, r.pos + n
            if hidden is not None:  # the MTP block consumes (h_j, t_{j+1}) for j = s-1 .. e-2
                h = hidden[i:i + 1, :-1] if r.hidden is None else torch.cat((r.hidden, hidden[i:i + 1, :-1]), 1)
                nxt = ids[i:i + 1, 1:] if r.hidden is None else ids[i:i + 1]
                if nxt.shape[1]:
                    self.model.mtp_logits(h, nxt, r.cache)
                r.hidden = hidden[i:i + 1, -1:]
            if self.prefix is not None and r.pos % self.block == 0 and r.pos < len(r.prompt):
                key = block_keys(self.fingerprint, r.prompt[:r.pos], self.block)[-1]
                if key not in self.prefix:
                    state = r.cache if self.pool is None else self.pool.export(r.slot)
                    self.prefix.put(key, PrefixEntry(state, r.hidden))
        done = [(i, r) for i, r in enumerate(rows) if r.pos == len(r.prompt)]
        if done:
            idx = [i for i, _ in done]
            self._sample_and_emit([r for _, r in done], logits[idx, -1])

    # ------------------------------------------------------------------ decode
    def _decode(self) -> None:
        rows = [r for r in self._active if r.pending is not None]
        spec = [r for r in rows if r.spec and r.params.max_new_tokens - len(r.generated) >= 2
                and self._length(r) + 2 < self.max_context]
        plain = [r for r in rows if r not in spec]
        for g in self._groups(plain):
            ids = torch.tensor([[r.pending] for r in g], device=self.device)
            if self.pool is None:
                logits = self._forward(ids, g, hidden=False)
            else:  # the same forward, as a replayed CUDA graph on a GPU
                self._counters["forward_passes"] += 1
                logits = self.decode_step(ids, [r.slot for r in g])
            self._sample_and_emit(g, logits[:, -1])
        for g in self._groups(spec):
            self._speculate(g)

    def _sample_and_emit(self, rows: list[_Request], logits: torch.Tensor) -> None:
        """logits (B, V): sample each row's next token (greedy rows in one argmax), emit it."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.params.temperature > 0:
                tokens[i] = int(sample(logits[i:i + 1], r.params, r.generator))
        for i, r in enumerate(rows):
            self._emit(r, tokens[i], logits[i])

    def _speculate(self, rows: list[_Request]) -> None:
        m = self.model
        caches = [r.cache for r in rows]
        pending = torch.tensor([[r.pending] for r in rows], device=self.device)
        draft_logits = m.mtp_logits(torch.cat([r.hidden for r in rows]), pending, caches)[:, -1]
        drafts = self.drafter(draft_logits, [r.prompt + r.generated for r in rows])
        snaps = [cache_ops.snapshot(c) for c in caches]
        ids = torch.cat((pending, torch.tensor(drafts, device=self.device)[:, None]), dim=1)
        logits, hidden = self._forward(ids, rows, hidden=True)
        trunk = logits[:, 0].argmax(dim=-1).tolist()
        bonus = logits[:, 1].argmax(dim=-1).tolist()
        accepted, rejected = [], []
        self._counters["spec_drafted"] += len(rows)
        for i, r in enumerate(rows):
            if trunk[i] == drafts[i]:
                self._counters["spec_accepted"] += 1
                if self._emit(r, drafts[i], logits[i, 0]) and self._emit(r, bonus[i], logits[i, 1]):
                    accepted.append(i)
            else:
                r.cache = snaps[i]
                if self._emit(r, trunk[i], logits[i, 0]):
                    rejected.append(i)
        if accepted:  # MTP catches up on (h_p, draft); the bonus token is pending
            for g in self._groups(accepted):
                m.mtp_logits(hidden[g, :1], ids[g, 1:], [rows[i].cache for i in g])
                for i in g:
                    rows[i].hidden = hidden[i:i + 1, 1:2]
        if rejected:  # the restored trunk cache consumes the old pending token again
            for g in self._groups(rejected):
                _, h = self._forward(ids[g, :1], [rows[i] for i in g], hidden=True)
                for j, i in enumerate(g):
                    rows[i].hidden = h[j:j + 1]

    # ------------------------------------------------------------------ output
    def _emit(self, r: _Request, token: int, logits: torch.Tensor) -> bool:
        """Record and send one generated token; returns False if the request finished with it."""
        now = time.monotonic()
        if r.first_token_at is None:
            r.first_token_at = now
            self._ttft_sum += now - r.submitted
            self._ttft_count += 1
        r.generated.append(token)
        r.pending = token
        self._counters["generation_tokens"] += 1
        lps = []
        if r.params.logprobs is not None:
            (lp, top), = token_logprobs(logits[None], [token], r.params.logprobs)
            lps = [TokenLogprob(token, lp, top)]
        p = r.params
        if token in p.stop_token_ids:
            self._send(r, Event(r.id, [token], "", lps))
            self._finish(r, "stop", stop_reason=token)
            return False
        text = r.text.add(token) if r.text is not None else ""
        self._send(r, Event(r.id, [token], text, lps))
        if r.text is not None and r.text.stopped:
            self._finish(r, "stop", stop_reason=r.text.matched)
            return False
        if len(r.generated) >= p.max_new_tokens or self._length(r) + 1 >= self.max_context:
            self._finish(r, "length")
            return False
        return True

    def _send(self, r: _Request, ev: Event) -> None:
        r.handle._push(ev)
        if r.on_event is not None:
            try:
                r.on_event(ev)
            except Exception:  # a broken consumer (e.g. a closed connection) must not stop the engine
                log.exception("on_event of %s failed; cancelling it", r.id)
                r.cancelled = True

    def _finish(self, r: _Request, reason: str, stop_reason=None, error: str | None = None) -> None:
        if r.handle.done:
            return
        if r in self._active:
            self._active.remove(r)
            self._reserved -= r.reserved
            for k, b in r.blocks.items():
                self._free_blocks[k] += b
            if r.slot is not None:  # the slot's blocks go back to the pool, its state rows are cleared
                self.pool.release(r.slot)
                r.slot = None
        elif r in self._waiting:
            self._waiting.remove(r)
        tail = r.text.finish() if r.text is not None and reason in ("stop", "length") else ""
        self._counters["prompt_tokens"] += len(r.prompt)
        self._finished[reason] = self._finished.get(reason, 0) + 1
        usage = Usage(len(r.prompt), len(r.generated), r.cached)
        r.cache = r.hidden = None
        self._send(r, Event(r.id, [], tail, [], finish_reason=reason, stop_reason=stop_reason, error=error,
                            usage=usage))
