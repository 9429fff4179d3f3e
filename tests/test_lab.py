"""Position-encoding lab: every encoding (shapes, causal masking, relative-position invariance where it holds),
against transformers where it has the same maths (RoPE, ALiBi slopes, T5 buckets), the inference tricks, the
save/load format through `lengthwise.load_model`, the perplexity task, training resume, and the CLI errors."""

from __future__ import annotations

import math

import pytest
import torch

from lengthwise.lab.encodings import ENCODINGS, build_encoding, encoding_config
from lengthwise.lab.model import InferenceOptions, LabConfig, LabModel, attention_mask, logn_scale

HEADS, HEAD_DIM, D_MODEL, L = 4, 16, 64, 16
RELATIVE = [n for n in ENCODINGS if n not in ("sinusoidal",)]  # score depends only on m - n (at inference)
VOCAB = 97


def tiny_lab(pe: str, **inference) -> LabModel:
    torch.manual_seed(0)
    model = LabModel(LabConfig(pe=pe, vocab_size=VOCAB, d_model=D_MODEL, num_hidden_layers=2, heads=HEADS, ffn=96,
                               max_position_embeddings=L, inference=InferenceOptions(**inference)))
    return model.eval()


def encoding(name: str):
    return build_encoding(name, None, HEADS, HEAD_DIM, D_MODEL, L).eval()


def score(pe, q: torch.Tensor, k: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """(H,) attention logit (before 1/sqrt(d)) of a query at position m on a key at position n."""
    qm = pe.rotate(q[None, :, None], torch.tensor([m]), True)[0, :, 0]  # (H, Dh)
    kn = pe.rotate(k[None, :, None], torch.tensor([n]), False)[0, :, 0]
    logit = (qm * kn).sum(-1)
    bias = pe.bias(torch.tensor([m]), torch.tensor([n]))
    return logit + (bias[:, 0, 0] if bias is not None else 0)


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_forward_shapes_loss_and_gradients(name):
    model = tiny_lab(name).train()
    ids = torch.randint(0, VOCAB, (2, 3 * L))  # past the training length, also while training
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 3 * L, VOCAB)
    assert torch.isfinite(out.logits).all() and math.isfinite(out.loss.item())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the learnable encodings really learn (their parameters get a gradient)
    if name in ("t5-bias", "kerple-power", "kerple-log"):
        assert any(p.grad.abs().sum() > 0 for p in model.pe.parameters())


CAUSAL_CASES = [(name, {}) for name in ENCODINGS] + [
    ("rope", {"logn": True}), ("nope", {"local_window": 5}), ("xpos", {"blockwise": True}),
    ("alibi", {"blockwise": True, "block": 3})]


@pytest.mark.parametrize("name, options", CAUSAL_CASES, ids=[f"{n}-{'-'.join(o) or 'full'}" for n, o in CAUSAL_CASES])
def test_causal_masking(name, options):
    """Changing the future never changes the logits of the past."""
    model = tiny_lab(name, **options)
    ids = torch.randint(0, VOCAB, (1, 3 * L))
    changed = ids.clone()
    changed[0, 2 * L :] = (changed[0, 2 * L :] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, : 2 * L], b[:, : 2 * L])
    assert not torch.allclose(a[:, 2 * L :], b[:, 2 * L :])


@pytest.mark.parametrize("name", RELATIVE)
def test_relative_position_invariance(name):
    """q_m . k_n (+ bias) depends on m - n only, also far beyond the training length."""
    pe = encoding(name)
    if name == "t5-bias":  # its table starts at zero; give it values
        torch.nn.init.normal_(pe.table.weight)
    q, k = torch.randn(HEADS, HEAD_DIM), torch.randn(HEADS, HEAD_DIM)
    for m, n in [(5, 2), (9, 9), (L + 3, 1)]:
        base = score(pe, q, k, m, n)
        for shift in (1, 7, 10 * L):
            torch.testing.assert_close(score(pe, q, k, m + shift, n + shift), base, rtol=1e-4, atol=1e-4)
    if name != "nope":  # and it does depend on the distance
        assert not torch.allclose(score(pe, q, k, 9, 8), score(pe, q, k, 9, 1))


def test_sinusoidal_is_absolute():
    pe = encoding("sinusoidal")
    table = pe.embed(torch.arange(3 * L)) / pe.config.scale
    assert table.shape == (3 * L, D_MODEL)
    # PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)
    p, i = 7, 3
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / D_MODEL)), abs=1e-6)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / D_MODEL)), abs=1e-6)
    assert pe.bias(torch.arange(4), torch.arange(4)) is None


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    pe = encoding("rope")
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, max_position_embeddings=L)
    x = torch.randn(2, HEADS, 3 * L, HEAD_DIM)
    positions = torch.arange(3 * L)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(pe.rotate(x, positions, True), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [4, 6, 8, 12])
