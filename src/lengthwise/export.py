"""Write a RoPE method as the settings inference engines read, so the extended model runs without lengthwise.

    model, tokenizer = load_model("smollm2-135m")
    result = export_model(model, tokenizer, "yarn:factor=4", "/tmp/smollm2-32k")
    print("\\n".join(result.report()))   # the folder, and the vLLM / SGLang / llama.cpp settings

`export_model` patches the model (`lengthwise.api.patch`, so a factor composes with a shipped scaling exactly as
the patch composes it), reads the resolved config, and writes a standard HF folder whose `config.json` carries
`rope_parameters` and `max_position_embeddings` for the extended context. Before the folder is moved into place,
the rotary module transformers builds from the written config is checked to compute the patched model's
frequencies and attention factor. From a GGUF source, `write_gguf` copies every tensor and key of the file and
sets llama.cpp's RoPE keys. Everything is written beside its target under a temporary name and renamed at the end:
a failed export leaves nothing half-written.

What each engine can express (docs/export.md has the table):
- transformers, vLLM, SGLang: linear, ntk (rope_type "default" with the NTK base: the same frequencies), yarn,
  llama3, longrope (per-dimension long/short factors); dynamic-ntk in transformers only (vLLM and SGLang fix one
  base for the whole context).
- llama.cpp: linear, yarn (default betas), ntk (`rope.freq_base`), llama3 (a `rope_freqs` tensor, as llama.cpp's
  own converter writes for Llama 3.1).
- no engine: Λ attention (lm-infinite, streaming), log-n query scaling, n_hat start tokens.

The `gguf` package (`pip install 'lengthwise[real]'`) is needed only by `write_gguf`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from lengthwise.api import patch
from lengthwise.errors import UserError
from lengthwise.models.compat import standard_rope_frequencies
from lengthwise.models.families import context_length, shipped_rope_parameters
from lengthwise.registry import check_combination, get_entry, get_method, parse_method_spec
from lengthwise.models.rotary import rotary_layout
from lengthwise.rope.scaling import base_inv_freq, frequency_gap
from lengthwise.rope.shipped import original_length
from lengthwise.rope.table import ROPE_METHODS, to_rope_parameters

_ALL = "transformers, vLLM, SGLang or llama.cpp"
# why the methods that change more than the rotary frequencies have no engine form
NOT_EXPORTABLE = {
    "lm-infinite": "its Λ-shaped attention (the first n_global and last n_local tokens, distances capped at L) is an "
                   f"attention pattern, and no {_ALL} model config sets one",
    "streaming": "attention sinks with a rolling cache whose positions are re-indexed inside it are a cache policy, "
                 f"and no {_ALL} model config sets one",
    "logn": f"no {_ALL} model config scales the queries by log(position) / log(L)",
    "vanilla": "it changes nothing, so there is nothing to export",
    "sliding-window": "it is a scoring strategy, not a change to the model",
}
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": None}
MARKER = "lengthwise_export.json"  # written into the folder: what was exported, from what


def require_gguf():
    try:
        import gguf  # noqa: PLC0415
    except ImportError:
        raise ModuleNotFoundError("writing a GGUF needs the gguf package: pip install 'lengthwise[real]' "
                                  "(or pip install gguf)") from None
    return gguf


# ----------------------------------------------------------------------------------------------- the method spec
def check_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """(method, options) of a spec that some engine can express; one line (UserError) naming why not otherwise.
    Read before any model is loaded."""

    parts = parse_method_spec(spec)
    check_combination([name for name, _ in parts])
    for name, options in parts:
        get_entry(name).make_config(**options)  # bad options: the registry's own one-line message
        if name in NOT_EXPORTABLE:
            raise UserError(f"{name!r} cannot be exported: {NOT_EXPORTABLE[name]}; keep the lengthwise patch "
                            f"(lengthwise.patch) to run it")
        if name not in ROPE_METHODS:
            raise UserError(f"{name!r} cannot be exported; exportable: {', '.join(ROPE_METHODS)}")
    if len(parts) != 1:
        raise UserError(f"export takes one RoPE method, got {spec!r}")
    name, options = parts[0]
    config = get_method(name).make_config(**options)
    if config.n_hat:
        raise UserError(f"{name} with n_hat={config.n_hat} cannot be exported: no {_ALL} keeps the first n_hat "
                        f"positions at the original frequencies; export with n_hat=0, or keep the lengthwise patch")
    return name, options


# ----------------------------------------------------------------------------------- settings, one per engine
@dataclass(frozen=True)
class EngineSettings:
    """What a RoPE method is in each engine's terms, for one model. `refused` maps an engine to why it cannot
    express the method; `notes` are the limits of an engine that can."""

    method: str
    spec: str
    rope_parameters: dict[str, Any]  # transformers-native, as config.json carries them
    context: int  # max_position_embeddings of the export: the extended context
    original: int  # L, the length the scaling starts from
    base: float  # the model's unscaled rope theta
    rotary_dim: int
    config: dict[str, Any] = field(default_factory=dict)  # the resolved method config (shipped scaling composed)
    divisors: tuple[float, ...] | None = None  # per rotary frequency, original / scaled (llama.cpp's rope_freqs)
    refused: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def hf_overrides(self) -> dict[str, Any]:
        """The config entries the export changes: vLLM's --hf-overrides (transformers 5 keys)."""
        return {"rope_parameters": self.rope_parameters, "max_position_embeddings": self.context}

    def sglang_overrides(self) -> dict[str, Any]:
        # `rope_scaling` is the key SGLang documents; transformers 5 maps it onto rope_parameters (rope_theta
        # included), transformers 4 reads the top-level rope_theta beside it
        return {"rope_scaling": self.rope_parameters, "rope_theta": self.rope_parameters["rope_theta"],
                "max_position_embeddings": self.context}

    def llama_cpp_flags(self) -> list[str] | None:
        """llama.cpp command-line flags that give the same RoPE on the unscaled GGUF; None where only a tensor in
        the file can (llama3) or llama.cpp cannot."""
        if "llama.cpp" in self.refused:
            return None
        p = self.rope_parameters
        if self.method == "linear":
            return ["--rope-scaling", "linear", "--rope-scale", f"{p['factor']:g}", "-c", str(self.context)]
        if self.method == "ntk":
            return ["--rope-scaling", "none", "--rope-freq-base", f"{p['rope_theta']:.9g}", "-c", str(self.context)]
        if self.method == "yarn":
            return ["--rope-scaling", "yarn", "--rope-scale", f"{p['factor']:g}", "--yarn-orig-ctx",
                    str(self.original), "-c", str(self.context)]
        return None

    def record(self) -> dict[str, Any]:
        return {"spec": self.spec, "method": self.method, "config": self.config,
                "rope_parameters": self.rope_parameters, "max_position_embeddings": self.context,
                "original_length": self.original, "vllm": {"hf_overrides": self.hf_overrides()},
                "sglang": {"json_model_override_args": self.sglang_overrides()},
                "llama.cpp": {"flags": self.llama_cpp_flags()}, "refused": self.refused, "notes": self.notes}


