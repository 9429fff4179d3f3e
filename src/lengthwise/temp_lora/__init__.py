"""Temp-LoRA (Wang et al. 2024, arXiv 2401.11504): store the context in a temporary LoRA trained at inference time.

    from lengthwise.temp_lora import TempLoraConfig, TempLoraSession
    with TempLoraSession(model, TempLoraConfig(chunk_size=64, window=256, lr=2e-3)) as session:
        nll = session.process(ids)        # each chunk scored, then trained on
        new = session.generate(100)       # LoRA trained on every generated chunk
    # here the LoRA is gone and the model is bit-identical to before

A session, not a registry patch: it owns an optimizer and a cache policy and must see the text.
"""

from lengthwise.temp_lora.adapter import lora_modules, save_adapter
from lengthwise.temp_lora.buckets import DEFAULT_EDGES, bucket_nll
from lengthwise.temp_lora.config import TempLoraConfig
from lengthwise.temp_lora.cost import CostMeter, ModelCost, model_cost
from lengthwise.temp_lora.session import TempLoraSession

__all__ = ["DEFAULT_EDGES", "CostMeter", "ModelCost", "TempLoraConfig", "TempLoraSession", "bucket_nll",
           "lora_modules", "model_cost", "save_adapter"]
