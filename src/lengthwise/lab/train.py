"""Train one lab model: same size, data, steps and seed for every encoding; progress, checkpoints, resume.

Data: a token stream from the stdlib training files and/or PG19 train (capped in characters so that tokenizing
stays cheap), cached once under the runs folder and shared by every encoding; batches are random windows of
`context` tokens drawn by a generator seeded with `seed`, so every encoding sees the very same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lengthwise.data.corpus import load_corpus
from lengthwise.errors import UserError
from lengthwise.io import atomic_torch_save, atomic_write_json, load_torch_file, remove_temp_files
from lengthwise.lab.encodings import encoding_config
from lengthwise.lab.model import LAB_MARKER, LabConfig, LabModel, save_lab_model

DATA_CHOICES = ("stdlib", "pg19", "mix")


@dataclass(frozen=True)
class TrainConfig:
    pe: str = "rope"
    pe_options: dict = dataclasses.field(default_factory=dict)
    data: str = "stdlib"  # stdlib | pg19 | mix
    context: int = 128
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 384
    steps: int = 500
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    max_chars: int = 4_000_000  # per source
    checkpoint_every: int = 50
    threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        encoding_config(self.pe, self.pe_options)
        if self.data not in DATA_CHOICES:
            raise UserError(f"data must be one of {', '.join(DATA_CHOICES)}, got {self.data!r}")
        for name in ("context", "d_model", "layers", "heads", "ffn", "steps", "batch", "max_chars",
                     "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"train {name} must be a positive integer, got {value!r}")
        if self.context < 8:
            raise UserError(f"train context must be >= 8 tokens, got {self.context}")
        if not self.lr > 0:
            raise UserError(f"train lr must be > 0, got {self.lr!r}")


def default_tokenizer():
    """The reference models' byte-level BPE tokenizer (vocab 2048), saved with every lab model."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    folder = Path(__file__).resolve().parents[1] / "reference_models" / "llama-rope-256"
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"the reference tokenizer is missing from {folder}")
    return AutoTokenizer.from_pretrained(folder)


