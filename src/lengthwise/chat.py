"""A conversation about one document, through a method's KV cache: the document is read once, then every question
and answer goes on in the same cache.

    from lengthwise import load_model
    from lengthwise.chat import Conversation

    model, tokenizer = load_model("smollm2-135m")
    with Conversation(model, tokenizer, method="lm-infinite") as chat:
        chat.read(open("book.txt").read())                 # prefill in chunks through handle.new_cache()
        print(chat.ask("Who is the narrator?"))            # greedy by default
        for piece in chat.stream("And then?", temperature=0.7, top_p=0.9):
            print(piece, end="", flush=True)
        chat.save("book.session")                          # the cache, to ask again later without a prefill
    chat = Conversation.load("book.session", model, tokenizer)

Where the document goes: into the system turn (`system` instruction, a blank line, the document), so the rendered
conversation grows as a prefix and each turn feeds only its new text. A chat template that refuses a system role
gets the document in a first user turn followed by a fixed assistant reply (`DOCUMENT_ACK`). A tokenizer without a
chat template gets a plain format (`Question: ...\\nAnswer:`, answers end at a newline).

Memory: with `lm-infinite` or `streaming` (no middle retrieval) every layer keeps at most n_global + n_local +
spare slots + one chunk of keys, whatever the length of the document and of the conversation; layers that retrieve
from the middle (top_k / top_blocks) keep every key, and so does any other method (vanilla: transformers'
`DynamicCache`; RoPE methods); `memory_bound()` says which, in numbers.

Temp-LoRA (`temp_lora=TempLoraConfig(...)`): the document is read through a `TempLoraSession` (a LoRA trained chunk
by chunk on it, the window bounded by the session's `window`), questions and answers continue that session; saving
such a conversation is refused (docs/chat.md says what it would need).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lengthwise import __version__, session
from lengthwise.api import patch
from lengthwise.attention.cache import LambdaCache, LambdaCacheLayer
from lengthwise.errors import UserError
from lengthwise.eval.speed import _release_free_memory, cache_bytes
from lengthwise.models.compat import cache_kwargs
from lengthwise.registry import get_entry, get_method, is_scorer, parse_method_spec
from lengthwise.session import model_identity
from lengthwise.temp_lora import TempLoraSession

DEFAULT_SYSTEM = ("You are a helpful assistant. The user asks questions about the document below; answer briefly, "
                  "from the document.")
DOCUMENT_ACK = "I have read the document. Ask me about it."
CONVERSATION_FILE = "conversation.json"


# ------------------------------------------------------------------------------------------------------ formatting
class ChatFormat:
    """Renders messages with the tokenizer's chat template, or a plain format when it has none."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.name = "chat-template" if self.template else "plain"

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        parts = []
        for message in messages:
            if message["role"] == "system":
                parts.append(message["content"] + "\n\n")
            elif message["role"] == "user":
                parts.append(f"Question: {message['content']}\nAnswer:")
            else:
                parts.append(message["content"] + "\n\n")
        return "".join(parts)

    def document_messages(self, document: str, system: str) -> tuple[list[dict], str]:
        """The messages that hold the document, and where it went ('system' or 'user')."""
        messages = [{"role": "system", "content": f"{system}\n\n{document}"}]
        if not self.template:
            return messages, "system"
        try:
            self.render(messages, False)
            return messages, "system"
        except Exception:  # noqa: BLE001 - a template that refuses the system role (jinja raises its own errors)
            return [{"role": "user", "content": f"{system}\n\n{document}"},
                    {"role": "assistant", "content": DOCUMENT_ACK}], "user"


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # binary search for the first differing character
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature <= 0) or nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    keep[0] = True
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def resident_mib() -> float:
    """Resident set size of this process, MiB (psutil; /proc/self/status without it)."""
    try:
        import psutil  # noqa: PLC0415

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return float(line.split()[1]) / 1024
    return float("nan")


