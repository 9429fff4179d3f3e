"""Speed and memory by (method, length), dense SDPA (`vanilla`) included, in one run (DESIGN.md protocol).

A cell: a random prompt of n tokens (fixed by the seed) is prefilled through the method's own KV cache
(`handle.new_cache()`, else a `DynamicCache`), then `decode_steps` greedy tokens are decoded one at a time.
Reported: prefill seconds, per-token decode seconds (median of the steps), peak memory above the level before the
cell (CUDA: `max_memory_allocated`; CPU: the resident-set high-water mark, reset through /proc/self/clear_refs,
after freed heap pages are handed back with glibc's malloc_trim),
and the KV-cache bytes after the last decode step. The sliding-window baseline has no cache: its prefill runs the model over
the last `window` tokens and every decode step recomputes that window (what its generation pays).
Generic over registered methods and models; the LM-Infinite-specific study is benchmarks/lm_infinite_speed.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.tasks import check_lengths, check_specs, estimate_memory, resolve_spec
from lengthwise.models.families import model_info
from lengthwise.progress import progress_bar
from lengthwise.registry import config_options, get_entry, parse_method_spec
from lengthwise.scoring import open_scorer, require_static_cache, require_static_decode
from lengthwise.static_decode import check_weights, decoder_for

WARMUP_TOKENS = 32


def build_llama(hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
                mlp: int | None = None, vocab: int = 2048, train_length: int = 256, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa"):
    """A randomly initialised Llama-shaped model built in code (no download), SDPA attention, for speed sweeps.

    On the CPU it is built as always (float32, then cast: records stay comparable); on another device (a GPU) its
    weights are initialised there and in `dtype`, so a 7B shape needs no float32 copy in host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("vocab", vocab),
                        ("train_length", train_length)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden ({hidden}) must split into {heads} heads of an even size")
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp or 3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=train_length, attn_implementation=attn_implementation,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    if torch.device(device).type == "cpu":
        return LlamaForCausalLM(config).to(dtype).eval()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval()


