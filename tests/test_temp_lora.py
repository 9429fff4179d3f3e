"""Temp-LoRA session: order (score, then train), window/cache policy, eager reference, clean removal."""

import math

import pytest
import torch
import torch.nn.functional as F

from lengthwise.registry import method_names
from lengthwise.temp_lora import TempLoraConfig, TempLoraSession, bucket_nll, lora_modules
from lengthwise.temp_lora.adapter import attach_lora
from lengthwise.testing import random_ids, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def _assert_restored(model, snapshot, ids, logits):
    state, types = snapshot
    assert lora_modules(model) == []
    assert "peft_config" not in model.__dict__
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())  # HF models start fully trainable
    assert not model.training
    assert torch.equal(model(ids).logits, logits)


def _eager_reference(model, ids, config):
    """The algorithm without a KV cache: every chunk is scored by one full forward over its window, with the
    LoRA as trained so far (this is what `reuse_cache=False` must equal), then trained on exactly like that."""
    undo, params = attach_lora(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ids = ids.tolist()
    fed, cache_start, out = 0, 0, []
    while fed < len(ids) - 1:
        count = min(config.chunk_size, len(ids) - 1 - fed)
        if fed - cache_start + count > config.window:
            cache_start = max(cache_start, fed - config.context_keep)
        with torch.no_grad():
            window = torch.tensor([ids[cache_start : fed + count]])
            logits = model(window).logits[0, -count:]
        out.append(F.cross_entropy(logits, torch.tensor(ids[fed + 1 : fed + count + 1]), reduction="none"))
        end = fed + count + 1
        start = max(0, end - config.window)
        for _ in range(config.steps_per_chunk):
            optimizer.zero_grad()
            logits = model(torch.tensor([ids[start:end]])).logits[0, :-1]  # predicts ids[start+1:end]
            targets = torch.tensor(ids[start + 1 : end])
            loss = F.cross_entropy(logits[-count:], targets[-count:])  # the new tokens only
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
        fed += count
    undo.remove()
    return torch.cat(out)


def test_no_reuse_matches_eager_reference_and_first_chunk_is_vanilla():
    model = tiny_model("llama", length=32)
    ids = random_ids(56)[0]
    config = TempLoraConfig(chunk_size=8, window=24, lr=5e-3, steps_per_chunk=2, reuse_cache=False)
    with TempLoraSession(model, config) as session:
        nll = session.process(ids)
    assert nll.shape == (55,)
    reference = _eager_reference(model, ids, config)
    torch.testing.assert_close(nll, reference, atol=2e-4, rtol=1e-4)
    vanilla = F.cross_entropy(model(ids[None, :9]).logits[0, :-1], ids[1:9], reduction="none")
    torch.testing.assert_close(nll[:8], vanilla, atol=1e-5, rtol=1e-5)  # scored before any training


def test_without_training_equals_windowed_scoring_and_reuse_is_irrelevant():
    model = tiny_model("llama", length=32)
    ids = random_ids(70, seed=1)[0]
    config = TempLoraConfig(chunk_size=8, window=32, steps_per_chunk=0)
    with TempLoraSession(model, config) as session:
        nll = session.process(ids)
    torch.testing.assert_close(nll, _eager_reference(model, ids, config), atol=1e-4, rtol=1e-4)
    with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32, steps_per_chunk=0, reuse_cache=False)) as s:
        torch.testing.assert_close(s.process(ids), nll, atol=1e-5, rtol=1e-5)


def test_cache_reuse_keeps_old_states_until_overflow():
    model = tiny_model("llama", length=64)
    ids = random_ids(72, seed=2)[0]
    runs = {}
    for reuse in (True, False):
        config = TempLoraConfig(chunk_size=8, window=32, keep=8, lr=1e-2, reuse_cache=reuse)
        with TempLoraSession(model, config) as session:
            runs[reuse] = (session.process(ids), session.meter)
    (nll_reuse, meter_reuse), (nll_fresh, meter_fresh) = runs[True], runs[False]
    torch.testing.assert_close(nll_reuse[:8], nll_fresh[:8])  # first chunk: nothing trained yet
    assert not torch.allclose(nll_reuse[8:16], nll_fresh[8:16])  # stale vs re-encoded context
    assert meter_reuse.reencode_tokens < meter_fresh.reencode_tokens
    assert meter_reuse.score_tokens == meter_fresh.score_tokens == 71
    assert meter_reuse.train_steps == meter_fresh.train_steps == 9


