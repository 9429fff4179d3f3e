"""The one registry of methods. The Python API, the CLI and the docs all read it.

A method is a typed config dataclass plus `apply(model, config) -> Undo`. Register one with `@register(...)`:

    @register("yarn", YarnConfig, role="rope", summary="...", paper="arXiv 2309.00071")
    def apply_yarn(model, config: YarnConfig) -> Undo: ...

Every field of a config carries its help text in its metadata (`option(default, "help")`), so the CLI and
docs/methods.md describe each option from the same place the code reads it.
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
    "scoring": "an evaluation strategy, not a patch (the model itself is unchanged)",
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

    def make_config(self, **kwargs: Any) -> Any:
        names = [f.name for f in dataclasses.fields(self.config_cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise UserError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; accepted: "
                f"{', '.join(names) or '(none)'}"
            )
        return self.config_cls(**kwargs)


def option(default: Any, help: str) -> Any:  # noqa: A002 - the name the CLI and docs show
    """A config dataclass field with its help text: `factor: float = option(4.0, "s: positions read as p / s")`."""
    return field(default=default, metadata={"help": help})


def option_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def option_rows(config_cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) of every option of a config dataclass, in field order."""
    return [(f.name, _default_text(f), option_help(f)) for f in dataclasses.fields(config_cls)]


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, *, role: str, summary: str, paper: str = "", **extra: Any):
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; accepted: {', '.join(ROLES)}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config of {name!r} must be a dataclass")

    def decorator(apply: Callable[[Any, Any], Any]):
        if name in _REGISTRY and _REGISTRY[name].apply is not apply:
            raise UserError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, config_cls, apply, role, summary, paper, **extra)
        return apply

    return decorator


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; accepted: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registry_markdown() -> str:
    """The registry as the Markdown page `docs/methods.md` (a test keeps that page equal to this)."""
    lines = ["# Methods", "", "Generated from the registry by `lengthwise methods --markdown > docs/methods.md`; "
             "a test fails when this page and the registry disagree.", "",
             "Use any of them as `lengthwise.patch(model, \"name\", option=value)` or on the command line as "
             "`-m name:option=value`; stack methods of different roles with `+` "
             "(e.g. `yarn:factor=8+lm-infinite`).", ""]
    for name in method_names():
        spec = _REGISTRY[name]
        lines += [f"## `{name}`", "", spec.summary, "",
                  f"- role: `{spec.role}`; position encodings: {', '.join(spec.encodings)}",
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
        get_method(name)  # validates the name
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
    specs = [get_method(n) for n in names]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.role in ("none", "scoring") and len(specs) > 1:
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
