"""Tiny random models of every RoPE causal-LM type that transformers registers, built in code (no download).

`rope_causal_lm_types()` walks transformers' own registry (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), so a test looping
over it meets every architecture a new transformers release adds. `tiny_config()` shrinks a type's default config with
generic rules: sizes by attribute name (`_SIZES`), relations read from the default config (kv heads, rotary dims, MLA
and mamba sizes, per-layer overrides), sub-configs shrunk recursively; and it keeps every kind of layer the default has
(attention kinds, NoPE layers, dense/sparse MLPs, KV-sharing layers, attention indices of hybrids) in the shortest
prefix of the type's own layer pattern that holds them all. The few types whose default config no generic rule makes
buildable are in `_PER_TYPE`, each with its reason. `tiny_model()` builds the config with sharp attention (query and
key weights x4), so that a test notices a wrong mask.

    python -m lengthwise.zoo        # one line per type (ok, or why it cannot be made tiny) and the count
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

VOCAB = 320
MAX_PARAMS = 3_000_000
MIN_ROTARY_DIMS = 8
MIN_LAYERS = 2  # one layer would hide bugs in per-layer state (caches indexed by layer)
MAX_EXTRA_LAYERS = 8  # layers tried beyond the shortest prefix holding every kind
FORWARD_TOKENS = 24

# the tiny value of each size attribute, set wherever the default config has it as a positive int (None: derived from
# other sizes, or a part left out, such as the query LoRA of q_lora_rank; 0 or -1: a part switched off)
_SIZES = {
    # width (kv heads follow the default's ratio: _kv_heads; head_dim the rotary factor: _head_dim)
    "hidden_size": 64, "d_model": 64, "hidden_size_global": 64, "num_attention_heads": 4, "n_heads": 4,
    "head_dim": 16, "kv_channels": 16, "intermediate_size": 96, "ffn_hidden_size": 96, "ffn_dim": 96,
    "first_dense_intermediate_size": 96, "mlp_only_intermediate_size": 96, "vocab_size": VOCAB,
    # mixture of experts: few small experts
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "n_shared_experts": 1,
    "num_shared_experts": 1, "topk_group": 1, "n_group": 1,
    # multi-head latent attention (a rotary part of 8 dims)
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # sparse index attention (a pool smaller than a ~100-token test, so that selection happens)
    "index_head_dim": 16, "index_n_heads": 2, "index_num_heads": 2, "index_topk": 8, "index_pool_size": 16,
    "index_compression": 4,
    # linear attention and mamba (mamba heads x head dim = expand x hidden: _mamba_sizes)
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_num_heads": 4, "linear_head_dim": 16, "mamba_d_state": 16, "mamba_chunk_size": 16, "chunk_size": 16,
    # per-layer inputs (gemma3n & co), hyper-connections (qwen4_exp), byte hashes (blt)
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB, "hc_lowrank": 16,
    "encoder_hash_byte_group_vocab": VOCAB,
    # convolution channels of audio encoders (phi4_multimodal)
    "nemo_conv_channels": 64, "ext_pw_out_channel": 64, "depthwise_separable_out_channel": 64,
}
# counts capped at a value, never raised above the default's (zaya allows 1 expert per token, deepseek_v2 has 0
# dense layers): at most 2 experts per token, at most 1 dense layer before the MoE ones
_TOP_K = ("num_experts_per_tok", "moe_topk", "moe_top_k")
_AT_MOST = {**dict.fromkeys(_TOP_K, 2), "first_k_dense_replace": 1, "num_dense_layers": 1}
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "kv_n_heads")
_LAYER_COUNT = ("num_hidden_layers", "n_layers", "num_layers", "num_blocks")
_SLIDING_WINDOW = ("sliding_window", "local_attention_window_len")
_CHUNK = ("attention_chunk_size",)  # chunked attention (llama4): chunks as long as the sliding window
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# per-layer lists of layer kinds: every kind of the default survives
_KIND_LISTS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types", "no_rope_layers", "indexer_types",
               "kv_sharing_modes")
# lists of layer indices (each a kind of layer: attention of a hybrid, dense MLP...): cut to the tiny layer count, and
# non-empty where the default's is
_INDEX_LISTS = ("attn_layer_indices", "hybrid_layer_ids", "full_attn_idxs", "index_layers", "mlp_only_layers",
                "moe_layers")

# Types whose default config no generic rule makes buildable: their overrides, applied before the caller's.
_PER_TYPE: dict[str, dict] = {
    # BltModel builds its DynamicCache from the top config, which has no num_hidden_layers: a forward with the cache
    # fails (transformers bug), so no cache
    "blt": {"use_cache": False},
    # the model reads a per-layer-type rope dict, the default config has one global rope; its multimodal rope
    # sections (height, width, time) default to those of a 128-dim head: those of a 16-dim head
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [3, 3, 2]}}},
    # the attention reads attn_config.rope_theta, which the default attention config lacks, and clamps q/k/v to
    # +-attn_config.clip_qkv, which fails for the default None (torch.clamp needs a bound)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # the default config has MoE layers (first_k_dense_replace=0) but leaves their expert counts unset
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1},
    # input + recurrent + output stacks must sum to the layer count (default 8 + 20 + 8)
    "dory": {"n_input_layers": 1, "n_output_layers": 1},
    # the last 15 of 35 layers reuse the KV of earlier ones: 5 layers of the pattern (4 sliding, 1 full), then one
    # sliding layer reusing the KV of the last sliding one
    "gemma3n_text": {"num_hidden_layers": 6, "num_kv_shared_layers": 1},
    # the default config has no layer_types (the model needs them): conv and attention, a dense then a MoE MLP
    "lfm2_moe": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"]},
    # the default config leaves the sizes of the QSA indexer of its indexed-attention layers unset
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
}


class NotBuildable(Exception):
    """The type cannot be made tiny; the message says, in one line, what fails."""


@contextlib.contextmanager
def _quiet():
    """Silence transformers' logging and Python warnings (noise for a walk over ~120 types)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:240]}"


