"""Fine-tuning at the target length with fixed RoPE factors (LongRoPE's step after the search), resumable.

`finetune(model, tokenizer, documents, method, config, out_dir)` patches `model` with a RoPE method spec (the
searched `longrope:long_factors=FILE,...`, or a control: `linear:factor=s` (PI), `yarn:factor=s`), attaches a peft
LoRA (default) or trains every weight (`full=True`), and trains on random windows of `config.length` tokens of
`documents` (next-token loss over every position of the window), with gradient checkpointing.

Resumable: every `checkpoint_every` steps the trainable tensors (`trainable.safetensors`), the AdamW state
(`optimizer.safetensors`: every tensor; the param groups in `state.json`), the step, the losses and torch's RNG
state go into `checkpoints/step-NNNNNN/`, written in a temporary folder and renamed, then named by
`checkpoint.json` (rewritten atomically). A killed run rerun with the same arguments continues from the last
checkpoint to the same state as an uninterrupted run: the windows of step k are drawn from an RNG seeded from
(seed, k), and the learning rate is a function of the step (tests/test_longrope_pipeline.py).

Output folder (everything loads without unpickling code: JSON and safetensors only):
    finetune.json           manifest: base model, method spec and its options (factors inline), config, losses;
                            written last, so its presence means the run finished
    factors.json            the factors (longrope only), readable by `-m longrope:long_factors=OUT/factors.json`
    adapter/                peft LoRA (adapter_config.json + adapter_model.safetensors); `PeftModel.from_pretrained`
                            reads it too
    model/                  (full fine-tuning instead of adapter/) an HF folder: `load_model(OUT/model)`
    train_log.jsonl         one row per step: loss, learning rate, tokens, seconds
`load_finetuned(out_dir)` returns (model, tokenizer, handle): the base model with the adapter (or the fully
fine-tuned weights), patched with the same method.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lengthwise import locks
from lengthwise.api import load_model, patch
from lengthwise.errors import UserError
from lengthwise.io import atomic_write_json, atomic_write_text, remove_temp_files
from lengthwise.models.families import model_info, require_encoding
from lengthwise.registry import check_combination, get_method, is_scorer, parse_method_spec
from lengthwise.rope.factors import read_factors_file, save_factors
from lengthwise.temp_lora.adapter import check_targets

FORMAT_VERSION = 1
MANIFEST = "finetune.json"
ADAPTER_NAME = "default"
TEMP_PREFIX = ".tmp-"  # folders being written; never read, removed by the next run


@dataclass(frozen=True)
class FinetuneConfig:
    """The training budget and the adapter. `length`: tokens per training sequence (the target length)."""

    length: int
    steps: int = 200
    batch_size: int = 1  # sequences per optimizer step (gradient accumulation, one sequence in memory at a time)
    lr: float = 1e-3
    warmup: int = 10  # linear warm-up steps, then cosine decay to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    full: bool = False  # train every weight instead of a LoRA
    rank: int = 16
    alpha: float = 32.0
    target_modules: str | tuple[str, ...] = "all-linear"
    gradient_checkpointing: bool = True
    checkpoint_every: int = 50
    loss_chunk: int = 4096  # output head + cross-entropy over this many positions at a time (0: all at once)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("length", "steps", "batch_size", "rank", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "length" else 1):
                raise UserError(f"fine-tuning {name} must be an integer >= {2 if name == 'length' else 1}, "
                                f"got {value!r}")
        for name in ("warmup", "loss_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"fine-tuning {name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"fine-tuning lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"fine-tuning min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.weight_decay >= 0:
            raise UserError(f"fine-tuning weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"fine-tuning max_grad_norm must be positive (or None: no clipping), got "
                            f"{self.max_grad_norm!r}")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, then cosine down to min_lr_ratio * lr."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_json(self) -> dict:
        out = asdict(self)
        out["target_modules"] = (self.target_modules if isinstance(self.target_modules, str)
                                 else list(self.target_modules))
        return out


# ---------------------------------------------------------------------------------------------------------------
# method spec: file paths replaced by the factors they hold, so the output folder is self-contained


def method_parts(method: str) -> list[list]:
    """[[name, options], ...] of a method spec, the LongRoPE factor files read in (lists), checked by the registry."""

    try:
        parts = parse_method_spec(method)
        check_combination([name for name, _ in parts])
    except ValueError as err:
        raise UserError(str(err)) from None
    out = []
    for name, options in parts:
        if is_scorer(name):
            raise UserError(f"{name!r} is a scoring strategy, not a patch; fine-tuning needs a RoPE method "
                            "(e.g. longrope:long_factors=FILE, linear:factor=8, yarn:factor=8)")
        options = dict(options)
        for key, regime in (("long_factors", "long"), ("short_factors", "short")):
            if isinstance(options.get(key), str):
                source = options[key]
                values = read_factors_file(source, regime)
                if values is None:
                    raise UserError(f"{name} {key}={source}: the file holds no {regime} factors")
                options[key] = list(values)
                options.setdefault("source", source)
        try:
            get_method(name).make_config(**options)
        except ValueError as err:
            raise UserError(str(err)) from None
        out.append([name, options])
    if not any(get_method(name).role == "rope" for name, _ in out):
        raise UserError(f"method {method!r} has no RoPE method; fine-tuning at the target length needs one "
                        "(longrope, linear, yarn, ntk, ...)")
    return out


def _as_patch_arg(parts: list[list]) -> list[tuple[str, dict]]:
    return [(name, dict(options)) for name, options in parts]


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class TrainingWindows:
    """Token streams of the training documents; `window(step, index)` draws a window of `length` tokens from an
    RNG seeded from (seed, step, index), so the data of a step never depends on what ran before it."""

    names: list[str]
    tokens: list[torch.Tensor]  # (n_i,) int32 per document
    length: int
    seed: int

    def __post_init__(self) -> None:
        self._weights = [len(t) - self.length + 1 for t in self.tokens]

    def window(self, step: int, index: int = 0) -> torch.Tensor:
        rng = random.Random(f"lengthwise-finetune:{self.seed}:{step}:{index}")
        doc = rng.choices(range(len(self.tokens)), weights=self._weights)[0]
        start = rng.randrange(self._weights[doc])
        return self.tokens[doc][start : start + self.length].long()

    def digest(self) -> str:
        h = hashlib.sha1()
        for name, t in zip(self.names, self.tokens):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def training_windows(documents: Sequence, tokenizer, length: int, max_docs: int | None, seed: int) -> TrainingWindows:
    """Tokenize whole documents (no special tokens); keep those with at least `length` tokens (at most `max_docs`)."""
    names, tokens, skipped = [], [], 0
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            skipped += 1
            continue
        names.append(doc.name)
        tokens.append(torch.tensor(ids, dtype=torch.int32))
        if max_docs is not None and len(names) >= max_docs:
            break
    if not names:
        raise UserError(f"no training document has {length} tokens ({skipped} shorter ones skipped); give longer "
                        "documents or a smaller target length")
    return TrainingWindows(names, tokens, length, seed)


# ---------------------------------------------------------------------------------------------------------------
# model preparation


def attach_lora(model, config: FinetuneConfig) -> None:
    """A fresh peft LoRA in place (B = 0: the logits are unchanged at first), base weights frozen."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

    if "peft_config" in model.__dict__:
        raise UserError("the model already carries a peft adapter; fine-tune a plain model (or merge the adapter)")
    try:
        names = check_targets(model, config.target_modules)
    except ValueError as err:
        raise UserError(str(err).replace("temp-lora target_modules", "fine-tuning target_modules")) from None
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none", target_modules=names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the LoRA A init is random: a run is reproducible
        inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def set_checkpointing(model, enabled: bool) -> None:
    """Activation (gradient) checkpointing on or off, non-reentrant: transformers' new names where it has them
    (`activation_checkpointing_enable`; the `gradient_checkpointing_*` ones are deprecated from 5.25)."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def check_model(model, config: FinetuneConfig) -> None:
    """Refuse, before any work, a model `config` cannot fine-tune: not RoPE, a length that does not extend its
    training length, LoRA targets that match no linear layer."""

    require_encoding(model, "fine-tuning at the target length", ("rope",))
    pretrain = model_info(model).pretrain_length
    if config.length <= pretrain:
        raise UserError(f"fine-tuning length {config.length} must exceed the training length {pretrain} (the target "
                        "length of the extension)")
    if not config.full:
        try:
            check_targets(model, config.target_modules)
        except ValueError as err:
            raise UserError(str(err).replace("temp-lora target_modules", "fine-tuning target_modules")) from None


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _head_is_plain(model) -> bool:
    """Whether logits == output_embeddings(decoder(ids).last_hidden_state) for this model (checked on 8 tokens):
    then the loss can be computed over chunks of positions without the full (T, vocab) logits in memory."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        return False
    ids = torch.arange(1, 9, device=next(model.parameters()).device)[None] % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits
            mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - any family whose body cannot be called alone: the plain path
        return False
    finally:
        model.train(was_training)
    return full.shape == mine.shape and torch.allclose(full, mine, atol=1e-5, rtol=1e-5)


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def sequence_loss(model, ids: torch.Tensor, loss_chunk: int, chunked: bool) -> torch.Tensor:
    """Mean next-token NLL over positions 1..T-1 of `ids` (T,). Chunked: the output head and the cross-entropy run
    over `loss_chunk` positions at a time under checkpointing, so the (T, vocab) logits never exist at once."""
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    ids = ids.to(next(model.parameters()).device)[None]
    targets = ids[0, 1:]
    if not (chunked and loss_chunk):
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        return F.cross_entropy(logits.float(), targets)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, len(targets), loss_chunk):
        total = total + checkpoint(_chunk_ce, hidden[a : a + loss_chunk], targets[a : a + loss_chunk], head,
                                   use_reentrant=False)
    return total / len(targets)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
    return tensors, json.loads(json.dumps(state["param_groups"]))


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_folder(final: Path, fill: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then rename it into place (replacing an older one)."""
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if final.exists():
            old = final.parent / f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_temp(folder: Path) -> None:
    for parent in (folder, folder / "checkpoints"):
        if parent.is_dir():
            for p in parent.glob(f"{TEMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    remove_temp_files(folder)


def save_checkpoint(out: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, log: list[dict],
                    fingerprint: dict) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors, groups = _optimizer_tensors(optimizer)
    folder = out / "checkpoints" / f"step-{step:06d}"

    def fill(tmp: Path) -> None:
        save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "state.json", {"version": FORMAT_VERSION, "step": step, "param_groups": groups,
                                               "log": log, "fingerprint": fingerprint})

    _write_folder(folder, fill)
    atomic_write_json(out / "checkpoint.json", {"version": FORMAT_VERSION, "step": step,
                                                "folder": f"checkpoints/{folder.name}"})
    for old in (out / "checkpoints").glob("step-*"):  # the pointer names the new one: older ones can go
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} cannot be read as JSON ({type(err).__name__}); delete it to start over") \
            from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a JSON object; delete it to start over")
    return obj


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - torn or foreign: one line
        raise UserError(f"{what} {path} cannot be read as safetensors ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:160]}); delete it to start over") from None


def load_checkpoint(out: Path, fingerprint: dict) -> dict | None:
    """The last checkpoint of this run ({step, log, trainable, optimizer, groups, rng}), None when there is none;
    a checkpoint of another run (fingerprint differs) is refused."""
    pointer = out / "checkpoint.json"
    if not pointer.exists():
        return None
    info = _read_json(pointer, "fine-tuning checkpoint pointer")
    folder = out / str(info.get("folder", ""))
    if info.get("version") != FORMAT_VERSION or not (folder / "state.json").is_file():
        raise UserError(f"fine-tuning checkpoint {pointer} names no readable checkpoint ({folder}); delete "
                        f"{out / 'checkpoints'} and {pointer} to start over")
    state = _read_json(folder / "state.json", "fine-tuning checkpoint")
    saved, wanted = state.get("fingerprint"), json.loads(json.dumps(fingerprint))
    if saved != wanted:
        diff = sorted(k for k in set(saved or {}) | set(wanted) if (saved or {}).get(k) != wanted.get(k))
        raise UserError(f"fine-tuning checkpoint {folder} belongs to another run (differs in: {', '.join(diff)}); "
                        f"use another output folder or delete {out / 'checkpoints'} to start over")
    return {
        "step": int(state["step"]),
        "log": list(state["log"]),
        "groups": state["param_groups"],
        "trainable": _load_safetensors(folder / "trainable.safetensors", "fine-tuning checkpoint"),
        "optimizer": _load_safetensors(folder / "optimizer.safetensors", "fine-tuning checkpoint"),
        "rng": _load_safetensors(folder / "rng.safetensors", "fine-tuning checkpoint")["torch_rng"],
    }


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class FinetuneResult:
    folder: Path
    method: str
    parts: list[list]
    config: FinetuneConfig
    steps: int
    log: list[dict]
    seconds: float  # training time of this process (a resumed run adds to the time before the kill)
    resumed_from: int  # 0 when started from scratch; config.steps when the folder held a finished run
    handle: Any = field(default=None, repr=False)  # the patch in force on the fine-tuned model

    @property
    def final_loss(self) -> float | None:
        return self.log[-1]["loss"] if self.log else None


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_UNSTABLE_CONFIG_KEYS = ("architectures", "_name_or_path", "transformers_version")  # set by saving, not by weights


def _fingerprint(model, model_name: str | None, parts, config: FinetuneConfig, windows: TrainingWindows) -> dict:
    cfg = config.to_json()
    cfg.pop("checkpoint_every")  # when checkpoints are taken does not change the result
    described = {k: v for k, v in model.config.to_dict().items() if k not in _UNSTABLE_CONFIG_KEYS}
    return {"model": model_name or model.config.model_type, "model_config": _digest(described),
            "method": parts, "config": cfg, "documents": windows.names, "tokens": windows.digest()}


def finetune(
    model,
    tokenizer,
    documents: Sequence,
    method: str,
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    max_docs: int | None = None,
    threads: int | None = None,
    on_step: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    wait: bool = True,
) -> FinetuneResult:
    """Fine-tune `model` in place at `config.length` tokens with the RoPE method `method` in force.

    `model_name`: how `load_finetuned` loads the base model again (a name or folder `load_model` reads); without it
    pass `base_model=` to `load_finetuned`. `documents`: the training set (whole documents; windows drawn at
    random). `threads`: torch threads. `stop_after`: stop (after checkpointing) once this many steps are done, as a
    kill would (tests, and splitting a long run). `out_dir` is locked while the run writes it; a finished folder
    with the same fingerprint is loaded instead of retrained. Returns with the model fine-tuned, patched
    (`result.handle`) and in eval mode.
    """

    parts = method_parts(method)
    check_model(model, config)
    windows = training_windows(documents, tokenizer, config.length, max_docs, config.seed)
    fingerprint = _fingerprint(model, model_name, parts, config, windows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token = locks.acquire(out, wait=wait)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _clean_temp(out)
        manifest = out / MANIFEST
        if manifest.exists():
            saved = _read_json(manifest, "fine-tuning manifest")
            if saved.get("fingerprint") != json.loads(json.dumps(fingerprint)):
                raise UserError(f"{out} holds a finished fine-tuning run with other settings; use another output "
                                "folder or delete it")
            attach_saved(model, out, saved)
            handle = patch(model, _as_patch_arg(parts))
            return FinetuneResult(out, method, parts, config, config.steps, saved["log"], 0.0, config.steps, handle)
        return _train(model, tokenizer, parts, method, config, windows, fingerprint, out, model_name, on_step,
                      stop_after)
    finally:
        torch.set_num_threads(previous_threads)
        locks.release(out, token)


def _train(model, tokenizer, parts, method, config, windows, fingerprint, out, model_name, on_step, stop_after):
    if config.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, config)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    checkpoint = load_checkpoint(out, fingerprint)
    start, log = 0, []
    if checkpoint is not None:
        missing = set(params) ^ set(checkpoint["trainable"])
        if missing:
            raise UserError(f"fine-tuning checkpoint in {out} has other trainable tensors ({sorted(missing)[:3]}); "
                            "delete its checkpoints to start over")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(checkpoint["trainable"][name])
        _load_optimizer(optimizer, checkpoint["optimizer"], checkpoint["groups"])
        torch.set_rng_state(checkpoint["rng"])
        start, log = checkpoint["step"], checkpoint["log"]
    handle = patch(model, _as_patch_arg(parts))
    chunked = _head_is_plain(model)
    if config.gradient_checkpointing:
        set_checkpointing(model, True)
    model.train()
    began = time.perf_counter()
    step = start
    try:
        while step < config.steps:
            if stop_after is not None and step >= stop_after:
                break
            t0 = time.perf_counter()
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for index in range(config.batch_size):
                loss = sequence_loss(model, windows.window(step, index), config.loss_chunk, chunked)
                (loss / config.batch_size).backward()
                total += float(loss.detach())
            norm = (torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                    if config.max_grad_norm else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "loss": total / config.batch_size, "lr": lr,
                   "grad_norm": None if norm is None else float(norm),
                   "tokens": step * config.batch_size * config.length, "seconds": round(time.perf_counter() - t0, 3)}
            log.append(row)
            if on_step:
                on_step(row)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(out, step, params, optimizer, log, fingerprint)
                _write_log(out, log)
        if step < config.steps and step % config.checkpoint_every:  # stopped between two checkpoints
            save_checkpoint(out, step, params, optimizer, log, fingerprint)
            _write_log(out, log)
    finally:
        if config.gradient_checkpointing:
            set_checkpointing(model, False)
        model.eval()
    seconds = round(time.perf_counter() - began, 2)
    if step >= config.steps:
        handle.remove()  # saved unpatched (a static plan swaps the rotary module), patched again below
        try:
            _write_outputs(model, tokenizer, parts, method, config, fingerprint, out, model_name, log)
        finally:
            handle = patch(model, _as_patch_arg(parts))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "checkpoint.json").unlink(missing_ok=True)
    return FinetuneResult(out, method, parts, config, step, log, seconds, start, handle)


def _write_log(out: Path, log: list[dict]) -> None:
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in log))


def _write_outputs(model, tokenizer, parts, method, config, fingerprint, out, model_name, log) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    if config.full:
        def fill(tmp: Path) -> None:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

        _write_folder(out / "model", fill)
    else:
        from peft.utils import get_peft_model_state_dict  # noqa: PLC0415

        def fill(tmp: Path) -> None:
            state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
            save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
                      str(tmp / "adapter_model.safetensors"))
            lora = model.peft_config[ADAPTER_NAME]
            if model_name:
                lora.base_model_name_or_path = model_name
            lora.save_pretrained(str(tmp))

        _write_folder(out / "adapter", fill)
    files = {"adapter": "model" if config.full else "adapter"}
    longrope = [options for name, options in parts if name == "longrope"]
    if longrope:

        opts = longrope[0]
        extra = {k: v for k, v in opts.items() if k not in ("long_factors", "short_factors") and v is not None}
        if opts.get("long_factors") is not None:
            save_factors(out / "factors.json", opts["long_factors"], opts.get("short_factors"), **extra,
                         note="factors the model was fine-tuned with (lengthwise longrope finetune)")
            files["factors"] = "factors.json"
    _write_log(out, log)
    atomic_write_json(out / MANIFEST, {
        "version": FORMAT_VERSION,
        "base_model": model_name,
        "method": method,
        "method_parts": parts,
        "adapter": "full" if config.full else "lora",
        "config": config.to_json(),
        "steps": config.steps,
        "tokens": config.steps * config.batch_size * config.length,
        "final_loss": log[-1]["loss"] if log else None,
        "log": log,
        "files": files,
        "fingerprint": fingerprint,
        "documents": fingerprint["documents"],
    })


# ---------------------------------------------------------------------------------------------------------------
# loading


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        what = "an unfinished run (resume it with the same command)" if (folder / "checkpoint.json").exists() else \
            "no fine-tuning output"
        raise UserError(f"{folder} holds {what}: no {MANIFEST}")
    obj = _read_json(manifest, "fine-tuning manifest")
    if obj.get("version") != FORMAT_VERSION:
        raise UserError(f"fine-tuning manifest {manifest} has version {obj.get('version')!r}; this lengthwise reads "
                        f"{FORMAT_VERSION}")
    return obj


def attach_saved(model, folder: str | Path, manifest: dict | None = None) -> None:
    """Put the saved fine-tuned weights into `model` (the base model): the LoRA adapter, or every weight."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest["adapter"] == "full":
        state = {}
        for path in sorted((folder / "model").glob("*.safetensors")):
            state.update(_load_safetensors(path, "fine-tuned weights"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise UserError(f"fine-tuned weights in {folder / 'model'} do not fit this model "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        return
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415
    from peft.utils import set_peft_model_state_dict  # noqa: PLC0415

    if "peft_config" in model.__dict__:
        raise UserError("the model already carries a peft adapter; load the fine-tuned adapter into a plain model")
    adapter = folder / "adapter"
    try:
        lora = LoraConfig.from_pretrained(str(adapter))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"LoRA adapter config in {adapter} cannot be read ({type(err).__name__}); the run did not "
                        "finish or the folder was changed") from None
    inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)
    state = _load_safetensors(adapter / "adapter_model.safetensors", "LoRA adapter")
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"LoRA adapter in {adapter} does not fit this model (unexpected {unexpected[:3]})")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


def load_finetuned(folder: str | Path, base_model: str | None = None, *, dtype: Any = None,
                   device: str | None = "cpu", patch_method: bool = True):
    """(model, tokenizer, handle) from a `finetune` output folder: the base model (`base_model`, default the one the
    manifest names) with the saved LoRA adapter, or the fully fine-tuned weights, patched with the method it was
    fine-tuned with (`handle.remove()` takes the patch off; the adapter stays). `patch_method` False: no patch
    (handle None), e.g. to patch with other factors (the progressive search, the short readjustment)."""

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["adapter"] == "full" and base_model is None:
        model, tokenizer = load_model(str(folder / "model"), dtype=dtype, device=device)
    else:
        base = base_model or manifest.get("base_model")
        if not base:
            raise UserError(f"{folder} does not name its base model (fine-tuned from a model object); pass "
                            "base_model= (a name or folder load_model reads)")
        model, tokenizer = load_model(base, dtype=dtype, device=device)
        attach_saved(model, folder, manifest)
    handle = patch(model, _as_patch_arg(manifest["method_parts"])) if patch_method else None
    return model, tokenizer, handle
