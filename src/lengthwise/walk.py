"""Walk transformers' own registry of causal LMs: for every RoPE type, a tiny random model of the type's own config
class (`lengthwise.zoo`), and for each method either a one-line refusal naming the feature, or checks that what the
method promises holds on it. Anything else (a wrong logit, an unbounded cache, a traceback) is a defect.

lm-infinite, on a model with training length 64 and its own sliding window 16 (where the type has one):
- inside the window: default options (n_local = the model's context) give the unpatched model's logits;
- past it, with n_global 2, n_local 8, distance limit 16: a token outside every layer's window and the receptive
  field of the last query changes nothing (attention-only models; hybrid models mix every token through their
  recurrent layers), and every attention layer ran the Λ function;
- cached decoding (prefill through `handle.new_cache()`, then one token at a time) equals recomputation;
- every bounded cache layer holds at most globals + window + spare slots + the token being decoded.

The RoPE rescaling methods: each either refuses in one line, or changes every rotated layer's frequencies to its
plan's (read back from the model's calls by `lengthwise.models.probe`), with the plan's attention factor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import lengthwise
from lengthwise import zoo
from lengthwise.attention.cache import LambdaCacheLayer
from lengthwise.errors import UnsupportedModelError, UserError
from lengthwise.methods.rope_scaling import model_geometry
from lengthwise.models.compat import cache_kwargs, layer_types_of
from lengthwise.models.probe import probe_attention
from lengthwise.models.rotary import rotary_layout
from lengthwise.rope.table import make_plan

LENGTH, WINDOW = 64, 16  # the tiny models' training length and own sliding window
SMALL = dict(n_global=2, n_local=8, distance_limit=16)
TOLERANCE = dict(atol=1e-4, rtol=1e-4)
ROPE_CHECKS = {"linear": {"factor": 2.0}, "ntk": {"factor": 2.0}, "dynamic-ntk": {"factor": 2.0},
               "yarn": {"factor": 2.0}, "llama3": {"factor": 2.0}, "longrope": {"factor": 2.0}}
METHODS = ("lm-infinite", *ROPE_CHECKS)


@dataclass
class Outcome:
    model_type: str
    method: str
    status: str  # "served" | "unverified" (applied, not checkable) | "refused" | "not buildable" | "wrong" | "error"
    detail: str = ""
    seconds: float = 0.0

    @property
    def silent_wrong(self) -> bool:
        return self.status in ("wrong", "error")


class Wrong(AssertionError):
    pass


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tolerance: dict = TOLERANCE) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, **tolerance):
        gap = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
        raise Wrong(f"{what}: max |Δlogit| {gap:.3g}")


def _ids(length: int, seed: int = 0, vocab: int = 320) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator)


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits.float()


def _has_recurrent_layers(model) -> bool:
    return any(t not in ("full_attention", "sliding_attention") for t, _ in layer_types_of(model.config))


def check_lm_infinite(model, full: bool = False) -> str:
    """The checks of the module docstring; returns a detail line, raises Wrong or a refusal."""
    inside = _ids(LENGTH - 16)
    before = _logits(model, inside)
    impls = ("blocked", "eager") if full else ("blocked",)
    for impl in impls:
        with lengthwise.patch(model, "lm-infinite", impl=impl):
            _close(_logits(model, inside), before, f"inside the training length ({impl})")
    if not torch.equal(_logits(model, inside), before):
        raise Wrong("remove() did not restore the model")
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    n = SMALL["n_global"] + layers * SMALL["n_local"] + 12
    ids = _ids(n, seed=1)
    own_gap = _own_cache_gap(model, ids)  # a model whose own cached decoding is inexact (Mamba scans) sets the bar
    tolerance = dict(atol=TOLERANCE["atol"] + 2 * own_gap, rtol=TOLERANCE["rtol"])
    with lengthwise.patch(model, "lm-infinite", **SMALL) as handle:
        ran: set[int] = set()
        states = [m.__dict__["_lengthwise_lambda"] for m in model.modules() if "_lengthwise_lambda" in m.__dict__]
        for index, state in enumerate(states):  # note the layers that really ran the Λ function
            state.__dict__["encoding_fn"] = _noting(state.encoding_fn, ran, index)
        far = _logits(model, ids)
        if len(ran) != len(states):
            raise Wrong(f"{len(ran)} of {len(states)} attention layers ran the Λ function")
        if not _has_recurrent_layers(model):
            changed = ids.clone()
            changed[0, SMALL["n_global"] + 1] = (changed[0, SMALL["n_global"] + 1] + 7) % 317 + 3
            _close(_logits(model, changed)[:, -1], far[:, -1], "a token outside every window moved the last query")
        # cached decoding == recomputation; the cache stays bounded
        cache = handle.new_cache()
        prefill = ids[:, : n - 4]
        positions = torch.arange(n)[None]  # as generate() passes them (some models count from 0 without them)
        with torch.no_grad():
            out = model(input_ids=prefill, position_ids=positions[:, : n - 4], use_cache=True,
                        **cache_kwargs(model, cache))
        _close(out.logits[:, -1].float(), far[:, n - 5], "chunked prefill through the bounded cache", tolerance)
        for step in range(n - 4, n):
            with torch.no_grad():
                out = model(input_ids=ids[:, step : step + 1], position_ids=positions[:, step : step + 1],
                            use_cache=True, **cache_kwargs(model, cache))
            _close(out.logits[:, -1].float(), far[:, step], f"cached decoding at position {step}", tolerance)
        bound = SMALL["n_global"] + SMALL["n_local"] + 1
        for index, layer in enumerate(cache.layers):
            if isinstance(layer, LambdaCacheLayer) and layer.keys.shape[-2] > bound + layer.slack:
                raise Wrong(f"cache layer {index} holds {layer.keys.shape[-2]} keys (bound {bound} + {layer.slack})")
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
    gap = f"; the model's own cached decoding is off by {own_gap:.2g}" if own_gap > TOLERANCE["atol"] else ""
    return f"{len(states)} Λ layers; cache layers {', '.join(kinds)}{gap}"


def _own_cache_gap(model, ids) -> float:
    """Largest |Δlogit| between the unpatched model's cached decoding of the last 4 tokens and its recomputation."""
    from transformers import DynamicCache  # noqa: PLC0415

    n = ids.shape[1]
    positions = torch.arange(n)[None]
    full = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    gaps = []
    with torch.no_grad():
        model(input_ids=ids[:, : n - 4], position_ids=positions[:, : n - 4], use_cache=True,
              **cache_kwargs(model, cache))
        for step in range(n - 4, n):
            out = model(input_ids=ids[:, step : step + 1], position_ids=positions[:, step : step + 1], use_cache=True,
                        **cache_kwargs(model, cache))
            gaps.append(float((out.logits[:, -1].float() - full[:, step]).abs().max()))
    return max(gaps)