def test_alibi_slopes_match_transformers_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    pe = build_encoding("alibi", None, heads, HEAD_DIM, heads * HEAD_DIM, L)
    slopes = build_alibi_tensor(torch.ones(1, 4), heads, torch.float32)[:, 0, 1]  # slope * position 1
    bias = pe.bias(torch.arange(4), torch.arange(4))  # (H, 4, 4)
    torch.testing.assert_close(-bias[:, 3, 2], slopes)
    torch.testing.assert_close(-bias[:, 3, 0], 3 * slopes)


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from lengthwise.lab.encodings.t5_bias import relative_bucket

    dist = torch.arange(0, 600)
    expected = T5Attention._relative_position_bucket(-dist, bidirectional=False, num_buckets=32, max_distance=128)
    torch.testing.assert_close(relative_bucket(dist, 32, 128), expected)


def test_kerple_formulas():
    q_pos, k_pos = torch.tensor([10]), torch.tensor([0, 4, 10])
    power, log = encoding("kerple-power"), encoding("kerple-log")
    with torch.no_grad():
        power.r1.fill_(0.5), power.r2.fill_(1.5), log.r1.fill_(2.0), log.r2.fill_(0.25)
    d = torch.tensor([10.0, 6.0, 0.0])
    torch.testing.assert_close(power.bias(q_pos, k_pos)[0, 0], -0.5 * d**1.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log.bias(q_pos, k_pos)[0, 0], -2.0 * torch.log1p(0.25 * d))


def test_sandwich_bias_is_zero_on_the_diagonal_and_negative_elsewhere():
    pe = encoding("sandwich")
    bias = pe.bias(torch.arange(3 * L), torch.arange(3 * L))  # (H, T, T)
    assert torch.allclose(bias.diagonal(dim1=1, dim2=2), torch.zeros(HEADS, 3 * L), atol=1e-4)
    below = torch.tril(torch.ones(3 * L, 3 * L, dtype=torch.bool), -1)
    assert (bias[:, below] < 0).all()


