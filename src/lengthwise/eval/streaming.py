"""Streaming perplexity: one long token stream scored chunk by chunk through a method's bounded KV cache.

The documents of a corpus (or one text file) are joined into one stream (the tokenizer's EOS token after each
document, where it has one) and tokenised piece by piece (`PIECE_CHARS` characters of whole lines at a time), never
the whole corpus at once. The first `n_tokens` tokens of that stream are fed `chunk_size` at a time through the
patched model's own KV cache (`handle.new_cache()`: bounded for `lm-infinite` and `streaming`), exactly as
`perplexity.nll_one_pass(model, ids, chunk_size, cache)` feeds one document. NLL is summed per position bucket
(edges chosen up front from `n_tokens`: log-spaced or equal widths, by absolute position in the stream), so what is
held in memory is the model, the bounded cache, one chunk's logits, one tokenised piece, and the running sums --
never a per-token array of the stream.

The `sliding-window` baseline streams too (it keeps only its last `window` tokens); methods with an unbounded cache
(vanilla, a RoPE rescaling alone, lm-infinite with middle retrieval) are refused: their memory grows with the stream.

Checkpoints (every `checkpoint_every` tokens, at least every `checkpoint_seconds`, and when a run pauses): the
running sums, the token offset, where in the corpus the next token comes from, and the KV cache's state (its
tensors are bounded): per cache layer, its attributes as tensors, numbers, strings, dtypes and devices, never the
cache object. The file is written with torch.save to a temporary file and moved into place with os.replace, and
read back with `weights_only=True`: a checkpoint that would unpickle anything else is refused. A resumed run
restores all of it and continues as if never stopped (equal to an uninterrupted run within float tolerance; tested).
Each checkpoint also writes a JSON snapshot of the buckets so far and the process's resident memory (current and
peak), so a long run shows its memory staying flat.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lengthwise.data.corpus import (CORPUS_NAMES, hf_corpus, is_text_file, no_text_left, shared_data_root, stdlib_files,
                                    warn_skipped)
from lengthwise.errors import UserError
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.io import atomic_torch_save, atomic_write_json, load_torch_file, remove_temp_files
from lengthwise.models.families import model_info
from lengthwise.progress import progress_bar
from lengthwise.registry import get_entry, parse_method_spec
from lengthwise.scoring import open_scorer

CHECKPOINT_VERSION = 2  # 2: the cache as plain per-layer state (1 pickled the cache object)
PIECE_CHARS = 1 << 16  # characters of whole lines tokenised at a time
BUCKET_SCALES = ("log", "linear")
EXACT_FLOAT32_POSITIONS = 1 << 24  # beyond this, float32 cannot even hold the integer positions RoPE rotates by


# --------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class StreamSource:
    """One document of the stream: a file read line by line at run time, or a text already in memory (hf:)."""

    name: str
    path: Path | None = None
    text: str | None = None

    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None else len(self.text or "")

    def pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
        """The text in pieces of whole lines, each at least `piece_chars` characters (but the last); a line longer
        than `piece_chars` is cut after `piece_chars` characters. The same text always gives the same pieces."""
        handle = open(self.path, encoding="utf-8", errors="replace") if self.path is not None \
            else io.StringIO(self.text or "")
        with handle:
            parts, size = [], 0
            while True:
                line = handle.readline(piece_chars)
                if not line:
                    break
                parts.append(line)
                size += len(line)
                if size >= piece_chars:
                    yield "".join(parts)
                    parts, size = [], 0
            if parts:
                yield "".join(parts)


def _folder_sources(folder: Path, prefix: str, suffixes: tuple[str, ...]) -> list[StreamSource]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in suffixes and p.is_file())
    return [StreamSource(f"{prefix}{p.relative_to(folder).as_posix()}", p) for p in files]


def stream_sources(spec: str) -> list[StreamSource]:
    """The documents a stream joins, in order, without reading them: a corpus name (`stdlib`, `stdlib-train`,
    `pg19-dev`, `pg19-train`), `hf:NAME[:SPLIT]` (read into memory, as `load_corpus` does), a text file, a folder
    (every .txt/.md/.py file under it, sorted), or several of these joined with commas (`pg19-train,pg19-dev`)."""
    import sysconfig  # noqa: PLC0415

    specs = [spec] if Path(spec).exists() else [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise UserError(f"empty corpus spec {spec!r}")
    sources: list[StreamSource] = []
    for item in specs:
        if item in ("stdlib", "stdlib-train"):
            root = Path(sysconfig.get_paths()["stdlib"])
            files = stdlib_files("heldout" if item == "stdlib" else "train")
            sources += [StreamSource(p.relative_to(root).as_posix(), p) for p in files]
        elif item in ("pg19-dev", "pg19-train"):
            split = item.split("-")[1]
            folder = shared_data_root() / "pg19" / split
            if not folder.is_dir():
                raise FileNotFoundError(f"PG19 folder {folder} not found; place the project's shared/ folder beside "
                                        "the checkout or set LENGTHWISE_SHARED_DATA")
            sources += [StreamSource(f"pg19/{split}/{p.name}", p) for p in sorted(folder.glob("*.txt"))]
        elif item.startswith("hf:"):

            sources += [StreamSource(d.name, text=d.text) for d in hf_corpus(item)]
        elif Path(item).is_file():
            if why := is_text_file(Path(item)):
                raise no_text_left(f"file {item}", [(Path(item).name, why)])
            sources.append(StreamSource(Path(item).name, Path(item)))
        elif Path(item).is_dir():
            found = _folder_sources(Path(item), "", (".txt", ".md", ".py"))
            if not found:
                raise UserError(f"folder {item} holds no .txt, .md or .py files")
            checked = [(source, is_text_file(source.path)) for source in found]  # the first 64 KiB of each
            skipped = [(source.name, why) for source, why in checked if why]
            found = [source for source, why in checked if not why]
            if not found:
                raise no_text_left(f"folder {item}", skipped)
            warn_skipped(skipped, f"folder {item}")
            sources += found
        else:
            raise UserError(f"unknown corpus {item!r}; accepted: {', '.join(CORPUS_NAMES)}, hf:NAME[:SPLIT], a "
                             "local file or folder, or several of these joined with commas")
    sources = [s for s in sources if s.size() > 0]
    if not sources:
        raise UserError(f"corpus {spec!r} holds no non-empty documents")
    return sources


def sources_fingerprint(sources: Sequence[StreamSource]) -> str:
    """Names and sizes of the documents, hashed: a resumed run refuses a checkpoint of another stream."""
    text = "\n".join(f"{s.name}\t{s.size()}" for s in sources)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def document_separator(tokenizer) -> list[int]:
    """Tokens put after each document: the tokenizer's EOS token, or nothing where it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if isinstance(eos, int) else []