def _start_length(method_config: Any, model_config: Any) -> int:
    """The length the resolved scaling starts from: the method's own original_max_position_embeddings, else the one a
    composed shipped scaling started from, else the model's context."""

    if method_config.original_max_position_embeddings:
        return int(method_config.original_max_position_embeddings)
    context = context_length(model_config)
    shipped = shipped_rope_parameters(model_config)
    if shipped is not None and method_config.shipped == "compose":
        return original_length(shipped, context)
    return context


def _divisors(model_config: Any, params: dict[str, Any], rotary_dim: int) -> tuple[float, ...]:
    """Per rotary frequency, unscaled / scaled inverse frequency (the scaled one as transformers computes it)."""

    scaled, _ = standard_rope_frequencies(model_config, params)
    unscaled = base_inv_freq(rotary_dim, params["rope_theta"])
    return tuple(float(v) for v in (unscaled.double() / scaled.double().cpu()))


def engine_limits(method: str, config: Any) -> tuple[dict[str, str], dict[str, str]]:
    """({engine: why it cannot express `method` with `config`}, {engine: the limit of one that can}); read from the
    method config alone, so a command can refuse before loading a model."""
    refused: dict[str, str] = {}
    notes: dict[str, str] = {}
    if method == "dynamic-ntk":
        notes["transformers"] = ("its 'dynamic' rope agrees on a forward pass from scratch; while generating with a "
                                 "KV cache it keeps the cached keys rotated under the bases they were written with "
                                 "(lengthwise rebuilds them)")
        why = ("its 'dynamic' rope for decoders fixes one base for the whole served context when the engine starts, "
               "not the base of the current length")
        refused.update(vllm=why, sglang=why, **{"llama.cpp": "llama.cpp has no length-dependent rope base"})
    if method == "longrope":
        refused["llama.cpp"] = ("llama.cpp reads LongRoPE factors only as the rope_factors_long/short tensors of the "
                                "Phi-3-type architectures that declare them, with their own attention factor; the "
                                "HF folder carries them for transformers, vLLM and SGLang")
        if config.short_factors is not None:
            notes["transformers"] = ("it switches from the short to the long factors when the sequence passes L, as "
                                     "lengthwise does, but keeps cached keys rotated under the short factors "
                                     "(lengthwise rebuilds them)")
    if method == "yarn":
        changed = [f"{k}={getattr(config, k)}" for k, v in YARN_DEFAULTS.items() if getattr(config, k) != v]
        if changed:
            refused["llama.cpp"] = (f"llama.cpp's yarn takes the default beta_fast=32, beta_slow=1, truncate=true and "
                                    f"attention factor 0.1 ln s + 1 for most architectures; this yarn sets "
                                    f"{', '.join(changed)}")
    return refused, notes