def test_xpos_scales_q_and_k_by_zeta_powers():
    """At position 0 (rotation = identity) q is scaled by zeta^((0 - L/2)/s) and k by its inverse, so a score
    carries zeta^((m - n)/s), < 1 for m > n: XPOS's decay on top of RoPE."""
    pe = encoding("xpos")
    ones = torch.ones(1, 1, 1, HEAD_DIM)
    offset = (0 - L // 2) / pe.config.scale_base
    torch.testing.assert_close(pe.rotate(ones, torch.tensor([0]), True)[0, 0, 0], pe.zeta**offset)
    torch.testing.assert_close(pe.rotate(ones, torch.tensor([0]), False)[0, 0, 0], pe.zeta**-offset)
    assert (pe.zeta > 0).all() and (pe.zeta < 1).all()


def test_randomized_positions():
    pe = encoding("randomized")
    torch.manual_seed(1)
    train_pos = pe.positions(L, training=True)
    assert train_pos.shape == (L,) and (train_pos.diff() > 0).all()
    assert train_pos.min() >= 0 and train_pos.max() < 16 * L and train_pos.max() >= L  # spread far out
    torch.testing.assert_close(pe.positions(L, training=False), torch.arange(L))
    sinus = build_encoding("randomized", {"underlying": "sinusoidal"}, HEADS, HEAD_DIM, D_MODEL, L)
    assert sinus.embed(train_pos).shape == (L, D_MODEL)


def test_inference_masks_and_logn():
    idx = torch.arange(4 * L)
    local = attention_mask(idx, idx, window=5)
    assert local.sum(-1).max() == 5 and local[0].sum() == 1
    block = attention_mask(idx, idx, block=L // 2)
    dist = (idx[:, None] - idx[None, :]).masked_fill(~block, -1)
    assert dist.max() == L - 1  # never beyond the training length
    assert block.sum(-1).min() >= 1 and not torch.triu(block, 1).any()
    scale = logn_scale(idx, L)
    assert (scale[:L] == 1).all() and scale[-1].item() == pytest.approx(math.log(4 * L) / math.log(L))


def test_local_plus_logn_uses_full_attention_in_the_last_layer():
    """Su's hybrid: only the early layers are local; within the window and the training length it equals the
    plain model."""
    ids = torch.randint(0, VOCAB, (1, L))
    with torch.no_grad():
        plain = tiny_lab("nope")(input_ids=ids).logits
        hybrid = tiny_lab("nope", local_window=L)(input_ids=ids).logits
        narrow = tiny_lab("nope", local_window=2)(input_ids=ids).logits
    torch.testing.assert_close(hybrid, plain)
    assert not torch.allclose(narrow, plain)


@pytest.mark.parametrize("bad, message", [
    ({"pe": "rotary"}, "accepted: sinusoidal"),
    ({"pe": "t5-bias", "pe_options": {"buckets": 3}}, "no option buckets"),
    ({"pe": "kerple-log", "pe_options": {"init_r1": -1.0}}, "init_r1 must be a positive"),
    ({"d_model": 30, "heads": 4}, "divisible by heads"),
])
def test_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        LabConfig(**bad)


def test_inference_option_errors():
    with pytest.raises(ValueError, match="local_window must be a positive integer"):
        InferenceOptions(local_window=0)
    with pytest.raises(ValueError, match="choose one"):
        InferenceOptions(local_window=4, blockwise=True)
    with pytest.raises(ValueError, match="randomized underlying"):
        encoding_config("randomized", {"underlying": "alibi"})


@pytest.fixture(scope="module")
def saved_lab(tmp_path_factory):
    from lengthwise.lab.model import save_lab_model
    from lengthwise.lab.train import default_tokenizer

    tokenizer = default_tokenizer()  # read from disk: much faster than training a tiny one
    torch.manual_seed(0)
    model = LabModel(LabConfig(pe="alibi", vocab_size=len(tokenizer), d_model=32, num_hidden_layers=2, heads=2,
                               ffn=64, max_position_embeddings=L)).eval()  # (a 2048-token vocabulary)
    root = tmp_path_factory.mktemp("lab")
    save_lab_model(model, tokenizer, root / "alibi")
    return model, root


def test_load_model_round_trip_and_perplexity(saved_lab):
    from lengthwise import load_model
    from lengthwise.data.corpus import Document
    from lengthwise.eval.perplexity import perplexity

    model, root = saved_lab
    loaded, tokenizer = load_model(str(root / "alibi"))
    ids = torch.randint(0, len(tokenizer), (1, 2 * L))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    docs = [Document("a", "The grass is green. The sky is blue. The pass key is 12345. " * 20)]
    records = perplexity(loaded, tokenizer, docs, [L, 2 * L], ["vanilla", "sliding-window"], max_docs=1,
                         progress=False)
    assert [r["length"] for r in records] == [L, 2 * L, L, 2 * L]
    assert all(math.isfinite(r["metrics"]["ppl"]) and r["pretrain_length"] == L for r in records)
    # inside the training length the sliding window is the one pass
    assert records[0]["metrics"]["nll"] == pytest.approx(records[2]["metrics"]["nll"], rel=1e-5)


def test_logits_to_keep_and_passkey(saved_lab):
    model, _ = saved_lab
    ids = torch.randint(0, 50, (1, 2 * L))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=3).logits, model(input_ids=ids).logits[:, -3:])
    passkey = pytest.importorskip("lengthwise.eval.passkey")
    from lengthwise.lab.train import default_tokenizer

    records = passkey.passkey(model, default_tokenizer(), [80], [50], ["vanilla"], trials=1, progress=False)
    assert len(records) == 1 and 0 <= records[0]["metrics"]["accuracy"] <= 1


def test_compare_variants_table_and_plot(saved_lab, tmp_path, monkeypatch):
    from lengthwise.data.corpus import Document
    from lengthwise.lab import compare as lab_compare

    _, root = saved_lab
    with pytest.raises(ValueError, match="unknown trick 'fast'"):
        lab_compare.parse_variant("alibi+fast", root)
    with pytest.raises(ValueError, match="no lab model 'rope'"):
        lab_compare.parse_variant("rope", root)
    variant = lab_compare.parse_variant("alibi+local", root)
    assert variant.inference == {"local_window": L} and variant.method == "vanilla"
    assert lab_compare.parse_variant("alibi+sliding", root).method == "sliding-window"
    with pytest.raises(ValueError, match="use it alone"):
        lab_compare.parse_variant("alibi+sliding+logn", root)
    assert lab_compare.default_variants(root) == ["alibi", "alibi+sliding"]
    docs = [Document("a", "The grass is green. The sky is blue. The pass key is 12345. " * 20)]
    monkeypatch.setattr(lab_compare, "load_corpus", lambda name: docs)
    results = tmp_path / "r.jsonl"
    records = lab_compare.compare(root, ["alibi", "alibi+logn", "alibi+sliding"], [1, 2], ["toy"], 1, results,
                                  tmp_path / "t.md", tmp_path / "p.png", progress=False,
                                  position_plot=tmp_path / "n.png")
    assert len(records) == 6 and (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "n.png").exists()
    assert records[4]["method"] == "sliding-window"
    assert records[4]["metrics"]["nll"] == pytest.approx(records[0]["metrics"]["nll"], rel=1e-5)  # 1x: equal
    table = (tmp_path / "t.md").read_text()
    assert "| alibi+logn | - |" in table and f"{2 * L} (2x)" in table
    again = lab_compare.compare(root, ["alibi"], [1, 2], ["toy"], 1, results, progress=False)  # resumed
    assert [r["time"] for r in again] == [r["time"] for r in records[:2]]


