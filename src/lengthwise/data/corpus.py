"""Text corpora: the embedded stdlib default, PG19 from ../shared/data, local files, HF datasets.

Every corpus is a list of `Document(name, text)`; nothing is copied into the repository, the text is
read at run time. Local files that are not text (random bytes, a binary named .txt) are skipped with a warning
naming them, and a corpus with no text left is refused (`non_text_reason`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from lengthwise.errors import UserError

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
        raise UserError(f"unknown stdlib split {split!r}; accepted: 'train', 'heldout', 'all'")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if split == "all":
        return files
    want_held_out = split == "heldout"
    return [p for p in files if _is_held_out(p.relative_to(root).as_posix()) == want_held_out]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


NON_TEXT_SHARE = 0.01  # a file with more than this share of undecodable bytes (or of control characters) is not text
TEXT_SAMPLE_BYTES = 1 << 16  # what `is_text_file` reads of a file (the streaming mode reads files only at run time)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # C0 controls but tab, newline, form feed, carriage return


def non_text_reason(data: bytes) -> str | None:
    """Why these bytes are not text (None when they are): a NUL byte; more than `NON_TEXT_SHARE` of them not
    decodable as UTF-8 (each becomes a replacement character); or more than that share of control characters."""
    if not data:
        return None
    if b"\x00" in data:
        return "it holds NUL bytes"
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.count("\ufffd".encode())  # not the ones the file itself holds
    if undecodable > NON_TEXT_SHARE * len(data):
        return f"{undecodable / len(data):.0%} of its bytes are not UTF-8"
    controls = len(_CONTROL.findall(text))
    if controls > NON_TEXT_SHARE * len(text):
        return f"{controls / len(text):.0%} of its characters are control characters"
    return None


def warn_skipped(skipped: list[tuple[str, str]], where: str) -> None:
    """One warning line on stderr naming the files skipped as not text (the first 10, then a count)."""
    if not skipped:
        return
    names = ", ".join(f"{name} ({why})" for name, why in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    print(f"warning: {where}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
          f"{'are' if len(skipped) > 1 else 'is'} not text: {names}{more}", file=sys.stderr, flush=True)


def no_text_left(where: str, skipped: list[tuple[str, str]]) -> ValueError:
    """The one-line refusal of a file (`where` = "file PATH") or folder ("folder PATH") with no text in it."""
    name, why = skipped[0]
    rule = (f"a file with NUL bytes, or more than {NON_TEXT_SHARE:.0%} of its bytes undecodable as UTF-8 or control "
            "characters, is not text; give UTF-8 text files")
    if where.startswith("file "):
        return UserError(f"{where} is not text ({why}); {rule}")
    count = f"its {len(skipped)} files are" if len(skipped) > 1 else "its one file is"
    return UserError(f"{where} holds no text: {count} not text ({name}: {why}"
                      f"{', ...' if len(skipped) > 1 else ''}); {rule}")


def is_text_file(path: Path) -> str | None:
    """`non_text_reason` of the first `TEXT_SAMPLE_BYTES` of a file (a multi-byte character cut at the end of the
    sample counts as at most 3 bad bytes)."""
    with open(path, "rb") as handle:
        return non_text_reason(handle.read(TEXT_SAMPLE_BYTES))


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
        raise UserError(f"unknown pg19 split {split!r}; accepted: 'train', 'dev'")
    folder = shared_data_root() / "pg19" / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"PG19 folder {folder} not found; place the project's shared/ folder beside the checkout "
            "or set LENGTHWISE_SHARED_DATA"
        )
    return [Document(f"pg19/{split}/{p.name}", _read(p)) for p in sorted(folder.glob("*.txt"))]


def _read_local(path: Path) -> tuple[str | None, str | None]:
    """(text, None), or (None, why it is not text): the bytes are read once."""
    data = path.read_bytes()
    why = non_text_reason(data)
    return (None, why) if why else (data.decode("utf-8", errors="replace"), None)


def local_corpus(path: str | Path) -> list[Document]:
    """A text file, or every .txt/.md/.py file under a folder. Files that are not text (`non_text_reason`: NUL
    bytes, or over 1% undecodable bytes or control characters) are skipped with one warning line naming them; a
    file or folder with no text left is refused (ValueError)."""
    path = Path(path)
    if path.is_file():
        text, why = _read_local(path)
        if why:
            raise no_text_left(f"file {path}", [(path.name, why)])
        return [Document(path.name, text)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".py") and p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt, .md or .py files")
        docs, skipped = [], []
        for p in files:
            name = p.relative_to(path).as_posix()
            text, why = _read_local(p)
            if why:
                skipped.append((name, why))
            else:
                docs.append(Document(name, text))
        if not docs:
            raise no_text_left(f"folder {path}", skipped)
        warn_skipped(skipped, f"folder {path}")
        return docs
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
        raise UserError(
            f"unknown corpus {spec!r}; accepted: {', '.join(CORPUS_NAMES)}, hf:NAME[:SPLIT], or a local file/folder"
        )
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"corpus {spec!r} holds no non-empty documents")
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
