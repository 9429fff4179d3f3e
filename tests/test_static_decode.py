"""Static Λ decoding (`lengthwise.static_decode`): the same tokens as the eager path, or a refusal by name."""

import pytest
import torch

from lengthwise.api import patch
from lengthwise.generation import generate
from lengthwise.models.compat import cache_kwargs
from lengthwise.errors import UserError
from lengthwise.static_decode import (WEIGHT_FORMATS, StaticDecoder, StaticDecodeMismatch, StaticDecodeUnsupported,
                                     dequantized, greedy_static, project, projections_as_stored, slot_of, span_for,
                                     span_sizes, stored_weight, _call)
from lengthwise.testing import random_ids, tiny_model

# A prompt past the training length (64) and past n_global + n_local: the distance limit applies to the global keys
# and the ring of local slots wraps several times while decoding.
SPEC = "lm-infinite:n_global=4,n_local=16"


def _prefilled(model, ids, spec=SPEC):
    handle = patch(model, spec)
    cache = handle.new_cache()
    with torch.no_grad():
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    return handle, cache, logits


def test_slots_keep_globals_and_a_ring_of_local_keys():
    positions = torch.arange(40)
    slots = slot_of(positions, 4, 16)
    assert slots[:4].tolist() == [0, 1, 2, 3] and slots[4:20].tolist() == list(range(4, 20))
    assert slots[20].item() == 4 and slots[39].item() == 7  # position p replaces p - n_local


def test_a_projection_as_a_sum_equals_the_linear_layer():
    x = torch.randn(1, 1, 24)
    for linear in (torch.nn.Linear(24, 40), torch.nn.Linear(24, 40, bias=False)):
        torch.testing.assert_close(project(linear, x, stored_weight(linear, "model")), linear(x), atol=1e-6,
                                   rtol=1e-5)

    class Adapter(torch.nn.Linear):  # a subclass may compute something else: its own forward runs
        def forward(self, x):
            return super().forward(x) + 1.0

    adapter = Adapter(24, 40)
    torch.testing.assert_close(project(adapter, x, None), adapter(x))


@pytest.mark.parametrize("weights", ["bfloat16", "float16", "int8"])
def test_a_stored_weight_stands_for_the_layer_it_was_made_from(weights):
    linear = torch.nn.Linear(24, 40)
    stored = stored_weight(linear, weights)
    assert stored[0].dtype == getattr(torch, weights) and stored[0].shape == (40, 24)
    # rounding to the nearest representable value: half a step of the format at most
    step = {"bfloat16": 2**-8, "float16": 2**-11}.get(weights)
    bound = (linear.weight.abs() * step if step else stored[1][:, None] / 2).detach()
    assert bool(((dequantized(stored, torch.float32) - linear.weight).abs() <= bound * 1.001 + 1e-12).all())
    x = torch.randn(1, 1, 24)
    expected = torch.nn.functional.linear(x, dequantized(stored, torch.float32), linear.bias)
    torch.testing.assert_close(project(linear, x, stored), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_call(linear, x, stored), expected)


def test_static_decoding_gives_the_eager_tokens():
    model = tiny_model("llama")
    ids = random_ids(90)
    eager = generate(model, ids, SPEC, max_new_tokens=40)
    static = generate(model, ids, SPEC, max_new_tokens=40, decode="static")
    assert static.tolist() == eager.tolist()