def engine_settings(model, method: str, config: Any, spec: str = "") -> EngineSettings:
    """The settings of `method` with its resolved `config` (a patch handle's, shipped scaling composed) on `model`."""

    model_config = model.config
    try:
        params = to_rope_parameters(method, config, model)
    except ValueError as err:
        raise UserError(f"{spec or method} cannot be exported: {err}") from None
    original = _start_length(config, model_config)
    refused, notes = engine_limits(method, config)
    if method == "dynamic-ntk":  # transformers' "dynamic" reads L from max_position_embeddings, so the export keeps it
        context = int(model_config.max_position_embeddings)
    else:
        scale = config.scale if method == "longrope" else float(config.factor)
        context = int(round(original * scale))
    layout = rotary_layout(model)
    divisors = _divisors(model_config, params, layout.rotary_dim) if method == "llama3" else None
    resolved = asdict(config) if is_dataclass(config) else dict(config)
    return EngineSettings(method, spec or method, params, context, original, float(layout.base), layout.rotary_dim,
                          resolved, divisors, refused, notes)


# ------------------------------------------------------------------------------------------------ the HF folder
def export_config(model_config: Any, settings: EngineSettings):
    """A copy of the model's config carrying the export's rope_parameters and context."""
    config = copy.deepcopy(model_config)
    text = config.get_text_config(decoder=True)
    text.rope_parameters = copy.deepcopy(settings.rope_parameters)
    text.max_position_embeddings = settings.context
    # Phi-3's config keeps the length outside rope_parameters and transformers gives it priority on load
    if getattr(text, "original_max_position_embeddings", None) is not None and \
            "original_max_position_embeddings" in settings.rope_parameters:
        text.original_max_position_embeddings = settings.rope_parameters["original_max_position_embeddings"]
    if hasattr(config, "quantization_config"):  # weights are saved as the dequantized floats the model holds
        del config.quantization_config
    return config


def checked_export_config(model_config: Any, settings: EngineSettings):
    """`export_config`, validated as transformers validates it on save and load; one line where it refuses (e.g.
    Phi-3's config takes only longrope)."""
    config = export_config(model_config, settings)
    validate = getattr(config, "validate", None)
    try:
        if validate is not None:
            validate()
        else:  # releases without strict config dataclasses validate on construction
            type(config).from_dict(config.to_dict())
    except Exception as err:  # noqa: BLE001 - strict config dataclasses raise their own error class
        cause = err.__cause__ or err
        reason = " ".join(str(cause).split())
        raise UserError(f"{settings.spec} cannot be exported for {model_config.model_type!r}: transformers' "
                        f"{type(config).__name__} refuses its rope_parameters ({reason})") from None
    return config


