"""`lengthwise chat`: read a document once, then answer questions about it in the same KV cache (docs/chat.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lengthwise import session as sessions
from lengthwise.api import load_model
from lengthwise.chat import Conversation, resident_mib
from lengthwise.cli.app import (DeviceOption, DtypeOption, METHODS_HELP, MODEL_HELP, app, check_device_dtype,
                                check_methods, check_methods_fit)
from lengthwise.cli.outputs import check_out_file
from lengthwise.cli.temp_lora import build_config
from lengthwise.data.corpus import non_text_reason
from lengthwise.io import atomic_write_text
from lengthwise.registry import is_scorer, parse_method_spec

DEFAULT_METHOD = "lm-infinite"


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read_document(path: Path) -> str:
    if not path.exists():
        raise typer.BadParameter(f"--document {path} does not exist")
    if not path.is_file():
        raise typer.BadParameter(f"--document {path} is not a file")
    data = path.read_bytes()
    why = non_text_reason(data)
    if why:
        raise typer.BadParameter(f"--document {path} is not text ({why}); give a UTF-8 text file")
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise typer.BadParameter(f"--document {path} is empty: nothing to read")
    return text


def _questions(questions: list[str]):
    """--question values, else one question per line of stdin (blank lines skipped), until EOF."""
    if questions:
        yield from questions
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def _progress(quiet: bool):
    """A rich progress bar on stderr for the prefill (tokens, tokens/s), or None."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    bar = Progress(TextColumn("reading"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TimeElapsedColumn(), TextColumn("{task.fields[rate]}"), console=Console(stderr=True))
    return bar, bar.add_task("read", total=None, rate="")


def _names(spec: str) -> list[str]:
    return [name for name, _ in parse_method_spec(spec)]


def _check_chat_method(spec: str) -> None:
    for name in _names(spec):
        if is_scorer(name):
            raise typer.BadParameter(f"{name!r} is a scoring strategy with no KV cache; a conversation needs a cache: "
                                     f"use lm-infinite or streaming (bounded), or vanilla / a RoPE method (unbounded)")


def _check_session_method(folder: Path, manifest: dict, method: str) -> None:
    """Before the model loads: a --method of other methods than the session's is refused (options are compared
    once the model is patched: `Conversation.load`)."""
    saved = str(manifest.get("method", {}).get("spec"))
    if _names(saved) != _names(method):
        raise typer.BadParameter(f"session {folder} was saved with method {saved!r}; --method {method!r} differs: "
                                 f"omit --method to use the saved one, or read the document again")