def _trained_and_crashed(pe: str, tmp_path, monkeypatch):
    """(config, tokenizer, folder of an uninterrupted 4-step run, folder of a run crashed at step 3 after its
    step-2 checkpoint) on a random token stream."""
    from lengthwise.lab import train as lab_train

    tokenizer = lab_train.default_tokenizer()
    stream = torch.randint(0, len(tokenizer), (4000,), dtype=torch.int32)
    monkeypatch.setattr(lab_train, "token_stream", lambda *a, **k: stream)
    cfg = lab_train.TrainConfig(pe=pe, context=16, d_model=16, layers=1, heads=2, ffn=16, steps=4, batch=2,
                                warmup=1, checkpoint_every=2)
    straight = lab_train.train(cfg, tmp_path / "a", tokenizer=tokenizer, log=lambda m: None)
    real_batch_at = lab_train.batch_at

    def crash_at_3(stream, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch_at(stream, step, *args)

    monkeypatch.setattr(lab_train, "batch_at", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        lab_train.train(cfg, tmp_path / "b", tokenizer=tokenizer, log=lambda m: None)
    monkeypatch.setattr(lab_train, "batch_at", real_batch_at)
    return cfg, tokenizer, straight, tmp_path / "b"


def test_train_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from lengthwise.lab import train as lab_train

    cfg, tokenizer, straight, _ = _trained_and_crashed("randomized", tmp_path, monkeypatch)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    logs = []
    resumed = lab_train.train(cfg, tmp_path / "b", tokenizer=tokenizer, log=logs.append)
    assert any("resuming randomized at step 2/4" in m for m in logs)
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not (resumed / "checkpoint.pt").exists()
    other = lab_train.TrainConfig(**{**cfg.__dict__, "pe": "rope"})
    (tmp_path / "b" / "training.json").unlink()  # an unfinished folder, resumed with another config
    lab_train.atomic_torch_save({"config": {}, "step": 1}, tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ValueError, match="another config"):
        lab_train.train(other, tmp_path / "b", tokenizer=tokenizer, log=lambda m: None)


def test_train_takes_over_what_a_killed_run_left(tmp_path, monkeypatch):
    """What a SIGKILL leaves in a model folder neither blocks nor changes the rerun: a checkpoint, a lock of a dead
    process or an empty one (killed between creating and writing it), temporary files of cut-short writes, a
    checkpoint still beside a finished model. The resumed weights are bit-identical to an uninterrupted run's."""
    import os
    import subprocess
    import sys
    import time

    from lengthwise.lab import train as lab_train

    cfg, tokenizer, straight, killed = _trained_and_crashed("rope", tmp_path, monkeypatch)
    (killed / lab_train.LOCK).write_text("")  # SIGKILL leaves its lock; this one even before its pid was written
    long_ago = time.time() - 2 * lab_train.LOCK_WRITE_SECONDS
    os.utime(killed / lab_train.LOCK, (long_ago, long_ago))
    (killed / ".checkpoint.pt.tmp").write_bytes(b"torn")
    (killed / ".training.json.k1ll3d.tmp").write_text('{"config": {"pe"')
    logs = []
    resumed = lab_train.train(cfg, killed, tokenizer=tokenizer, log=logs.append)
    assert any("resuming rope at step 2/4" in m for m in logs), logs
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in straight.iterdir())
    lab_train.atomic_torch_save({"step": 2}, killed / "checkpoint.pt")  # killed after training.json, before this went
    assert lab_train.train(cfg, killed, tokenizer=tokenizer, log=logs.append) == killed
    assert "already trained" in logs[-1] and not (killed / "checkpoint.pt").exists()

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    holders = {"": -1, "0": None, str(dead.pid): None, str(os.getppid()): os.getppid(), str(os.getpid()): None}
    for text, owner in holders.items():  # a fresh empty lock: its writer is starting (-1), skip the folder
        folder = tmp_path / f"lock-{text or 'empty'}"
        folder.mkdir()
        (folder / lab_train.LOCK).write_text(text)
        assert lab_train._lock(folder) == owner, text  # 0 once read as "our own process group": always alive


def test_cli_rejects_bad_input(tmp_path):
    from typer.testing import CliRunner

    from lengthwise.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["lab", "train", "--pe", "rotary", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown position encoding 'rotary'" in result.output
    result = runner.invoke(app, ["lab", "compare", "--models", str(tmp_path), "--factors", "1,x"])
    assert result.exit_code != 0 and "--factors must be" in result.output
