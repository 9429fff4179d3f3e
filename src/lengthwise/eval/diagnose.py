"""LM-Infinite's three out-of-distribution diagnostics (Han et al. 2023, arXiv 2308.16137), measured on any model and
method.

The paper names three reasons a model fails past its training length L, and Λ attention with the distance limit is
built to remove each one. For one document truncated to N tokens and one forward pass per (method, N), this module
records per attention layer and head:

(a) **logits at unseen distances**: the attention logits of the LAST query to every key it sees, by distance d
    (log-spaced buckets, L an edge): count, max and the 5/50/95% quantiles per bucket, plus the largest
    logit at d < L and at d >= L;
(b) **attention entropy by query position**: for queries sampled in log-spaced position buckets (`queries` evenly
    spaced positions per bucket, every position where a bucket is smaller), the entropy (nats) of each query's
    attention distribution, averaged per bucket, and as reference the same in the bucket that ends at L;
(c) **implicitly encoded absolute position**: a 2-D PCA of chosen layers' hidden states (the residual stream output
    of the decoder layer, each position's vector divided by its RMS), coloured by position in the figures, the first
    tokens marked; and three distances between centroids, in units of the RMS spread (see `hidden_state_pca`).

How the logits are obtained. Queries and keys are captured where the model hands them to its attention function,
already rotated (so a RoPE rescaling such as YaRN is in them) and after any scaling a method applies to them: the
model's attention implementation is switched, reversibly and for the one pass, to a recording function registered
with transformers' `AttentionInterface` under `lengthwise_diagnose_<previous implementation>`, whose mask function
is the previous implementation's own. The recorder computes its statistics and then delegates to the previous
function (sdpa, eager, or lm-infinite's `lambda_attention_forward`), so the pass computes what it computes
unrecorded. From the captured q and k, the logits a layer really gives come from
`lengthwise.attention.reference.lambda_scores`: with the layer's `LambdaState` (pattern and encoding, the distance
limit included) on a layer patched by `lm-infinite` or `streaming`, and full causal attention (n_global 0, an
unbounded local branch, no limit, no encoding; the layer's own sliding window kept) on any other layer. Nothing is
n x n: the last query is one row of N logits, and the entropy queries go through `lambda_scores` in blocks of
`block` queries against the keys up to the block's last position (block x N floats per head at most). Hidden states
come from forward hooks on the chosen decoder layers only.

Causality makes (b) and (c) the same at a position for every N (a query at m sees keys 0..m whatever follows), so
the longest N shows them all; (a) differs by N (another last query).

Not served: models whose attention does not go through `AttentionInterface` (Bloom, MPT), methods that do not run
one forward pass (the `sliding-window` baseline), and middle retrieval (`top_k`/`top_blocks`: the selection depends
on how the queries of a forward call are grouped, which blocks of queries would change). A length-dependent RoPE
method (dynamic-ntk) is recorded as its one pass from position 0 computes it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lengthwise.api import patch
from lengthwise.attention.hf import score_mods
from lengthwise.attention.pattern import LambdaPattern, ScoreMods, expand_heads
from lengthwise.attention.reference import lambda_scores
from lengthwise.data.corpus import documents_of_length
from lengthwise.errors import UserError
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.models.compat import switch_attn_implementation
from lengthwise.models.families import attention_route, model_info
from lengthwise.patching import Undo
from lengthwise.progress import progress_bar
from lengthwise.registry import config_options, get_method, is_scorer, parse_method_spec

RECORD_NAME = "lengthwise_diagnose"
UNBOUNDED = 1 << 40  # n_local of full causal attention
PER_OCTAVE = 4  # log-spaced bucket edges per factor 2
PCA_FIRST = 64  # hidden states kept in a record: every one of the first PCA_FIRST positions ...
PCA_POINTS = 768  # ... and this many more, evenly spaced


@dataclass(frozen=True)
class DiagnoseSettings:
    """What a pass records. layers / heads: None for all; pca_layers: layers whose hidden states get a PCA."""

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    pca_layers: tuple[int, ...] = ()
    queries: int = 16  # entropy queries sampled per position bucket
    first_tokens: int = 10  # "initial tokens" of the PCA view
    block: int = 128  # entropy queries per lambda_scores call

    def __post_init__(self) -> None:
        for name in ("queries", "first_tokens", "block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"diagnose {name} must be a positive integer, got {value!r}")
        for name in ("layers", "heads", "pca_layers"):
            value = getattr(self, name)
            if value is not None and any(not isinstance(v, int) or v < 0 for v in value):
                raise UserError(f"diagnose {name} must be non-negative integers, got {value!r}")

    def key_fields(self) -> dict:
        """The settings that change a record (the block size changes none)."""
        return {"heads": "all" if self.heads is None else ",".join(map(str, self.heads)), "queries": self.queries,
                "first": self.first_tokens}


# ----------------------------------------------------------------------------------------------------- pure statistics
def log_edges(n: int, per_octave: int = PER_OCTAVE, marks: Sequence[int] = ()) -> list[int]:
    """Integer bucket edges 0 = e_0 < e_1 < ... < e_k = n, log-spaced (`per_octave` per factor 2, rounded, repeats
    merged), every mark in (0, n) an edge too: bucket i is [e_i, e_{i+1})."""
    edges, i = {0, n}, 0
    while (edge := round(2 ** (i / per_octave))) < n:
        edges.add(edge)
        i += 1
    edges.update(m for m in marks if 0 < m < n)
    return sorted(edges)


def _number(x: float) -> float | None:
    """A float for JSON: 5 significant digits, None for nan or inf."""
    return None if not math.isfinite(x) else float(f"{x:.5g}")


def _numbers(t: torch.Tensor) -> list:
    return [_number(float(v)) for v in t.flatten().tolist()] if t.dim() <= 1 else [_numbers(r) for r in t]


def logit_stats(scores: torch.Tensor, visible: torch.Tensor, edges: Sequence[int], train_length: int) -> dict:
    """Statistics of one query's logits by distance. scores (H, Tk) float, visible (H or 1, Tk) bool, key j at
    distance Tk - 1 - j (the query is the last position). Per bucket of `edges` (over distances) and head: count of
    visible keys, max, q05, q50, q95 (None where a bucket holds no visible key); and per head the largest
    logit at d < train_length and at d >= train_length."""
    scores = scores.float()
    visible = visible.expand_as(scores)
    tk = scores.shape[-1]
    distance = torch.arange(tk - 1, -1, -1)
    masked = scores.masked_fill(~visible, float("nan"))
    out = {name: [] for name in ("count", "max", "q05", "q50", "q95")}
    levels = torch.tensor([0.05, 0.5, 0.95])
    for a, b in zip(edges[:-1], edges[1:]):
        cols = slice(tk - b, tk - a)  # keys at distances a..b-1
        vals, seen = masked[:, cols], visible[:, cols]
        count = seen.sum(-1)
        out["count"].append(count.tolist())
        out["max"].append(_numbers(vals.nan_to_num(float("-inf")).amax(-1).where(count > 0, float("nan"))))
        quantiles = torch.nanquantile(vals, levels, dim=-1) if vals.shape[-1] else torch.full((3, len(vals)), math.nan)
        for name, row in zip(("q05", "q50", "q95"), quantiles):
            out[name].append(_numbers(row))
    inside = visible & (distance < train_length)[None]
    beyond = visible & (distance >= train_length)[None]

    def largest(where):
        return _numbers(scores.masked_fill(~where, float("-inf")).amax(-1).where(where.any(-1), float("nan")))

    # per bucket lists are [bucket][head]; transpose to [head][bucket] for reading one head's curve
    result = {name: [list(col) for col in zip(*rows)] for name, rows in out.items()}
    return {"edges": list(edges), **result, "max_inside": largest(inside), "max_beyond": largest(beyond)}


def attention_entropy(scores: torch.Tensor, visible: torch.Tensor, mods: ScoreMods | None = None) -> torch.Tensor:
    """Entropy (nats) of each query's attention distribution: scores (..., Tq, Tk), visible broadcastable -> (...,
    Tq). A per-head sink logit (`mods.sinks`, heads on dim -3) joins the distribution as one more outcome."""
    scores = scores.float().masked_fill(~visible, float("-inf"))
    if mods is not None and mods.sinks is not None:
        sink = mods.sinks.float()[:, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    logp = torch.log_softmax(scores, dim=-1)
    return -torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)


def sample_positions(edges: Sequence[int], per_bucket: int) -> list[list[int]]:
    """Query positions sampled per bucket [e_i, e_{i+1}): all of them where a bucket has at most `per_bucket`, else
    `per_bucket` evenly spaced ones (both ends included)."""
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b - a <= per_bucket:
            out.append(list(range(a, b)))
        else:
            out.append(sorted(set(torch.linspace(a, b - 1, per_bucket).round().long().tolist())))
    return out


def entropy_by_position(q: torch.Tensor, k: torch.Tensor, pattern: LambdaPattern, encoding, scale: float,
                        mods: ScoreMods, edges: Sequence[int], per_bucket: int, train_length: int,
                        block: int = 128) -> dict:
    """Entropy of sampled queries, blocked: q (1, H, T, D), k (1, H, T, D) (already expanded to q's heads), positions
    0..T-1 of one pass. Per position bucket: the sampled positions' mean position, count, the mean number of keys
    they see and, per head, their mean entropy; plus per head the mean entropy in the bucket that ends at
    train_length (the reference; None when the pass is shorter)."""
    samples = sample_positions(edges, per_bucket)
    flat = torch.tensor([p for bucket in samples for p in bucket], dtype=torch.long)
    entropy, seen = [], []
    for start in range(0, len(flat), block):
        positions = flat[start:start + block]
        last = int(positions.max()) + 1
        k_pos = torch.arange(last)[None]
        scores, visible = lambda_scores(q[:, :, positions], k[:, :, :last], positions[None], k_pos, None, pattern,
                                        encoding, scale, mods)
        entropy.append(attention_entropy(scores, visible, mods)[0])  # (H, b)
        seen.append(visible.expand_as(scores)[0].sum(-1).float().mean(0))  # (b,)
    entropy, seen = torch.cat(entropy, dim=-1), torch.cat(seen)
    mean, position, count, keys, i = [], [], [], [], 0
    for bucket in samples:
        j = i + len(bucket)
        mean.append(entropy[:, i:j].mean(-1))
        position.append(_number(sum(bucket) / len(bucket)))
        count.append(len(bucket))
        keys.append(_number(float(seen[i:j].mean())))
        i = j
    mean = torch.stack(mean, dim=-1)  # (H, buckets)
    reference = None
    if train_length in edges[1:]:
        reference = _numbers(mean[:, edges.index(train_length) - 1])
    return {"edges": list(edges), "position": position, "count": count, "keys": keys, "mean": _numbers(mean),
            "at_train_length": reference}


def _spread(x: torch.Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).sum(-1).mean().sqrt())


def _centroid_distance(a: torch.Tensor, b: torch.Tensor, unit: torch.Tensor) -> float | None:
    if not len(a) or not len(b) or len(unit) < 2:
        return None
    return _number(float((a.mean(0) - b.mean(0)).norm()) / max(_spread(unit), 1e-12))


def hidden_state_pca(hidden: torch.Tensor, first_tokens: int, train_length: int) -> dict:
    """2-D PCA of one layer's hidden states (T, d), each position's vector divided by its RMS first (as the next
    layer's norm sees it; without it the one or two first tokens whose activations are hundreds of times larger,
    the attention sinks, are the first component alone). Fitted on every position of the pass (float64 covariance;
    each axis's sign fixed so that its largest loading is positive). Kept: the projections of the first PCA_FIRST
    positions and of PCA_POINTS more evenly spaced, the explained variance ratios, the largest RMS among the first
    tokens over the median RMS of the others (`first_rms_ratio`), and, on the normalised vectors in the full space,
    centroid distances in units of the RMS spread of the group named second: `first_vs_inside`: first tokens vs
    positions [first_tokens, L); `first_vs_beyond`: first tokens vs [L, T); `beyond_vs_inside`: [L, T) vs
    [first_tokens, L) (None where a group is empty)."""
    raw = hidden.double()
    t = raw.shape[0]
    rms = raw.pow(2).mean(-1).sqrt()
    x = raw / rms.clamp(min=1e-12)[:, None]
    centred = x - x.mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred / max(t - 1, 1))
    axes = vectors[:, [-1, -2]]
    axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    projection = centred @ axes  # (T, 2)
    keep = sorted(set(range(min(t, PCA_FIRST))) |
                  set(torch.linspace(min(t - 1, PCA_FIRST), t - 1, PCA_POINTS).round().long().tolist()))
    first, inside, beyond = x[:first_tokens], x[first_tokens:train_length], x[train_length:]
    total = float(values.clamp(min=0).sum())
    rest = rms[first_tokens:]
    return {
        "positions": keep,
        "xy": [[_number(a), _number(b)] for a, b in projection[keep].tolist()],
        "explained": [_number(float(v) / total) if total > 0 else None for v in values[[-1, -2]]],
        "first_tokens": first_tokens,
        "first_rms_ratio": _number(float(rms[:first_tokens].max() / rest.median())) if len(rest) else None,
        "first_vs_inside": _centroid_distance(first, inside, inside),
        "first_vs_beyond": _centroid_distance(first, beyond, beyond),
        "beyond_vs_inside": _centroid_distance(beyond, inside, inside),
    }


# ------------------------------------------------------------------------------------------------- recording a pass
@dataclass
class _Session:
    settings: DiagnoseSettings
    train_length: int
    layers: dict[int, dict] = field(default_factory=dict)  # layer -> {"logits": ..., "entropy": ...}
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0


_session: _Session | None = None


def layer_view(module, kwargs: dict):
    """(pattern, encoding, score mods) of the logits a layer gives: its Λ state where lm-infinite / streaming patched
    it, else full causal attention on the rotated q and k (its own sliding window kept)."""
    state = module.__dict__.get("_lengthwise_lambda")
    if state is not None:

        return state.pattern, state.encoding_fn(), score_mods(state, kwargs)
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    pattern = LambdaPattern(0, window or UNBOUNDED, None, window=window)
    return pattern, None, ScoreMods(None if softcap is None else float(softcap), kwargs.get("s_aux"))


def layer_statistics(q, k, pattern, encoding, scale: float, mods: ScoreMods, settings: DiagnoseSettings,
                     train_length: int) -> dict:
    """(a) and (b) for one layer of one pass: q (1, H, T, D), k (1, Hk, T, D) as the attention function got them."""
    heads = list(range(q.shape[1])) if settings.heads is None else list(settings.heads)
    qh = q[:, heads].float()
    kh = expand_heads(k, q.shape[1])[:, heads].float()
    sinks = None if mods.sinks is None else mods.sinks[heads]
    mods = ScoreMods(mods.softcap, sinks)
    t = q.shape[2]
    positions = torch.arange(t)[None]
    scores, visible = lambda_scores(qh[:, :, -1:], kh, positions[:, -1:], positions, None, pattern, encoding, scale,
                                    mods)
    logits = logit_stats(scores[0, :, 0], visible[0, :, 0], log_edges(t, marks=(train_length,)), train_length)
    entropy = entropy_by_position(qh, kh, pattern, encoding, scale, mods, log_edges(t, marks=(train_length,)),
                                  settings.queries, train_length, settings.block)
    return {"heads": heads, "logits": logits, "entropy": entropy}


def _record_call(module, query, key, kwargs: dict) -> None:
    session = _session
    index = getattr(module, "layer_idx", None)
    wanted = session.settings.layers
    if session.error is not None or index is None or (wanted is not None and index not in wanted):
        return
    started = time.perf_counter()
    try:
        if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            raise UserError(f"diagnose records one unpadded row in one pass; layer {index} got queries "
                            f"{tuple(query.shape)} and keys {tuple(key.shape)}")
        call = {name: value for name, value in kwargs.items() if name not in ("scaling", "dropout")}
        pattern, encoding, mods = layer_view(module, call)  # the keywords as the attention function sees them
        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        with torch.no_grad():
            session.layers[index] = layer_statistics(query.detach(), key.detach(), pattern, encoding, scale, mods,
                                                     session.settings, session.train_length)
    except BaseException as err:  # noqa: BLE001 - raised again after the pass, outside the model's code
        session.error = err
    session.seconds += time.perf_counter() - started


def _recording_function(delegate):
    def recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
        if _session is not None:
            _record_call(module, query, key, kwargs)
        return delegate(module, query, key, value, attention_mask, *args, **kwargs)

    return recording_attention


def _delegate_of(model, implementation: str):
    from transformers import AttentionInterface  # noqa: PLC0415

    if implementation == "eager":  # each modeling file has its own; it is not in the registry
        for module in model.modules():
            if hasattr(module, "layer_idx"):
                function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
                if function is not None:
                    return function
        raise UserError(f"diagnose: no eager attention function found for model type {model.config.model_type!r}")
    mapping = AttentionInterface._global_mapping
    if implementation not in mapping:
        raise UserError(f"diagnose cannot record attention implementation {implementation!r} (not registered with "
                        f"transformers' AttentionInterface)")
    return mapping[implementation]


def decoder_layers(model):
    """The decoder layers' ModuleList (the one with config.num_hidden_layers entries)."""
    count = getattr(model.config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and (count is None or len(layers) == count):
        return layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"diagnose: cannot find the decoder layers of model type {model.config.model_type!r}")


def record_pass(model, ids: torch.Tensor, settings: DiagnoseSettings, train_length: int) -> dict:
    """One forward pass over `ids` (T,) with the recorder in place: {"layers": {layer: {"heads", "logits",
    "entropy", "pca"?}}, "forward_s", "stats_s"}. The model is left as it was (implementation, hooks)."""
    global _session
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: PLC0415

    if attention_route(model) != "interface" or not model._can_set_attn_implementation():
        raise UserError(f"diagnose records attention through transformers' AttentionInterface; model type "
                        f"{model.config.model_type!r} computes its attention inside its own modules")
    previous = model.config._attn_implementation
    name = f"{RECORD_NAME}_{previous}"
    AttentionInterface.register(name, _recording_function(_delegate_of(model, previous)))
    if previous in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[previous])
    session = _Session(settings, train_length)
    layers = decoder_layers(model)
    undo = Undo()

    def keep(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            session.hidden[index] = hidden[0].detach().float().clone()
        return hook

    device = next(model.parameters()).device
    try:
        switch_attn_implementation(model, name, undo)
        for index in settings.pca_layers:
            undo.add(layers[index].register_forward_hook(keep(index)).remove)
        _session = session
        started = time.perf_counter()
        with torch.no_grad():
            try:
                model(input_ids=ids.to(device)[None], use_cache=False, logits_to_keep=1)
            except TypeError as err:  # a model without logits_to_keep
                if "logits_to_keep" not in str(err):
                    raise
                model(input_ids=ids.to(device)[None], use_cache=False)
        total = time.perf_counter() - started
    finally:
        _session = None
        undo.remove()
    if session.error is not None:
        raise session.error
    started = time.perf_counter()
    out = {index: dict(stats) for index, stats in session.layers.items()}
    for index, hidden in session.hidden.items():
        out.setdefault(index, {})["pca"] = hidden_state_pca(hidden, settings.first_tokens, train_length)
    pca_s = time.perf_counter() - started
    return {"layers": out, "forward_s": round(total - session.seconds, 2), "stats_s": round(session.seconds + pca_s, 2)}


# --------------------------------------------------------------------------------------------------- the whole task
def check_method(spec: str) -> None:
    """Refuse, before any model loads, a method diagnose cannot record (one line)."""

    for name, options in parse_method_spec(spec):
        if is_scorer(name):
            raise UserError(f"method {name!r} scores each token by recomputing windows; diagnose records one "
                            f"forward pass (use vanilla, a RoPE method, lm-infinite or streaming)")
        resolved = config_options(get_method(name).make_config(**options))  # flat: the middle group's too
        if resolved.get("top_k") or resolved.get("top_blocks"):
            raise UserError(f"{spec!r}: diagnose does not record middle retrieval (top_k / top_blocks select keys per "
                            f"forward call and query group, which blocks of queries would change); drop those options")


def check_layers(settings: DiagnoseSettings, model) -> None:
    """Layers and heads within the model (after it loads)."""
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    for name, values, bound in (("--layers", settings.layers, layers), ("--pca-layers", settings.pca_layers, layers),
                                ("--heads", settings.heads, heads)):
        bad = [v for v in values or () if v >= bound]
        if bad:
            raise UserError(f"{name} {','.join(map(str, bad))}: the model has {bound} "
                            f"{'layers' if 'layer' in name else 'attention heads'} (0..{bound - 1})")
    if settings.layers is not None:
        outside = [v for v in settings.pca_layers if v not in settings.layers]
        if outside:
            raise UserError(f"--pca-layers {','.join(map(str, outside))} not among --layers "
                            f"{','.join(map(str, settings.layers))}")


def pick_document(documents, tokenizer, length: int, data_name: str):
    """(name, ids) of the first document (corpus order) with at least `length` tokens."""

    found = documents_of_length(documents, tokenizer, length, max_docs=1)
    if not found.docs:
        raise UserError(f"no document of {data_name!r} has {length} tokens ({found.skipped} shorter ones); use "
                        f"shorter lengths or longer documents")
    return found.docs[0]


def diagnose(model, tokenizer, documents, lengths: Sequence[int], methods: Sequence[str],
             settings: DiagnoseSettings = DiagnoseSettings(), *, results=None, model_name: str = "model",
             data_name: str = "data", progress: bool = True, log=None) -> list[dict]:
    """Records of every (method, length, layer): one forward pass per (method, length) over the first document with
    max(lengths) tokens, truncated to each length. Cells whose every layer is in `results` are skipped; a cell with
    some layers missing (a killed writer) runs again and appends only those."""

    results = results or ResultsFile(None)
    for spec in methods:
        check_method(spec)
    check_layers(settings, model)
    info = model_info(model)
    doc_name, ids = pick_document(documents, tokenizer, max(lengths), data_name)
    layers = list(settings.layers) if settings.layers is not None else list(range(model.config.num_hidden_layers))
    records: list[dict] = []
    with progress_bar(progress) as bar:
        job = bar.add_task("diagnose", total=len(methods) * len(lengths))
        for spec in methods:
            for n in lengths:
                keys = {layer: cell_key("diagnose", model=model_name, method=spec, data=data_name, doc=doc_name,
                                        length=n, layer=layer, pca=layer in settings.pca_layers,
                                        **settings.key_fields()) for layer in layers}
                done = {layer: results.done(key) for layer, key in keys.items()}
                if all(done.values()):
                    records += [done[layer] for layer in layers]
                    bar.advance(job)
                    continue
                bar.update(job, description=f"diagnose {spec} @ {n}")
                handle = patch(model, spec)
                try:
                    recorded = record_pass(model, torch.tensor(ids[:n]), settings, info.pretrain_length)
                    config = handle.describe()
                finally:
                    handle.remove()
                if log is not None:
                    log(f"{spec} @ {n}: forward {recorded['forward_s']} s, statistics {recorded['stats_s']} s")
                for layer in layers:
                    if done[layer] is not None:
                        records.append(done[layer])
                        continue
                    stats = recorded["layers"].get(layer)
                    if stats is None or "logits" not in stats:
                        raise UserError(f"layer {layer} made no attention call through AttentionInterface in the "
                                        f"pass (a layer without attention?); leave it out of --layers")
                    metrics = {"logits": stats["logits"], "entropy": stats["entropy"], "pca": stats.get("pca")}
                    record = make_record("diagnose", keys[layer], model=model_name, method=spec,
                                         method_config=config, data=data_name, seed=0, metrics=metrics, length=n,
                                         layer=layer, heads=stats["heads"], pretrain_length=info.pretrain_length,
                                         doc=doc_name, settings=asdict(settings), forward_s=recorded["forward_s"],
                                         stats_s=recorded["stats_s"])
                    results.append(record)
                    records.append(record)
                bar.advance(job)
    return records
