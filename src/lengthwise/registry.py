"""The one registry of methods and scoring strategies. The Python API, the CLI and the docs all read it.

A method is a patch: a typed config dataclass plus `apply(model, config) -> Undo`. Register one with `@register`:

    @register("yarn", YarnConfig, role="rope", summary="...", paper="arXiv 2309.00071")
    def apply_yarn(model, config: YarnConfig) -> Undo: ...

A scoring strategy is not a patch: the model stays as it is and the evaluators score with it by name (the
sliding-window baseline). It is a config dataclass plus the scorer class it opens (`lengthwise.scoring`), registered
with `register_scorer`; the same spec grammar names both, and `patch()` refuses a scoring strategy.

Every field of a config carries its help text in its metadata (`option(default, "help")`), so the CLI and
docs/methods.md describe each option from the same place the code reads it. A field may hold a config object of its
own (`option_group(MiddleConfig, "help")`: a part with its own options and checks); its options are spelled flat
beside the method's own (`lm-infinite:n_local=4096,top_blocks=4`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from lengthwise.errors import UserError

# What part of the model a method changes. Two methods with the same role cannot be stacked.
# phrased to follow "both ..." and "methods that ..." in the combination errors
ROLES = {
    "none": "change nothing (reference)",
    "rope": "rescale the rotary frequencies",
    "attention": "replace the attention pattern and the KV cache",
    "query-scale": "scale the queries by position",
    "adapter": "train weights at inference time",
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply: Callable[[Any, Any], Any]
    role: str
    summary: str
    paper: str = ""
    encodings: tuple[str, ...] = ("rope", "alibi")  # position encodings the method works on
    composable_with: tuple[str, ...] = field(default=())  # roles it may be stacked with; empty: any other role
    chunked = True  # a stream feeds a patched model in chunks

    @property
    def bounded(self) -> bool:
        """Whether its KV cache stays bounded over a stream (the attention methods own one)."""
        return self.role == "attention"

    def make_config(self, **kwargs: Any) -> Any:
        return _make_config(self.name, self.config_cls, kwargs)


@dataclass(frozen=True)
class ScorerSpec:
    """A scoring strategy: `open(model, config)` gives its scorer. Its config implements
    `context_length(length, pretrain_length)` (tokens the model runs over at once)."""

    name: str
    config_cls: type
    open: Callable[[Any, Any], Any]
    summary: str
    paper: str = ""
    encodings: tuple[str, ...] = ("rope", "alibi", "other")  # it runs the model as it is: any causal LM
    chunked: bool = False  # whether a chunk size means anything to it
    bounded: bool = True  # whether its memory stays bounded over a stream
    role = "scoring"  # shown beside the methods' roles; never a patch's role
    composable_with: tuple[str, ...] = ()

    def make_config(self, **kwargs: Any) -> Any:
        return _make_config(self.name, self.config_cls, kwargs)


def _make_config(name: str, config_cls: type, kwargs: dict) -> Any:
    """The config of flat options `kwargs`: each goes to the method's own field or to the group that declares it."""
    owner = _option_owners(config_cls)
    unknown = sorted(set(kwargs) - set(owner))
    if unknown:
        raise UserError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; accepted: "
                        f"{', '.join(owner) or '(none)'}")
    own = {key: value for key, value in kwargs.items() if owner[key] is None}
    for f in dataclasses.fields(config_cls):
        group = _group_of(f)
        if group is not None:
            own[f.name] = group(**{key: value for key, value in kwargs.items() if owner[key] == f.name})
    return config_cls(**own)


