"""A KV cache saved to a folder and restored: a document read once can be asked about again without a new prefill.

Layout of a session folder (format `FORMAT_VERSION`):

- `manifest.json`: format name and version, the model's identity (name as given, a SHA-256 of its config without
  the fields that only say where or how it was loaded, a SHA-256 of a sample of its weights, dtype), the method
  (spec and resolved config, `PatchHandle.describe()`), tokens seen, and per cache layer its class and its scalar
  state (bounds, `seen`, buffer capacity, how many keys it holds, middle-retrieval blocks indexed);
- `cache.safetensors`: per layer `layers.I.keys` / `.values` (B, Hk, T, D) of the T keys it holds, and for a bounded
  layer (`LambdaCacheLayer`) `.positions` (B, T) and `.valid` (B, T), plus the bounding boxes of its middle blocks
  (`.middle_lo` / `.middle_hi`) when it retrieves from the middle;
- whatever the caller adds (`extra_json`: e.g. `conversation.json`, the turns so far).

Nothing is unpickled on load (JSON and safetensors only). A bounded layer is rebuilt with buffers of the capacity it
had, so the next update writes in place exactly where the saved one would have: the logits that follow are the
same as without the save (tested). The folder is written as a sibling temporary folder and renamed into place, so
an interrupted save leaves the previous session (or nothing), never half a session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lengthwise.attention.cache import LambdaCacheLayer, LambdaHybridLayer
from lengthwise.attention.middle import BlockIndex
from lengthwise.errors import UserError

FORMAT = "lengthwise-session"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "cache.safetensors"
# config fields that say where or how a model was loaded, not what it computes
VOLATILE_CONFIG_KEYS = {"_name_or_path", "_model_name_or_path", "name_or_path", "transformers_version", "dtype",
                        "torch_dtype", "_attn_implementation", "_attn_implementation_internal",
                        "_attn_implementation_autoset", "_commit_hash", "architectures", "use_cache"}


# ------------------------------------------------------------------------------------------------ model identity
def _plain_config(config) -> dict:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if k not in VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

    return clean(data)


def config_hash(model) -> str:
    return hashlib.sha256(json.dumps(_plain_config(model.config), sort_keys=True).encode()).hexdigest()


def weights_hash(model, values: int = 4096) -> str:
    """SHA-256 of the first `values` entries of the first, middle and last parameter (as float32): two checkpoints
    with one config (a base model and its fine-tune) differ here."""
    params = [p for _, p in model.named_parameters()]
    picked = [params[0], params[len(params) // 2], params[-1]] if params else []
    digest = hashlib.sha256()
    for param in picked:
        digest.update(param.detach().reshape(-1)[:values].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_identity(model, name: str | None = None) -> dict:
    param = next(model.parameters())
    return {"name": name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "model_type": getattr(model.config, "model_type", None), "config_sha256": config_hash(model),
            "weights_sha256": weights_hash(model), "dtype": str(param.dtype).removeprefix("torch.")}


def check_identity(saved: dict, model, folder: Path, name: str | None = None) -> None:
    """One line when the session was saved for another model (or dtype)."""
    here = model_identity(model, name)
    what = f"session {folder} was saved for model {saved.get('name')!r}"
    if saved.get("dtype") != here["dtype"]:
        raise UserError(f"{what} in {saved.get('dtype')}; this model is loaded in {here['dtype']}: load it with "
                        f"--dtype {saved.get('dtype')} (or read the document again)")
    if saved.get("config_sha256") != here["config_sha256"]:
        raise UserError(f"{what} (config {str(saved.get('config_sha256'))[:12]}, {saved.get('model_type')}); this "
                        f"model is {here['name']!r} (config {here['config_sha256'][:12]}, {here['model_type']}): load "
                        f"it with --model {saved.get('name')}, or read the document again")
    if saved.get("weights_sha256") != here["weights_sha256"]:
        raise UserError(f"{what}; this model {here['name']!r} has the same config but other weights: load it with "
                        f"--model {saved.get('name')}, or read the document again")


# --------------------------------------------------------------------------------------------------------- cache
def _layer_state(index: int, layer) -> tuple[dict, dict[str, torch.Tensor]]:
    from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

    prefix = f"layers.{index}."
    if isinstance(layer, LambdaHybridLayer) or type(layer) not in (LambdaCacheLayer, DynamicLayer):
        raise UserError(f"cache layer {index} is a {type(layer).__name__}; a session saves attention caches only "
                        f"(LambdaCacheLayer, transformers' DynamicLayer), not linear-attention or sliding-window state")
    initialized = bool(layer.is_initialized) and layer.keys is not None and layer.keys.dim() == 4
    meta: dict[str, Any] = {"class": type(layer).__name__, "held": int(layer.keys.shape[-2]) if initialized else 0}
    tensors: dict[str, torch.Tensor] = {}
    if initialized:
        tensors[prefix + "keys"] = layer.keys.detach().contiguous()
        tensors[prefix + "values"] = layer.values.detach().contiguous()
    if isinstance(layer, LambdaCacheLayer):
        meta.update(n_global=layer.n_global, n_local=layer.n_local, slack=layer.slack, keep_all=layer.keep_all,
                    sliding=bool(layer.is_sliding), seen=layer.seen,
                    capacity=int(layer._buffers[0].shape[-2]) if layer._views_are_ours() else meta["held"])
        if initialized:
            if layer.positions is None or layer.positions.shape[1] != meta["held"]:
                raise UserError(f"cache layer {index} holds keys whose positions were never recorded (a cache the "
                                f"patched attention did not see); it cannot be saved")
            tensors[prefix + "positions"] = layer.positions.contiguous()
            tensors[prefix + "valid"] = layer.valid.contiguous()
        index_ = layer.middle_index
        meta["middle_blocks"] = None if index_ is None or index_.lo is None else index_.blocks
        if meta["middle_blocks"] is not None:
            tensors[prefix + "middle_lo"] = index_.lo.contiguous()
            tensors[prefix + "middle_hi"] = index_.hi.contiguous()
    return meta, tensors


def cache_state(cache) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able description, tensors) of a transformers Cache made of LambdaCacheLayer / DynamicLayer layers."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UserError(f"a {type(cache).__name__} has no cache layers to save")
    metas, tensors = [], {}
    for index, layer in enumerate(layers):
        meta, layer_tensors = _layer_state(index, layer)
        metas.append(meta)
        tensors.update(layer_tensors)
    return {"class": type(cache).__name__, "tokens_seen": int(cache.get_seq_length()), "layers": metas}, tensors


def restore_cache(fresh, description: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Fill `fresh` (a new cache of the same method and model) with the saved state."""

    layers = description.get("layers")
    if description.get("class") != type(fresh).__name__ or not isinstance(layers, list) or \
            len(layers) != len(fresh.layers):
        raise UserError(f"session {folder} holds a {description.get('class')} of {len(layers or [])} layers; this "
                        f"method makes a {type(fresh).__name__} of {len(fresh.layers)}: it was saved for another "
                        f"method or model")
    for index, (meta, layer) in enumerate(zip(layers, fresh.layers)):
        prefix = f"layers.{index}."
        if meta.get("class") != type(layer).__name__:
            raise UserError(f"session {folder}: cache layer {index} was a {meta.get('class')}, this method makes a "
                            f"{type(layer).__name__}: it was saved for another method")
        if isinstance(layer, LambdaCacheLayer):
            for key in ("n_global", "n_local", "slack", "keep_all", "sliding"):
                mine = bool(layer.is_sliding) if key == "sliding" else getattr(layer, key)
                if meta.get(key) != mine:
                    raise UserError(f"session {folder}: cache layer {index} kept {key}={meta.get(key)}, this "
                                    f"method keeps {key}={mine}: it was saved for another method setting")
        held = int(meta.get("held", 0))
        if held == 0:
            continue
        try:
            keys, values = tensors[prefix + "keys"], tensors[prefix + "values"]
        except KeyError:
            raise UserError(f"session {folder}: {TENSORS} lacks the keys of layer {index} (a damaged session; "
                            f"read the document again)") from None
        if keys.shape[-2] != held or values.shape[-2] != held:
            raise UserError(f"session {folder}: layer {index} should hold {held} keys, {TENSORS} has "
                            f"{keys.shape[-2]} (a damaged session)")
        if not isinstance(layer, LambdaCacheLayer):
            layer.update(keys, values)
            continue
        capacity = max(int(meta.get("capacity", held)), held)
        batch, heads, _, dim = keys.shape
        buffers = (keys.new_empty(batch, heads, capacity, dim), values.new_empty(batch, values.shape[1], capacity,
                                                                                 values.shape[-1]),
                   torch.zeros(batch, capacity, dtype=torch.long, device=keys.device),
                   torch.zeros(batch, capacity, dtype=torch.bool, device=keys.device))
        buffers[0][..., :held, :] = keys
        buffers[1][..., :held, :] = values
        buffers[2][:, :held] = tensors[prefix + "positions"]
        buffers[3][:, :held] = tensors[prefix + "valid"]
        layer.lazy_initialization(keys, values)
        layer._buffers = buffers
        layer.keys, layer.values = buffers[0][..., :held, :], buffers[1][..., :held, :]
        layer.positions, layer.valid = buffers[2][:, :held], buffers[3][:, :held]
        layer.seen = int(meta["seen"])
        if meta.get("middle_blocks") is not None:
            block_index = BlockIndex()
            block_index.lo, block_index.hi = tensors[prefix + "middle_lo"], tensors[prefix + "middle_hi"]
            block_index.blocks = int(meta["middle_blocks"])
            layer.middle_index = block_index
    if fresh.get_seq_length() != int(description.get("tokens_seen", -1)):
        raise UserError(f"session {folder}: the restored cache has seen {fresh.get_seq_length()} tokens, the "
                        f"manifest says {description.get('tokens_seen')} (a damaged session)")