def _rss_kib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return float(line.split()[1])
    return float("nan")


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), so the RSS high-water mark measures the next cell."""
    import ctypes  # noqa: PLC0415
    import gc  # noqa: PLC0415

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak may then be under-counted (memory reused from earlier cells)


class PeakMemory:
    """Peak bytes allocated above the level at entry: CUDA allocator stats, or the process RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: float = float("nan")
        self.source = "cuda max_memory_allocated" if device.type == "cuda" else "rss high-water mark"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()  # else memory freed by earlier cells, still mapped, hides this cell's peak
            try:  # writing 5 resets VmHWM to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.source = "rss high-water mark (not resettable here: an upper bound)"
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def cache_bytes(cache) -> int | None:
    """Bytes held by the keys and values of a transformers Cache (None when its layout is unknown)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        held = layer.stored() if hasattr(layer, "stored") else [getattr(layer, "keys", None),
                                                                getattr(layer, "values", None)]
        total += sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    return total


@torch.no_grad()
def run_cell(model, ids: torch.Tensor, spec: str, decode_steps: int, pretrain_length: int,
             chunk_size: int | None = None, decode: str = "eager", decode_weights: str = "model",
             decode_kv: str = "model") -> dict:
    """Prefill `ids` (1, n) and decode `decode_steps` tokens under `spec`; seconds and cache bytes. `chunk_size`:
    prefill that many tokens per forward call through the cache (None: one call), as long prompts are fed.
    decode: "eager" (the model's forward on the method's cache), "static" or "compiled" (lm-infinite on a Llama
    model: `lengthwise.static_decode`; two untimed steps first, the first of them compiles and is checked against
    the eager step; the mode that ran is returned as `decode_mode`); decode_weights: how that step stores the
    projection weights it reads (`lengthwise.static_decode.WEIGHT_FORMATS`; their bytes returned as
    `weight_bytes`); decode_kv: how it holds the keys and values (`KV_FORMATS`)."""
    device = ids.device
    with open_scorer(model, spec) as scorer:
        decoder = scorer.decoder()  # the method's cache (else a DynamicCache), or the sliding window's recomputation
        chunk = chunk_size if decoder.cache is not None else None  # a recomputing decoder runs its last window once

        def prefill_chunks() -> torch.Tensor:
            out = None
            for start in range(0, ids.shape[1], chunk or ids.shape[1]):
                out = decoder.feed(ids[0, start : start + (chunk or ids.shape[1])])
            return out[None]  # (1, V)

        prefill, logits = _timed(prefill_chunks, device)
        extra, advance = {"decode_mode": "eager"}, (lambda token: decoder.feed(token[0])[None])
        require_static_cache(decode, spec, decoder.cache, decode_weights, decode_kv)
        if decode != "eager":
            static = decoder_for(model, decoder.cache, compile=decode == "compiled", weights=decode_weights,
                                 kv=decode_kv)
            advance = static.step  # every later token on the static cache
            warm = []
            for _ in range(2):  # the first compiles (when asked) and runs the eager check
                seconds, logits = _timed(lambda t=logits.argmax(-1, keepdim=True): advance(t), device)
                warm.append(round(seconds, 4))
            extra = {"decode_mode": static.mode, "warmup_steps_s": warm, "check_gap": static.check_gap,
                     "weight_bytes": static.weight_bytes()}
        times = []
        for _ in range(decode_steps):
            seconds, logits = _timed(lambda t=logits.argmax(-1, keepdim=True): advance(t), device)
            times.append(seconds)
        # after decoding: bounded caches trim lazily, on the next update
        held = (cache_bytes(decoder.cache) if decoder.cache is not None else 0) if decode == "eager" \
            else static.stored_bytes()
    return {"prefill_s": prefill, "decode_s": times, "cache_bytes": held, **extra}


def bench(
    model,
    lengths: Sequence[int],
    methods: Sequence[str] = ("vanilla", "lm-infinite"),
    *,
    decode_steps: int = 8,
    seed: int = 0,
    results: ResultsFile | None = None,
    model_name: str = "model",
    progress: bool = True,
    decode: str = "eager",
    decode_weights: str = "model",
    decode_kv: str = "model",
) -> list[dict]:
    """Prefill latency, per-token decode latency and peak memory for every (method, length) cell, one run each.

    Every method is first run once on a short prompt (warm-up: allocator, kernel choice, patch set-up). `{s}` in a
    spec becomes length / L_pretrain. Cells already in `results` are skipped. decode: see `run_cell` ("static" and
    "compiled" apply to methods with a bounded Λ cache; the others decode eagerly, and each record says which;
    decode_weights and decode_kv apply to those static cells only).
    """
    check_specs(methods)
    check_lengths(lengths, 2, "bench length")
    if decode_steps < 1:
        raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
    check_weights(model, decode_weights, decode_kv)  # before any cell runs
    require_static_decode(decode, decode_weights, decode_kv)
    results = results or ResultsFile(None)
    info = model_info(model)
    param = next(model.parameters())
    device, vocab = param.device, model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (1, max(lengths)), generator=generator).to(device)
    cells = [(m, n) for m in methods for n in lengths]
    warmed: set[str] = set()
    records = []
    with progress_bar(progress) as bar:
        task = bar.add_task("bench", total=len(cells))
        for method, n in cells:
            cell_decode = decode if method.split(":")[0] == "lm-infinite" else "eager"
            cell_weights, cell_kv = (decode_weights, decode_kv) if cell_decode != "eager" else ("model", "model")
            key = cell_key("bench", model=model_name, method=method, length=n, decode_steps=decode_steps,
                           device=str(device), dtype=str(param.dtype), seed=seed,
                           **({} if cell_decode == "eager" else {"decode": cell_decode}),
                           **({} if cell_weights == "model" else {"decode_weights": cell_weights}),
                           **({} if cell_kv == "model" else {"decode_kv": cell_kv}))
            done = results.done(key)
            if done:
                records.append(done)
                bar.advance(task)
                continue
            spec = resolve_spec(method, n, info.pretrain_length)
            bar.update(task, description=f"bench {spec} @ {n}")
            if method not in warmed:
                run_cell(model, prompt[:, :WARMUP_TOKENS], resolve_spec(method, WARMUP_TOKENS, info.pretrain_length),
                         1, info.pretrain_length)
                warmed.add(method)
            with PeakMemory(device) as peak:
                out = run_cell(model, prompt[:, :n], spec, decode_steps, info.pretrain_length, decode=cell_decode,
                               decode_weights=cell_weights, decode_kv=cell_kv)
            estimate = estimate_memory(model, n, spec, logits=1)
            metrics = {
                "prefill_s": round(out["prefill_s"], 5),
                "prefill_tokens_per_s": round(n / out["prefill_s"], 1),
                "decode_s_per_token": round(statistics.median(out["decode_s"]), 6),
                "peak_memory_mib": round(peak.peak / 2**20, 2),
                "cache_mib": None if out["cache_bytes"] is None else round(out["cache_bytes"] / 2**20, 4),
                "cache_bytes": out["cache_bytes"],
                "estimated_mib": round(estimate.total / 2**20, 1),
            }
            describe = [{"method": name, **config_options(get_entry(name).make_config(**options))}
                        for name, options in parse_method_spec(spec)]
            record = make_record("bench", key, model=model_name, method=method, method_config=describe,
                                 data="random-ids", seed=seed, metrics=metrics, length=n, method_resolved=spec,
                                 decode_steps=decode_steps, decode_s=[round(t, 6) for t in out["decode_s"]],
                                 decode=cell_decode, decode_mode=out["decode_mode"], decode_weights=cell_weights,
                                 decode_kv=cell_kv,
                                 decode_weight_bytes=out.get("weight_bytes"),
                                 decode_warmup_s=out.get("warmup_steps_s"),
                                 decode_check_gap=out.get("check_gap"),
                                 device=str(device), dtype=str(param.dtype), memory_source=peak.source,
                                 attn_implementation=getattr(model.config, "_attn_implementation", None),
                                 pretrain_length=info.pretrain_length, torch_threads=torch.get_num_threads())
            results.append(record)
            records.append(record)
            bar.advance(task)
    return records

