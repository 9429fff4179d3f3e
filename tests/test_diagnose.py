"""`lengthwise diagnose` (lengthwise.eval.diagnose): the blocked statistics equal a dense computation, the
distance-limited logits of lm-infinite equal the logits at distance L, the model is left as it was, and the command
writes records and figures, resumes, and answers bad input with one line."""

import json
import math

import pytest
import torch

import lengthwise
from lengthwise.attention.pattern import expand_heads
from lengthwise.attention.reference import lambda_scores
from lengthwise.cli import main
from lengthwise.eval import diagnose as dg
from lengthwise.testing import tiny_model

L = 32  # training length of the tiny model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def model():
    return tiny_model("llama", length=L)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(seed))


def _capture(monkeypatch):
    """What layer_statistics gets (q, k, pattern, encoding, scale, mods) per call, then the real computation."""
    seen = []
    original = dg.layer_statistics

    def spy(q, k, pattern, encoding, scale, mods, settings, train_length):
        seen.append((q.clone(), k.clone(), pattern, encoding, scale, mods))
        return original(q, k, pattern, encoding, scale, mods, settings, train_length)

    monkeypatch.setattr(dg, "layer_statistics", spy)
    return seen


def _dense_bucket_stats(row: torch.Tensor, visible: torch.Tensor, edges):
    """Per bucket of distances: (count, max, q50) from one dense row of logits (Tk,), key j at distance Tk-1-j."""
    tk = len(row)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        values = [float(row[j]) for j in range(tk) if a <= tk - 1 - j < b and bool(visible[j])]
        if not values:
            out.append((0, None, None))
            continue
        out.append((len(values), max(values), float(torch.tensor(values).quantile(0.5))))
    return out


@pytest.mark.parametrize(("family", "spec"), [
    ("llama", "vanilla"), ("llama", "lm-infinite:n_global=3"), ("llama", "yarn:factor=4"),
    ("llama", "streaming:n_sink=2"), ("llama", "yarn:factor=2+lm-infinite"),
    ("phi3", "lm-infinite"), ("gpt_neox", "lm-infinite"),  # partial rotary
])
def test_blocked_statistics_equal_a_dense_computation(monkeypatch, family, spec):
    model = tiny_model(family, length=L)
    seen = _capture(monkeypatch)
    n = 100
    settings = dg.DiagnoseSettings(queries=3, block=5)  # blocks of 5 queries: many blocks, split buckets
    with lengthwise.patch(model, spec):
        recorded = dg.record_pass(model, _ids(n), settings, L)
    assert sorted(recorded["layers"]) == [0, 1] and len(seen) == 2
    for layer, (q, k, pattern, encoding, scale, mods) in enumerate(seen):
        stats = recorded["layers"][layer]
        kx = expand_heads(k, q.shape[1]).float()
        pos = torch.arange(n)[None]
        scores, visible = lambda_scores(q.float(), kx, pos, pos, None, pattern, encoding, scale, mods)  # n x n
        visible = visible.expand_as(scores)[0]
        scores = scores[0]
        edges = stats["logits"]["edges"]
        assert edges == dg.log_edges(n, marks=(L,)) and L in edges
        for head in range(q.shape[1]):
            dense = _dense_bucket_stats(scores[head, -1], visible[head, -1], edges)
            assert stats["logits"]["count"][head] == [c for c, _, _ in dense]
            for got, want in zip(stats["logits"]["max"][head], [m for _, m, _ in dense]):
                assert (got is None) == (want is None) and (want is None or got == pytest.approx(want, rel=1e-4, abs=1e-5))
            for got, want in zip(stats["logits"]["q50"][head], [m for _, _, m in dense]):
                assert (got is None) == (want is None) and (want is None or got == pytest.approx(want, rel=1e-4,
                                                                                                  abs=1e-5))
        # entropy of the dense softmax, averaged over the sampled positions of each bucket
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)  # (H, n)
        for bucket, positions in enumerate(dg.sample_positions(edges, settings.queries)):
            want = entropy[:, positions].mean(-1)
            got = torch.tensor([stats["entropy"]["mean"][h][bucket] for h in range(q.shape[1])])
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        reference = edges.index(L) - 1
        assert stats["entropy"]["at_train_length"] == [stats["entropy"]["mean"][h][reference]
                                                       for h in range(q.shape[1])]


