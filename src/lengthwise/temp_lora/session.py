"""A Temp-LoRA session: read a long text chunk by chunk, training a temporary LoRA on it, then generate.

Per chunk (the order the evaluation protocol needs): 1. score the chunk's tokens with the current LoRA through the
window's KV cache; 2. train the LoRA on the same tokens (loss on them only; the earlier window, up to
`window - n` tokens, is context with labels -100). One AdamW optimizer lives for the whole session.

KV cache (the paper's cache reuse): the cache holds the window's context. When a chunk would overflow the window,
only the last `keep` tokens are kept and re-encoded under the current LoRA. With `reuse_cache=True` states computed
under older LoRA weights stay in the cache until that overflow; with `reuse_cache=False` the cached tokens are
re-encoded after every LoRA update. Positions inside the window restart at 0 at every re-encode, so the model
never sees a position >= `window`.

When the session ends (context manager exit or `close()`), the LoRA is removed: the base model's weights are
bit-identical to before and no LoRA module remains. An optional long-context method (`method="yarn:factor=4"`)
is applied to the base model for the window itself and removed too.

Half precision: on a bfloat16 or float16 base the LoRA weights, their gradients and AdamW's state are float32
(`adapter._as_float32` says why); the base weights stay as they are and are never written.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lengthwise.api import patch
from lengthwise.errors import UserError
from lengthwise.models.compat import cache_kwargs
from lengthwise.temp_lora.adapter import attach_lora, check_targets, save_adapter
from lengthwise.temp_lora.config import TempLoraConfig
from lengthwise.temp_lora.cost import CostMeter, causal_pairs, model_cost


class TempLoraSession:
    """`with TempLoraSession(model, TempLoraConfig(...)) as s: nll = s.process(ids); new = s.generate(100)`."""

    def __init__(self, model, config: TempLoraConfig | None = None, method: str | None = None) -> None:
        self.model = model
        self.config = config or TempLoraConfig()
        check_targets(model, self.config.target_modules)  # clear error before any change to the model
        self.device = next(model.parameters()).device
        self._was_training = model.training
        self._handle = None
        self._undo = None
        self.closed = False
        try:
            if method:

                self._handle = patch(model, method)
            self._undo, self.params = attach_lora(model, self.config)
        except BaseException:
            self._close_patches()
            raise
        model.eval()  # no dropout: scoring and training see the same function
        # the LoRA weights are float32 on a half-precision base (adapter._as_float32), so this state is float32 too
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.losses: list[float] = []  # every optimizer step's loss, in order: a diverging session shows here
        self.cost = model_cost(model)
        self.meter = CostMeter()
        self.ids: list[int] = []  # every token read or generated so far
        self._fed = 0  # tokens of `ids` already fed through the model (the cache covers ids[_cache_start:_fed])
        self._cache = None
        self._cache_start = 0
        self._stale = False  # cache computed under older LoRA weights than the current ones

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> TempLoraSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_patches(self) -> None:
        if self._undo is not None:
            self._undo.remove()
            self._undo = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def close(self) -> None:
        """Discard the LoRA (and the long-context patch): the base model is exactly as before the session."""
        if self.closed:
            return
        self.optimizer.zero_grad(set_to_none=True)
        self._cache = None
        self._close_patches()
        self.model.train(self._was_training)
        self.closed = True

    def save_adapter(self, path: str | Path) -> Path:
        """Save the current LoRA in peft's format (before the session ends)."""
        self._check_open()
        return save_adapter(self.model, path)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Temp-LoRA session has ended (its LoRA was discarded); start a new one")

    # ---- the window's KV cache ---------------------------------------------------------------------------
    def _new_cache(self):
        if self._handle is not None:
            cache = self._handle.new_cache()
            if cache is not None:
                return cache
        from transformers import DynamicCache  # noqa: PLC0415

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def _reencode(self, start: int) -> None:
        """Rebuild the cache over ids[start:_fed] under the current weights."""
        self._cache, self._cache_start, self._stale = self._new_cache(), start, False
        n = self._fed - start
        if n == 0:
            return
        with self.meter.timed("reencode"):
            ids = torch.tensor([self.ids[start : self._fed]], device=self.device)
            self.model(input_ids=ids, **cache_kwargs(self.model, self._cache), use_cache=True, logits_to_keep=1)
        self.meter.reencode_tokens += n
        self.meter.reencode_pairs += causal_pairs(n, 0)
        self.meter.reencodes += 1

    @torch.no_grad()
    def _feed(self, count: int) -> torch.Tensor:
        """Feed ids[_fed:_fed+count] through the window; returns their logits (count, V) (float32)."""
        cached = self._fed - self._cache_start
        if self._cache is None or cached + count > self.config.window:
            self._reencode(max(self._cache_start, self._fed - self.config.context_keep))
        elif self._stale:
            self._reencode(self._cache_start)
        cached = self._fed - self._cache_start
        with self.meter.timed("score"):
            ids = torch.tensor([self.ids[self._fed : self._fed + count]], device=self.device)
            logits = self.model(input_ids=ids, **cache_kwargs(self.model, self._cache), use_cache=True).logits[0].float()
        self.meter.score_tokens += count
        self.meter.score_pairs += causal_pairs(count, cached)
        self._fed += count
        return logits

    # ---- training ------------------------------------------------------------------------------------------
    def _train(self, end: int, n: int) -> list[float]:
        """Train on targets ids[end-n:end], the earlier window as context; returns the loss of each step."""
        if not self.config.trains or n == 0:
            return []
        start = max(0, end - self.config.window)
        ids = torch.tensor([self.ids[start:end]], device=self.device)  # (1, <= window)
        labels = ids.clone()
        labels[:, : end - n - start] = -100  # context: no loss (HF shifts labels: labels[i] is predicted at i-1)
        losses = []
        with self.meter.timed("train"):
            for _ in range(self.config.steps_per_chunk):
                self.optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = self.model(input_ids=ids, labels=labels, use_cache=False).loss
                    loss.backward()
                if self.config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
                self.optimizer.step()
                losses.append(loss.item())
        self.losses += losses
        self.meter.train_tokens += ids.shape[1] * self.config.steps_per_chunk
        self.meter.train_pairs += causal_pairs(ids.shape[1], 0) * self.config.steps_per_chunk
        self.meter.train_steps += self.config.steps_per_chunk
        self._stale = self._stale or not self.config.reuse_cache
        return losses

    # ---- public API ----------------------------------------------------------------------------------------
    def process(self, input_ids) -> torch.Tensor:
        """Read `input_ids` ((N,) or (1, N)) chunk by chunk: score each chunk, then train on it.

        Returns the NLL (float32, on CPU) of every token predicted during the call, each scored before the LoRA
        was trained on it: tokens 1..N-1 on the first call, all N tokens on later calls (they continue the text).
        """
        self._check_open()
        ids = torch.as_tensor(input_ids).reshape(-1).tolist()
        if not ids:
            raise UserError("Temp-LoRA input is empty: give at least one token")
        first = not self.ids
        self.ids.extend(ids)
        pieces = []
        # On a continuation the last token of the previous text is not fed yet, so it predicts the first new one.
        chunk = self.config.chunk_size
        while self._fed < len(self.ids) - 1:
            count = min(chunk, len(self.ids) - 1 - self._fed)
            start = self._fed
            logits = self._feed(count)  # (count, V): predictions for ids[start+1 : start+count+1]
            targets = torch.tensor(self.ids[start + 1 : start + count + 1], device=logits.device)
            pieces.append(F.cross_entropy(logits, targets, reduction="none").cpu())
            self._train(start + count + 1, count)
        nll = torch.cat(pieces) if pieces else torch.zeros(0)
        if not first and len(nll) < len(ids):
            raise AssertionError("internal: continuation tokens left unscored")
        return nll

    def generate(self, max_new_tokens: int, eos_token_id: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue the text read so far; the LoRA is trained on every `chunk_size` generated tokens.

        Greedy unless `temperature > 0` (then nucleus sampling with `top_p`). Returns the new tokens (T,).
        """
        self._check_open()
        if not self.ids:
            raise UserError("nothing to continue: call process(prompt_ids) first (the prompt must not be empty)")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        new: list[int] = []
        since_update = 0
        for _ in range(max_new_tokens):
            logits = self._feed(1)[-1]  # feeds the last token, predicts the next one
            token = _pick(logits, temperature, top_p, generator)
            self.ids.append(token)
            new.append(token)
            since_update += 1
            if since_update == self.config.chunk_size:
                self._train(len(self.ids), since_update)
                since_update = 0
            if eos_token_id is not None and token == eos_token_id:
                break
        return torch.tensor(new, dtype=torch.long)

    def cost_summary(self, scored: int) -> dict:
        return self.meter.summary(self.cost, scored)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])
