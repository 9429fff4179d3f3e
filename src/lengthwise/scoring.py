"""Scorers: how the evaluators run a model under one spec, whatever the spec is.

`open_scorer(model, spec)` gives a scorer with the same methods for every spec:
- `nll(ids, chunk_size)`: the NLL of tokens 1..N-1 of one document;
- `decoder()`: a context fed token by token (`feed`, `feed_each`, `fork`), what passkey, speed and generation use;
- `generate(input_ids, max_new_tokens, ...)`: greedy continuation;
- `stream(chunk_size)`: a stream scored piece by piece with bounded state that checkpoints as plain data.

A patch's scorer (`PatchScorer`) applies the patch and runs the patched model, through the method's own KV cache
where it has one. A scoring strategy is not a patch: it is registered with `register_scorer` and runs the model as
it is. The one built in is the sliding-window baseline: every token is scored (or generated) by recomputing the model
over the previous `window` tokens, so the model never leaves its training length.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from lengthwise.api import patch
from lengthwise.attention.cache import LambdaCache
from lengthwise.errors import UserError
from lengthwise.models.compat import cache_kwargs
from lengthwise.models.families import model_info
from lengthwise.registry import (ScorerSpec, check_combination, get_entry, option, parse_method_spec,
                                 register_scorer)
from lengthwise.static_decode import greedy_static

DECODE_PATHS = ("eager", "static", "compiled")


# ------------------------------------------------------------------------------------------------ the NLL functions


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits: (T, V), targets: (T,) -> (T,) float32
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def nll_one_pass(model, ids: torch.Tensor, chunk_size: int | None = None, cache=None) -> torch.Tensor:
    """NLL of tokens 1..N-1 of `ids` (shape (N,)), one causal pass; chunked through `cache` when asked."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    if not chunk_size or chunk_size >= len(ids):
        logits = model(input_ids=ids[None], use_cache=False).logits[0]  # (N, V)
        return token_nll(logits[:-1], ids[1:]).cpu()
    if cache is None:
        cache = DynamicCache(config=model.config)
    pieces = []
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start : start + chunk_size]
        logits = model(input_ids=chunk[None], **cache_kwargs(model, cache), use_cache=True).logits[0]  # (C, V)
        targets = ids[start + 1 : start + 1 + len(chunk)]
        pieces.append(token_nll(logits[: len(targets)], targets).cpu())
    return torch.cat(pieces)


@torch.no_grad()
def windows_nll(model, ids: torch.Tensor, ends: list[int], window: int, previous: int, offset: int = 0,
                logits_to_keep: int = 0) -> torch.Tensor:
    """One batch of sliding windows: the window ending at each of `ends` (ascending) scores the targets it adds
    after the one before it (the first after `previous`). ids[i] is position offset + i; `logits_to_keep` (where the
    model takes it): logits of the last positions only, enough for the targets a window adds."""
    rows = torch.stack([ids[end - window - offset : end - offset] for end in ends])  # (B, window)
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    logits = model(input_ids=rows, use_cache=False, **kwargs).logits  # (B, window or logits_to_keep, V)
    width, pieces = logits.shape[1], []
    for row, end in enumerate(ends):
        scored = end - previous
        targets = ids[end - scored - offset : end - offset]
        pieces.append(token_nll(logits[row, width - scored - 1 : width - 1], targets))
        previous = end
    return torch.cat(pieces).cpu()