def test_captured_logits_are_the_ones_eager_attention_softmaxes(model, monkeypatch):
    """Vanilla: the softmax of the dense logits from the captured q and k equals the attention probabilities the
    model's own eager attention returns, and entropy recorded on an eager model equals theirs."""
    seen = _capture(monkeypatch)
    n = 60
    ids = _ids(n, seed=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids[None], output_attentions=True).attentions
        recorded = dg.record_pass(model, ids, dg.DiagnoseSettings(queries=4, block=7), L)  # delegates to eager
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    for layer, (q, k, pattern, encoding, scale, mods) in enumerate(seen):
        scores = (q.float() @ expand_heads(k, q.shape[1]).float().transpose(-1, -2)) * scale
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[0]
        assert torch.allclose(probs, attentions[layer][0], atol=1e-5)
        entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
        edges = dg.log_edges(n, marks=(L,))
        for bucket, positions in enumerate(dg.sample_positions(edges, 4)):
            got = torch.tensor([row[bucket] for row in recorded["layers"][layer]["entropy"]["mean"]])
            assert torch.allclose(got, entropy[:, positions].mean(-1), rtol=1e-4, atol=1e-5)


def test_lm_infinite_far_global_logits_equal_the_logits_at_distance_L(model):
    """Layer 0 sees only token embeddings and positions, so the logit of the last query (token x at position
    n-1) to global key 0 under lm-infinite must equal vanilla's logit of the same token at position L to the same
    key: a pass of L + 1 tokens whose last token is x. Beyond the window only global keys are seen."""
    n = 120
    ids = _ids(n, seed=2)
    settings = dg.DiagnoseSettings(layers=(0,), queries=2)
    with lengthwise.patch(model, "lm-infinite:n_global=1"):
        limited = dg.record_pass(model, ids, settings, L)["layers"][0]["logits"]
    near = torch.cat([ids[:1], ids[n - L:n]])  # x_0 at position 0, x_{n-1} at position L
    plain = dg.record_pass(model, near, settings, L)["layers"][0]["logits"]
    true_distance = dg.record_pass(model, ids, settings, L)["layers"][0]["logits"]  # vanilla, key 0 at n - 1
    edges = limited["edges"]
    far = len(edges) - 2  # the bucket holding distance n - 1: key 0 alone
    assert edges[far] <= n - 1 < edges[far + 1]
    at_l = plain["edges"].index(L)  # bucket [L, L + 1): key 0 of the short pass
    heads = len(limited["max"])
    for head in range(heads):
        counts = limited["count"][head]
        assert counts[far] == 1
        beyond_window = [c for a, c in zip(edges, counts) if L <= a < edges[far]]
        assert sum(beyond_window) == 0  # the middle is not seen
        assert limited["max"][head][far] == pytest.approx(plain["max"][head][at_l], rel=1e-4, abs=1e-5)
        assert limited["max_beyond"][head] == limited["max"][head][far]
    moved = [abs(limited["max"][h][far] - true_distance["max"][h][far]) for h in range(heads)]
    assert max(moved) > 1e-2  # the true-distance logit differs: the limit is what makes them equal


def test_record_pass_leaves_the_model_as_it_was(model):
    ids = _ids(80, seed=3)
    with torch.no_grad():
        before = model(input_ids=ids[None]).logits
    for spec in ("vanilla", "lm-infinite"):
        with lengthwise.patch(model, spec):
            implementation = model.config._attn_implementation
            dg.record_pass(model, ids, dg.DiagnoseSettings(pca_layers=(0, 1)), L)
            assert model.config._attn_implementation == implementation
            assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids[None]).logits, before)


def test_hidden_state_pca_matches_the_hidden_states_and_a_dense_pca(model):
    n = 90
    ids = _ids(n, seed=4)
    recorded = dg.record_pass(model, ids, dg.DiagnoseSettings(pca_layers=(0,), first_tokens=5), L)
    pca = recorded["layers"][0]["pca"]
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[1][0].double()  # layer 0 output
    x = hidden / hidden.pow(2).mean(-1, keepdim=True).sqrt()
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    xy = torch.tensor([[v if v is not None else math.nan for v in p] for p in pca["xy"]], dtype=torch.float64)
    want = centred[pca["positions"]] @ vh[:2].T
    assert torch.allclose(xy.abs(), want.abs(), rtol=1e-4, atol=1e-4)  # equal up to each axis's sign
    assert pca["explained"][0] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-4)
    assert pca["positions"][:5] == [0, 1, 2, 3, 4] and pca["positions"][-1] == n - 1
    assert pca["beyond_vs_inside"] is not None and pca["first_vs_inside"] is not None