# ------------------------------------------------------------------------------------------------------ the folder
def is_session(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def check_save_target(folder: str | Path) -> Path:
    """A folder a session may be written to: absent, empty, or a session already (replaced whole)."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"--save-session {folder} is a file; give a folder (it is created)")
        if any(folder.iterdir()) and not is_session(folder):
            raise UserError(f"--save-session {folder} is a folder that holds files but no {MANIFEST} (not a "
                            f"session); give a new or empty folder, or a session to replace")
    parent = folder.resolve().parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise UserError(f"--save-session {folder}: {above} is a file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise UserError(f"--save-session {folder}: folder {above} is not writable")
            break
    return folder


def save(folder: str | Path, manifest: dict, cache, extra_json: dict[str, Any] | None = None) -> Path:
    """Write a session: `manifest` (the caller's identity fields) plus the cache's state, atomically."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = check_save_target(folder)
    description, tensors = cache_state(cache)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **manifest, "cache": description, "tensors": TENSORS,
                "files": sorted([MANIFEST, TENSORS, *(extra_json or {})])}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / TENSORS),
                  metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        old = None
        if folder.exists():  # an empty folder or an older session: moved aside, then removed
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"--load-session {folder} is not a folder (a session is a folder written by --save-session)")
    if not path.is_file():
        raise UserError(f"--load-session {folder} holds no {MANIFEST}: not a lengthwise session")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--load-session {folder}: {MANIFEST} is not JSON ({type(err).__name__}); a damaged "
                        f"session: read the document again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"--load-session {folder}: {MANIFEST} is not a lengthwise session manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"--load-session {folder}: session format version {manifest.get('version')}, this "
                        f"lengthwise reads version {FORMAT_VERSION}; read the document again")
    return manifest


