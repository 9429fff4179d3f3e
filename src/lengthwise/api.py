"""Public API: load a model, patch it with one or more methods, undo the patch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lengthwise.models.families import require_encoding
from lengthwise.patching import Undo
from lengthwise.registry import check_combination, get_method, parse_method_spec

REFERENCE_MODELS_DIR = Path(__file__).parent / "reference_models"
LAB_MARKER = "lengthwise_lab.json"  # a model saved by the position-encoding lab in its own format


def bundled_models() -> list[str]:
    if not REFERENCE_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in REFERENCE_MODELS_DIR.iterdir() if (p / "config.json").exists())


def resolve_model_path(name_or_path: str) -> str:
    """A loadable HF folder (or hub id) for a bundled name, a folder, a GGUF file or folder, or a real model name."""
    from lengthwise.models.real import convert_gguf, find_gguf  # noqa: PLC0415

    if name_or_path in bundled_models():
        return str(REFERENCE_MODELS_DIR / name_or_path)
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        return str(convert_gguf(gguf))
    path = Path(name_or_path)
    if path.is_dir():
        if not ((path / "config.json").exists() or (path / LAB_MARKER).exists()):
            raise FileNotFoundError(
                f"folder {path} holds no config.json (nor {LAB_MARKER}); bundled models: {', '.join(bundled_models())}"
            )
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        from lengthwise.models.real import REAL_MODELS  # noqa: PLC0415

        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a bundled model ({', '.join(bundled_models())}), a real model "
            f"({', '.join(REAL_MODELS)}), a model folder, a .gguf file, nor a hub id (ORG/NAME)")
    return name_or_path  # a hub id


def load_model(name_or_path: str, dtype: Any = None, device: str = "cpu"):
    """Return `(model, tokenizer)` for a bundled reference model name, a local folder, a GGUF file (or a folder
    holding one), a registered real model (`lengthwise.models.real.REAL_MODELS`, e.g. "smollm2-135m"), or a hub id.

    Bundled models: see `bundled_models()`. Weights are loaded in float32 unless `dtype` says otherwise.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    path = resolve_model_path(name_or_path)
    if (Path(path) / LAB_MARKER).exists():
        from lengthwise.lab.model import load_lab_model  # noqa: PLC0415

        return load_lab_model(path, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r} ({err.__class__.__name__}: {str(err).splitlines()[0]}); "
            f"bundled models: {', '.join(bundled_models())}; or pass a local folder in HF format"
        ) from err
    model.to(device).eval()
    return model, tokenizer


@dataclass
class PatchHandle:
    """What `patch()` returns. `remove()` restores the model exactly; `configs` holds the resolved configs."""

    model: Any
    names: list[str]
    configs: list[Any]
    undo: Undo = field(repr=False)

    @property
    def spec(self) -> str:
        return "+".join(self.names)

    def describe(self) -> list[dict]:
        return [{"method": n, **asdict(c)} for n, c in zip(self.names, self.configs)]

    def new_cache(self):
        """A fresh KV cache suited to the patched model (bounded for lm-infinite/streaming), or None (default cache)."""
        return self.undo.cache_factory(self.model) if self.undo.cache_factory else None

    def remove(self) -> None:
        self.undo.remove()
        self.model.__dict__.pop("_lengthwise_handle", None)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


MethodArg = str | list | tuple


def _normalise(method: MethodArg, config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(method, str):
        parts = parse_method_spec(method)
        if config:
            if len(parts) != 1:
                raise ValueError("keyword options apply to a single method; use 'a:k=v+b:k=v' for several")
            parts = [(parts[0][0], {**parts[0][1], **config})]
        return parts
    if config:
        raise ValueError("with a list of methods, give options as (name, {options}) pairs")
    parts = []
    for item in method:
        if isinstance(item, str):
            parts.extend(parse_method_spec(item))
        else:
            name, options = item
            get_method(name)
            parts.append((name, dict(options)))
    return parts


def patch(model, method: MethodArg, **config: Any) -> PatchHandle:
    """Apply one or more registered methods to `model` in place; returns a handle whose `remove()` undoes them.

    `method`: a name (`"yarn"`), a spec (`"yarn:factor=4+lm-infinite:n_local=256"`), or a list of names or
    `(name, options)` pairs. Options of a single method may also be keyword arguments.
    """
    if "_lengthwise_handle" in model.__dict__:
        raise RuntimeError(
            f"model is already patched with {model.__dict__['_lengthwise_handle'].spec!r}; remove() that handle first"
        )
    parts = _normalise(method, config)
    names = [name for name, _ in parts]
    check_combination(names)
    undo, configs = Undo(), []
    try:
        for name, options in parts:
            spec = get_method(name)
            require_encoding(model, name, spec.encodings)
            cfg = spec.make_config(**options)
            undo.extend(spec.apply(model, cfg))
            configs.append(cfg)
    except BaseException:
        undo.remove()
        raise
    handle = PatchHandle(model, names, configs, undo)
    model.__dict__["_lengthwise_handle"] = handle
    return handle