@torch.no_grad()
def nll_sliding_window(model, ids: torch.Tensor, window: int, stride: int, batch_size: int = 8) -> torch.Tensor:
    """NLL of tokens 1..N-1, each predicted from at least `window - stride` and at most `window - 1` earlier tokens.

    The first window scores its own positions (less context is all there is); each later window of `window`
    tokens ends `stride` tokens after the previous one and scores only the targets it adds.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = len(ids)
    first = min(window, n)
    out = [token_nll(model(input_ids=ids[None, :first], use_cache=False).logits[0, :-1], ids[1:first]).cpu()]
    ends = [min(e, n) for e in range(first + stride, n + stride, stride)]  # every end > first >= window
    for i in range(0, len(ends), batch_size):
        out.append(windows_nll(model, ids, ends[i : i + batch_size], window, ends[i - 1] if i else first))
    nll = torch.cat(out)
    assert len(nll) == n - 1, (len(nll), n)
    return nll


# ------------------------------------------------------------------------------------------------------- decoders


class CacheDecoder:
    """A context held in a KV cache: each `feed` is one forward call through it (the calls `generate()` makes)."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def feed(self, ids) -> torch.Tensor:
        """Feed `ids` (k,) in one call; logits (V,) of the last position."""
        ids = torch.as_tensor(ids, device=self.device)
        return self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1,
                          **cache_kwargs(self.model, self.cache)).logits[0, -1]

    def feed_each(self, ids) -> torch.Tensor:
        """Feed `ids` (k,) one token per call (middle retrieval selects keys per call); logits (k, V)."""
        ids = torch.as_tensor(ids, device=self.device)
        return torch.stack([self.feed(ids[j : j + 1]) for j in range(len(ids))]) if len(ids) else ids.new_zeros(0)

    def fork(self) -> "CacheDecoder":
        return CacheDecoder(self.model, copy.deepcopy(self.cache))


class RecomputeDecoder:
    """A context with no cache: each call reruns the model over its last `window` tokens (all of them when None)."""

    cache = None

    def __init__(self, model, window: int | None = None, context: list[int] | None = None) -> None:
        self.model, self.window = model, window
        self.context: list[int] = list(context or [])
        self.device = next(model.parameters()).device

    def _rows(self, ends: list[int]) -> torch.Tensor:
        width = min(self.window or ends[0], ends[0])
        return torch.tensor([self.context[end - width : end] for end in ends], device=self.device)  # (B, width)

    @torch.no_grad()
    def feed(self, ids) -> torch.Tensor:
        self.context += [int(t) for t in ids]
        end = len(self.context)
        return self.model(input_ids=self._rows([end]), use_cache=False, logits_to_keep=1).logits[0, -1]

    @torch.no_grad()
    def feed_each(self, ids) -> torch.Tensor:
        start = len(self.context)
        self.context += [int(t) for t in ids]
        k = len(self.context) - start
        if k == 0:
            return torch.zeros(0, device=self.device)
        if self.window is None:  # one pass over the whole context gives every position's logits
            return self.model(input_ids=self._rows([start + k]), use_cache=False, logits_to_keep=k).logits[0]
        ends = list(range(start + 1, start + k + 1))
        if ends[0] >= self.window:  # every row holds a full window: one batch
            return self.model(input_ids=self._rows(ends), use_cache=False, logits_to_keep=1).logits[:, -1]
        return torch.stack([self.model(input_ids=self._rows([end]), use_cache=False,
                                       logits_to_keep=1).logits[0, -1] for end in ends])

    def fork(self) -> "RecomputeDecoder":
        return RecomputeDecoder(self.model, self.window, self.context)


# -------------------------------------------------------------------------------------------------------- streams


