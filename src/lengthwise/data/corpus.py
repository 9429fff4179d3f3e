"""Text corpora: the embedded stdlib default, PG19 from ../shared/data, local files, HF datasets.

Every corpus is a list of `Document(name, text)`; nothing is copied into the repository, the text is
read at run time.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_BUCKETS = 10  # 1 in 10 stdlib files (by hash of the relative path) is held out


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _is_held_out(relative_name: str) -> bool:
    # A hash of the name, not of the content, so the split never moves when a file is edited.
    digest = hashlib.sha1(relative_name.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def stdlib_files(split: str = "train") -> list[Path]:
    """The Python standard library's own .py files (site-packages excluded), sorted, split by name."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown stdlib split {split!r}; accepted: 'train', 'heldout', 'all'")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if split == "all":
        return files
    want_held_out = split == "heldout"
    return [p for p in files if _is_held_out(p.relative_to(root).as_posix()) == want_held_out]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_corpus(split: str = "heldout") -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [Document(p.relative_to(root).as_posix(), _read(p)) for p in stdlib_files(split)]


def shared_data_root() -> Path:
    """`../shared/data` next to the checkout (or $LENGTHWISE_SHARED_DATA)."""
    env = os.environ.get("LENGTHWISE_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def pg19_corpus(split: str = "dev") -> list[Document]:
    if split not in ("train", "dev"):
        raise ValueError(f"unknown pg19 split {split!r}; accepted: 'train', 'dev'")
    folder = shared_data_root() / "pg19" / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"PG19 folder {folder} not found; place the project's shared/ folder beside the checkout "
            "or set LENGTHWISE_SHARED_DATA"
        )
    return [Document(f"pg19/{split}/{p.name}", _read(p)) for p in sorted(folder.glob("*.txt"))]


def local_corpus(path: str | Path) -> list[Document]:
    """A text file, or every .txt/.md/.py file under a folder."""
    path = Path(path)
    if path.is_file():
        return [Document(path.name, _read(path))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".py") and p.is_file())
        if not files:
            raise ValueError(f"folder {path} holds no .txt, .md or .py files")
        return [Document(p.relative_to(path).as_posix(), _read(p)) for p in files]
    raise FileNotFoundError(f"no file or folder at {path}")


def hf_corpus(spec: str, limit: int = 100) -> list[Document]:
    """`hf:NAME[:SPLIT]` through HF `datasets` (needs a reachable hub or a local cache)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise ImportError("HF datasets corpora need `pip install datasets`") from err
    parts = spec.split(":")
    name, split = parts[1], (parts[2] if len(parts) > 2 else "test")
    rows = datasets.load_dataset(name, split=split, streaming=True)
    docs = []
    for i, row in enumerate(rows):
        if i >= limit:
            break
        docs.append(Document(f"{name}/{split}/{i}", row.get("text") or next(iter(row.values()))))
    return docs


CORPUS_NAMES = ("stdlib", "stdlib-train", "pg19-dev", "pg19-train")


def load_corpus(spec: str) -> list[Document]:
    """Resolve a corpus spec: one of CORPUS_NAMES, `hf:NAME[:SPLIT]`, or a local path."""
    if spec == "stdlib":
        docs = stdlib_corpus("heldout")
    elif spec == "stdlib-train":
        docs = stdlib_corpus("train")
    elif spec in ("pg19-dev", "pg19-train"):
        docs = pg19_corpus(spec.split("-")[1])
    elif spec.startswith("hf:"):
        docs = hf_corpus(spec)
    elif Path(spec).exists():
        docs = local_corpus(spec)
    else:
        raise ValueError(
            f"unknown corpus {spec!r}; accepted: {', '.join(CORPUS_NAMES)}, hf:NAME[:SPLIT], or a local file/folder"
        )
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus {spec!r} holds no non-empty documents")
    return docs


@dataclass
class TokenizedDocs:
    docs: list[tuple[str, list[int]]]
    skipped: int  # documents shorter than the asked length


def documents_of_length(documents, tokenizer, length: int, max_docs: int | None = None) -> TokenizedDocs:
    """Tokenize documents, keep those with at least `length` tokens (truncated to it), longest-first order kept.

    Short documents are skipped and counted, never padded.
    """
    kept, skipped = [], 0
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            skipped += 1
            continue
        kept.append((doc.name, ids[:length]))
        if max_docs is not None and len(kept) >= max_docs:
            break
    return TokenizedDocs(kept, skipped)