class SessionTensors:
    """The tensors of a session's safetensors file, read one at a time (`tensors[name]`), so that restoring a cache
    holds its buffers plus one layer, never a second copy of the whole cache. Use as a context manager."""

    def __init__(self, folder: str | Path, device) -> None:
        from safetensors import safe_open  # noqa: PLC0415

        self.folder, self.path = Path(folder), Path(folder) / TENSORS
        try:
            self._file = safe_open(str(self.path), framework="pt", device=str(device))
            self._names = set(self._file.keys())
        except Exception as err:  # noqa: BLE001 - torn, foreign or missing: one line
            raise _damaged(self.folder, err) from None

    def __enter__(self) -> SessionTensors:
        return self

    def __exit__(self, *exc) -> None:
        self._file = None

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:  # a copy: a tensor kept from the file (the middle index) would otherwise keep the whole file mapped
            return self._file.get_tensor(name).clone()
        except Exception as err:  # noqa: BLE001 - a file cut short after its header
            raise _damaged(self.folder, err) from None


def _damaged(folder: Path, err: BaseException) -> UserError:
    message = " ".join(str(err).split())[:160]
    return UserError(f"--load-session {folder}: {TENSORS} cannot be read ({type(err).__name__}: {message}); a "
                     f"damaged session: read the document again")


def read_tensors(folder: str | Path, device) -> SessionTensors:
    return SessionTensors(folder, device)


def read_json(folder: str | Path, name: str) -> Any:
    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--load-session {folder}: {name} cannot be read ({type(err).__name__}); a damaged "
                        f"session: read the document again") from None
