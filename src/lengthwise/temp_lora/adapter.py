"""Attach a temporary peft LoRA to a model in place, reversibly.

peft's `inject_adapter_in_model` swaps each target `nn.Linear` for a `lora.Linear` that keeps the original layer as
`base_layer` (same object, weights untouched) and freezes every base parameter. The returned `Undo` puts the
original layers back, restores every `requires_grad` flag and removes the `peft_config` attribute, so afterwards
the model holds no LoRA module and its state dict is bit-identical to before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lengthwise.patching import Undo
from lengthwise.temp_lora.config import TempLoraConfig
from lengthwise.errors import UserError

ADAPTER_NAME = "temp_lora"


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415 - GPT-2 style linear layers

    return isinstance(module, (nn.Linear, Conv1D))


def matching_linear_names(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """Names of the linear layers a target spec selects ("all-linear": all but the output head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or module is output:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def check_targets(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """Raise a clear error, before any work, when no linear layer matches the targets."""
    names = matching_linear_names(model, targets)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise UserError(
            f"temp-lora target_modules {targets!r} match no linear layer of this {type(model).__name__}; "
            f"its linear layers are named: {', '.join(linear) or '(none)'}; accepted: 'all-linear' or some of those"
        )
    return names


def attach_lora(model: nn.Module, config: TempLoraConfig) -> tuple[Undo, list[nn.Parameter]]:
    """Inject a fresh LoRA (B = 0, so logits are unchanged at first); returns (undo, trainable parameters)."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    if "peft_config" in model.__dict__:
        raise RuntimeError("model already carries a peft adapter; a Temp-LoRA session needs a plain model")
    names = check_targets(model, config.target_modules)
    originals = {name: model.get_submodule(name) for name in names}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                             target_modules=names)  # exact names: what was checked is what gets adapted
    undo = Undo()

    def restore() -> None:
        for name, original in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, original)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        model.__dict__.pop("peft_config", None)

    undo.add(restore)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the LoRA A init is random; a session is reproducible
            inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER_NAME)
    except BaseException:
        undo.remove()
        raise
    device = next(iter(originals.values())).weight.device
    params = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.to(device)
            for pname, param in module.named_parameters():
                if "lora_" in pname:
                    params.append(_as_float32(param))
    return undo, params


def _as_float32(param: nn.Parameter) -> nn.Parameter:
    """Keep a LoRA weight in float32 whatever the base model's dtype (peft gives it the base layer's).

    Why: AdamW's state takes its parameter's dtype, and its steps are at most about lr (2e-3 by default). In
    bfloat16 (8 significant bits) a step below 2e-3 on a weight of 0.5 or more rounds away, and smaller weights
    move in coarse quanta. In float16 (1 - beta2) * grad**2 underflows to 0 for gradients below ~5e-3 and eps = 1e-8
    rounds to 0 too, so the step divides by zero: the LoRA is NaN from its second step (tested). The adapter is small
    (rank x width per layer), so float32 costs little; peft's own `autocast_adapter_dtype` makes the same choice.
    peft casts the layer input to the adapter's dtype and the adapter's output back to the base layer's, so the
    half-precision base weights are neither copied nor changed.
    """
    if param.dtype in (torch.float16, torch.bfloat16):
        param.data = param.data.float()
    return param


def lora_modules(model: nn.Module) -> list[str]:
    """Names of peft LoRA layers still attached (empty after a session ends)."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Save the attached LoRA in peft's folder format (adapter_config.json + adapter_model.safetensors).

    `peft.PeftModel.from_pretrained(base_model, path)` loads it back.
    """
    import os  # noqa: PLC0415

    from peft.utils import get_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    if "peft_config" not in model.__dict__:
        raise RuntimeError("no Temp-LoRA adapter is attached (the session has ended); save before it closes")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    # peft's own format prefixes keys with the PeftModel wrapper path.
    state = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = path / "adapter_model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / "adapter_model.safetensors")
    config = model.peft_config[ADAPTER_NAME]
    config.save_pretrained(str(path))
    return path