class TokenStream:
    """The tokens of `sources` joined, produced piece by piece. A position `(document, segment, token)` names the
    next token: segment s < P is the s-th piece of the document, segment P its separator. Starting at a position
    skips earlier documents unread and earlier pieces of the same document untokenised."""

    def __init__(self, sources: Sequence[StreamSource], tokenizer, *, separator: Sequence[int] = (),
                 piece_chars: int = PIECE_CHARS, start: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.sources, self.tokenizer = list(sources), tokenizer
        self.separator, self.piece_chars = list(separator), piece_chars
        self._start = tuple(start)
        self._segments = self._iter_segments()
        self._current = self._start[:2]
        self._tokens: list[int] = []
        self._index = self._start[2]
        self._started = False
        self.exhausted = False

    def _iter_segments(self) -> Iterator[tuple[int, int, list[int]]]:
        first_doc, first_segment, _ = self._start
        for doc in range(first_doc, len(self.sources)):
            segment = 0
            for piece in self.sources[doc].pieces(self.piece_chars):
                if not (doc == first_doc and segment < first_segment):
                    yield doc, segment, self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                segment += 1
            if self.separator and not (doc == first_doc and segment < first_segment):
                yield doc, segment, list(self.separator)

    def take(self, n: int) -> list[int]:
        """Up to `n` next tokens (fewer only where the stream ends)."""
        out: list[int] = []
        while len(out) < n:
            if self._started and self._index < len(self._tokens):
                k = min(n - len(out), len(self._tokens) - self._index)
                out.extend(self._tokens[self._index : self._index + k])
                self._index += k
                continue
            following = next(self._segments, None)
            if following is None:
                self.exhausted = True
                break
            doc, segment, tokens = following
            first = not self._started
            if first and (doc, segment) != self._start[:2]:
                raise UserError(f"the stream has no segment {self._start[:2]} to resume at; its documents changed")
            self._current, self._tokens, self._started = (doc, segment), tokens, True
            self._index = self._start[2] if first else 0
        return out

    def position(self) -> tuple[int, int, int]:
        return (*self._current, self._index)

    @property
    def document(self) -> int:
        return self._current[0]


def stream_token_ids(sources: Sequence[StreamSource], tokenizer, n_tokens: int,
                     piece_chars: int = PIECE_CHARS) -> list[int]:
    """The first `n_tokens` tokens of the stream as one list (tests and short streams only)."""
    return TokenStream(sources, tokenizer, separator=document_separator(tokenizer), piece_chars=piece_chars).take(
        n_tokens)


def count_stream_tokens(sources: Sequence[StreamSource], tokenizer, limit: int,
                        piece_chars: int = PIECE_CHARS) -> int:
    """Tokens in the stream, counted piece by piece up to `limit` (stops there)."""
    stream = TokenStream(sources, tokenizer, separator=document_separator(tokenizer), piece_chars=piece_chars)
    count = 0
    while count < limit:
        got = len(stream.take(min(limit - count, 1 << 20)))
        if not got:
            break
        count += got
    return count


# --------------------------------------------------------------------------------------------------------- buckets


def parse_token_count(text: str | int, option: str = "--stream-tokens") -> int:
    """`200000`, `200_000`, `200k`, `10M`, `1.5M`, `1G` -> tokens; an integer >= 2 or ValueError."""
    raw = str(text).strip().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(raw[-1:].lower(), 1) if raw else 1
    number = raw[:-1] if scale != 1 else raw
    value = None
    try:
        value = int(number) * scale
    except ValueError:
        try:
            as_float = float(number) * scale
            value = int(as_float) if math.isfinite(as_float) and as_float == int(as_float) else None
        except ValueError:
            value = None
    if value is None or value < 2:
        raise UserError(f"{option} must be a positive integer number of tokens, at least 2 (e.g. 200000, 200k, "
                         f"10M), got {str(text)!r}")
    return value


def bucket_edges(n_tokens: int, num_buckets: int = 32, scale: str = "log") -> list[int]:
    """Edges of the position buckets of target positions 1..n_tokens-1: bucket i holds [edges[i], edges[i+1]).
    `log`: log-spaced from 1 to n_tokens (fewer buckets where rounding merges the first ones); `linear`: equal
    widths."""
    if scale not in BUCKET_SCALES:
        raise UserError(f"unknown bucket scale {scale!r}; accepted: {', '.join(BUCKET_SCALES)}")
    if not isinstance(num_buckets, int) or num_buckets < 1:
        raise UserError(f"buckets must be a positive integer, got {num_buckets!r}")
    if scale == "log":
        raw = [round(math.exp(math.log(n_tokens) * i / num_buckets)) for i in range(num_buckets + 1)]
    else:
        raw = [1 + round(i * (n_tokens - 1) / num_buckets) for i in range(num_buckets + 1)]
    return sorted({1, n_tokens, *(min(max(e, 1), n_tokens) for e in raw)})


class Buckets:
    """Running NLL sums and token counts per position bucket (float64, fixed size)."""

    def __init__(self, edges: Sequence[int]) -> None:
        self.edges = list(edges)
        self._bounds = torch.tensor(self.edges, dtype=torch.long)
        self.sums = torch.zeros(len(self.edges) - 1, dtype=torch.float64)
        self.counts = torch.zeros(len(self.edges) - 1, dtype=torch.long)

    def add(self, first_position: int, nll: torch.Tensor) -> None:
        """NLL of the targets at positions first_position, first_position + 1, ..."""
        positions = torch.arange(first_position, first_position + len(nll))
        index = torch.searchsorted(self._bounds, positions, right=True) - 1
        self.sums.index_add_(0, index, nll.double())
        self.counts.index_add_(0, index, torch.ones_like(index))

    def summary(self) -> dict:
        means = [round((s / c).item(), 5) if c else None for s, c in zip(self.sums, self.counts)]
        return {"edges": self.edges, "mean_nll": means, "counts": self.counts.tolist(),
                "sum_nll": [round(s, 6) for s in self.sums.tolist()]}

    def state(self) -> dict:
        return {"edges": self.edges, "sums": self.sums.clone(), "counts": self.counts.clone()}

    @classmethod
    def from_state(cls, state: dict) -> Buckets:
        buckets = cls(state["edges"])
        buckets.sums.copy_(state["sums"])
        buckets.counts.copy_(state["counts"])
        return buckets


# ---------------------------------------------------------------------------------------------------------- memory


def memory_now() -> dict:
    """Resident memory of this process, MiB: now and the peak so far (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    try:
        import psutil  # noqa: PLC0415

        rss = psutil.Process().memory_info().rss
    except ImportError:
        try:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            rss = None
    return {"rss_mib": None if rss is None else round(rss / (1 << 20), 1), "peak_rss_mib": round(peak_mib, 1)}


# ------------------------------------------------------------------------------------------------------ the scorers


def unbounded_reason(method: str) -> str | None:
    """Why `method` cannot stream with bounded memory (from the registry, before any model is loaded), or None."""
    entries = [get_entry(name) for name, _ in parse_method_spec(method)]
    if any(entry.bounded for entry in entries):
        return None
    return (f"method {method!r} has no bounded KV cache (its cache would hold every token of the stream); streaming "
            "perplexity needs one: lm-infinite, streaming, a combination with them (e.g. 'yarn:factor=4+lm-infinite'),"
            " or the sliding-window baseline")


def check_streamable(method: str) -> None:
    reason = unbounded_reason(method)
    if reason:
        raise UserError(reason)


# ------------------------------------------------------------------------------------------------------- the driver


def stream_key(model_name: str, method: str, data_name: str, n_tokens: int, chunk_size: int, edges_spec: str,
               seed: int = 0) -> str:
    return cell_key("ppl", mode="stream", model=model_name, method=method, data=data_name, length=n_tokens,
                    chunk=chunk_size, buckets=edges_spec, seed=seed)


def checkpoint_path(checkpoint_dir: str | Path, key: str, method: str, n_tokens: int) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)[:60]
    return Path(checkpoint_dir) / f"{slug}_{n_tokens}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def _load_checkpoint(path: Path) -> dict:
    # weights only: tensors and plain containers; a file that would unpickle anything else is refused in one line
    state = load_torch_file(path, "checkpoint", "delete it to start the stream over")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} streaming checkpoint; delete it "
                         "to start the stream over")
    return state


def streaming_perplexity(
    model,
    tokenizer,
    sources: Sequence[StreamSource],
    n_tokens: int,
    method: str = "lm-infinite",
    *,
    chunk_size: int | None = None,
    num_buckets: int = 32,
    bucket_scale: str = "log",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float = 600.0,
    results: ResultsFile | None = None,
    model_name: str = "model",
    data_name: str = "data",
    seed: int = 0,
    piece_chars: int = PIECE_CHARS,
    max_chunks: int | None = None,
    progress: bool = True,
    log=None,
) -> dict | None:
    """PPL of the first `n_tokens` tokens of the joined `sources`, streamed through `method`'s bounded cache.

    Returns the record (also appended to `results`), or None when `max_chunks` chunks were scored in this call and
    the stream is not finished (it was checkpointed; call again to resume). A cell already in `results` is returned
    as stored. `checkpoint_dir` None: no checkpoints (nothing to resume from).
    """
    n_tokens = parse_token_count(n_tokens, "n_tokens")
    results = results or ResultsFile(None)
    info = model_info(model)
    chunked = get_entry(parse_method_spec(method)[0][0]).chunked
    check_streamable(method)
    chunk_size = int(chunk_size or min(max(info.pretrain_length, 64), 2048)) if chunked else 0
    if chunk_size < 0 or (chunked and chunk_size < 1):
        raise UserError(f"chunk size must be a positive integer, got {chunk_size}")
    edges = bucket_edges(n_tokens, num_buckets, bucket_scale)
    key = stream_key(model_name, method, data_name, n_tokens, chunk_size, f"{bucket_scale}{num_buckets}", seed)
    if checkpoint_dir:  # a kill during an atomic write leaves its temporary file: never read, but half-written
        remove_temp_files(checkpoint_dir)
    done = results.done(key)
    if done:
        return done
    fingerprint = sources_fingerprint(sources)
    separator = document_separator(tokenizer)
    every = int(checkpoint_every or max(chunk_size or 1, -(-n_tokens // 10)))
    ckpt = checkpoint_path(checkpoint_dir, key, method, n_tokens) if checkpoint_dir else None
    say = log or (lambda text: None)

    scorer = open_scorer(model, method)
    try:
        scored = scorer.stream(chunk_size)
        state = _load_checkpoint(ckpt) if ckpt is not None and ckpt.exists() else None
        if state is not None:
            if state["key"] != key or state["fingerprint"] != fingerprint:
                raise UserError(f"checkpoint {ckpt} belongs to another stream (its documents or settings changed); "
                                 "delete it to start over")
            buckets = Buckets.from_state(state["buckets"])
            offset, total, scored_count = state["offset"], state["total_nll"], state["scored"]
            buffer, position = list(state["buffer"]), tuple(state["stream_position"])
            memory_log, elapsed, chunks, resumes = state["memory"], state["elapsed_s"], state["chunks"], \
                state["resumes"] + 1
            scored.restore(state["scorer"], offset)
            say(f"resuming {method} at token {offset:,} of {n_tokens:,} from {ckpt}")
        else:
            have = count_stream_tokens(sources, tokenizer, n_tokens, piece_chars)
            if have < n_tokens:
                raise UserError(f"corpus {data_name!r} holds {have:,} tokens, fewer than the {n_tokens:,} asked; "
                                 "stream fewer tokens or join more documents (e.g. 'pg19-train,pg19-dev')")
            buckets = Buckets(edges)
            offset, total, scored_count, buffer, position = 0, 0.0, 0, [], (0, 0, 0)
            memory_log, elapsed, chunks, resumes = [], 0.0, 0, 0
        stream = TokenStream(sources, tokenizer, separator=separator, piece_chars=piece_chars, start=position)
        documents = stream.document + 1

        def save(reason: str) -> None:
            nonlocal memory_log
            memory_log = memory_log + [{"offset": offset, "elapsed_s": round(elapsed, 2), **memory_now(),
                                        "reason": reason}]
            snapshot = {"key": key, "method": method, "offset": offset, "n_tokens": n_tokens,
                        "ppl_so_far": round(math.exp(total / scored_count), 4) if scored_count else None,
                        "tokens_per_s": round(offset / elapsed, 1) if elapsed else None,
                        "nll_by_position": buckets.summary(), "memory": memory_log, "resumes": resumes}
            if ckpt is None:
                return
            if reason != "end":  # at the end the record holds everything; no cache to write
                atomic_torch_save({"version": CHECKPOINT_VERSION, "key": key, "fingerprint": fingerprint,
                                   "offset": offset, "total_nll": total, "scored": scored_count, "buffer": buffer,
                                   "stream_position": stream.position(), "buckets": buckets.state(),
                                   "scorer": scored.state(), "memory": memory_log, "elapsed_s": elapsed,
                                   "chunks": chunks, "resumes": resumes}, ckpt)
            atomic_write_json(ckpt.with_suffix(".json"), snapshot)

        next_save = (offset // every + 1) * every
        last_save_time = time.monotonic()
        started_chunks = 0
        with progress_bar(progress) as bar:
            task = bar.add_task(f"stream {method}", total=n_tokens, completed=offset)
            while offset < n_tokens:
                if max_chunks is not None and started_chunks >= max_chunks:
                    save("paused")
                    say(f"paused {method} at token {offset:,} of {n_tokens:,} (checkpoint {ckpt})")
                    return None
                need = scored.lookahead(offset, n_tokens)
                if len(buffer) < need:
                    buffer += stream.take(need - len(buffer))
                    documents = max(documents, stream.document + 1)
                    if len(buffer) < need:
                        raise UserError(f"the stream ran out at token {offset + len(buffer):,} of {n_tokens:,} (its "
                                         "documents changed while it ran?)")
                tick = time.perf_counter()
                consumed, first_target, nll = scored.step(buffer, offset, n_tokens)
                buckets.add(first_target, nll)
                total += nll.double().sum().item()
                scored_count += len(nll)
                buffer = buffer[consumed:]
                offset += consumed
                elapsed += time.perf_counter() - tick
                chunks += 1
                started_chunks += 1
                bar.update(task, completed=offset)
                if offset >= next_save or time.monotonic() - last_save_time >= checkpoint_seconds:
                    if offset < n_tokens:
                        save("checkpoint")
                    last_save_time = time.monotonic()
                    next_save = (offset // every + 1) * every
        save("end")
    finally:
        scorer.close()

    assert scored_count == n_tokens - 1 == int(buckets.counts.sum()), (scored_count, n_tokens)
    mean = total / scored_count
    summary = buckets.summary()
    metrics = {"ppl": round(math.exp(mean), 4), "nll": round(mean, 6), "tokens": scored_count, "docs": documents,
               "skipped": 0, "tokens_per_s": round(n_tokens / elapsed, 1) if elapsed else None,
               "peak_rss_mib": memory_log[-1]["peak_rss_mib"]}
    record = make_record(
        "ppl", key, model=model_name, method=method, method_config=scorer.method_config, data=data_name, seed=seed,
        metrics=metrics, length=n_tokens, pretrain_length=info.pretrain_length, chunk_size=chunk_size or None,
        mode="stream",
        nll_by_position={"scale": bucket_scale, **summary},
        stream={"fingerprint": fingerprint, "documents": documents, "separator": separator,
                "piece_chars": piece_chars, "checkpoint_every": every, "chunks": chunks, "resumes": resumes,
                "elapsed_s": round(elapsed, 2), "memory": memory_log},
    )
    results.append(record)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)  # the record holds everything; the JSON snapshot stays beside the results
    return record


def memory_table(record: dict) -> str:
    """Markdown table of a stream record's memory log (offset, RSS now, peak RSS)."""
    rows = ["| tokens | elapsed s | RSS MiB | peak RSS MiB |", "|---|---|---|---|"]
    for entry in record["stream"]["memory"]:
        rows.append(f"| {entry['offset']:,} | {entry['elapsed_s']} | {entry['rss_mib']} | {entry['peak_rss_mib']} |")
    return "\n".join(rows)


__all__ = ["Buckets", "StreamSource", "TokenStream", "bucket_edges", "check_streamable", "count_stream_tokens",
           "parse_token_count", "stream_sources", "stream_token_ids", "streaming_perplexity", "unbounded_reason"]