def test_log_edges_and_samples():
    edges = dg.log_edges(40, marks=(32,))
    assert edges[0] == 0 and edges[-1] == 40 and 32 in edges and edges == sorted(set(edges))
    samples = dg.sample_positions(edges, 3)
    assert all(len(s) <= 3 and all(a <= p < b for p in s) for s, a, b in zip(samples, edges[:-1], edges[1:]))


# ----------------------------------------------------------------------------------------------------------- command
def _corpus(tmp_path):
    words = " ".join(f"word{i % 97} and {i % 13} then" for i in range(3000))
    path = tmp_path / "doc.txt"
    path.write_text(words + "\n")
    return path


def _run(args):
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code


def test_the_command_writes_records_and_figures_and_resumes(tmp_path, capsys):
    data = _corpus(tmp_path)
    out = tmp_path / "out"
    args = ["diagnose", "--model", "llama-rope-256", "--data", str(data), "--lengths", "128,512", "-m", "vanilla",
            "-m", "lm-infinite", "--layers", "0,3", "--queries", "4", "--out", str(out), "--figures",
            str(tmp_path / "figs"), "--threads", "1", "--quiet"]
    assert _run(args) == 0
    results = out / "diagnose_llama-rope-256.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 2 * 2 * 2  # method x length x layer
    assert {(r["method"], r["length"], r["layer"]) for r in records} == {
        (m, n, layer) for m in ("vanilla", "lm-infinite") for n in (128, 512) for layer in (0, 3)}
    assert all(r["task"] == "diagnose" and r["pretrain_length"] == 256 for r in records)
    assert all(r["metrics"]["pca"] is not None for r in records)  # default PCA layers: first and last of --layers
    figures = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert figures == ["diagnose_entropy_llama-rope-256.png", "diagnose_logits_band_llama-rope-256.png",
                       "diagnose_logits_llama-rope-256.png", "diagnose_pca_layer0_llama-rope-256.png",
                       "diagnose_pca_layer3_llama-rope-256.png"]
    assert all((tmp_path / "figs" / name).stat().st_size > 10_000 for name in figures)
    table = capsys.readouterr().out
    assert "| lm-infinite | 512 |" in table
    # a rerun records nothing new
    assert _run(args) == 0
    assert [json.loads(line)["key"] for line in results.read_text().splitlines()] == [r["key"] for r in records]
    # a record lost (a killed writer): only that one is made again
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n")
    assert _run(args) == 0
    again = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(again) == len(records) and again[-1]["key"] == records[-1]["key"]
    # statistics are reproducible: the remade record equals the lost one
    assert again[-1]["metrics"] == records[-1]["metrics"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--lengths", "abc"], "lengths must be comma-separated integers"),
    (["-m", "sliding-window"], "scores each token by recomputing windows"),
    (["-m", "lm-infinite:top_k=2"], "does not record middle retrieval"),
    (["-m", "nonsense"], "unknown method 'nonsense'"),
    (["--layers", "0,x"], "--layers must be comma-separated integers"),
    (["--heads", "-1"], "--heads must be comma-separated integers"),
    (["--layers", "9"], "--layers 9: the model has 4 layers"),
    (["--heads", "0,7"], "--heads 7: the model has 4 attention heads"),
    (["--layers", "0,1", "--pca-layers", "2"], "--pca-layers 2 not among --layers 0,1"),
    (["--lengths", "100000"], "has 100000 tokens"),
    (["--out", "{tmp}/afile"], "{tmp}/afile is a file, not a folder"),
    (["--queries", "0"], "queries"),
])
def test_bad_input_gets_one_line(tmp_path, capsys, extra, expected):
    data = _corpus(tmp_path)
    (tmp_path / "afile").write_text("a file\n")
    args = ["diagnose", "--model", "llama-rope-256", "--data", str(data), "--lengths", "128", "--out",
            str(tmp_path / "out"), "--quiet"] + [e.format(tmp=tmp_path) for e in extra]
    code = _run(args)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