def test_lora_learns_text_that_no_longer_fits_the_window():
    """A random 24-token passage repeated: the window (16) never holds the previous copy, the LoRA does."""
    model = tiny_model("llama", length=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)  # a random tiny head is near-uniform; let the model become confident
    ids = random_ids(24, seed=3)[0].repeat(5)
    base = TempLoraConfig(chunk_size=8, window=16, steps_per_chunk=0)
    trained = TempLoraConfig(chunk_size=8, window=16, lr=2e-2, steps_per_chunk=2)
    with TempLoraSession(model, base) as session:
        nll_base = session.process(ids)
    with TempLoraSession(model, trained) as session:
        nll_lora = session.process(ids)
    assert nll_lora[:8].tolist() == nll_base[:8].tolist()
    assert nll_lora[-24:].mean() < 0.5 * nll_base[-24:].mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_trains_finite_and_comes_back_bit_identical(dtype):
    """A Temp-LoRA session on a bf16 (or fp16) model: the LoRA and its AdamW state are float32, every step's loss
    and every logit (scoring, re-encoding, training, generating) is finite, the LoRA still learns the repeated
    passage, and the base weights are bit-identical after the session. fp16 with a half-precision LoRA gave NaN
    from the second step on (AdamW's eps and second moment underflow to 0)."""
    model = tiny_model("llama", length=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)  # confident logits: large gradients, the case that overflows
    model = model.to(dtype)
    ids = random_ids(24, seed=3)[0].repeat(4)
    with torch.no_grad():
        logits = model(ids[None]).logits
    snapshot = _snapshot(model)
    finite = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: finite.append(bool(torch.isfinite(out).all())))
    try:
        with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=16, lr=2e-2, steps_per_chunk=2)) as session:
            nll = session.process(ids)
            session.generate(16)
            assert {p.dtype for p in session.params} == {torch.float32}
            moments = [v for state in session.optimizer.state.values() for v in state.values() if v.dim() > 0]
            assert moments and {v.dtype for v in moments} == {torch.float32}
            losses = session.losses
    finally:
        hook.remove()
    assert len(losses) == 2 * (12 + 2) and all(math.isfinite(loss) for loss in losses)  # 95 + 16 tokens: 14 chunks
    assert len(finite) > 2 * len(losses) and all(finite)
    assert torch.isfinite(nll).all() and nll[-24:].mean() < 0.75 * nll[:24].mean()
    assert all(p.dtype == dtype for p in model.parameters())
    _assert_restored(model, snapshot, ids[None], logits)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "bloom"])
def test_session_end_restores_bit_identical_model(family, tmp_path):
    model = tiny_model(family, length=32)
    ids = random_ids(50)
    logits = model(ids).logits
    snapshot = _snapshot(model)
    with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32, lr=1e-2)) as session:
        session.process(ids[0])
        new = session.generate(20)
        assert new.shape == (20,) and lora_modules(model)
        assert not torch.equal(model(ids).logits, logits)  # the LoRA did change the model
        saved = session.save_adapter(tmp_path / "adapter")
    _assert_restored(model, snapshot, ids, logits)
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    with pytest.raises(RuntimeError, match="has ended"):
        session.generate(1)


def test_saved_adapter_loads_in_peft():
    from peft import PeftModel

    model = tiny_model("llama", length=32)
    ids = random_ids(40)
    with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32, lr=1e-2)) as session:
        session.process(ids[0])
        with torch.no_grad():
            adapted = model(ids).logits
        path = session.save_adapter("/tmp/lengthwise-test-adapter")
    loaded = PeftModel.from_pretrained(tiny_model("llama", length=32), str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, adapted)


def test_generation_trains_on_generated_chunks():
    model = tiny_model("llama", length=32)
    with TempLoraSession(model, TempLoraConfig(chunk_size=4, window=32, lr=1e-2)) as session:
        session.process(random_ids(20)[0])
        steps = session.meter.train_steps
        new = session.generate(10)
        assert new.shape == (10,)
        assert session.meter.train_steps == steps + 2  # two full chunks of 4 generated tokens
        assert session.ids[-10:] == new.tolist()
    with TempLoraSession(model, TempLoraConfig(chunk_size=4, window=32, steps_per_chunk=0)) as session:
        session.process(random_ids(20)[0])
        greedy = session.generate(5)
    ids = random_ids(20)
    for _ in range(5):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy.tolist() == ids[0, 20:].tolist()


