"""The package's structure, read from its imports: the core (what a user imports to patch a model) never imports the
harness (evaluation, reports, search, lab, CLI), modules import each other in one direction (no cycle), and every
module imports lengthwise's modules at the top of the file (a function-local import hides an edge), except a module
that needs an optional dependency (an extra the harness does not install: lm-eval, Ray, datasets, gguf)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lengthwise"
# the core: torch + transformers only (gguf as an extra, imported where a GGUF is read)
CORE = {"__init__", "api", "registry", "patching", "errors", "io", "models", "rope", "attention", "methods", "export",
        "generation", "static_decode", "scoring"}
HARNESS = {"eval", "report", "search", "lab", "cli", "temp_lora", "data", "training", "harness", "chat", "session",
           "locks", "progress", "distributed", "testing", "zoo", "walk", "reference_models"}


def _unit(module: str) -> str:
    """lengthwise.rope.table -> rope; lengthwise -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("lengthwise",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of imports under `if TYPE_CHECKING:` (annotations only: no edge at run time)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            inside |= {id(n) for child in node.body for n in ast.walk(child)}
    return inside


def _imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, at top level, line) for every run-time import of a lengthwise module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top, skip = {id(n) for n in tree.body}, _type_checking_nodes(tree)
        importer = _module_name(path)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lengthwise"):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("lengthwise")]
            else:
                continue
            found += [(importer, target, id(node) in top, node.lineno) for target in targets]
    return found


IMPORTS = _imports()


def test_every_unit_is_core_or_harness():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert not CORE & HARNESS
    assert units <= CORE | HARNESS, f"place these in CORE or HARNESS: {sorted(units - CORE - HARNESS)}"


def test_the_core_never_imports_the_harness():
    upward = [f"{a} -> {b} (line {line})" for a, b, _, line in IMPORTS if _unit(a) in CORE and _unit(b) in HARNESS]
    assert not upward, "\n".join(upward)


OPTIONAL = {"lm_eval", "ray", "datasets", "gguf"}  # third-party packages of extras beyond the harness's own


def _needs_optional(module: str) -> bool:
    """Whether importing `module` imports an optional dependency (at its top level, or through lengthwise modules it
    imports at theirs)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = PACKAGE.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module or ""]
            else:
                continue
            if any(t.split(".")[0] in OPTIONAL for t in targets):
                return True
            todo += [t for t in targets if t.startswith("lengthwise")]
    return False


def test_modules_import_lengthwise_at_the_top():
    hidden = [f"{a} -> {b} (line {line})" for a, b, top, line in IMPORTS if not top and not _needs_optional(b)]
    assert not hidden, "\n".join(hidden)


def test_an_optional_dependency_may_be_imported_inside_a_function():
    assert _needs_optional("lengthwise.harness")  # lm-eval at its top
    assert not _needs_optional("lengthwise.api") and not _needs_optional("lengthwise.eval.perplexity")


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for a, b, _, _ in IMPORTS:
        while b not in modules and "." in b:  # `from lengthwise.x import name` of a package's name
            b = b.rpartition(".")[0]
        if a != b and not a.startswith(b + "."):  # a package's own __init__ re-exports: not a cycle
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_core_needs_only_torch_and_transformers():
    """Third-party imports of the core: torch, transformers and what transformers itself installs; gguf (the `real`
    extra) only inside functions, where a GGUF is read."""
    import sys  # noqa: PLC0415

    allowed = {"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "packaging", "numpy"}
    extra = {"gguf"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _unit(_module_name(path)) not in CORE:
            continue
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root == "lengthwise" or root in allowed:
                    continue
                if root in extra and id(node) not in top:
                    continue
                found.append(f"{_module_name(path)}: {name} (line {node.lineno})")
    assert not found, "\n".join(found)