def token_stream(data: str, tokenizer, max_chars: int, cache_dir: Path) -> torch.Tensor:
    """(N,) int32 tokens of the training text (documents joined by EOS), cached by (data, max_chars, vocab)."""

    tag = hashlib.sha1(f"{data}|{max_chars}|{len(tokenizer)}".encode()).hexdigest()[:10]
    cache = cache_dir / f"tokens-{data}-{tag}.pt"
    if cache.exists():
        return load_torch_file(cache, "token cache", "delete it to tokenize again")
    sources = {"stdlib": ["stdlib-train"], "pg19": ["pg19-train"], "mix": ["stdlib-train", "pg19-train"]}[data]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for spec in sources:
        budget = max_chars
        for doc in load_corpus(spec):
            text = doc.text[:budget]
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
            budget -= len(text)
            if budget <= 0:
                break
    stream = torch.tensor(ids, dtype=torch.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(stream, cache)
    return stream


def batch_at(stream: torch.Tensor, step: int, batch: int, context: int, seed: int) -> torch.Tensor:
    """(batch, context) windows for `step`: a pure function of (seed, step), hence identical across encodings
    and across a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - context, (batch,), generator=g)
    return torch.stack([stream[s : s + context] for s in starts.tolist()]).long()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


LOCK = "training.lock"
LOCK_WRITE_SECONDS = 10.0  # a lock still without its pid after this long lost its writer between create and write


def _lock_owner(path: Path) -> int | None:
    """The pid of the live process (not this one) holding the lock at `path`; None when the lock is stale."""
    import os  # noqa: PLC0415

    try:
        text = path.read_text().strip()
        if not text:  # created, pid not written yet: its writer is starting now, or was killed in between
            fresh = time.time() - path.stat().st_mtime < LOCK_WRITE_SECONDS
            return -1 if fresh else None
        pid = int(text)
        if pid <= 0:  # os.kill(0, ...) would signal this process's own group and always succeed
            return None
        os.kill(pid, 0)  # raises when that process is gone
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return None
    except PermissionError:  # alive, owned by another user
        return pid
    return None if pid == os.getpid() else pid


def _lock(out: Path) -> int | None:
    """Take `out/training.lock` for this process; returns the pid of another live process holding it (-1: one that
    is just starting), else None. A lock left by a killed process is taken over.

    Lets several `lab train` processes share one list of encodings: each skips the folders another is training."""
    import os  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None:
                return owner
            path.unlink(missing_ok=True)  # stale lock of a dead process (or of this one)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return None
    return None


def train(cfg: TrainConfig, out: str | Path, tokenizer=None, cache_dir: str | Path | None = None,
          progress: bool = True, log=print) -> Path:
    """Train (or resume) into `out`; returns the saved model folder. A finished folder is returned untouched, and
    a folder that another live process is training is skipped (returned as is)."""
    out = Path(out)
    if _finished(out):
        log(f"{out} is already trained; skipping")
        return out
    owner = _lock(out)
    if owner is not None:
        who = "a process that is starting" if owner < 0 else f"process {owner}"
        log(f"{out} is being trained by {who}; skipping")
        return out
    try:
        if _finished(out):  # finished by another process between the check above and the lock
            log(f"{out} is already trained; skipping")
            return out
        remove_temp_files(out)  # what a killed run was writing when it died; its last complete files stay
        return _train(cfg, out, tokenizer, cache_dir, progress, log)
    finally:
        (out / LOCK).unlink(missing_ok=True)


def _finished(out: Path) -> bool:
    """training.json is written last: with it the model is complete. A checkpoint still beside it is the killed
    run's (killed after training.json, before the checkpoint's removal): stale, so it goes."""
    if not ((out / LAB_MARKER).exists() and (out / "training.json").exists()):
        return False
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return True


def _train(cfg: TrainConfig, out: Path, tokenizer, cache_dir, progress: bool, log) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = tokenizer or default_tokenizer()
    stream = token_stream(cfg.data, tokenizer, cfg.max_chars, Path(cache_dir or out.parent / "_data"))
    torch.manual_seed(cfg.seed)
    model = LabModel(LabConfig(pe=cfg.pe, pe_options=dict(cfg.pe_options), vocab_size=len(tokenizer),
                               d_model=cfg.d_model, num_hidden_layers=cfg.layers, heads=cfg.heads, ffn=cfg.ffn,
                               max_position_embeddings=cfg.context))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ckpt_path = out / "checkpoint.pt"
    start, losses, seconds = 0, [], 0.0
    out.mkdir(parents=True, exist_ok=True)
    if ckpt_path.exists():
        # weights only: the config as a dict, tensors, the optimizer's state dict, the RNG state (a uint8 tensor),
        # numbers and lists
        ckpt = load_torch_file(ckpt_path, "checkpoint", "delete it to train from the start")
        if not isinstance(ckpt, dict) or ckpt.get("config") != dataclasses.asdict(cfg):
            raise UserError(f"{ckpt_path} was written with another config; remove it or use the same options")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, losses, seconds = ckpt["step"], ckpt["losses"], ckpt["seconds"]
        log(f"resuming {cfg.pe} at step {start}/{cfg.steps}")
    model.train()
    t0 = time.time()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids = batch_at(stream, step, cfg.batch, cfg.context, cfg.seed)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        done = step + 1
        if progress and (done % 10 == 0 or done == cfg.steps):
            elapsed = seconds + time.time() - t0
            log(f"[{cfg.pe}] step {done}/{cfg.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"lr {lr_at(step, cfg):.2e} {elapsed:.0f}s")
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            atomic_torch_save({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": done,
                               "losses": losses, "seconds": seconds + time.time() - t0}, ckpt_path)
    seconds += time.time() - t0
    model.eval()
    save_lab_model(model, tokenizer, out, extra={"train": dataclasses.asdict(cfg)})
    params = sum(p.numel() for p in model.parameters())
    atomic_write_json(out / "training.json", {"config": dataclasses.asdict(cfg), "parameters": params,
                                              "train_seconds": round(seconds, 1),
                                              "train_loss_last": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
                                              "losses": losses})
    if ckpt_path.exists():
        ckpt_path.unlink()
    log(f"[{cfg.pe}] saved {out} ({params} parameters, {seconds:.0f}s)")
    return out


def train_config_from_json(path: str | Path) -> TrainConfig:
    return TrainConfig(**json.loads(Path(path).read_text())["config"])