def _noting(encoding_fn, ran: set, index: int):
    def noted():
        ran.add(index)
        return encoding_fn()

    return noted


class Unverified(Exception):
    """The method was applied, but the layers' calls cannot be read to check it."""


def check_rope(model, method: str, options: dict) -> str:
    """The method rescales every rotated layer to its plan's frequencies (read back from the layers' own calls), NoPE
    layers stay unrotated; dynamic-ntk changes nothing inside L. Raises Wrong, Unverified, or the method's refusal."""
    inside = _ids(LENGTH - 16)
    before = _logits(model, inside)
    try:
        rotated = {layer.layer_idx: layer.rotation is not None for layer in probe_attention(model, method).layers}
    except UnsupportedModelError as err:
        rotated = err
    with lengthwise.patch(model, method, **options) as handle:
        config = handle.configs[0]
        plan = make_plan(method, config, model_geometry(model, rotary_layout(model),
                                                       config.original_max_position_embeddings))
        if not plan.static:  # dynamic-ntk: the base follows the length past L, nothing changes inside it
            _close(_logits(model, inside), before, f"{method} inside the training length")
            return "no change inside L (as documented)"
        if isinstance(rotated, Exception):
            raise Unverified(f"applied; its layers' calls cannot be read to check it ({rotated})")
        expected = plan.scaled(0)[0]
        for layer in probe_attention(model, method).layers:
            if (layer.rotation is not None) != rotated[layer.layer_idx]:
                raise Wrong(f"layer {layer.layer_idx} {'lost' if rotated[layer.layer_idx] else 'gained'} its rotation")
            if layer.rotation is not None:
                got = layer.rotation.inv_freq(model).abs()
                if got.shape != expected.shape or not torch.allclose(got, expected.to(got), rtol=1e-5, atol=0):
                    raise Wrong(f"layer {layer.layer_idx} rotates with other frequencies than the {method} plan")
    if not any(rotated.values()):
        raise Wrong(f"{method} was applied, but no layer rotates")
    return f"{sum(rotated.values())} rotated layers at the plan's frequencies"


def walk(types: list[str] | None = None, methods: tuple[str, ...] = METHODS, full: bool = False,
         on_outcome=None) -> list[Outcome]:

    outcomes = []
    for model_type in types or zoo.rope_causal_lm_types():
        try:
            model = zoo.tiny_model(model_type, length=LENGTH, sliding_window=WINDOW)
        except zoo.NotBuildable as err:
            outcomes.append(Outcome(model_type, "-", "not buildable", str(err)))
            continue
        for method in methods:
            start = time.perf_counter()
            try:
                if method == "lm-infinite":
                    detail = check_lm_infinite(model, full)
                else:
                    detail = check_rope(model, method, ROPE_CHECKS.get(method, {}))
                outcome = Outcome(model_type, method, "served", detail)
            except UserError as err:
                outcome = Outcome(model_type, method, "refused", str(err))
            except Unverified as err:
                outcome = Outcome(model_type, method, "unverified", str(err))
            except Wrong as err:
                outcome = Outcome(model_type, method, "wrong", str(err))
            except Exception as err:  # noqa: BLE001 - a crash is a defect the walk reports, not a refusal
                outcome = Outcome(model_type, method, "error", f"{type(err).__name__}: {err}".splitlines()[0])
            outcome.seconds = time.perf_counter() - start
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