@dataclass
class TurnStats:
    """One turn, measured: `ttft_s` from the question to its first answer token (the question's prefill included);
    `tokens_per_s`: answer tokens after the first, per second of decoding."""

    question: str
    question_tokens: int
    answer_tokens: int
    ttft_s: float
    tokens_per_s: float | None
    seconds: float
    rss_mib: float
    cache_mib: float | None
    tokens_seen: int
    kept_tokens: int | None
    stopped: str  # "eos", "max_new_tokens" or "newline" (plain format)

    def line(self, turn: int) -> str:
        rate = "-" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f}"
        cache = "" if self.cache_mib is None else f", cache {self.cache_mib:.1f} MiB"
        kept = "" if self.kept_tokens is None else f", {self.kept_tokens:,} kept"
        return (f"[turn {turn}] first token {self.ttft_s:.2f} s, {rate} tokens/s, {self.answer_tokens} tokens "
                f"({self.stopped}), RSS {self.rss_mib:.0f} MiB{cache} ({self.tokens_seen:,} tokens seen{kept})")


@dataclass
class ReadStats:
    tokens: int
    seconds: float
    tokens_per_s: float
    rss_mib: float
    cache_mib: float | None
    document_role: str
    extra: dict = field(default_factory=dict)


def cache_mib(cache) -> float | None:
    held = cache_bytes(cache) if cache is not None else None
    return None if held is None else held / 2**20


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------------- conversation
class Conversation:
    """A document and a conversation about it, through `method`'s KV cache (see the module doc).

    `method`: a spec (`"lm-infinite:n_local=4096,top_blocks=4"`, `"vanilla"`, `"yarn:factor=2"`, ...); scoring
    strategies (sliding-window) have no cache and are refused. `chunk_size`: tokens per forward call while reading.
    `system`: the instruction placed before the document. `seed`: of the sampling generator. `model_name`: how the
    model is named in a saved session. `temp_lora`: a `TempLoraConfig` to read the document into a Temp-LoRA.
    """

    def __init__(self, model, tokenizer, method: str = "vanilla", *, chunk_size: int = 2048,
                 system: str | None = None, seed: int = 0, model_name: str | None = None, temp_lora=None) -> None:

        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise UserError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        try:
            parts = parse_method_spec(method)
            for name, options in parts:
                get_entry(name).make_config(**options)
        except ValueError as err:
            raise UserError(str(err)) from None
        for name, _ in parts:
            if is_scorer(name):
                raise UserError(f"{name!r} is a scoring strategy with no KV cache; a conversation needs a cache: use "
                                f"lm-infinite or streaming (bounded), or vanilla / a RoPE method (unbounded)")
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.chunk_size, self.system = chunk_size, DEFAULT_SYSTEM if system is None else system
        self.identity = model_identity(model, model_name)
        self.format = ChatFormat(tokenizer)
        self.eos = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.messages: list[dict] = []
        self.rendered = ""  # the conversation's text as fed to the cache
        self.committed = 0  # length of `rendered` the template must reproduce (up to the last answer's start)
        self.pending: list[int] = []  # generated tokens not yet fed (the last one of each answer)
        self.document_role: str | None = None
        self.turns: list[TurnStats] = []
        self.answer_ids: list[int] = []
        self.read_stats: ReadStats | None = None
        self.temp_lora = temp_lora
        self.session = None
        self.handle = None
        self.closed = False
        if temp_lora is not None:

            window_method = None if all(get_method(n).role == "none" for n, _ in parts) else method
            self.session = TempLoraSession(model, temp_lora, method=window_method)
            self.handle = self.session._handle
            self.cache = None
            return
        self.handle = patch(model, method)
        try:
            cache = self.handle.new_cache()
            if cache is None:
                from transformers import DynamicCache  # noqa: PLC0415

                cache = DynamicCache(config=model.config)
            self.cache = cache
        except BaseException:
            self.handle.remove()
            raise

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the method's patch (and a Temp-LoRA): the model is as before."""
        if self.closed:
            return
        self.closed = True
        self.cache = None
        if self.session is not None:
            self.session.close()
        elif self.handle is not None:
            self.handle.remove()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise UserError("this conversation is closed (its patch was removed); start a new one")

    # ---- the cache -------------------------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    @torch.no_grad()
    def _feed(self, ids: list[int], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Feed `ids` through the cache in chunks; returns the float32 logits after the last one (V,)."""

        logits = None
        for start in range(0, len(ids), self.chunk_size):
            chunk = torch.tensor([ids[start : start + self.chunk_size]], device=self.device)
            out = self.model(input_ids=chunk, **cache_kwargs(self.model, self.cache), use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[0, -1].float()
            if progress is not None:
                progress(min(start + self.chunk_size, len(ids)), len(ids))
        return logits

    def tokens_seen(self) -> int:
        if self.session is not None:
            return self.session._fed
        return int(self.cache.get_seq_length())

    def kept_tokens(self) -> int | None:
        """Keys the first attention layer holds now (all of them for an unbounded cache)."""
        if self.session is not None:
            cache = self.session._cache
            return None if cache is None else int(cache.layers[0].keys.shape[-2]) if cache.layers[0].is_initialized \
                else 0
        layer = self.cache.layers[0]
        return int(layer.keys.shape[-2]) if layer.is_initialized and layer.keys.dim() == 4 else 0

    def memory_bound(self) -> dict:
        """What the cache keeps: bounded (at most so many keys per layer, MiB) or growing (bytes per token)."""

        config = self.model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_attention_heads", 1)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = next(self.model.parameters()).element_size()
        per_key = 2 * kv_heads * head_dim * element  # keys and values, one layer
        if self.session is not None:
            window = self.temp_lora.window
            layers = getattr(config, "num_hidden_layers", 1)
            return {"bounded": True, "max_keys_per_layer": window, "max_mib": layers * window * per_key / 2**20,
                    "text": f"bounded by the Temp-LoRA window: at most {window:,} keys per layer ({layers} layers, "
                            f"{layers * window * per_key / 2**20:.1f} MiB); the rest of the document is in the LoRA"}
        if isinstance(self.cache, LambdaCache):
            layers = self.cache.layers
            bounded = [x for x in layers if isinstance(x, LambdaCacheLayer) and not x.keep_all]
            growing = [i for i, x in enumerate(layers) if isinstance(x, LambdaCacheLayer) and x.keep_all]
            parts, total = [], 0
            for layer in bounded:
                total += layer.n_global + layer.n_local + layer.slack + self.chunk_size
            if bounded:
                first = bounded[0]
                keys = first.n_global + first.n_local + first.slack + self.chunk_size
                parts.append(f"{len(bounded)} layers keep at most n_global {first.n_global} + n_local "
                             f"{first.n_local:,} + {first.slack} spare slots + a chunk of {self.chunk_size:,} = "
                             f"{keys:,} keys each ({total * per_key / 2**20:.1f} MiB in all), whatever the length")
            if growing:
                parts.append(f"{len(growing)} layers (middle retrieval: top_k / top_blocks) keep every key: "
                             f"{len(growing) * per_key / 1024:.1f} KiB more per token")
            return {"bounded": not growing, "max_keys_per_layer": None if growing else
                    max(x.n_global + x.n_local + x.slack + self.chunk_size for x in bounded),
                    "max_mib": None if growing else total * per_key / 2**20,
                    "growing_layers": growing, "per_token_kib": len(growing) * per_key / 1024,
                    "text": ("bounded: " if not growing else "growing: ") + "; ".join(parts)}
        layers = len(self.cache.layers)
        return {"bounded": False, "max_keys_per_layer": None, "max_mib": None, "growing_layers": list(range(layers)),
                "per_token_kib": layers * per_key / 1024,
                "text": f"unbounded: {type(self.cache).__name__} keeps every key ({self.method}); "
                        f"{layers * per_key / 1024:.1f} KiB per token, {layers} layers"}

    # ---- reading ---------------------------------------------------------------------------------------------
    def read(self, document: str, progress: Callable[[int, int], None] | None = None) -> ReadStats:
        """Read the document once (it goes into the system turn); `progress(done, total)` after each chunk."""
        self._check_open()
        if self.messages:
            raise UserError("this conversation has read its document already; start a new Conversation for another")
        if not isinstance(document, str) or not document.strip():
            raise UserError("the document is empty: nothing to read")
        messages, role = self.format.document_messages(document, self.system)
        text = self.format.render(messages, False)
        ids = self._tokenize(text)
        start = time.perf_counter()
        if self.session is not None:
            self.session.process(torch.tensor(ids))
            if progress is not None:
                progress(len(ids), len(ids))
        else:
            self._feed(ids, progress)
        seconds = time.perf_counter() - start
        self.messages, self.rendered, self.committed, self.document_role = messages, text, len(text), role
        self.read_stats = ReadStats(len(ids), seconds, len(ids) / seconds if seconds else float("inf"),
                                    resident_mib(), cache_mib(self.cache), role)
        return self.read_stats

    # ---- asking ----------------------------------------------------------------------------------------------
    def _delta(self, full: str) -> str:
        shared = _common_prefix(self.rendered, full)
        if shared < self.committed:
            raise UserError("this model's chat template rewrites earlier turns of the conversation (it renders "
                            "them differently once a new turn is added), so a cache that already holds them cannot "
                            "go on; use a model whose template renders a conversation as a growing prefix")
        return full[shared:]

    def stream(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               ) -> Iterator[str]:
        """Ask `question`; yields the answer's text as it is generated. `last_turn()` has the figures after."""
        self._check_open()
        if not self.messages:
            raise UserError("read a document first (Conversation.read), or load a saved session")
        if not isinstance(question, str) or not question.strip():
            raise UserError("the question is empty")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise UserError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        start = time.perf_counter()
        messages = self.messages + [{"role": "user", "content": question}]
        full = self.format.render(messages, True)
        delta_ids = self._tokenize(self._delta(full))
        fed_ids = self.pending + delta_ids
        if self.session is not None:
            logits = None
            if fed_ids:
                self.session.process(torch.tensor(fed_ids))
        else:
            logits = self._feed(fed_ids)
        generated: list[int] = []
        emitted, first, stopped = "", None, "max_new_tokens"
        for step in range(max_new_tokens):
            if self.session is not None:
                token = int(self.session.generate(1, temperature=temperature, top_p=top_p,
                                                  generator=self.generator)[0])
            else:
                token = pick_token(logits, temperature, top_p, self.generator)
            first = first or time.perf_counter()
            generated.append(token)
            if token in self.eos:
                stopped = "eos"
                break
            text = self.tokenizer.decode(generated, skip_special_tokens=False)
            if not text.endswith("\ufffd"):  # a character cut between two tokens waits for the next one
                piece, emitted = text[len(emitted):], text
                if not self.format.template and "\n" in text.lstrip():
                    piece = piece.split("\n")[0]
                    stopped = "newline"
                if piece:
                    yield piece
                if stopped == "newline":
                    break
            if step + 1 < max_new_tokens and self.session is None:
                logits = self._feed([token])
        end = time.perf_counter()
        answer_ids = [t for t in generated if t not in self.eos]
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=False)
        if stopped == "newline":
            answer = answer.lstrip().split("\n")[0]
        elif answer.startswith(emitted) and len(answer) > len(emitted):  # a last character held back
            yield answer[len(emitted):]
        # the cache holds every generated token but the last, which goes in front of the next turn's text
        self.answer_ids = generated  # the answer's tokens as generated (an end-of-turn token included)
        self.pending = generated[-1:] if self.session is None else []
        self.rendered = full + self.tokenizer.decode(generated, skip_special_tokens=False)
        self.committed = len(full)
        self.messages = messages + [{"role": "assistant", "content": answer.strip() if stopped == "newline" else
                                     answer}]
        decode_s = end - first if first else 0.0
        stats = TurnStats(question=question, question_tokens=len(fed_ids), answer_tokens=len(generated),
                          ttft_s=(first or end) - start,
                          tokens_per_s=(len(generated) - 1) / decode_s if len(generated) > 1 and decode_s else None,
                          seconds=end - start, rss_mib=resident_mib(), cache_mib=cache_mib(
                              self.cache if self.session is None else self.session._cache),
                          tokens_seen=self.tokens_seen() + len(self.pending), kept_tokens=self.kept_tokens(),
                          stopped=stopped)
        self.turns.append(stats)

    def ask(self, question: str, **sampling: Any) -> str:
        """The whole answer to `question` (see `stream` for the options)."""
        return "".join(self.stream(question, **sampling))

    def last_turn(self) -> TurnStats | None:
        return self.turns[-1] if self.turns else None

    # ---- sessions ----------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Save the cache and the conversation so far (lengthwise.session); `Conversation.load` restores them."""

        self._check_open()
        if self.session is not None:
            raise UserError("a Temp-LoRA conversation cannot be saved yet (its LoRA weights, optimizer state and "
                            "window would have to be saved too); save a conversation without --temp-lora")
        if not self.messages:
            raise UserError("nothing to save: read a document first")
        manifest = {"model": self.identity, "method": {"spec": self.method, "resolved": _normalised(
                    self.handle.describe())}, "chunk_size": self.chunk_size, "tokens_seen": self.tokens_seen(),
                    "lengthwise": __version__}
        conversation = {"format": self.format.name, "document_role": self.document_role, "system": self.system,
                        "messages": self.messages, "rendered": self.rendered, "committed": self.committed,
                        "pending": self.pending, "seed": self.seed,
                        "read": None if self.read_stats is None else asdict(self.read_stats),
                        "turns": [asdict(t) for t in self.turns]}
        return session.save(folder, manifest, self.cache, {CONVERSATION_FILE: conversation})

    @classmethod
    def load(cls, folder: str | Path, model, tokenizer, method: str | None = None, *, model_name: str | None = None,
             chunk_size: int | None = None, seed: int = 0) -> Conversation:
        """A conversation restored from `save()`: refused in one line when it was saved for another model (config,
        weights, dtype) or another method (`method`, when given, must resolve to the saved one)."""

        folder = Path(folder)
        manifest = session.read_manifest(folder)
        session.check_identity(manifest.get("model", {}), model, folder, model_name)
        saved = manifest.get("method", {})
        chat = cls(model, tokenizer, method or saved.get("spec", "vanilla"),
                   chunk_size=chunk_size or int(manifest.get("chunk_size", 2048)), seed=seed, model_name=model_name)
        try:
            if _normalised(chat.handle.describe()) != saved.get("resolved"):
                raise UserError(f"session {folder} was saved with method {saved.get('spec')!r}; this conversation "
                                f"uses {chat.method!r}, which resolves differently: omit --method to use the saved "
                                f"one, or read the document again")
            conversation = session.read_json(folder, CONVERSATION_FILE)
            if conversation.get("format") != chat.format.name:
                raise UserError(f"session {folder} was written in the {conversation.get('format')} format, this "
                                f"tokenizer gives {chat.format.name}: it was saved with another tokenizer")
            with session.read_tensors(folder, chat.device) as tensors:
                session.restore_cache(chat.cache, manifest.get("cache", {}), tensors, folder)
            chat.messages = conversation["messages"]
            chat.rendered, chat.committed = conversation["rendered"], int(conversation["committed"])
            chat.pending = [int(t) for t in conversation["pending"]]
            chat.document_role, chat.system = conversation["document_role"], conversation["system"]

            _release_free_memory()  # each layer read from the file was copied into the cache's buffers: freed now
        except KeyError as err:
            chat.close()
            raise UserError(f"session {folder}: {CONVERSATION_FILE} lacks {err} (a damaged session)") from None
        except BaseException:
            chat.close()
            raise
        return chat
