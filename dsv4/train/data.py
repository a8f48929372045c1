"""Training data: the bundled corpus, its cached tokenisation, packing into fixed-length rows with
sample-level attention masking, and a deterministic, resumable loader that mixes sources by weight
and lets the sequence length change between steps (a curriculum).

Packing. Documents are wrapped as `[BOS] doc [EOS]`, concatenated into one stream and cut into rows
of `seq_len + 1` tokens; every token of the stream lands in exactly one row. A *segment* is the
longest run of one document inside one row (a document that crosses a row edge, or is longer than a
row, becomes several segments, each masked as its own document). Per row:

    tokens     [T+1]  the row                      input_ids = tokens[:-1]
    doc_ids    [T+1]  0, 1, 2, ... per segment     labels[t] = tokens[t+1], or -100 when t+1 starts
    positions  [T+1]  0, 1, ... within segment                 a new segment (no cross-document target)

Attention may only look inside a segment (`doc_ids[q] == doc_ids[k]`), and RoPE uses `positions`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dsv4.tokenizer import Tokenizer, load_tokenizer

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
VAL_FRACTION = 0.02
IGNORE_INDEX = -100  # label of a position with no target; torch's cross_entropy default


class CorpusError(FileNotFoundError):
    """A corpus source is missing or empty."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4")) / "tokens"


def corpus_sources(root: Path = CORPUS_DIR) -> list[str]:
    """Names of the sources under `root`: one `NAME.jsonl.gz` file each, e.g. code, math, prose."""
    return sorted(p.name.removesuffix(".jsonl.gz") for p in Path(root).glob("*.jsonl.gz"))


def _source_path(name: str, root: Path) -> Path:
    path = Path(root) / f"{name}.jsonl.gz"
    if not path.is_file():
        raise CorpusError(f"no corpus source {name!r}: {path} is missing (sources here: {corpus_sources(root)}); "
                          "rebuild with `python dsv4/data/make_corpus.py` and `python dsv4/data/make_math.py`")
    return path


