"""Λ-shaped attention (LM-Infinite) and attention sinks (StreamingLLM): masks, eager reference, blocked fast kernel,
bounded KV caches, and the transformers hooks that install them."""

from lengthwise.attention.pattern import AlibiEncoding, LambdaPattern, RopeEncoding
from lengthwise.attention.reference import lambda_attention_reference
from lengthwise.attention.blocked import lambda_attention_blocked

__all__ = ["AlibiEncoding", "LambdaPattern", "RopeEncoding", "lambda_attention_blocked", "lambda_attention_reference"]