def check_out(out: Path, force: bool, option: str = "--out", source: str | None = None) -> Path:
    """`out` may be written: absent, an empty folder, or (with `force`) a folder to replace; never the source."""
    out = Path(out)
    if source is not None and Path(source).exists() and out.resolve() == Path(source).resolve():
        raise UserError(f"{option} {out} is the source model's own folder; give another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{option} {out} exists and is not empty; pass --force to replace it (the new folder is "
                        f"written beside it and swapped in at the end)")
    return out


def check_out_file(out: Path, force: bool, option: str = "--gguf") -> Path:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; give a .gguf file path")
    if out.exists() and not force:
        raise UserError(f"{option} {out} exists; pass --force to replace it")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _partial_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, removed unless the caller renamed it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    partial.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would follow the folder into place
    try:
        yield partial
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _swap_in(partial: Path, out: Path) -> None:
    """Rename `partial` to `out`; an existing `out` is moved aside first and removed once the new one is in place."""
    if not out.exists():
        partial.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        partial.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_rotary(written: Path, patched_rotary, settings: EngineSettings) -> None:
    """The rotary module transformers builds from the written config computes the patched model's frequencies and
    attention factor (static plans: the patch itself runs such a module; a mismatch is a defect of the export)."""
    from transformers import AutoConfig  # noqa: PLC0415

    loaded = AutoConfig.from_pretrained(written).get_text_config(decoder=True)
    if int(loaded.max_position_embeddings) != settings.context:
        raise RuntimeError(f"the written config reads max_position_embeddings {loaded.max_position_embeddings}, "
                           f"not {settings.context}")
    if patched_rotary is None:
        return
    rebuilt = type(patched_rotary)(config=loaded)
    gap = frequency_gap(patched_rotary.inv_freq, rebuilt.inv_freq)
    factor_gap = abs(float(rebuilt.attention_scaling) - float(patched_rotary.attention_scaling))
    if gap > 1e-6 or factor_gap > 1e-6:
        raise RuntimeError(f"the written config builds other rotary frequencies than the patched model (largest "
                           f"relative difference {gap:.2e}, attention factor {factor_gap:.2e}); nothing was written")


def write_folder(model, tokenizer, settings: EngineSettings, out: Path, force: bool = False,
                 patched_rotary=None, source: str | None = None) -> Path:
    """Write the unpatched `model` with the export's config (and `tokenizer`) as a standard HF folder at `out`."""
    out = check_out(Path(out), force, source=source)
    with _partial_folder(out) as partial:
        model.save_pretrained(partial)
        checked_export_config(model.config, settings).save_pretrained(partial)  # replaces the config.json written
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        (partial / MARKER).write_text(json.dumps(settings.record(), indent=2) + "\n")
        _check_rotary(partial, patched_rotary, settings)
        _swap_in(partial, out)
    return out


# ------------------------------------------------------------------------------------------------------ GGUF
def _field(reader, key: str, default: Any = None) -> Any:
    found = reader.get_field(key)
    return default if found is None else found.contents()