def _plain(value) -> bool:
    """Whether `torch.load(weights_only=True)` reads `value` back (tensors, numbers, strings, dtypes, devices,
    None, and tuples, lists and dicts of them)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


class CacheStream:
    """Chunks of `chunk_size` tokens through the patched model's bounded cache (as `nll_one_pass` with a cache)."""

    def __init__(self, model, method: str, cache, chunk_size: int) -> None:
        if not isinstance(cache, LambdaCache):
            raise UserError(f"method {method!r} gives no bounded KV cache ({type(cache).__name__}); streaming "
                            "perplexity needs lm-infinite, streaming or the sliding-window baseline")
        growing = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keep_all", False)]
        if growing:
            raise UserError(f"method {method!r} keeps every key in the cache of layers {growing} (attention to the "
                            "middle: top_k / top_blocks), so its memory grows with the stream; stream it without them")
        self.model, self.cache, self.chunk_size = model, cache, chunk_size
        self.device = next(model.parameters()).device

    def lookahead(self, offset: int, n_tokens: int) -> int:
        """Tokens the next step needs from `offset` on: the chunk, plus the target after it."""
        return min(self.chunk_size + 1, n_tokens - offset)

    @torch.no_grad()
    def step(self, buffer: list[int], offset: int, n_tokens: int) -> tuple[int, int, torch.Tensor]:
        """Feed the next chunk (buffer starts at `offset`); returns (tokens consumed, first target position, NLL of
        the targets offset + 1, ...)."""
        fed = min(self.chunk_size, n_tokens - offset)
        scored = min(fed, n_tokens - 1 - offset)
        ids = torch.tensor(buffer[: fed + 1], device=self.device)
        logits = self.model(input_ids=ids[None, :fed], **cache_kwargs(self.model, self.cache), use_cache=True).logits[0]
        return fed, offset + 1, token_nll(logits[:scored], ids[1 : 1 + scored]).cpu()

    def state(self) -> dict:
        """The cache as plain data: per layer, its attributes (tensors, numbers, strings, dtypes, devices and
        tuples/lists/dicts of them; views of one buffer stay views of it in the file). Never the cache object."""
        layers = []
        for index, layer in enumerate(self.cache.layers):
            attributes = dict(vars(layer))
            odd = sorted(name for name, value in attributes.items() if not _plain(value))
            if odd:
                raise UserError(f"layer {index} of the {type(self.cache).__name__} holds {', '.join(odd)}, which a "
                                "weights-only checkpoint cannot hold; this cache cannot be checkpointed")
            layers.append(attributes)
        return {"cache_class": type(self.cache).__name__,
                "layer_classes": [type(x).__name__ for x in self.cache.layers], "layers": layers}

    def restore(self, state: dict, offset: int) -> None:
        fresh = self.cache  # a new cache of this method: the saved attributes go into its layers
        layers = state.get("layers") if isinstance(state, dict) else None
        same = isinstance(layers, list) and state.get("cache_class") == type(fresh).__name__ and \
            state.get("layer_classes") == [type(x).__name__ for x in fresh.layers] and \
            len(layers) == len(fresh.layers) and all(isinstance(saved, dict) and set(vars(layer)) <= set(saved)
                                                     for saved, layer in zip(layers, fresh.layers))
        if not same:
            raise UserError("the checkpoint's KV cache was written by another version of lengthwise's bounded cache; "
                            "delete the checkpoint to start the stream over")
        for saved, layer in zip(layers, fresh.layers):
            vars(layer).update(saved)
        if fresh.get_seq_length() != offset:
            raise UserError(f"the checkpoint's KV cache has seen {fresh.get_seq_length()} tokens, its offset says "
                            f"{offset}; delete the checkpoint to start the stream over")