@app.command("chat")
def chat_command(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    method: str = typer.Option(None, "--method", "-m", help=METHODS_HELP + f" (default {DEFAULT_METHOD}, or the "
                               "method of --load-session)"),
    document: Path = typer.Option(None, help="the text file to read once (UTF-8)"),
    question: list[str] = typer.Option(None, "--question", "-q", help="a question, repeatable (scripts); without "
                                       "it, one question per line of stdin until EOF"),
    max_new_tokens: int = typer.Option(256, min=1, help="answer tokens at most, per turn"),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; > 0: sampling at this temperature"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="nucleus sampling: keep the tokens whose probability "
                                "reaches top_p (with --temperature > 0)"),
    seed: int = typer.Option(0, help="seed of the sampling generator"),
    chunk_size: int = typer.Option(2048, min=1, help="tokens per forward call while reading the document"),
    system: str = typer.Option(None, help="the instruction before the document in the system turn (default: answer "
                               "briefly, from the document)"),
    save_session: Path = typer.Option(None, help="after reading, save the cache here (a folder) to ask again later "
                                      "with --load-session, without reading again"),
    load_session: Path = typer.Option(None, help="a folder written by --save-session: its cache instead of reading "
                                      "--document"),
    stats: Path = typer.Option(None, help="also write the figures of the read and of every turn to this JSON file"),
    quiet: bool = typer.Option(False, help="no progress bar, no per-turn lines on stderr"),
    threads: int = typer.Option(0, min=0, help="torch CPU threads (0: torch's default)"),
    temp_lora: bool = typer.Option(False, "--temp-lora", help="read the document into a temporary LoRA (trained "
                                   "chunk by chunk on it) and answer through its window; METHOD then serves the "
                                   "window"),
    temp_lora_chunk: int = typer.Option(1024, min=1, help="Temp-LoRA: tokens between two LoRA updates"),
    temp_lora_window: int = typer.Option(2048, min=1, help="Temp-LoRA: tokens the model attends to"),
    temp_lora_lr: float = typer.Option(2e-3, help="Temp-LoRA: learning rate"),
    temp_lora_rank: int = typer.Option(8, min=1, help="Temp-LoRA: LoRA rank (alpha = 2 * rank)"),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Read a document once through METHOD's KV cache, then answer questions about it with the model's chat
    template, streaming the answer; the conversation goes on in the same cache (bounded for lm-infinite)."""

    # every check before the model loads
    if (document is None) == (load_session is None):
        raise typer.BadParameter("give exactly one of --document (read it) or --load-session (a document read "
                                 "before)")
    if load_session is not None and save_session is not None:
        raise typer.BadParameter("--load-session already holds its document; --save-session saves a new read")
    if temp_lora and (load_session is not None or save_session is not None):
        raise typer.BadParameter("--temp-lora conversations cannot be saved or loaded yet (docs/chat.md)")
    text = _read_document(document) if document is not None else None
    manifest = sessions.read_manifest(load_session) if load_session is not None else None
    spec = method or (manifest["method"]["spec"] if manifest else DEFAULT_METHOD)
    check_methods([spec])
    _check_chat_method(spec)
    if manifest is not None and method is not None:
        _check_session_method(load_session, manifest, method)
    check_methods_fit(model, [spec])
    check_device_dtype(device, dtype)
    if save_session is not None:
        try:
            sessions.check_save_target(save_session)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    check_out_file(stats, "--stats")
    config = None
    if temp_lora:

        config = build_config(temp_lora_chunk, temp_lora_window, None, temp_lora_rank, 2.0 * temp_lora_rank,
                              "all-linear", temp_lora_lr, 1, True)
    if threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)

    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    record: dict = {"model": model, "method": spec, "device": str(next(lm.parameters()).device),
                    "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."), "document": None,
                    "load_session": None if load_session is None else str(load_session), "read": None, "turns": []}
    if load_session is not None:
        import time  # noqa: PLC0415

        start = time.perf_counter()
        chat = Conversation.load(load_session, lm, tokenizer, method, model_name=model, seed=seed)
        seconds = time.perf_counter() - start
        record["load"] = {"seconds": seconds, "tokens": chat.tokens_seen(), "rss_mib": resident_mib()}
        if not quiet:
            _err(f"loaded session {load_session}: {chat.tokens_seen():,} tokens in {seconds:.2f} s, no prefill; "
                 f"method {chat.method}; RSS {record['load']['rss_mib']:.0f} MiB")
    else:
        chat = Conversation(lm, tokenizer, spec, chunk_size=chunk_size, system=system, seed=seed, model_name=model,
                            temp_lora=config)
    with chat:
        bound = chat.memory_bound()
        record["memory_bound"] = bound
        if not quiet:
            _err(f"cache: {bound['text']}")
        if text is not None:
            record["document"] = str(document)
            bar, task = _progress(quiet)
            import time  # noqa: PLC0415

            began = time.perf_counter()

            def progress(done: int, total: int) -> None:
                rate = done / max(time.perf_counter() - began, 1e-9)
                bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} tokens/s")

            if bar is not None:
                with bar:
                    read = chat.read(text, progress=progress)
            else:
                read = chat.read(text)
            record["read"] = {**read.__dict__}
            if not quiet:
                _err(f"read {read.tokens:,} tokens in {read.seconds:.1f} s ({read.tokens_per_s:,.0f} tokens/s), "
                     f"document in the {read.document_role} turn; RSS {read.rss_mib:.0f} MiB" +
                     ("" if read.cache_mib is None else f", cache {read.cache_mib:.1f} MiB"))
            if save_session is not None:
                saved = chat.save(save_session)
                record["saved_session"] = str(saved)
                if not quiet:
                    _err(f"session saved to {saved}")
        echo = bool(question) or not sys.stdin.isatty()
        for number, asked in enumerate(_questions(question or []), 1):
            if echo:
                print(f"> {asked}", flush=True)
            for piece in chat.stream(asked, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p):
                sys.stdout.write(piece)
                sys.stdout.flush()
            print(flush=True)
            turn = chat.last_turn()
            record["turns"].append({**turn.__dict__, "answer": chat.messages[-1]["content"]})
            if not quiet:
                _err(turn.line(number))
            if stats is not None:
                _write_stats(stats, record)
    if stats is not None:
        _write_stats(stats, record)


def _write_stats(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