def gguf_metadata(reader, settings: EngineSettings) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """({key: (value, GGUFValueType)}, {tensor name: float32 array}) to set in a copy of the GGUF `reader` reads.
    One line (UserError) where llama.cpp cannot express the method or the file is not the model's."""
    import numpy as np  # noqa: PLC0415

    gguf = require_gguf()
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if "llama.cpp" in settings.refused:
        raise UserError(f"{settings.spec} cannot be written as a GGUF: {settings.refused['llama.cpp']}")
    rope = gguf.Keys.Rope
    key = lambda template: template.format(arch=arch)  # noqa: E731 - the keys are templates on the architecture
    shipped_type = _field(reader, key(rope.SCALING_TYPE), "none")
    shipped_factor = _field(reader, key(rope.SCALING_FACTOR), 1.0)
    if shipped_type not in ("none", "linear") or (shipped_type == "linear" and shipped_factor not in (0.0, 1.0)) \
            or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(f"the source GGUF ships RoPE scaling (rope.scaling.type {shipped_type!r}, factor "
                        f"{shipped_factor:g}, or a rope_freqs tensor), which transformers' GGUF reader does not read "
                        f"for {arch!r}; export from an unscaled GGUF")
    base = float(_field(reader, key(rope.FREQ_BASE), 10000.0))
    dims = _field(reader, key(rope.DIMENSION_COUNT))
    if abs(base - settings.base) > 1e-6 * settings.base or (dims is not None and int(dims) != settings.rotary_dim):
        raise UserError(f"the GGUF (rope base {base:g}, {dims} rotary dims) is not the model the settings were "
                        f"computed for (base {settings.base:g}, {settings.rotary_dim} rotary dims)")
    T = gguf.GGUFValueType
    p = settings.rope_parameters
    kv: dict[str, tuple[Any, Any]] = {key(gguf.Keys.LLM.CONTEXT_LENGTH): (settings.context, T.UINT32)}
    tensors: dict[str, Any] = {}
    if settings.method == "linear":
        kv |= {key(rope.SCALING_TYPE): ("linear", T.STRING), key(rope.SCALING_FACTOR): (float(p["factor"]), T.FLOAT32)}
    elif settings.method == "yarn":
        kv |= {key(rope.SCALING_TYPE): ("yarn", T.STRING), key(rope.SCALING_FACTOR): (float(p["factor"]), T.FLOAT32),
               key(rope.SCALING_ORIG_CTX_LEN): (settings.original, T.UINT32),
               # read by the architectures that read them (llama.cpp's defaults elsewhere: the same values)
               key(rope.SCALING_YARN_BETA_FAST): (float(p["beta_fast"]), T.FLOAT32),
               key(rope.SCALING_YARN_BETA_SLOW): (float(p["beta_slow"]), T.FLOAT32)}
    elif settings.method == "ntk":
        kv |= {key(rope.SCALING_TYPE): ("none", T.STRING), key(rope.FREQ_BASE): (float(p["rope_theta"]), T.FLOAT32)}
    elif settings.method == "llama3":
        arch_id = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
        if arch_id is None or gguf.MODEL_TENSOR.ROPE_FREQS not in gguf.MODEL_TENSORS.get(arch_id, ()):
            raise UserError(f"llama3 cannot be written as a GGUF for architecture {arch!r}: llama.cpp takes its "
                            f"per-dimension factors as a rope_freqs tensor, which {arch!r} does not declare")
        kv[key(rope.SCALING_TYPE)] = ("none", T.STRING)
        tensors["rope_freqs.weight"] = np.asarray(settings.divisors, dtype=np.float32)
    else:
        raise UserError(f"{settings.spec} cannot be written as a GGUF: llama.cpp has no {settings.method}")
    return kv, tensors


@contextmanager
def _partial_file(out: Path) -> Iterator[Path]:
    """A temporary file beside `out`, removed unless the caller renamed it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp's 0600 would follow the file into place
    try:
        yield Path(name)
    finally:
        if os.path.exists(name):
            os.remove(name)


def write_gguf(source: Path, settings: EngineSettings, out: Path, force: bool = False) -> Path:
    """Copy the GGUF `source` to `out` with every tensor and key, llama.cpp's RoPE keys set for `settings`."""
    with _staged_gguf(Path(source), settings, Path(out), force) as partial:
        os.replace(partial, out)
    return Path(out)


@contextmanager
def _staged_gguf(source: Path, settings: EngineSettings, out: Path, force: bool) -> Iterator[Path]:
    """The finished copy under a temporary name beside `out`, for the caller to rename into place."""
    gguf = require_gguf()
    out = check_out_file(out, force)
    if source.resolve() == out.resolve():
        raise UserError(f"--gguf {out} is the source GGUF itself; give another file")
    reader = gguf.GGUFReader(str(source))
    kv, tensors = gguf_metadata(reader, settings)
    with _partial_file(out) as partial:
        _copy_gguf(gguf, reader, partial, kv, tensors)
        del reader  # its memory map of the source
        yield partial