class WindowStream:
    """The sliding-window baseline over a stream (as `nll_sliding_window`): keeps only the last `window` tokens."""

    def __init__(self, model, window: int, stride: int, batch_size: int = 8) -> None:
        self.model, self.window, self.stride, self.batch_size = model, window, stride, batch_size
        self.tail: list[int] = []  # the last `window` tokens before `offset`
        self.device = next(model.parameters()).device
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _ends(self, offset: int, n_tokens: int) -> list[int]:
        if offset == 0:
            return [min(self.window, n_tokens)]
        return [min(offset + k * self.stride, n_tokens) for k in range(1, self.batch_size + 1)
                if offset + (k - 1) * self.stride < n_tokens]

    def lookahead(self, offset: int, n_tokens: int) -> int:
        return self._ends(offset, n_tokens)[-1] - offset

    @torch.no_grad()
    def step(self, buffer: list[int], offset: int, n_tokens: int) -> tuple[int, int, torch.Tensor]:
        """The next windows (up to `batch_size`); the first scores targets 1..window-1, each later one the `stride`
        targets it adds: returns (tokens consumed, first target position, NLL)."""
        ends = self._ends(offset, n_tokens)
        context = self.tail + buffer[: ends[-1] - offset]  # positions offset - len(tail) ...
        base = offset - len(self.tail)
        ids = torch.tensor(context, device=self.device)
        if offset == 0:  # the first window scores its own positions
            first = ends[0]
            logits = self.model(input_ids=ids[None, :first], use_cache=False).logits[0]
            nll = token_nll(logits[:-1], ids[1:first]).cpu()
        else:
            nll = windows_nll(self.model, ids, ends, self.window, offset, base, self.stride + 1 if self._keep else 0)
        self.tail = context[-self.window :]
        return ends[-1] - offset, max(offset, 1), nll

    def state(self) -> dict:
        return {"tail": list(self.tail)}

    def restore(self, state: dict, offset: int) -> None:
        self.tail = list(state["tail"])
        if len(self.tail) != min(self.window, offset):
            raise UserError("the checkpoint's sliding-window context does not match its offset; delete the "
                            "checkpoint to start the stream over")


# -------------------------------------------------------------------------------------------------------- scorers


def require_static_decode(decode: str, decode_weights: str = "model", decode_kv: str = "model") -> None:
    """Refuse stored decode weights or key/value formats without a static / compiled decode (one line)."""
    for name, value in (("decode_weights", decode_weights), ("decode_kv", decode_kv)):
        if decode == "eager" and value != "model":
            raise UserError(f"{name}={value!r} is read by the static decoding step: use decode 'static' or "
                            f"'compiled' with it")


def require_static_cache(decode: str, spec: str, cache, decode_weights: str = "model",
                         decode_kv: str = "model") -> None:
    """Refuse a static / compiled decode where the spec gives no cache to decode on, and the stored formats without
    one (`require_static_decode`)."""
    if decode != "eager" and cache is None:
        raise UserError(f"decode={decode!r} runs on the bounded cache of lm-infinite, not on {spec!r}")
    require_static_decode(decode, decode_weights, decode_kv)


class _Scorer:
    """What every scorer shares: `with` closes it."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PatchScorer(_Scorer):
    """The model patched with `spec` (the patch is removed by `close()`)."""

    def __init__(self, model, spec: str) -> None:
        self.model, self.spec = model, spec
        self.handle = patch(model, spec)
        self.method_config = self.handle.describe()

    def nll(self, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """NLL (N-1,) of one document (N,): one pass, or `chunk_size` tokens per call through a fresh cache."""
        return nll_one_pass(self.model, ids, chunk_size, self.handle.new_cache() if chunk_size else None)

    def decoder(self) -> CacheDecoder | RecomputeDecoder:
        """The method's own KV cache, else a DynamicCache for transformers models; models of the lab keep no cache
        and recompute."""
        cache = self.handle.new_cache()
        if cache is None and isinstance(self.model, PreTrainedModel):
            cache = DynamicCache(config=self.model.config)
        return RecomputeDecoder(self.model) if cache is None else CacheDecoder(self.model, cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 decode: str = "eager", decode_weights: str = "model", decode_kv: str = "model") -> torch.Tensor:
        """Greedy tokens (T,) after `input_ids` (1, N): `model.generate()` on the method's cache (so it keeps only
        what the method keeps), or the static / compiled Λ decoder (`lengthwise.static_decode`), reading its
        projection weights as `decode_weights` and its keys and values as `decode_kv`."""
        cache = self.handle.new_cache()
        kwargs = cache_kwargs(self.model, cache)
        require_static_cache(decode, self.spec, cache, decode_weights, decode_kv)
        if decode != "eager":
            logits = self.model(input_ids=input_ids, **kwargs, use_cache=True, logits_to_keep=1).logits[:, -1]
            return greedy_static(self.model, cache, logits, max_new_tokens, eos_token_id,
                                 compile=decode == "compiled", weights=decode_weights, kv=decode_kv)[0]
        pad = self.model.config.pad_token_id
        out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens if eos_token_id is None else 0, do_sample=False,
                                  eos_token_id=eos_token_id, pad_token_id=0 if pad is None else pad, **kwargs)
        return out[0, input_ids.shape[1] :]

    def stream(self, chunk_size: int) -> CacheStream:
        """A stream through the method's bounded cache; refused in one line when the cache is not bounded."""
        return CacheStream(self.model, self.spec, self.handle.new_cache(), chunk_size)

    def close(self) -> None:
        self.handle.remove()