def test_continuation_scores_every_new_token():
    model = tiny_model("llama", length=32)
    ids = random_ids(60)[0]
    with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32, steps_per_chunk=0)) as session:
        first = session.process(ids[:25])
        second = session.process(ids[25:])
    with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32, steps_per_chunk=0)) as session:
        whole = session.process(ids)
    assert len(first) == 24 and len(second) == 35
    assert torch.isfinite(second).all() and len(whole) == 59


@pytest.mark.parametrize("spec", ["yarn:factor=2", "lm-infinite"])
def test_composes_with_a_long_context_method(spec):
    name = spec.split(":")[0]
    if name not in method_names():
        pytest.skip(f"{name} is not registered yet")
    model = tiny_model("llama", length=16)
    ids = random_ids(60)
    logits = model(ids).logits
    snapshot = _snapshot(model)
    config = TempLoraConfig(chunk_size=8, window=32, steps_per_chunk=0)
    with TempLoraSession(model, config, method=spec) as session:
        with_method = session.process(ids[0])
    with TempLoraSession(model, config) as session:
        without = session.process(ids[0])
    assert not torch.allclose(with_method, without)  # the window itself is handled by the method
    _assert_restored(model, snapshot, ids, logits)


TRAIN_THROUGH = [
    "yarn:factor=2",
    "lm-infinite:n_local=16,n_global=2",  # window 32 > n_local: training goes through the Λ pattern (eager kernel)
]


@pytest.mark.parametrize("spec", TRAIN_THROUGH)
def test_trains_through_a_long_context_method(spec):
    if spec.split(":")[0] not in method_names():
        pytest.skip(f"{spec} is not registered yet")
    model = tiny_model("llama", length=16)
    ids = random_ids(60)
    logits = model(ids).logits
    snapshot = _snapshot(model)
    try:
        with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32, lr=1e-2), method=spec) as session:
            assert torch.isfinite(session.process(ids[0])).all()
    finally:
        _assert_restored(model, snapshot, ids, logits)


def test_clear_errors():
    model = tiny_model("llama", length=32)
    with pytest.raises(ValueError, match="chunk_size .* must not exceed window"):
        TempLoraConfig(chunk_size=64, window=32)
    with pytest.raises(ValueError, match="keep must be"):
        TempLoraConfig(chunk_size=8, window=32, keep=30)
    with pytest.raises(ValueError, match="match no linear layer.*q_proj"):
        TempLoraSession(model, TempLoraConfig(target_modules=("c_attn",)))
    assert lora_modules(model) == []
    with TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32)) as session:
        with pytest.raises(ValueError, match="empty"):
            session.process([])
        with pytest.raises(ValueError, match="process"):
            session.generate(3)
    with pytest.raises(ValueError, match="unknown method"):
        TempLoraSession(model, TempLoraConfig(chunk_size=8, window=32), method="no-such-method")
    assert lora_modules(model) == [] and "_lengthwise_handle" not in model.__dict__


def test_bucket_nll_pools_sums_and_counts():
    nll = torch.ones(3000)
    buckets = bucket_nll(nll, edges=(0, 1024, 2048))
    assert buckets == {"0-1k": (1023.0, 1023), "1k-2k": (1024.0, 1024), "2k+": (953.0, 953)}


def test_pooled_buckets_are_in_position_order_after_a_json_round_trip():
    import json

    from lengthwise.temp_lora.buckets import bucket_start
    from lengthwise.temp_lora.evaluate import pool

    buckets = bucket_nll(torch.ones(20000), edges=(0, 1024, 2048, 16384))
    cost = {"seconds": {"score": 1.0}, "flops": {"score": 1.0}}
    record = {"metrics": {"nll_sum": 19999.0, "tokens": 19999, "buckets": buckets, "cost": cost}}
    resumed = json.loads(json.dumps(record, sort_keys=True))  # results files store keys sorted: "16k+" < "1k-2k"
    assert list(resumed["metrics"]["buckets"]) != list(buckets)
    assert list(pool([resumed])["buckets"]) == list(buckets) == ["0-1k", "1k-2k", "2k-16k", "16k+"]
    assert [bucket_start(k) for k in buckets] == [0, 1024, 2048, 16384] and bucket_start("256-512") == 256