def rope_causal_lm_types() -> list[str]:
    """Every causal-LM model_type whose default config constructs and carries `rope_parameters`, sorted."""
    return list(_rope_causal_lm_types())


@functools.cache
def _rope_causal_lm_types() -> tuple[str, ...]:  # ~2 s: every default config of the registry
    types = []
    with _quiet():
        for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            try:
                default = CONFIG_MAPPING[model_type]()
            except Exception:
                continue
            if _get(default, "rope_parameters") is not None:
                types.append(model_type)
    return tuple(sorted(types))


# ------------------------------------------------------------------------------------------------- reading configs


def _get(config: PretrainedConfig, name: str, fallback=None):
    """config.name, also where it is a per-layer attribute of a heterogeneous config (the global value then)."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    try:
        return getter(name, fallback) if getter else getattr(config, name, fallback)
    except Exception:
        return fallback


def _fields(config: PretrainedConfig) -> set[str]:
    """Names the config takes as keyword arguments: its attributes and attribute_map aliases, not its properties."""
    names = set(vars(config)) | set(getattr(type(config), "__dataclass_fields__", {}))
    names |= set(getattr(config, "attribute_map", {}))
    return {n for n in names if not isinstance(getattr(type(config), n, None), property)}


def _per_layer_overrides(config: PretrainedConfig) -> dict[int, dict]:
    """{layer: {attribute: value}} of a heterogeneous config (`per_layer_config`), {} for a homogeneous one."""
    spec = vars(config).get("_heterogeneity_spec")
    return dict(getattr(spec, "per_layer_overrides", None) or {})


def _rotary_factor(config: PretrainedConfig) -> float:
    """The smallest partial rotary factor of the config (rope parameters may be per layer type)."""
    params = _get(config, "rope_parameters") or {}
    dicts = [params] + [v for v in params.values() if isinstance(v, dict)]
    factors = [d["partial_rotary_factor"] for d in dicts if d.get("partial_rotary_factor")]
    factors.append(_get(config, "partial_rotary_factor") or 1.0)
    return min(factors)


# ----------------------------------------------------------------------------------------------------------- sizes


def _kv_heads(default: PretrainedConfig, kw: dict) -> None:
    """kv heads as the default has them: multi-query stays 1, multi-head stays equal to the query heads, GQA 2."""
    heads = _SIZES["num_attention_heads"]
    default_heads = _get(default, "num_attention_heads")
    for name in set(_KV_HEADS) & _fields(default):
        value = _get(default, name)
        if value == 1:
            kw[name] = 1
        elif type(value) is not int or type(default_heads) is not int or value >= default_heads:
            kw[name] = heads
        else:
            kw[name] = heads // 2


def _head_dim(default: PretrainedConfig, kw: dict) -> None:
    """head_dim 16, more where a partial rotary factor would leave fewer than 8 rotary dims; MLA relations kept."""
    fields = _fields(default)
    rope_dims = math.ceil(MIN_ROTARY_DIMS / _rotary_factor(default))
    head_dim = max(_SIZES["head_dim"], rope_dims + rope_dims % 2)
    if "head_dim" in fields:
        kw["head_dim"] = _mla_head_dim(default, kw) or head_dim
    elif head_dim > _SIZES["head_dim"]:
        for name in {"hidden_size", "d_model"} & set(kw):  # head_dim is hidden // heads: widen the model instead
            kw[name] = head_dim * _SIZES["num_attention_heads"]
    if "qk_head_dim" in fields:
        kw["qk_head_dim"] = kw.get("qk_nope_head_dim", 0) + kw.get("qk_rope_head_dim", 0)


def _mla_head_dim(default: PretrainedConfig, tiny: dict) -> int | None:
    """The tiny head_dim of a multi-head latent attention whose default head_dim is its rotary part, or the sum of its
    rotary and non-rotary parts (validators check that); None where neither holds."""
    head_dim, nope, rope = (_get(default, n) for n in ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim"))
    if rope is not None and head_dim == rope:
        return tiny.get("qk_rope_head_dim")
    if None not in (head_dim, nope, rope) and head_dim == nope + rope:
        return tiny.get("qk_nope_head_dim", 0) + tiny.get("qk_rope_head_dim", 0)
    return None


def _mamba_sizes(default: PretrainedConfig, kw: dict) -> None:
    """Mamba heads of 16 dims: heads x head dim = expand x hidden (the hybrids' validators check it)."""
    fields = _fields(default)
    heads = {"mamba_n_heads", "n_mamba_heads"} & fields
    if not heads:
        return
    inner = int((_get(default, "mamba_expand") or 2) * kw.get("hidden_size", _SIZES["hidden_size"]))
    if _get(default, "mamba_d_ssm") is not None:
        kw["mamba_d_ssm"] = inner
    for name in heads:
        kw[name] = inner // 16
    if "mamba_d_head" in fields:
        kw["mamba_d_head"] = 16


def _size_kwargs(default: PretrainedConfig, length: int, sliding_window: int | None, token_ids: dict) -> dict:
    fields = _fields(default)
    kw = {}
    for name in set(_SIZES) & fields:
        if type(_get(default, name)) is int and _get(default, name) > 0:
            kw[name] = _SIZES[name]
    for name in set(_AT_MOST) & fields:
        value = _get(default, name)
        if type(value) is int:
            kw[name] = min(value, _AT_MOST[name])
        elif value is None and name in _TOP_K:  # experts per token unset (deepseek_v2): its MoE layers need it
            kw[name] = _AT_MOST[name]
    _kv_heads(default, kw)
    _head_dim(default, kw)
    _mamba_sizes(default, kw)
    if sliding_window is not None:  # None: the type's own (long) window, which many validators and models need
        for name in set(_SLIDING_WINDOW) & fields:
            kw[name] = sliding_window
        for name in set(_CHUNK) & fields:
            if type(_get(default, name)) is int:
                kw[name] = sliding_window
    for name in {"max_position_embeddings", "max_seq_len"} & fields:
        kw[name] = length
    # a top-level original length (Phi-3) is the unscaled training length: the same, unless the type ships scaling
    shipped = isinstance(_get(default, "rope_parameters"), dict) and \
        _get(default, "rope_parameters").get("rope_type", "default") != "default"
    if "original_max_position_embeddings" in fields and type(_get(default, "original_max_position_embeddings")) is int \
            and not shipped:
        kw["original_max_position_embeddings"] = length
    # special token ids inside the vocabulary: pad/bos/eos 0/1/2, the others (image, audio...) at its top, one id per
    # name across the sub-configs (the image token id of a vision config is the one of its parent)
    for name in sorted(fields):
        value = _get(default, name)
        if name in _TOKEN_IDS:
            kw[name] = _TOKEN_IDS[name]
        elif re.search(r"_token_(id|index)$", name) and type(value) is int and value >= VOCAB:
            kw[name] = token_ids.setdefault(name, VOCAB - 1 - len(token_ids))
    # per-layer lists of sizes (intermediate_size per layer, heads per layer): the tiny size in each entry
    for name, value in vars(default).items():
        base = next((s for s in _SIZES if name == s or name.startswith(s + "_per_layer")), None)
        if base is not None and isinstance(value, list) and value and all(type(v) is int for v in value):
            kw[name] = [_SIZES[base]] * len(value)
    # sub-configs (text / vision / audio / attention / ffn parts): shrunk the same way
    for name, value in vars(default).items():
        if isinstance(value, PretrainedConfig):
            kw[name] = _tiny_kwargs(value, length, sliding_window, token_ids)
    return kw


def _tiny_per_layer(default: PretrainedConfig, kw: dict, n: int, sliding_window: int | None) -> dict:
    """The default's per-layer overrides of its first n layers, sizes scaled like the global ones (a full-attention
    layer with twice the head_dim keeps twice the tiny head_dim)."""
    tiny = {}
    for layer, overrides in _per_layer_overrides(default).items():
        if layer >= n:
            continue
        tiny[layer] = {}
        for name, value in overrides.items():
            base = _get(default, name)
            if type(value) is int and type(base) is int and base > 0 and type(kw.get(name)) is int:
                value = max(1, round(kw[name] * value / base))
            elif name in _SLIDING_WINDOW and value is not None and sliding_window is not None:
                value = sliding_window
            tiny[layer][name] = value
        head_dim = _mla_head_dim(default.per_layer_config[layer], {**kw, **tiny[layer]})
        if head_dim is not None and head_dim != kw.get("head_dim"):
            tiny[layer]["head_dim"] = head_dim
    return tiny


# ---------------------------------------------------------------------------------------------------------- layers


def _layer_count_name(config: PretrainedConfig) -> str | None:
    return next((n for n in _LAYER_COUNT if type(_get(config, n)) is int), None)


def _kinds(config: PretrainedConfig) -> dict[str, set]:
    """The layer kinds of each per-layer kind list of the config, and {"present"} for each non-empty index list."""
    kinds = {}
    for name in _KIND_LISTS:
        value = _get(config, name)
        if isinstance(value, (list, tuple)) and value:
            kinds[name] = set(value)
    for name in _INDEX_LISTS:
        value = _get(config, name)
        if isinstance(value, (list, tuple)) and value:
            kinds[name] = {"present"}
    return kinds


def _has_attention(config: PretrainedConfig) -> bool:
    types = _get(config, "layer_types") or _get(config, "layers_block_type") or _get(config, "block_types")
    return not types or any(
        isinstance(k, str) and k != "linear_attention" and ("attention" in k or k == "hybrid") for k in types
    )


def _fewest_layers(reference: PretrainedConfig, kinds: dict[str, set]) -> int:
    """The length of the shortest prefix of the reference's layer pattern that holds every kind."""
    n = MIN_LAYERS
    for name, wanted in kinds.items():
        value = list(_get(reference, name) or [])
        if name in _INDEX_LISTS:
            n = max(n, min(value) + 1) if value else n
        else:
            n = max([n] + [value.index(kind) + 1 for kind in wanted if kind in value])
    return n


def _prefix_kwargs(reference: PretrainedConfig, n: int) -> dict:
    """The reference's per-layer lists cut to n layers, for configs that do not derive them from the layer count."""
    fields = _fields(reference)
    kw = {}
    for name in set(_KIND_LISTS) & fields:
        value = _get(reference, name)
        if isinstance(value, (list, tuple)) and len(value) >= n:
            kw[name] = list(value[:n])
    for name in set(_INDEX_LISTS) & fields:
        value = _get(reference, name)
        if isinstance(value, (list, tuple)):
            kw[name] = [i for i in value if i < n]
    return kw


def _with_attention(config: PretrainedConfig, n: int) -> dict | None:
    """Overrides making the last of n recurrent layers (a mamba-only default) an attention layer; None if none do."""
    fields = _fields(config)
    if "attn_layer_indices" in fields:
        return {"attn_layer_indices": [n - 1]}
    for name in {"layer_types", "layers_block_type"} & fields:
        value = _get(config, name)
        if isinstance(value, list) and len(value) == n:
            return {name: value[:-1] + ["full_attention"]}
    return None


def _tiny_kwargs(default: PretrainedConfig, length: int, sliding_window: int | None, token_ids: dict,
                 extra: dict | None = None) -> dict:
    """Keyword arguments of a tiny version of `default`: sizes, then the fewest layers keeping every layer kind."""
    cls = type(default)
    kw = _merge(_size_kwargs(default, length, sliding_window, token_ids), extra or {})
    count = _layer_count_name(default)
    if count is None:
        return kw
    if count in kw:  # a per-type layer count
        return _cut_layers(default, kw, count, kw[count], sliding_window)
    wanted = _kinds(default)
    try:
        reference = cls(**{k: v for k, v in kw.items() if k != count})  # the default layer pattern, tiny sizes
    except Exception:
        reference = default
    # the shortest prefix holding every kind (never more layers than the default has); more layers where the config
    # derives kinds from the whole pattern (KV sharing: the last layers of each type store their KV for later ones)
    first = _fewest_layers(reference, {k: v for k, v in wanted.items() if k != "kv_sharing_modes"})
    first = min(first, _get(default, count))
    error = None
    for n in range(first, first + MAX_EXTRA_LAYERS + 1):
        kw_n = _cut_layers(default, kw, count, n, sliding_window)
        for layers in ({}, _prefix_kwargs(reference, n)):
            try:
                config = cls(**{**kw_n, **layers})
            except Exception as e:
                error = error or e
                continue
            kinds = _kinds(config)
            if all(wanted[name] <= kinds.get(name, set()) for name in wanted):
                if not _has_attention(config):
                    attention = _with_attention(config, n)
                    if attention is None:
                        continue
                    layers = {**layers, **attention}
                return {**kw_n, **layers}
    if error is not None:
        raise error
    kinds = sorted(map(str, set().union(*wanted.values())))
    raise NotBuildable(f"no pattern of {first} to {first + MAX_EXTRA_LAYERS} layers keeps the layer kinds {kinds} "
                       "and an attention layer")


def _cut_layers(default: PretrainedConfig, kw: dict, count: str, n: int, sliding_window: int | None) -> dict:
    """kw for n layers: per-layer lists of sizes cut to n entries, the default's per-layer overrides of n layers."""
    default_layers = _get(default, count)
    kw = {name: value[:n] if isinstance(value, list) and len(value) == default_layers else value
          for name, value in kw.items()}
    if _per_layer_overrides(default):
        kw["per_layer_config"] = _tiny_per_layer(default, kw, n, sliding_window)
    return {**kw, count: n}


def _merge(base: dict, extra: dict) -> dict:
    """base updated by extra, dicts (sub-configs) merged key by key."""
    out = dict(base)
    for name, value in extra.items():
        out[name] = _merge(out[name], value) if isinstance(value, dict) and isinstance(out.get(name), dict) else value
    return out


# ---------------------------------------------------------------------------------------------------------- public


def tiny_config(model_type: str, length: int = 64, sliding_window: int | None = 16, **overrides) -> PretrainedConfig:
    """A tiny config of `model_type` (see the module docstring), max_position_embeddings `length`, sliding window
    `sliding_window` where the type has one (chunked attention gets chunks of that length; None keeps the type's
    default window); `overrides` (config attributes) are set last, each replacing the tiny value."""
    if model_type not in CONFIG_MAPPING:
        raise NotBuildable(f"{model_type!r} is not a model type of this transformers")
    cls = CONFIG_MAPPING[model_type]
    with _quiet():
        try:
            default = cls()
        except Exception as e:
            raise NotBuildable(f"default config: {_one_line(e)}") from e
        try:
            kw = _tiny_kwargs(default, length, sliding_window, {}, copy.deepcopy(_PER_TYPE.get(model_type)))
            return cls(**{**kw, **copy.deepcopy(overrides)})
        except NotBuildable:
            raise
        except Exception as e:
            raise NotBuildable(f"tiny config: {_one_line(e)}") from e


# names of query and key projections (fused ones and MLA's low-rank ones included)
_QK_NAMES = ("q_proj", "k_proj", "qkv", "query_key_value", "Wqkv", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj",
             "kv_proj", "q_gate_proj")


def tiny_model(model_type: str, length: int = 64, sliding_window: int | None = 16, seed: int = 0, **overrides):
    """A float32 model of `tiny_config(...)`, seeded, in eval mode, its query and key weights x4 (sharp attention)."""
    config = tiny_config(model_type, length, sliding_window, **overrides)
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as e:
            raise NotBuildable(f"model: {_one_line(e)}") from e
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > MAX_PARAMS:
        raise NotBuildable(f"{n_params / 1e6:.1f}M parameters when tiny (more than {MAX_PARAMS / 1e6:.0f}M)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(k in name for k in _QK_NAMES):
                param.mul_(4.0)
    return model.eval()


def _forward_check(model) -> None:
    ids = torch.randint(3, VOCAB - 32, (1, FORWARD_TOKENS), generator=torch.Generator().manual_seed(0))
    try:
        with _quiet(), torch.no_grad():
            logits = model(ids).logits
    except Exception as e:
        raise NotBuildable(f"forward: {_one_line(e)}") from e
    finite = bool(torch.isfinite(logits).all())
    if tuple(logits.shape[:2]) != (1, FORWARD_TOKENS) or not finite:
        raise NotBuildable(f"forward: logits of shape {tuple(logits.shape)}, all finite: {finite}")


def build_report() -> dict[str, str]:
    """model_type -> "ok" (built, and a forward of 24 tokens gave finite logits) or why it is not buildable."""
    report = {}
    for model_type in rope_causal_lm_types():
        try:
            _forward_check(tiny_model(model_type))
            report[model_type] = "ok"
        except NotBuildable as e:
            report[model_type] = str(e)
    return report


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = build_report()
    for model_type, status in report.items():
        print(f"{model_type:28s} {status}")
    n_ok = sum(status == "ok" for status in report.values())
    print(f"{n_ok} of {len(report)} types buildable ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