@dataclass(frozen=True)
class SlidingWindowConfig:
    window: int | None = option(None, "tokens of context per scored token; default: the training length")
    stride: int | None = option(None, "tokens scored per window; default: window // 8")

    def __post_init__(self) -> None:
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"sliding-window {name} must be a positive integer, got {value!r}")
        if self.window and self.stride and self.stride > self.window:
            raise UserError(f"sliding-window stride ({self.stride}) must not exceed window ({self.window})")

    def context_length(self, length: int, pretrain_length: int) -> int:
        """Tokens the model runs over at once when scoring `length` tokens."""
        return min(length, self.window or pretrain_length)


class SlidingWindowScorer(_Scorer):
    """Every token scored (or generated) from the `window` tokens before it, the model recomputed each time."""

    def __init__(self, model, config: SlidingWindowConfig) -> None:
        self.model = model
        self.window = config.window or model_info(model).pretrain_length
        self.stride = config.stride or max(1, self.window // 8)
        self.method_config = [{"method": "sliding-window", "window": self.window, "stride": self.stride}]

    def nll(self, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        return nll_sliding_window(self.model, ids, self.window, self.stride)  # windows, not chunks

    def decoder(self) -> RecomputeDecoder:
        return RecomputeDecoder(self.model, self.window)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 decode: str = "eager", decode_weights: str = "model", decode_kv: str = "model") -> torch.Tensor:
        """Greedy tokens (T,): every step recomputes the model over the last `window` tokens (no cache); the speed
        users pay to keep a model inside its training length."""
        require_static_cache(decode, "sliding-window", None, decode_weights, decode_kv)  # no cache: recomputes
        decoder, tokens = RecomputeDecoder(self.model, self.window), []
        logits = decoder.feed(input_ids[0].tolist())  # (V,)
        while len(tokens) < max_new_tokens:
            tokens.append(int(logits.argmax()))
            if tokens[-1] == eos_token_id or len(tokens) == max_new_tokens:
                break
            logits = decoder.feed(tokens[-1:])
        return torch.tensor(tokens, dtype=torch.long, device=input_ids.device)

    def stream(self, chunk_size: int) -> WindowStream:
        return WindowStream(self.model, self.window, self.stride)


register_scorer(
    "sliding-window",
    SlidingWindowConfig,
    SlidingWindowScorer,
    summary="Baseline: every token is scored (or generated) by recomputing the model over the previous "
    "`window` tokens, so the model never leaves its training length. The fluency reference.",
)


def open_scorer(model, spec: str) -> PatchScorer | SlidingWindowScorer:
    """The scorer of `spec` on `model`: a registered scoring strategy's, else the patch's (applied now; `close()` or
    `with` removes it)."""
    parts = parse_method_spec(spec)
    check_combination([name for name, _ in parts])
    entry = get_entry(parts[0][0])
    if isinstance(entry, ScorerSpec):
        return entry.open(model, entry.make_config(**parts[0][1]))
    return PatchScorer(model, spec)