def config_options(config: Any) -> dict[str, Any]:
    """The flat options of a config (groups spelled out), the inverse of `make_config`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out.update(config_options(value) if _group_of(f) is not None else {f.name: value})
    return out


def option(default: Any, help: str) -> Any:  # noqa: A002 - the name the CLI and docs show
    """A config dataclass field with its help text: `factor: float = option(4.0, "s: positions read as p / s")`."""
    return field(default=default, metadata={"help": help})


def check_positive(method: str, name: str, value: Any, allow_zero: bool = False) -> None:
    """Option `name` of `method` is a positive (or non-negative) integer, or None: else one line saying so."""
    low = 0 if allow_zero else 1
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        kind = "a non-negative" if allow_zero else "a positive"
        raise UserError(f"{method} {name} must be {kind} integer, got {value!r}")


def option_group(config_cls: type, help: str) -> Any:  # noqa: A002
    """A config field holding a config object of its own (defaults: its defaults), its options spelled flat."""
    return field(default_factory=config_cls, metadata={"help": help, "group": config_cls})


def _group_of(f: dataclasses.Field) -> type | None:
    return f.metadata.get("group")


def _option_owners(config_cls: type) -> dict[str, str | None]:
    """Every flat option name -> the group field holding it (None: the method's own field)."""
    owners: dict[str, str | None] = {}
    for f in dataclasses.fields(config_cls):
        group = _group_of(f)
        names = [g.name for g in dataclasses.fields(group)] if group is not None else [f.name]
        for option_name in names:
            if option_name in owners:
                raise TypeError(f"option {option_name!r} of {config_cls.__name__} is declared twice")
            owners[option_name] = f.name if group is not None else None
    return owners


def option_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def option_rows(config_cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) of every flat option of a config dataclass, in field order (a group's in its place)."""
    rows = []
    for f in dataclasses.fields(config_cls):
        group = _group_of(f)
        rows += option_rows(group) if group is not None else [(f.name, _default_text(f), option_help(f))]
    return rows


_REGISTRY: dict[str, MethodSpec] = {}
_SCORERS: dict[str, ScorerSpec] = {}


def register(name: str, config_cls: type, *, role: str, summary: str, paper: str = "", **extra: Any):
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; accepted: {', '.join(ROLES)}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config of {name!r} must be a dataclass")
    _option_owners(config_cls)  # an option declared twice (by a field and by a group) is refused here

    def decorator(apply: Callable[[Any, Any], Any]):
        if name in _SCORERS or (name in _REGISTRY and _REGISTRY[name].apply is not apply):
            raise UserError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, role, summary, paper, **extra)
        return apply

    return decorator


def register_scorer(name: str, config_cls: type, open: Callable[[Any, Any], Any], *, summary: str,  # noqa: A002
                    **extra: Any) -> ScorerSpec:
    """Register a scoring strategy: `open(model, config)` returns its scorer (see `lengthwise.scoring`)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config of {name!r} must be a dataclass")
    _option_owners(config_cls)
    if name in _REGISTRY or (name in _SCORERS and _SCORERS[name].open is not open):
        raise UserError(f"method {name!r} is already registered")
    _SCORERS[name] = ScorerSpec(name, config_cls, open, summary, **extra)
    return _SCORERS[name]


def method_names() -> list[str]:
    """The registered patches."""
    return sorted(_REGISTRY)


def spec_names() -> list[str]:
    """Every name a spec may use: the patches and the scoring strategies."""
    return sorted(_REGISTRY) + sorted(_SCORERS)


def get_method(name: str) -> MethodSpec:
    """A registered patch; a scoring strategy is refused in one line (it is not a patch)."""
    if name in _SCORERS:
        raise UserError(f"{name!r} is a scoring strategy, not a patch: the model stays as it is and the evaluators "
                        f"score with it by name (e.g. `lengthwise ppl -m {name}`, "
                        f"`lengthwise.scoring.open_scorer(model, {name!r})`); patch() takes the registered methods")
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; accepted: {', '.join(spec_names())}")
    return _REGISTRY[name]


def get_entry(name: str) -> MethodSpec | ScorerSpec:
    """A registered patch or scoring strategy."""
    return _SCORERS[name] if name in _SCORERS else get_method(name)


def context_length(spec: str, length: int, pretrain_length: int) -> int:
    """Tokens the model runs over at once when `spec` scores `length` tokens (a scoring strategy may run over fewer:
    its config says)."""
    name, options = parse_method_spec(spec)[0]
    if name in _SCORERS:
        return _SCORERS[name].make_config(**options).context_length(length, pretrain_length)
    return length


def is_scorer(spec: str) -> bool:
    """Whether the spec (or name) names a scoring strategy (it stands alone: scorers are never combined)."""
    return spec.split("+")[0].partition(":")[0].strip() in _SCORERS


def registry_markdown() -> str:
    """The registry as the Markdown page `docs/methods.md` (a test keeps that page equal to this)."""
    lines = ["# Methods", "", "Generated from the registry by `lengthwise methods --markdown > docs/methods.md`; "
             "a test fails when this page and the registry disagree.", "",
             "Use any of them as `lengthwise.patch(model, \"name\", option=value)` or on the command line as "
             "`-m name:option=value`; stack methods of different roles with `+` "
             "(e.g. `yarn:factor=8+lm-infinite`).", ""]
    for name in spec_names():
        spec = get_entry(name)
        kind = "`scoring`: a scoring strategy, not a patch (the model itself is unchanged; `patch()` refuses it)" \
            if isinstance(spec, ScorerSpec) else f"`{spec.role}`"
        lines += [f"## `{name}`", "", spec.summary, "",
                  f"- role: {kind}; position encodings: {', '.join(spec.encodings)}",
                  f"- paper: {spec.paper or '-'}"]
        if spec.composable_with:
            lines.append(f"- composes with roles: {', '.join(spec.composable_with)}")
        rows = option_rows(spec.config_cls)
        if not rows:
            lines += ["- options: (none)", ""]
            continue
        lines += ["", "| option | default | description |", "|---|---|---|"]
        lines += [f"| `{option_name}` | `{default}` | {_cell(text)} |" for option_name, default, text in rows]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse `name[:key=value,...][+name...]`, e.g. `yarn:factor=4+lm-infinite:n_local=128`.

    Values are JSON where they parse (numbers, true/false, lists `[1,2]`), else strings (e.g. a file path).
    """
    parts = []
    for piece in spec.split("+"):
        piece = piece.strip()
        if not piece:
            raise UserError(f"empty method in spec {spec!r}")
        name, _, options = piece.partition(":")
        kwargs: dict[str, Any] = {}
        if options:
            for item in split_options(options):
                key, eq, value = item.partition("=")
                if not eq:
                    raise UserError(f"option {item!r} in {piece!r} is not key=value")
                kwargs[key.strip().replace("-", "_")] = _parse_value(value.strip())
        get_entry(name)  # validates the name
        parts.append((name, kwargs))
    return parts


def split_options(options: str) -> list[str]:
    """Split on commas outside brackets, so `factors=[1,2,3]` stays whole."""
    items, depth, current = [], 0, ""
    for char in options:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item.strip()]


def check_combination(names: list[str]) -> None:
    """At most one method per role; a method restricting its partners (`composable_with`) is honoured."""
    specs = [get_entry(n) for n in names]
    seen: dict[str, str] = {}
    for spec in specs:
        if (spec.role == "none" or isinstance(spec, ScorerSpec)) and len(specs) > 1:
            raise UserError(f"{spec.name!r} cannot be combined with other methods ({', '.join(names)})")
        if spec.role in seen:
            raise UserError(
                f"{seen[spec.role]!r} and {spec.name!r} both {ROLES[spec.role]}; combine at most one of each role"
            )
        seen[spec.role] = spec.name
    for spec in specs:
        if spec.composable_with:
            for other in specs:
                if other is not spec and other.role not in spec.composable_with:
                    raise UserError(
                        f"{spec.name!r} can be combined only with methods that "
                        f"{' or '.join(ROLES[r] for r in spec.composable_with)}; not with {other.name!r}"
                    )
