"""Train the tiny reference models shipped with lengthwise (DESIGN.md, "Reference models").

A byte-level BPE tokenizer (2048 tokens, digits split one per token so passkeys copy cleanly) is trained on the
stdlib train split and the PG19 train books; then a model of a given architecture is trained at a short context
on a mix of stdlib code, PG19 prose and synthetic passkey documents. Everything is seeded; the run checkpoints
every `checkpoint_every` steps and resumes from its folder.

    python -m lengthwise.training.reference --arch llama --out src/lengthwise/reference_models/llama-rope-256
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lengthwise.data.corpus import load_corpus
from lengthwise.data.passkey import make_passkey_prompt, random_key
from lengthwise.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_torch_file
from lengthwise.errors import UserError


@dataclass
class TrainConfig:
    arch: str = "llama"  # llama (RoPE) | bloom (ALiBi)
    context: int = 256
    vocab_size: int = 2048
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    steps: int = 1000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.05
    passkey_fraction: float = 0.25
    prose_fraction: float = 0.4  # of the non-passkey rows; the rest is stdlib code
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 100
    max_corpus_chars: int = 12_000_000  # per source, to bound tokenization time
    init_from: str = ""  # continue from a saved reference model (its weights and tokenizer), e.g. a second phase


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_model(cfg: TrainConfig):
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden,
            intermediate_size=3 * cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.context,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config)
    if cfg.arch == "bloom":
        config = BloomConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        # lengthwise convention: max_position_embeddings is the training length (methods read L_pretrain there).
        config.max_position_embeddings = cfg.context
        return BloomForCausalLM(config)
    raise UserError(f"unknown arch {cfg.arch!r}; accepted: 'llama', 'bloom'")


class BatchSampler:
    """Seeded rows of context+1 tokens: stdlib windows, PG19 windows, passkey documents."""

    def __init__(self, tokenizer, code_ids: torch.Tensor, prose_ids: torch.Tensor, cfg: TrainConfig):
        self.tokenizer, self.code, self.prose, self.cfg = tokenizer, code_ids, prose_ids, cfg

    def _window(self, rng: random.Random, pool: torch.Tensor, length: int) -> list[int]:
        start = rng.randrange(0, len(pool) - length)
        return pool[start : start + length].tolist()

    def _passkey_row(self, rng: random.Random) -> list[int]:
        n = self.cfg.context + 1
        length = rng.randint(64, n - 6)
        prompt = make_passkey_prompt(self.tokenizer, length, rng.random(), random_key(rng))
        row = prompt.input_ids + prompt.answer_ids + [self.tokenizer.eos_token_id]
        return (row + self._window(rng, self.prose, n))[:n]

    def batch(self, step: int) -> torch.Tensor:
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        rows = []
        for _ in range(self.cfg.batch):
            if rng.random() < self.cfg.passkey_fraction:
                rows.append(self._passkey_row(rng))
            else:
                pool = self.prose if rng.random() < self.cfg.prose_fraction else self.code
                rows.append(self._window(rng, pool, self.cfg.context + 1))
        return torch.tensor(rows)  # (batch, context+1)


def _pool(tokenizer, docs, max_chars: int) -> torch.Tensor:
    texts, total = [], 0
    for doc in docs:
        texts.append(doc.text)
        total += len(doc.text)
        if total >= max_chars:
            break
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = [t for ids in encoded for t in ids + [tokenizer.eos_token_id]]
    return torch.tensor(flat, dtype=torch.int32)


@torch.no_grad()
def heldout_loss(model, pool: torch.Tensor, context: int, windows: int = 48, seed: int = 1234) -> float:
    rng = random.Random(seed)
    losses = []
    for _ in range(windows):
        start = rng.randrange(0, len(pool) - context - 1)
        ids = pool[start : start + context].long()[None]
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, trials: int = 50, seed: int = 99) -> float:
    rng = random.Random(seed)
    hits = 0
    for i in range(trials):
        prompt = make_passkey_prompt(tokenizer, length, i / max(1, trials - 1), random_key(rng))
        ids = torch.tensor([prompt.input_ids])
        out = model.generate(ids, max_new_tokens=len(prompt.answer_ids), do_sample=False, pad_token_id=0)
        hits += out[0, len(prompt.input_ids) :].tolist() == prompt.answer_ids
    return hits / trials


def load_resume_state(path: Path) -> dict:
    """The training state a killed run left (model and optimizer state dicts, step), read weights only: a file
    holding anything else is refused in one line (ValueError), never unpickled."""
    state = load_torch_file(path, "training state", f"delete {path} to train from the start")
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise UserError(f"training state {path} is not a reference-training state (model, optimizer, step); "
                         f"delete {path} to train from the start")
    return state


def train(cfg: TrainConfig, out: Path, work: Path | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    work = work or out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    code_docs, prose_docs = load_corpus("stdlib-train"), load_corpus("pg19-train")
    tok_dir = Path(cfg.init_from) if cfg.init_from else work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        sample = [d.text for d in code_docs[::3]] + [d.text[:400_000] for d in prose_docs]
        tokenizer = train_tokenizer(sample, cfg.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    code_pool = _pool(tokenizer, code_docs, cfg.max_corpus_chars)
    prose_pool = _pool(tokenizer, prose_docs, cfg.max_corpus_chars)
    sampler = BatchSampler(tokenizer, code_pool, prose_pool, cfg)

    model = build_model(cfg)
    previous_phases = []
    if cfg.init_from:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32).state_dict())
        previous = json.loads((Path(cfg.init_from) / "training.json").read_text())
        previous_phases = previous.get("phases", []) + [{"config": previous["config"], "metrics": previous["metrics"]}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    state_path, log_path = work / "state.pt", work / "log.jsonl"
    start_step = 0
    if state_path.exists():
        state = load_resume_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        print(f"resuming at step {start_step}")

    model.train()
    t0 = time.time()
    for step in range(start_step, cfg.steps):
        rows = sampler.batch(step).long()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)}) + "\n")
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, state_path)

    model.eval()
    heldout_code = _pool(tokenizer, load_corpus("stdlib"), 3_000_000)
    heldout_prose = _pool(tokenizer, load_corpus("pg19-dev"), 3_000_000)
    metrics = {
        "train_loss_last": round(loss.item(), 4),
        "heldout_loss_stdlib": round(heldout_loss(model, heldout_code, cfg.context), 4),
        "heldout_loss_pg19_dev": round(heldout_loss(model, heldout_prose, cfg.context), 4),
        "passkey_accuracy_at_context": passkey_accuracy(model, tokenizer, cfg.context),
        "train_seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_reference(model, tokenizer, cfg, metrics, out, previous_phases)
    return metrics


def save_reference(model, tokenizer, cfg: TrainConfig, metrics: dict, out: Path, previous_phases=()) -> None:
    """Save weights in float16 (half the size; loaded back as float32), tokenizer, metrics and a model card."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    phases = list(previous_phases)
    atomic_write_json(out / "training.json", {"config": asdict(cfg), "metrics": metrics, "phases": phases})
    atomic_write_text(out / "README.md", model_card(cfg, metrics, out.name, phases))


