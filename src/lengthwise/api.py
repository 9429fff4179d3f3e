"""Public API: load a model, patch it with one or more methods, undo the patch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lengthwise.errors import UserError
from lengthwise.models.families import require_encoding
from lengthwise.models.real import REAL_MODELS, convert_gguf, find_gguf
from lengthwise.patching import Undo
from lengthwise.registry import check_combination, get_method, parse_method_spec

REFERENCE_MODELS_DIR = Path(__file__).parent / "reference_models"
LAB_MARKER = "lengthwise_lab.json"  # a model saved by the position-encoding lab in its own format
# marker file -> loader(path, device) -> (model, tokenizer), for folders in a format of the harness (the lab registers
# LAB_MARKER when `lengthwise.lab` is imported): the core never imports the harness
FOLDER_LOADERS: dict[str, Any] = {}


def register_folder_loader(marker: str, loader) -> None:
    FOLDER_LOADERS[marker] = loader


def bundled_models() -> list[str]:
    if not REFERENCE_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in REFERENCE_MODELS_DIR.iterdir() if (p / "config.json").exists())


def resolve_model_path(name_or_path: str) -> str:
    """A loadable HF folder (or hub id) for a bundled name, a folder, a GGUF file or folder, or a real model name."""
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
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a bundled model ({', '.join(bundled_models())}), a real model "
            f"({', '.join(REAL_MODELS)}), a model folder, a .gguf file, nor a hub id (ORG/NAME)")
    return name_or_path  # a hub id


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: Any = None):
    """A torch dtype from None (float32), a torch dtype, or a name: float32, bfloat16, float16 (fp32, bf16, fp16)."""
    import torch  # noqa: PLC0415

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UserError(f"dtype {dtype} is not served; accepted: {', '.join(DTYPES)}")
        return dtype
    name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower().removeprefix("torch."))
    if name not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_device(device: str | None = "cpu", dtype: Any = None) -> str:
    """The device name, checked: it exists here, and a small matmul, softmax and RMS norm run on it in `dtype`
    (one line otherwise, naming what torch said). Accepted: cpu, cuda, cuda:N, mps."""
    import torch  # noqa: PLC0415

    device = "cpu" if device is None else str(device)
    torch_dtype = resolve_dtype(dtype)
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N, mps (or --device auto: "
                        f"device_map='auto' through accelerate)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device "
                            f"here; accepted here: cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
                            f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"device {device!r} asked for, but torch {torch.__version__} has no MPS device here; "
                            f"accepted here: cpu")
    elif parsed.type != "cpu":
        raise UserError(f"device {device!r} is not served; accepted: cpu, cuda, cuda:N, mps")
    _probe_dtype(parsed, torch_dtype)
    return device


def _probe_dtype(device, dtype) -> None:
    """Run the operations every layer needs (matmul, softmax, RMS norm, SDPA) once, tiny, in `dtype` on `device`."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    try:
        x = torch.ones(4, 8, 8, dtype=dtype, device=device)
        y = torch.softmax(x @ x, dim=-1)
        y = F.rms_norm(y, (8,))
        y = F.scaled_dot_product_attention(y[None], y[None], y[None], is_causal=True)
        bad = not bool(torch.isfinite(y.float()).all())
    except (RuntimeError, TypeError, NotImplementedError) as err:
        reason = " ".join(str(err).split())[:160]
        bad = reason
    if bad:
        name = str(dtype).removeprefix("torch.")
        why = bad if isinstance(bad, str) else "it returned non-finite values"
        other = [d for d in DTYPES if d != name]
        raise UserError(f"--dtype {name} does not run on {device} with torch {torch.__version__} ({why}); "
                        f"use --dtype {' or '.join(other)}")