def _read_source(name: str, root: Path) -> list[str]:
    with gzip.open(_source_path(name, root), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _val_mask(texts: list[str]) -> list[bool]:
    """The VAL_FRACTION of documents (at least one) whose text hashes lowest: a split by document that
    depends only on the documents' contents, not on their order."""
    n_val = max(1, round(len(texts) * VAL_FRACTION)) if len(texts) > 1 else 0
    order = sorted(range(len(texts)), key=lambda i: hashlib.sha1(texts[i].encode()).digest())
    val = set(order[:n_val])
    return [i in val for i in range(len(texts))]


def _select(items: list, mask: list[bool], split: str) -> list:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return [x for x, v in zip(items, mask) if v == (split == "val")]


def load_corpus(split: str = "train", sources: Sequence[str] | None = None,
                root: Path = CORPUS_DIR) -> dict[str, list[str]]:
    """{source: [document text, ...]} of one split (~98% train / 2% val, by document)."""
    out = {}
    for name in sources or corpus_sources(root):
        texts = _read_source(name, root)
        out[name] = _select(texts, _val_mask(texts), split)
    return out


def tokenize_corpus(split: str = "train", sources: Sequence[str] | None = None,
                    tokenizer: Tokenizer | None = None, cache_dir: Path | None = None,
                    root: Path = CORPUS_DIR) -> dict[str, list[torch.Tensor]]:
    """`load_corpus` tokenised (int32, no BOS/EOS). Each source is tokenised once and cached under
    `cache_dir`, keyed by the source file's and the tokenizer's hashes; later calls just load it."""
    tokenizer = tokenizer or load_tokenizer()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = {}
    for name in sources or corpus_sources(root):
        path = _source_path(name, root)
        key = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        cache = cache_dir / f"{name}-{key}-{tokenizer.fingerprint}.npz"
        texts = _read_source(name, root)
        if cache.is_file():
            with np.load(cache) as z:
                flat, offsets = z["tokens"], z["offsets"]
        else:
            ids = tokenizer.encode_batch(texts)
            offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, tokens=flat, offsets=offsets)
            os.replace(tmp, cache)  # atomic: a concurrent or interrupted run never sees half a file
        flat = torch.from_numpy(flat)
        docs = [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        out[name] = _select(docs, _val_mask(texts), split)
    return out


def _rows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """Cut a flat token stream (length a multiple of seq_len + 1) and its document-start flags into
    rows; each row's first token starts a segment too."""
    tokens = stream.long().view(-1, seq_len + 1)  # (N, T+1)
    seg_start = starts.view(-1, seq_len + 1).clone()
    seg_start[:, 0] = True
    doc_ids = seg_start.long().cumsum(1) - 1
    col = torch.arange(seq_len + 1).expand_as(tokens)
    positions = col - torch.where(seg_start, col, 0).cummax(1).values  # distance to the segment start
    return {"tokens": tokens, "doc_ids": doc_ids, "positions": positions}


def _batch(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row tensors [B, T+1] -> model inputs [B, T]; a target in another segment becomes IGNORE_INDEX."""
    tokens, doc_ids = rows["tokens"], rows["doc_ids"]
    same = doc_ids[:, 1:] == doc_ids[:, :-1]
    return {
        "input_ids": tokens[:, :-1],
        "labels": torch.where(same, tokens[:, 1:], IGNORE_INDEX),
        "doc_ids": doc_ids[:, :-1],
        "positions": rows["positions"][:, :-1],
    }


def _wrap(doc: Sequence[int] | torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    doc = torch.as_tensor(doc, dtype=torch.int32)
    return torch.cat([doc.new_tensor([bos_id]), doc, doc.new_tensor([eos_id])])


class PackedBatchSource:
    """A fixed packing of a list of documents into rows (see the module docstring). `tokens`,
    `doc_ids`, `positions` are [N, T+1]; `remainder` holds the stream's tail that fills no full row."""

    def __init__(self, rows: dict[str, torch.Tensor], remainder: torch.Tensor):
        self.tokens, self.doc_ids, self.positions = rows["tokens"], rows["doc_ids"], rows["positions"]
        self.remainder = remainder

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, index) -> dict[str, torch.Tensor]:
        """Model inputs [B, T] for rows `index` (an int, slice or index tensor)."""
        rows = {"tokens": self.tokens, "doc_ids": self.doc_ids, "positions": self.positions}
        return _batch({k: v[index].reshape(-1, v.shape[1]) for k, v in rows.items()})


def pack_documents(docs_tokens: Sequence[Sequence[int] | torch.Tensor], seq_len: int,
                   bos_id: int, eos_id: int) -> PackedBatchSource:
    """Pack documents, in order, into rows of `seq_len + 1` tokens."""
    wrapped = [_wrap(d, bos_id, eos_id) for d in docs_tokens]
    stream = torch.cat(wrapped) if wrapped else torch.zeros(0, dtype=torch.int32)
    starts = torch.zeros(len(stream), dtype=torch.bool)
    starts[torch.tensor([0] + [len(w) for w in wrapped[:-1]]).cumsum(0)[: len(wrapped)]] = True
    n = len(stream) // (seq_len + 1) * (seq_len + 1)
    return PackedBatchSource(_rows(stream[:n], starts[:n], seq_len), stream[n:])


class DataLoader:
    """Endless, deterministic stream of packed batches over several sources.

    Documents are drawn one at a time: first the source, then that source's next document in an
    order reshuffled every epoch of the source. `weights` are shares of *tokens* per source (default:
    each source's natural share, i.e. every document equally likely); a source of weight 0, or left
    out of `weights`, is never drawn. Every random choice is a pure function of (seed, counter), so
    the position in the stream is a few integers: `state_dict()` saves it, and a loader given it by
    `load_state_dict` yields exactly the batches the original would have. `set_seq_len` and
    `set_batch_size` take effect at the next batch, which starts at the token where the last one
    stopped: the token stream does not depend on how it is cut into batches.

    Yields {"input_ids", "labels", "doc_ids", "positions"}: int64 [batch_size, seq_len].
    """

    def __init__(self, docs: dict[str, Sequence[Sequence[int] | torch.Tensor]], batch_size: int, seq_len: int,
                 bos_id: int, eos_id: int, weights: dict[str, float] | None = None, seed: int = 0):
        self.docs = {k: [torch.as_tensor(d, dtype=torch.int32) for d in v] for k, v in docs.items()}
        if weights is None:
            weights = {k: float(sum(len(d) + 2 for d in v)) for k, v in self.docs.items()}
        if unknown := set(weights) - set(self.docs):
            raise ValueError(f"weights name unknown sources {sorted(unknown)}; sources: {sorted(self.docs)}")
        if empty := sorted(k for k, w in weights.items() if w > 0 and not self.docs[k]):
            raise CorpusError(f"sources {empty} have weight > 0 but no documents")
        self.sources = sorted(k for k, w in weights.items() if w > 0)
        if not self.sources:
            raise ValueError("at least one source needs a weight > 0")
        # A token share w_s is met by drawing source s with probability ∝ w_s / (its mean document length).
        p = [weights[k] * len(self.docs[k]) / sum(len(d) + 2 for d in self.docs[k]) for k in self.sources]
        self._cum_p = np.cumsum(p) / sum(p)
        self.bos_id, self.eos_id, self.seed = bos_id, eos_id, seed
        self.set_batch_size(batch_size)
        self.set_seq_len(seq_len)
        self._n = 0  # documents drawn so far
        self._cursor = {k: [0, 0] for k in self.sources}  # source -> [epoch, index in that epoch's order]
        self._order: dict[str, tuple[int, list[int]]] = {}  # source -> (epoch, that epoch's document order)
        self._doc: torch.Tensor | None = None  # document being emitted, with BOS/EOS
        self._offset = 0  # how many of its tokens are already emitted
        self._before_doc = self._draw_state()  # draw state just before `_doc` was drawn
        self.batches = 0

    @classmethod
    def from_corpus(cls, split: str = "train", batch_size: int = 8, seq_len: int = 512,
                    weights: dict[str, float] | None = None, seed: int = 0, tokenizer: Tokenizer | None = None,
                    cache_dir: Path | None = None, sources: Sequence[str] | None = None) -> DataLoader:
        """A loader over the bundled corpus (tokenised once, then cached)."""
        tokenizer = tokenizer or load_tokenizer()
        docs = tokenize_corpus(split, sources, tokenizer, cache_dir)
        return cls(docs, batch_size, seq_len, tokenizer.bos_id, tokenizer.eos_id, weights, seed)

    def _uniform(self, *key) -> float:
        """A uniform [0, 1) number fixed by (seed, *key)."""
        h = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64

    def _draw_state(self) -> dict:
        return {"n": self._n, "cursor": {k: list(v) for k, v in self._cursor.items()}}

    def _draw(self) -> torch.Tensor:
        """The next document of the stream, wrapped in BOS/EOS."""
        source = self.sources[int(np.searchsorted(self._cum_p, self._uniform("source", self._n), side="right"))]
        self._n += 1
        epoch, i = self._cursor[source]
        if self._order.get(source, (None,))[0] != epoch:  # this epoch's shuffle, made once per epoch
            n_docs = len(self.docs[source])
            self._order[source] = (epoch, random.Random(repr((self.seed, source, epoch))).sample(range(n_docs), n_docs))
        doc = self.docs[source][self._order[source][1][i]]
        self._cursor[source] = [epoch + 1, 0] if i + 1 == len(self.docs[source]) else [epoch, i + 1]
        return _wrap(doc, self.bos_id, self.eos_id)

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        need = self.batch_size * (self.seq_len + 1)
        pieces, starts = [], torch.zeros(need, dtype=torch.bool)
        filled = 0
        while filled < need:
            if self._doc is None:
                self._before_doc = self._draw_state()
                self._doc, self._offset = self._draw(), 0
            take = min(need - filled, len(self._doc) - self._offset)
            pieces.append(self._doc[self._offset:self._offset + take])
            starts[filled] = self._offset == 0
            filled += take
            self._offset += take
            if self._offset == len(self._doc):
                self._doc = None
        self.batches += 1
        return _batch(_rows(torch.cat(pieces), starts, self.seq_len))

    def set_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len

    def set_batch_size(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def state_dict(self) -> dict:
        """Where the stream stands: the draw state before the current document, and how far into it."""
        mid_doc = self._doc is not None
        draw = self._before_doc if mid_doc else self._draw_state()
        return {"seed": self.seed, "sources": list(self.sources), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "batches": self.batches, "n": draw["n"],
                "cursor": {k: list(v) for k, v in draw["cursor"].items()}, "offset": self._offset if mid_doc else 0}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sources"]) != self.sources:
            raise ValueError(f"state is for sources {state['sources']}, this loader draws from {self.sources}")
        self.seed, self.batch_size, self.seq_len, self.batches = (
            state["seed"], state["batch_size"], state["seq_len"], state["batches"])
        self._n = state["n"]
        self._cursor = {k: list(v) for k, v in state["cursor"].items()}
        self._order = {}
        self._doc, self._offset = None, 0
        if state["offset"]:
            self._before_doc = self._draw_state()
            self._doc, self._offset = self._draw(), state["offset"]