# ------------------------------------------------------------------------------------------------ the generated table
BEGIN, END = "<!-- walk:begin -->", "<!-- walk:end -->"


def summary(outcomes: list[Outcome]) -> dict:
    """Counts per method: types walked, served, refused, wrong (silently or by a crash)."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        if outcome.method == "-":
            continue
        row = counts.setdefault(outcome.method, {"served": 0, "unverified": 0, "refused": 0, "wrong": 0})
        row["wrong" if outcome.silent_wrong else outcome.status] += 1
    return counts


def markdown(outcomes: list[Outcome]) -> str:
    """The walk as the section of docs/compatibility.md between BEGIN and END (a test keeps the page equal to it)."""
    import transformers  # noqa: PLC0415

    types = sorted({o.model_type for o in outcomes})
    by_type = {t: {o.method: o for o in outcomes if o.model_type == t} for t in types}
    counts = summary(outcomes)
    lines = [BEGIN, "", f"Generated by `python -m lengthwise.walk --markdown` on transformers {transformers.__version__}: "
             f"every causal-LM type it registers whose default config carries `rope_parameters` "
             f"({len(types)} types), each as a tiny random model of its own config class (`lengthwise.zoo`).", "",
             "| method | served (checked) | applied, not checkable | refused (one line, naming the feature) | "
             "silently wrong |", "|---|---|---|---|---|"]
    for method, row in counts.items():
        lines.append(f"| `{method}` | {row['served']} of {len(types)} ({100 * row['served'] / len(types):.0f}%) | "
                     f"{row['unverified']} | {row['refused']} | {row['wrong']} |")
    lines += ["", "| model type | lm-infinite | RoPE methods |", "|---|---|---|"]
    for model_type in types:
        row = by_type[model_type]
        if "-" in row:
            lines.append(f"| `{model_type}` | not buildable: {_cell(row['-'].detail)} | |")
            continue
        attention = row.get("lm-infinite")
        rope = [o for m, o in row.items() if m != "lm-infinite"]
        served = [o.method for o in rope if o.status == "served"]
        unverified = [o for o in rope if o.status == "unverified"]
        refused = [o for o in rope if o.status not in ("served", "unverified")]
        reasons = sorted({_reason(o.detail) for o in refused})
        rope_text = ", ".join(served) if served else ""
        if unverified:
            rope_text += ("; " if rope_text else "") + f"applied, not checkable: {', '.join(o.method for o in unverified)}"
        if refused:
            rope_text += ("; " if rope_text else "") + f"refused: {', '.join(o.method for o in refused)} ({'; '.join(reasons)})"
        lines.append(f"| `{model_type}` | {_status(attention)} | {_cell(rope_text)} |")
    return "\n".join(lines + ["", END])


def _reason(detail: str) -> str:
    """A refusal without the method's name in front, so methods refused for one reason share it."""
    for prefix in ("lm-infinite", "linear", "ntk", "dynamic-ntk", "yarn", "llama3", "longrope"):
        for form in (f"'{prefix}' ", f"{prefix} "):
            if detail.startswith(form):
                return detail[len(form):]
    return detail


def _status(outcome: Outcome | None) -> str:
    if outcome is None:
        return ""
    return "served" if outcome.status == "served" else f"{outcome.status}: {_cell(outcome.detail)}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def replace_section(page: str, section: str) -> str:
    if BEGIN not in page or END not in page:
        raise UserError(f"the page holds no {BEGIN} ... {END} section")
    head, rest = page.split(BEGIN, 1)
    return head + section + rest.split(END, 1)[1]


def main() -> None:
    import argparse  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m lengthwise.walk", description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: every RoPE causal-LM type)")
    parser.add_argument("--full", action="store_true", help="also the eager reference kernel")
    parser.add_argument("--markdown", metavar="PAGE", help="rewrite the generated section of this page")
    args = parser.parse_args()
    torch.set_num_threads(1)
    outcomes = walk(args.types or None, full=args.full,
                    on_outcome=None if args.markdown else lambda o: print(f"{o.status:8s} {o.model_type:24s} "
                                                                           f"{o.method:12s} {o.detail}"))
    if args.markdown:
        page = Path(args.markdown)
        page.write_text(replace_section(page.read_text(), markdown(outcomes)))
    for method, row in summary(outcomes).items():
        print(f"{method}: {row}")


if __name__ == "__main__":
    main()