def _hub_cache_folder(repo_id: str) -> str:
    """Where huggingface_hub keeps `repo_id`: HF_HUB_CACHE/models--ORG--NAME (HF_HOME/hub by default)."""
    from huggingface_hub import constants  # noqa: PLC0415

    return str(Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")))


def _hub_offline() -> bool:
    import os  # noqa: PLC0415

    from huggingface_hub import constants  # noqa: PLC0415

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().lower() in ("1", "on", "yes", "true")


def _from_pretrained(path: str, hub_id: bool, **kwargs):
    """(tokenizer, model) from a folder, or from a hub id: from the hub, and when the hub is unreachable (or
    HF_HUB_OFFLINE is set) from the local HF cache only (`local_files_only=True`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    def load(**extra):
        if not extra.get("local_files_only"):
            return (AutoTokenizer.from_pretrained(path, **extra),
                    AutoModelForCausalLM.from_pretrained(path, **kwargs, **extra))
        # cache only: huggingface_hub's offline switch too, for the lookups transformers makes without passing
        # local_files_only on (5.25: the peft adapter_config.json probe, retried for minutes without network)
        from huggingface_hub import constants  # noqa: PLC0415

        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            return (AutoTokenizer.from_pretrained(path, **extra),
                    AutoModelForCausalLM.from_pretrained(path, **kwargs, **extra))
        finally:
            constants.HF_HUB_OFFLINE = before

    if not hub_id:
        return load()
    if not _hub_offline() and not _hub_reachable():  # no network: straight to the cache (no minutes of retries)
        try:
            return load(local_files_only=True)
        except OSError as err:
            from huggingface_hub import constants  # noqa: PLC0415

            raise FileNotFoundError(
                f"model {path!r} is not in the local HF cache (looked in {_hub_cache_folder(path)}) and the hub "
                f"({constants.ENDPOINT}) is unreachable; download it once with network access, set HF_HOME to the "
                f"cache that holds it, or pass a local folder") from err
    if _hub_offline():
        try:
            return load(local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(
                f"model {path!r} is not in the local HF cache (looked in {_hub_cache_folder(path)}; HF_HUB_OFFLINE "
                f"is set, so the hub was not asked; {_first_line(err)})") from err
    try:
        return load()
    except OSError as online:
        try:  # the hub is unreachable (or refused): what the local cache holds
            return load(local_files_only=True)
        except OSError:
            raise FileNotFoundError(
                f"could not load model {path!r} from the hub ({_first_line(online)}) nor from the local HF cache "
                f"(looked in {_hub_cache_folder(path)}); download it once with network access, set HF_HOME to "
                f"the cache that holds it, or pass a local folder") from online


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT) opens within `timeout` seconds."""
    import socket  # noqa: PLC0415
    from urllib.parse import urlparse  # noqa: PLC0415

    from huggingface_hub import constants  # noqa: PLC0415

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # refused, unresolvable, timed out
        return False


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{err.__class__.__name__}: {text[:200]}"


def load_model(name_or_path: str, dtype: Any = None, device: str | None = "cpu", device_map: Any = None):
    """Return `(model, tokenizer)` for a bundled reference model name, a local folder, a GGUF file (or a folder
    holding one), a registered real model (`lengthwise.models.real.REAL_MODELS`, e.g. "smollm2-135m"), or a hub id
    (from the hub, or from the local HF cache when the hub is unreachable or HF_HUB_OFFLINE is set).

    Bundled models: see `bundled_models()`. `dtype`: float32 (default), bfloat16 or float16 (a torch dtype or its
    name). `device`: cpu, cuda, cuda:N, mps, or "auto" (= `device_map="auto"`); checked first: a device torch does
    not see, or a dtype it cannot run there, is one line (`UserError`). `device_map` ("auto", or a map) places the
    model through accelerate (`pip install accelerate`) instead of `device`.
    """
    import importlib.util  # noqa: PLC0415

    torch_dtype = resolve_dtype(dtype)
    if device == "auto":
        device, device_map = None, device_map or "auto"
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise UserError("device_map='auto' (--device auto) needs accelerate: pip install accelerate; or give "
                            "--device cpu / cuda")
        check_device("cuda" if _cuda_available() else "cpu", torch_dtype)
    else:
        device = check_device(device, torch_dtype)
    path = resolve_model_path(name_or_path)
    if (Path(path) / LAB_MARKER).exists():
        if LAB_MARKER not in FOLDER_LOADERS:
            raise UserError(f"{path} is a position-encoding lab model: `import lengthwise.lab` (the harness; "
                            f"pip install 'lengthwise[lab]') registers its loader")
        model, tokenizer = FOLDER_LOADERS[LAB_MARKER](path, device=device)
        return model.to(torch_dtype), tokenizer
    hub_id = not Path(path).exists()
    extra = {"device_map": device_map} if device_map is not None else {}
    try:
        tokenizer, model = _from_pretrained(path, hub_id, dtype=torch_dtype, **extra)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r} ({err.__class__.__name__}: {str(err).splitlines()[0]}); "
            f"bundled models: {', '.join(bundled_models())}; or pass a local folder in HF format"
        ) from err
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _cuda_available() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


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
                raise UserError("keyword options apply to a single method; use 'a:k=v+b:k=v' for several")
            parts = [(parts[0][0], {**parts[0][1], **config})]
        return parts
    if config:
        raise UserError("with a list of methods, give options as (name, {options}) pairs")
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
    for name in names:
        get_method(name)  # a scoring strategy is refused here, in one line
    check_combination(names)
    undo, configs = Undo(), []
    try:
        for name, options in parts:
            spec = get_method(name)
            require_encoding(model, name, spec.encodings)
            cfg = spec.make_config(**options)
            applied = spec.apply(model, cfg)
            undo.extend(applied)
            configs.append(getattr(applied, "resolved", cfg))  # what runs (e.g. a factor composed with the shipped)
    except BaseException:
        undo.remove()
        raise
    handle = PatchHandle(model, names, configs, undo)
    model.__dict__["_lengthwise_handle"] = handle
    return handle