def model_card(cfg: TrainConfig, metrics: dict, name: str, phases=()) -> str:
    pe = "RoPE (theta 10000)" if cfg.arch == "llama" else "ALiBi"
    return f"""# {name}

A tiny {cfg.arch.capitalize()}-architecture causal LM with {pe}, trained by lengthwise's own script for tests and
benchmarks of long-context methods. Not a useful language model: a measuring instrument.

- Parameters: {metrics['parameters']:,} ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads), tied embeddings
- Tokenizer: byte-level BPE, {cfg.vocab_size} tokens, digits one per token; trained on the same data
- Training length (`max_position_embeddings`): {cfg.context} tokens
- Data: Python standard library (train split by file-name hash, `lengthwise.data.corpus`), PG19 train books
  (read from `../shared/data/pg19/train` at training time), and {cfg.passkey_fraction:.0%} synthetic passkey documents
  (`lengthwise.data.passkey`) so that retrieval can be measured
{_phase_lines(cfg, phases, metrics)}
- Stored in float16; `lengthwise.load_model` loads it as float32

| metric | value |
|---|---|
| last train loss (nats/token) | {metrics['train_loss_last']} |
| held-out loss, stdlib held-out split, {cfg.context}-token windows | {metrics['heldout_loss_stdlib']} |
| held-out loss, PG19 dev, {cfg.context}-token windows | {metrics['heldout_loss_pg19_dev']} |
| passkey accuracy at {cfg.context} tokens (50 trials, depths 0..100%) | {metrics['passkey_accuracy_at_context']:.0%} |
| training wall time | {metrics['train_seconds']:.0f} s on 2 CPU cores |

Reproduce: {_reproduce(cfg, phases, name)}
"""


def _phase_line(number: int, cfg: dict, metrics: dict) -> str:
    return (f"- Phase {number}: {cfg['steps']} steps x batch {cfg['batch']} x {cfg['context']} tokens, "
            f"{cfg['passkey_fraction']:.0%} passkey documents, AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine to "
            f"10%), seed {cfg['seed']}; after it: passkey {metrics['passkey_accuracy_at_context']:.0%}, "
            f"held-out stdlib loss {metrics['heldout_loss_stdlib']}")


def _phase_lines(cfg: TrainConfig, phases, metrics: dict) -> str:
    every = [*phases, {"config": asdict(cfg), "metrics": metrics}]
    return "\n".join(_phase_line(i + 1, p["config"], p["metrics"]) for i, p in enumerate(every))


def _reproduce(cfg: TrainConfig, phases, name: str) -> str:
    commands = []
    for phase in [p["config"] for p in phases] + [asdict(cfg)]:
        flags = f"--arch {phase['arch']} --steps {phase['steps']} --passkey-fraction {phase['passkey_fraction']} " \
                f"--lr {phase['lr']} --warmup {phase['warmup']} --seed {phase['seed']}"
        if phase.get("init_from"):
            flags += f" --init-from {name}"
        commands.append(f"`python -m lengthwise.training.reference {flags} --out {name}`")
    return " then ".join(commands)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    for field, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    cfg = TrainConfig(**args)
    try:
        metrics = train(cfg, out)
    except ValueError as err:  # bad input (a foreign or unsafe training state): one line, exit code 2
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