def _copy_gguf(gguf, reader, path: Path, kv: dict[str, tuple[Any, Any]], tensors: dict[str, Any]) -> None:
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(str(path), arch=arch, endianess=reader.endianess)
    alignment = _field(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment
    pending = dict(kv)
    for item in reader.fields.values():
        # GGUF.* are the header's own counts; the writer writes them, and the architecture, itself
        if item.name == gguf.Keys.General.ARCHITECTURE or item.name.startswith("GGUF."):
            continue
        value_type = item.types[0]
        sub_type = item.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        if item.name in pending:
            value, value_type = pending.pop(item.name)
            sub_type = None
        else:
            value = item.contents()
        writer.add_key_value(item.name, value, value_type, sub_type=sub_type)
    for name, (value, value_type) in pending.items():
        writer.add_key_value(name, value, value_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    for name, array in tensors.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    for array in tensors.values():
        writer.write_tensor_data(array)
    writer.close()


# ---------------------------------------------------------------------------------------------------- together
@dataclass(frozen=True)
class ExportResult:
    settings: EngineSettings
    folder: Path
    gguf: Path | None = None

    def report(self) -> list[str]:
        """What was written and how each engine runs it, one item per line."""
        s, folder = self.settings, self.folder
        lines = [f"exported {s.spec} to {folder}: rope_parameters {json.dumps(s.rope_parameters)}, "
                 f"max_position_embeddings {s.context} (from {s.original})",
                 f"transformers: AutoModelForCausalLM.from_pretrained({str(folder)!r}) (no lengthwise needed)"]
        for engine, serve, overrides in (
                ("vllm", f"vllm serve {folder} --max-model-len {s.context}",
                 f"--hf-overrides '{json.dumps(s.hf_overrides())}' --max-model-len {s.context}"),
                ("sglang", f"python -m sglang.launch_server --model-path {folder} --context-length {s.context}",
                 f"--json-model-override-args '{json.dumps(s.sglang_overrides())}' --context-length {s.context}")):
            name = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
            if engine in s.refused:
                lines.append(f"{name}: not expressible: {s.refused[engine]}")
            else:
                lines.append(f"{name}: {serve}; or on the source model: {overrides}")
        if "llama.cpp" in s.refused:
            lines.append(f"llama.cpp: not expressible: {s.refused['llama.cpp']}")
        elif self.gguf is not None:
            lines.append(f"llama.cpp: GGUF written to {self.gguf} (run it with -c {s.context})")
        else:
            flags = s.llama_cpp_flags()
            lines.append(f"llama.cpp: on the unscaled GGUF: {' '.join(flags)}" if flags else
                         "llama.cpp: a GGUF with a rope_freqs tensor (--gguf FILE, from a GGUF source)")
        lines.extend(f"note ({engine}): {text}" for engine, text in s.notes.items())
        return lines


def export_model(model, tokenizer, spec: str, out: str | Path, force: bool = False,
                 gguf_source: str | Path | None = None, gguf_out: str | Path | None = None,
                 source: str | None = None) -> ExportResult:
    """Export `spec` for `model` (unpatched; left unpatched) to the HF folder `out`, and with `gguf_out` a GGUF
    copied from `gguf_source` with llama.cpp's RoPE keys. Every check runs before anything is written."""

    name, options = check_spec(spec)
    out = check_out(Path(out), force, source=source)
    if gguf_out is not None:
        if gguf_source is None:
            raise UserError("--gguf writes a copy of a GGUF source; this model was not read from a GGUF file")
        require_gguf()
        check_out_file(Path(gguf_out), force)
    handle = patch(model, name, **options)
    try:
        settings = engine_settings(model, name, handle.configs[0], spec)
        rotary = rotary_layout(model).rotary_module
        # a static plan runs a rotary module built from rope_parameters: the one the written config must rebuild
        replaced = rotary is not None and "forward" not in rotary.__dict__
    finally:
        handle.remove()
    checked_export_config(model.config, settings)  # refused by transformers: before anything is written
    if gguf_out is None:
        return ExportResult(settings, write_folder(model, tokenizer, settings, out, force, rotary if replaced else None,
                                                   source))
    # the GGUF is staged first (its refusals come before any folder is written) and renamed after the folder
    with _staged_gguf(Path(gguf_source), settings, Path(gguf_out), force) as partial:
        folder = write_folder(model, tokenizer, settings, out, force, rotary if replaced else None, source)
        os.replace(partial, gguf_out)
    return ExportResult(settings, folder, Path(gguf_out))


__all__ = ["NOT_EXPORTABLE", "EngineSettings", "ExportResult", "check_spec", "engine_limits", "engine_settings",
           "export_config", "export_model", "gguf_metadata", "require_gguf", "write_folder", "write_gguf"]