def _static_steps_match_eager_steps(spec: str, prompt: int, steps: int, weights: str = "model", kv: str = "model",
                                    atol: float = 2e-4) -> None:
    """Each static step's logits equal the eager step's on the same tokens (positions prompt .. prompt + steps - 1);
    with stored weights, the eager step of the model computing with them (`projections_as_stored`)."""
    model = tiny_model("llama")
    ids = random_ids(prompt)
    handle, cache, logits = _prefilled(model, ids, spec)
    try:
        decoder = StaticDecoder(model, cache, check=False, weights=weights, kv=kv)
        eager_cache = handle.new_cache()  # the same prompt again, for the eager steps
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, eager_cache), use_cache=True, logits_to_keep=1)
        token = logits.argmax(-1, keepdim=True)
        for step in range(steps):
            static = decoder.step(token)
            with torch.no_grad(), projections_as_stored(model, weights):
                eager = model(input_ids=token, **cache_kwargs(model, eager_cache), use_cache=True,
                              position_ids=torch.tensor([[prompt + step]]), logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(static, eager, atol=atol, rtol=1e-4)
            token = eager.argmax(-1, keepdim=True)
    finally:
        handle.remove()


def test_static_step_logits_match_the_eager_step_at_every_token():
    _static_steps_match_eager_steps(SPEC, prompt=70, steps=30)


@pytest.mark.parametrize("weights", ["bfloat16", "float16", "int8"])
def test_static_steps_with_stored_weights_match_the_model_computing_with_them(weights):
    _static_steps_match_eager_steps(SPEC, prompt=70, steps=12, weights=weights)


def test_bfloat16_keys_and_values_stay_close_to_the_eager_step():
    model = tiny_model("llama")
    handle, cache, logits = _prefilled(model, random_ids(70))
    try:
        decoder = StaticDecoder(model, cache, kv="bfloat16")
        assert {t.dtype for t in [*decoder.keys, *decoder.values]} == {torch.bfloat16}
        decoder.step(logits.argmax(-1, keepdim=True))  # the runtime check, at a half-precision tolerance
        assert decoder.tolerance == 5e-2 and decoder.check_gap is not None
    finally:
        handle.remove()
    # bfloat16 keeps 8 bits of mantissa: the tiny model's logits (about 1 in size) move by a few thousandths
    _static_steps_match_eager_steps(SPEC, prompt=70, steps=12, kv="bfloat16", atol=2e-2)


def test_stored_weights_pass_the_check_and_follow_a_changed_model():
    model = tiny_model("llama")
    handle, cache, logits = _prefilled(model, random_ids(70))
    try:
        decoder = StaticDecoder(model, cache, weights="int8")
        decoder.step(logits.argmax(-1, keepdim=True))  # the runtime check, against the model with the int8 copies
        assert decoder.check_gap is not None and decoder.check_gap < 1e-3
        assert decoder.weight_bytes() < sum(p.numel() for p in model.parameters()) * 4 / 3
        before = decoder.stored[model.lm_head][0]
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # changed between two decodings
        again = handle.new_cache()
        with torch.no_grad():
            model(input_ids=random_ids(70), **cache_kwargs(model, again), use_cache=True, logits_to_keep=1)
        decoder.load(again)
        assert decoder.stored[model.lm_head][0] is before  # rewritten in place: a compiled step reads it still
        torch.testing.assert_close(dequantized(decoder.stored[model.lm_head], torch.float32), model.lm_head.weight,
                                   atol=float(decoder.stored[model.lm_head][1].max()), rtol=0)
    finally:
        handle.remove()


def test_stored_weights_are_refused_where_they_do_not_apply():
    model = tiny_model("llama")
    ids = random_ids(8)
    assert WEIGHT_FORMATS[0] == "model"
    with pytest.raises(StaticDecodeUnsupported, match="decode weights must be one of model, bfloat16"):
        generate(model, ids, SPEC, max_new_tokens=2, decode="static", decode_weights="int4")
    with pytest.raises(UserError, match="read by the static decoding step"):
        generate(model, ids, SPEC, max_new_tokens=2, decode_weights="int8")
    with pytest.raises(StaticDecodeUnsupported, match="decode kv must be one of model, bfloat16"):
        generate(model, ids, SPEC, max_new_tokens=2, decode="static", decode_kv="float16")
    with pytest.raises(UserError, match="decode_kv='bfloat16' is read by the static decoding step"):
        generate(model, ids, SPEC, max_new_tokens=2, decode_kv="bfloat16")
    with pytest.raises(StaticDecodeUnsupported, match="store a float32 model's tensors"):
        generate(model.to(torch.bfloat16), ids, SPEC, max_new_tokens=2, decode="static", decode_weights="int8")


def test_static_decoding_refuses_what_it_does_not_compute():
    model = tiny_model("llama")
    with patch(model, "streaming:n_sink=4,window=16"):
        with pytest.raises(StaticDecodeUnsupported, match="only lm-infinite"):
            StaticDecoder(model)
    with pytest.raises(StaticDecodeUnsupported, match="not patched"):
        StaticDecoder(model)
    other = tiny_model("gpt_neox")
    with patch(other, SPEC), pytest.raises(StaticDecodeUnsupported, match="Llama architecture"):
        StaticDecoder(other)
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(model, random_ids(8), SPEC, max_new_tokens=2, decode="fast")


def test_static_decoding_refuses_a_batch():
    model = tiny_model("llama")
    handle, cache, _ = _prefilled(model, random_ids(20, batch=2))
    try:
        with pytest.raises(StaticDecodeUnsupported, match="batch of 2"):
            StaticDecoder(model, cache)
    finally:
        handle.remove()


def test_a_disagreeing_static_step_raises():
    model = tiny_model("llama")
    handle, cache, logits = _prefilled(model, random_ids(70))
    try:
        decoder = StaticDecoder(model, cache)
        decoder.keys[0].mul_(3.0)  # a wrong cache: the check of the first step must notice
        with pytest.raises(StaticDecodeMismatch, match="disagrees with the eager path"):
            decoder.step(logits.argmax(-1, keepdim=True))
    finally:
        handle.remove()


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens():
    model = tiny_model("llama")
    ids = random_ids(90)
    eager = generate(model, ids, SPEC, max_new_tokens=40)
    compiled = generate(model, ids, SPEC, max_new_tokens=40, decode="compiled")
    assert compiled.tolist() == eager.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("weights,kv", [("bfloat16", "model"), ("int8", "bfloat16")])
def test_compiled_decoding_with_stored_weights_gives_the_static_eager_tokens(weights, kv):
    model = tiny_model("llama")
    ids = random_ids(90)
    static = generate(model, ids, SPEC, max_new_tokens=40, decode="static", decode_weights=weights, decode_kv=kv)
    compiled = generate(model, ids, SPEC, max_new_tokens=40, decode="compiled", decode_weights=weights, decode_kv=kv)
    assert compiled.tolist() == static.tolist()


# A window longer than the smallest span: decoding from a 200-token prompt crosses from span 256 to the full 604
# slots (lengthwise.static_decode.span_sizes) at position 256.
WIDE = "lm-infinite:n_global=4,n_local=600,distance_limit=600"


def test_spans_cover_every_filled_slot():
    assert span_sizes(8202) == [512, 1024, 2048, 4096, 8202] and span_sizes(604) == [256, 604]
    assert span_sizes(300) == [300] and len(span_sizes(1 << 20)) == 5
    spans = span_sizes(8202)
    assert [span_for(p, 8202, spans) for p in (0, 511, 512, 4095, 4096, 8201, 10**6)] == \
        [512, 512, 1024, 4096, 8202, 8202, 8202]


def test_static_steps_across_a_span_change_match_the_eager_steps():
    _static_steps_match_eager_steps(WIDE, prompt=200, steps=80)  # positions 200..279


@pytest.mark.slow  # two compilations: ~17 s on the 2-core machine
def test_compiled_decoding_across_a_span_change_gives_the_eager_tokens():
    """One compiled graph per span, never the eager step under the compiled label."""
    model = tiny_model("llama")
    ids = random_ids(200)
    eager = generate(model, ids, WIDE, max_new_tokens=80)
    handle, cache, logits = _prefilled(model, ids, WIDE)
    try:
        compiled, mode = greedy_static(model, cache, logits, 80, compile=True)
    finally:
        handle.remove()
    assert mode == "compiled" and compiled.tolist() == eager.tolist()
