"""The lab's reference transformer and its on-disk format.

Pre-norm causal decoder (RMSNorm, SwiGLU MLP, tied embeddings); the attention calls the pluggable position
encoding (see `encodings.base`).  Inference-time options (`InferenceOptions`) change only the attention:
- `logn`: scale each query's logits by max(1, log(n) / log(L_train)), n = its position + 1 (Su's log-n scaling,
  survey sec. "Attention Scale");
- `local_window` (+ `logn_last`): Su's hybrid, local attention over the last `local_window` keys in every layer but
  the last, and a global last layer with log-n scaling (survey sec. "全局依赖");
- `blockwise` (+ `block`): XPOS's blockwise causal attention (Sun et al. 2023): the sequence is cut into blocks
  and each query sees its own block and the previous one; with the default block of half the training length no
  query-key distance exceeds the training length.

On disk a lab model is a folder with `lengthwise_lab.json` (config), `model.pt` (state dict) and the tokenizer;
`lengthwise.load_model(folder)` dispatches here.  One format serves every encoding (RoPE/ALiBi would fit
Llama/Bloom only with their exact block layout), so all lab models load and evaluate the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from lengthwise.api import LAB_MARKER, register_folder_loader
from lengthwise.io import atomic_torch_save, atomic_write_json, load_torch_file
from lengthwise.lab.encodings import build_encoding, encoding_config
from lengthwise.rope.scaling import logn_scale
from lengthwise.errors import UserError

MODEL_TYPE = "lengthwise-lab"


@dataclass(frozen=True)
class InferenceOptions:
    logn: bool = False
    local_window: int | None = None  # keys per query in every layer but the last
    logn_last: bool = True  # with local_window: log-n scale the (global) last layer
    blockwise: bool = False
    block: int | None = None  # blockwise block size; default: half the training length

    def __post_init__(self) -> None:
        for name in ("local_window", "block"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"{name} must be a positive integer or None, got {value!r}")
        if self.block is not None and not self.blockwise:
            raise UserError("block is the blockwise block size; set blockwise=True with it")
        if self.blockwise and self.local_window:
            raise UserError("blockwise and local_window are two different masks; choose one")


@dataclass
class LabConfig:
    pe: str = "rope"
    pe_options: dict = field(default_factory=dict)
    vocab_size: int = 2048
    d_model: int = 128
    num_hidden_layers: int = 2
    heads: int = 4
    ffn: int = 384
    max_position_embeddings: int = 64  # the training length
    model_type: str = MODEL_TYPE
    inference: InferenceOptions = field(default_factory=InferenceOptions)

    def __post_init__(self) -> None:
        encoding_config(self.pe, self.pe_options)  # raises on an unknown encoding or option
        if isinstance(self.inference, dict):
            self.inference = InferenceOptions(**self.inference)
        for name in ("vocab_size", "d_model", "num_hidden_layers", "heads", "ffn", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"lab config {name} must be a positive integer, got {value!r}")
        if self.d_model % self.heads:
            raise UserError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None,
                   block: int | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where attention is allowed: causal, and optionally a local window or XPOS blocks.

    Masks use the token index (not the encoding's position id, which may be randomized)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    if block is not None:
        allowed &= k_pos[None, :] >= (q_pos[:, None] // block - 1).clamp(min=0) * block
    return allowed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, config: LabConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, pe, positions, mask, scale):
        # x: (B, T, d); positions: (T,) encoding positions; mask: (T, T) bool; scale: (T,) query factor or None
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        q, k = pe.rotate(q, positions, True), pe.rotate(k, positions, False)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if scale is not None:
            logits = logits * scale[:, None]  # per query row (log-n scaling multiplies q, i.e. the row)
        bias = pe.bias(positions, positions)
        if bias is not None:
            logits = logits + bias[None]
        logits = logits.masked_fill(~mask, float("-inf"))
        y = torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, config: LabConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(config.d_model), RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn, bias=False)
        self.down = nn.Linear(config.ffn, config.d_model, bias=False)

    def forward(self, x, pe, positions, mask, scale):
        x = x + self.attn(self.norm1(x), pe, positions, mask, scale)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LabModel(nn.Module):
    """Causal LM; `model(input_ids=..., labels=None)` -> object with `.logits` (B, T, V) and `.loss`."""

    def __init__(self, config: LabConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pe = build_encoding(config.pe, config.pe_options, config.heads, config.head_dim, config.d_model,
                                 config.max_position_embeddings)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.startswith("embed") and not name.startswith("pe."):
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * config.num_hidden_layers) if "out" in name or
                                               "down" in name else 1.0))

    def set_inference(self, **options) -> None:
        """Replace the inference options (validated)."""
        self.config.inference = InferenceOptions(**options)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, use_cache: bool = False,
                logits_to_keep: int = 0, **unused):
        if unused.get("past_key_values") is not None:
            raise UserError("lab models keep no KV cache; score documents in one pass (no --chunk-size)")
        b, t = input_ids.shape
        device = input_ids.device
        opts, train_length = self.config.inference, self.config.max_position_embeddings
        index = torch.arange(t, device=device)  # token index: masks and log-n use it
        positions = self.pe.positions(t, self.training, device)  # encoding positions
        x = self.embed(input_ids)  # (B, T, d)
        absolute = self.pe.embed(positions)
        if absolute is not None:
            x = x + absolute.to(x.dtype)[None]
        block_size = (opts.block or max(1, train_length // 2)) if opts.blockwise else None
        full = attention_mask(index, index, block=block_size)
        local = attention_mask(index, index, window=opts.local_window) if opts.local_window else full
        logn = logn_scale(index, train_length)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            mask = full if last else local
            scale = logn if (opts.logn or (opts.local_window and last and opts.logn_last)) else None
            x = block(x, self.pe, positions, mask, scale)
        logits = self.norm(x) @ self.embed.weight.T  # tied output (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        if logits_to_keep:  # as in transformers: only the last `logits_to_keep` positions (the passkey task asks)
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, loss=loss)


def save_lab_model(model: LabModel, tokenizer, path: str | Path, extra: dict | None = None) -> Path:
    """Write config, weights and tokenizer; the marker file is written last so a half-written folder never loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / "model.pt")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    config = model.config.to_dict()
    config["inference"] = dataclasses.asdict(InferenceOptions())  # saved models are plain; options are per run
    atomic_write_json(path / LAB_MARKER, {"config": config, **(extra or {})})
    return path


def load_lab_model(path: str | Path, device: str | None = None, **inference):
    """(model, tokenizer) from a lab folder; `inference` = InferenceOptions fields for this run."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    path = Path(path)
    marker = path / LAB_MARKER
    if not marker.exists():
        raise FileNotFoundError(f"{path} is not a lab model folder (no {LAB_MARKER})")
    config = LabConfig(**json.loads(marker.read_text())["config"])
    config.inference = InferenceOptions(**inference)
    model = LabModel(config)
    model.load_state_dict(load_torch_file(path / "model.pt", "lab model weights", "train the model again"))
    model.eval()
    if device:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


register_folder_loader(LAB_MARKER, load_lab_model)
