"""LongRoPE's pipeline after the search (tiny models built in code): fine-tuning with fixed factors (LoRA and full,
checkpoint, resume to the identical state, the saved folder loads to the same logits), the seeded progressive search,
the short-context readjustment and its `short_attention_factor`, and one-line errors for bad input."""

import json
import random

import pytest
import torch

from lengthwise.api import load_model, patch
from lengthwise.cli import main
from lengthwise.data.corpus import Document
from lengthwise.errors import UserError
from lengthwise.search import EvolutionConfig
from lengthwise.search.finetune import FinetuneConfig, finetune, load_finetuned, sequence_loss, set_checkpointing
from lengthwise.search.progressive import extend, progressive_seeds, readjust
from lengthwise.search.space import SearchSpace
from lengthwise.testing import random_ids, tiny_model, tiny_tokenizer

L = 32
LONG = [1.0, 1.2, 1.6, 2.2, 3.0, 3.6, 4.0, 4.4]  # 8 rotary pairs (head_dim 16)
SPEC = "longrope:long_factors=[" + ",".join(map(str, LONG)) + "],factor=4,attention_factor=1"


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(0)
    words = "the grass is green sky blue sun yellow pass key remember here we go there and back again".split()
    return [Document(f"doc{i}", " ".join(rng.choice(words) for _ in range(400))) for i in range(3)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama and tokenizer saved as a folder, so `load_finetuned` can load the base model by name."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    tiny_model("llama", length=L).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def cfg(**kw):
    return FinetuneConfig(**{"length": 4 * L, "steps": 6, "checkpoint_every": 2, "lr": 1e-2, "warmup": 1,
                             "rank": 4, "alpha": 8.0, "loss_chunk": 50, **kw})


def run(base, docs, out, spec=SPEC, **kw):
    model, tok = load_model(base)
    stop = kw.pop("stop_after", None)
    return model, finetune(model, tok, docs, spec, cfg(**kw), out, model_name=base, stop_after=stop)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def logits(model, n=3 * L, seed=5):
    with torch.no_grad():
        return model(input_ids=random_ids(n, seed=seed)).logits


def test_finetune_resumes_to_the_identical_state_and_the_folder_loads(base, docs, tmp_path):
    killed, first = run(base, docs, tmp_path / "a", stop_after=3)
    assert first.steps == 3 and len(first.log) == 3
    files = sorted(p.name for p in (tmp_path / "a" / "checkpoints").rglob("*") if p.is_file())
    assert files == ["optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    assert not (tmp_path / "a" / "finetune.json").exists()  # unfinished: no manifest
    resumed, second = run(base, docs, tmp_path / "a")
    assert second.resumed_from == 3 and second.steps == 6
    straight, whole = run(base, docs, tmp_path / "b")
    assert [r["loss"] for r in second.log] == [r["loss"] for r in whole.log]
    a, b = trainable_state(resumed), trainable_state(straight)
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(resumed), logits(straight))
    # the folder: adapter (peft format) + factors + manifest, JSON and safetensors only; checkpoints removed
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "factors.json", "finetune.json", "train_log.jsonl"]
    assert json.loads((out / "factors.json").read_text())["long_factors"] == LONG
    model, _, handle = load_finetuned(out)
    assert torch.equal(logits(model), logits(resumed))
    assert torch.equal(logits(model, n=L // 2), logits(resumed, n=L // 2))
    handle.remove()
    assert not torch.equal(logits(model), logits(resumed))  # the factors are part of what was fine-tuned
    # the LoRA changed the model: the fine-tuned logits differ from the base model patched with the same factors
    plain, _ = load_model(base)
    with patch(plain, SPEC):
        assert not torch.allclose(logits(plain), logits(resumed))
    # rerun of a finished folder: read back, not retrained
    again, third = run(base, docs, out)
    assert third.resumed_from == 6 and torch.equal(logits(again), logits(resumed))


def test_the_adapter_loads_in_peft(base, docs, tmp_path):
    from peft import PeftModel

    model, result = run(base, docs, tmp_path / "p", steps=2)
    plain, _ = load_model(base)
    with patch(plain, SPEC):
        wrapped = PeftModel.from_pretrained(plain, str(tmp_path / "p" / "adapter"))
        assert torch.allclose(logits(wrapped), logits(model), atol=1e-6)


@pytest.mark.parametrize("spec", ["linear:factor=4", "yarn:factor=4"])
def test_controls_train_under_the_same_budget(base, docs, tmp_path, spec):
    model, result = run(base, docs, tmp_path / "c", spec=spec, steps=2)
    manifest = json.loads((tmp_path / "c" / "finetune.json").read_text())
    assert manifest["method"] == spec and manifest["tokens"] == 2 * 4 * L and result.steps == 2
    assert not (tmp_path / "c" / "factors.json").exists()
    loaded, _, _ = load_finetuned(tmp_path / "c")
    assert torch.equal(logits(loaded), logits(model))


def test_full_finetuning_saves_an_hf_folder(base, docs, tmp_path):
    model, result = run(base, docs, tmp_path / "f", full=True, steps=2, lr=1e-3)
    assert (tmp_path / "f" / "model" / "config.json").exists() and not (tmp_path / "f" / "adapter").exists()
    loaded, _, handle = load_finetuned(tmp_path / "f")
    assert torch.equal(logits(loaded), logits(model))
    plain, _ = load_model(base)
    changed = [n for (n, p), q in zip(plain.named_parameters(), loaded.parameters()) if not torch.equal(p, q)]
    assert changed


def test_chunked_loss_and_gradient_checkpointing_change_nothing(base):
    model, _ = load_model(base)
    ids = random_ids(4 * L, seed=2)[0]
    with patch(model, SPEC):
        full = sequence_loss(model, ids, 0, False)
        chunked = sequence_loss(model, ids, 17, True)
        assert torch.allclose(full, chunked, atol=1e-6)
        model.train()
        params = [p for p in model.parameters()]
        grads = []
        for checkpointing in (False, True):
            set_checkpointing(model, checkpointing)
            model.zero_grad()
            sequence_loss(model, ids, 17, True).backward()
            grads.append([p.grad.clone() for p in params])
        set_checkpointing(model, False)
        model.eval()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_checkpoint_of_another_run_is_refused(base, docs, tmp_path):
    run(base, docs, tmp_path / "x", stop_after=2)
    with pytest.raises(UserError, match="belongs to another run .differs in: config"):
        run(base, docs, tmp_path / "x", lr=5e-3)


def test_seeded_second_search_starts_from_the_given_factors(docs, tmp_path):
    model, tok = tiny_model("llama", length=L), tiny_tokenizer()
    previous = {"long_factors": LONG, "factor": 4.0, "n_hat": 0, "attention_factor": 1.0}
    result = extend(model, tok, docs, previous, scale=8, max_docs=1, out_dir=tmp_path / "e", standard_seeds=False,
                    evolution=EvolutionConfig(population=6, parents=3, mutations=2, crossovers=2, iterations=2))
    seeds = progressive_seeds(LONG, 4.0, 8.0, L, 10000.0)
    assert [name for name, _, _ in seeds] == ["previous", "previous-stretched", "previous+ntk", "previous+yarn"]
    assert seeds[1][1] == pytest.approx([2 * x for x in LONG])
    assert set(result.long.seed_ppl) == {name for name, _, _ in seeds}  # the PI / NTK / YaRN seeds are left out
    space = SearchSpace(8, 8.0)
    checkpoint = json.loads((tmp_path / "e" / "checkpoint-long.json").read_text())
    scored = {tuple(c["factors"]) for c, _ in checkpoint["state"]["scores"]}
    for _, lam, n_hat in seeds:
        assert tuple(space.snap(lam, n_hat).lambdas) in scored
    assert (tuple([8.0] * 8)) not in scored  # PI at 8x is no seed
    assert result.attention_factor == 1.0  # the first stage's
    assert result.target_length == 8 * L
    # by default PI / NTK / YaRN at the new scale join the seeds, after the first stage's
    both = extend(model, tok, docs, previous, scale=8, max_docs=1, out_dir=tmp_path / "d",
                  evolution=EvolutionConfig(population=8, parents=3, mutations=1, crossovers=0, iterations=1))
    assert list(both.long.seed_ppl)[:4] == [name for name, _, _ in seeds]
    assert {"pi", "ntk", "yarn"} <= set(both.long.seed_ppl)


def test_readjust_writes_short_factors_that_longrope_uses_below_L(docs, tmp_path):
    model, tok = tiny_model("llama", length=L), tiny_tokenizer()
    factors = {"long_factors": LONG, "factor": 4.0, "n_hat": 0, "attention_factor": 1.2,
               "original_max_position_embeddings": L}
    result = readjust(model, tok, docs, factors, max_docs=1, out_dir=tmp_path / "r",
                      evolution=EvolutionConfig(population=4, parents=2, mutations=2, crossovers=1, iterations=2))
    saved = json.loads((tmp_path / "r" / "factors.json").read_text())
    assert saved["short_factors"] == result.short_factors and saved["long_factors"] == LONG
    assert len(result.short_factors) == 8 and all(1.0 <= x <= 1.25 for x in result.short_factors)
    assert "original" in result.seed_ppl and (tmp_path / "r" / "rope_parameters.json").exists()
    spec = result.method_spec(str(tmp_path / "r" / "factors.json"))
    long_only = dict(long_factors=LONG, factor=4.0, attention_factor=1.2)
    with patch(model, spec):
        short_switched, long_switched = logits(model, L), logits(model, 3 * L, seed=4)
    with patch(model, "longrope", **long_only, short_factors=result.short_factors):
        assert torch.equal(logits(model, L), short_switched)
    with patch(model, "longrope", **long_only):
        assert torch.equal(logits(model, 3 * L, seed=4), long_switched)  # past L: the long factors, unchanged
        assert not torch.equal(logits(model, L), short_switched)  # below L the short factors are what changed


def test_short_attention_factor_restores_the_original_model_below_L(docs, tmp_path):
    model = tiny_model("llama", length=L)
    plain = logits(model, L)
    ones = [1.0] * 8
    with patch(model, "longrope", long_factors=LONG, factor=4.0, attention_factor=1.2):
        long_only = logits(model, 3 * L)
    with patch(model, "longrope", long_factors=LONG, short_factors=ones, factor=4.0, attention_factor=1.2,
               short_attention_factor=1.0):
        assert torch.allclose(logits(model, L), plain, atol=1e-5)
        assert torch.equal(logits(model, 3 * L), long_only)  # past L: long factors and the long attention factor
    with patch(model, "longrope", long_factors=LONG, short_factors=ones, factor=4.0, attention_factor=1.2):
        assert not torch.allclose(logits(model, L), plain, atol=1e-3)  # one factor in both regimes changes short inputs
    from lengthwise.rope.methods.longrope import LongRopeConfig
    from lengthwise.rope.table import to_rope_parameters

    with pytest.raises(ValueError, match="one attention_factor for both regimes"):
        to_rope_parameters("longrope", LongRopeConfig(long_factors=tuple(LONG), short_factors=tuple(ones),
                                                      attention_factor=1.2, short_attention_factor=1.0), model)
    with pytest.raises(ValueError, match="short_attention_factor applies with short_factors"):
        LongRopeConfig(long_factors=tuple(LONG), short_attention_factor=1.0)
    tok = tiny_tokenizer()
    result = readjust(model, tok, docs, {"long_factors": LONG, "factor": 4.0, "attention_factor": 1.2},
                      max_docs=1, short_attention=1.0, out_dir=tmp_path / "s",
                      evolution=EvolutionConfig(population=3, parents=2, mutations=1, crossovers=0, iterations=1))
    assert "short_attention_factor=1" in result.method_spec()
    assert not (tmp_path / "s" / "rope_parameters.json").exists()  # not expressible in transformers


def test_bad_library_input_is_refused_before_work(base, docs, tmp_path):
    model, tok = load_model(base)
    with pytest.raises(UserError, match="must exceed the training length 32"):
        finetune(model, tok, docs, SPEC, cfg(length=L), tmp_path / "o")
    with pytest.raises(UserError, match="is a scoring strategy"):
        finetune(model, tok, docs, "sliding-window", cfg(), tmp_path / "o")
    with pytest.raises(UserError, match="has no RoPE method"):
        finetune(model, tok, docs, "lm-infinite", cfg(), tmp_path / "o")
    with pytest.raises(UserError, match="steps must be an integer >= 1"):
        cfg(steps=0)
    with pytest.raises(UserError, match="fine-tuning target_modules"):
        finetune(model, tok, docs, SPEC, cfg(target_modules=("nope",)), tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(UserError, match="no training document has 4096 tokens"):
        finetune(model, tok, docs, SPEC, cfg(length=4096), tmp_path / "o")
    with pytest.raises(UserError, match="holds no fine-tuning output"):
        load_finetuned(tmp_path / "nothing")
    with pytest.raises(UserError, match="must be >= the previous stage's 4"):
        extend(model, tok, docs, {"long_factors": LONG, "factor": 4.0}, scale=2)
    with pytest.raises(UserError, match="needs 8"):
        readjust(model, tok, docs, {"long_factors": [1.0, 2.0], "factor": 2.0})
    with pytest.raises(UserError, match="short_length must be an integer between 2 and the training length 32"):
        readjust(model, tok, docs, {"long_factors": LONG, "factor": 4.0}, short_length=64)


CLI_CASES = [
    ("longrope finetune -m vanilla --length 64", "has no RoPE method"),
    ("longrope finetune -m sliding-window --length 64", "is a scoring strategy"),
    ("longrope finetune -m linear:factor=4", "exactly one of --length or --scale"),
    ("longrope finetune -m linear:factor=4 --scale 0.5", "--scale must be > 1"),
    ("longrope finetune -m longrope:long_factors={tmp}/missing.json --length 64", "does not exist"),
    ("longrope finetune -m linear:factor=4 --length 64 --steps 0", "Invalid value for '--steps'"),
    ("longrope finetune -m linear:factor=4 --length 64 --lr -1 --out {tmp}/o", "lr must be a positive number"),
    ("longrope finetune -m linear:factor=4 --length 128 --out {tmp}/o", "must exceed the training length 256"),
    ("longrope finetune -m linear:factor=4 --length 512 --targets nope --out {tmp}/o",
     "fine-tuning target_modules ('nope',) match no linear layer"),
    ("longrope readjust --factors {tmp}/missing.json", "does not exist"),
    ("longrope readjust", "give --factors FILE"),
    ("longrope readjust --finetuned {tmp}/empty", "holds no fine-tuning output"),
    ("longrope extend --factors {tmp}/f.json", "exactly one of --target-length or --scale"),
    ("longrope extend --factors {tmp}/f.json --scale 2", "is below the first stage's 4"),
    ("longrope extend --factors {tmp}/bad.json --scale 8", "is not JSON"),
    ("longrope bogus", "No such command 'bogus'"),
]


@pytest.mark.parametrize(("line", "expected"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_one_line_exit_2(line, expected, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "f.json").write_text(json.dumps({"long_factors": LONG, "factor": 4}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit) as stop:
        main(line.format(tmp=tmp_path).split())
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    lines = [text for text in err.splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(tmp=tmp_path) in lines[0] and "Traceback" not in err


def test_cli_finetune_then_readjust_end_to_end(base, docs, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in docs:
        (corpus / f"{d.name}.txt").write_text(d.text)
    out = tmp_path / "ft"
    main_args = ["longrope", "finetune", "--model", base, "-m", SPEC, "--length", str(4 * L), "--steps", "2",
                 "--data", str(corpus), "--checkpoint-every", "1", "--rank", "4", "--eval-data", str(corpus),
                 "--eval-docs", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        main(main_args)
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "held-out PPL at 128" in text and "load_finetuned" in text
    with pytest.raises(SystemExit) as stop:
        main(["longrope", "readjust", "--finetuned", str(out), "--data", str(corpus), "--population", "3",
              "--parents", "2", "--mutations", "1", "--crossovers", "0", "--iterations", "1",
              "--out", str(tmp_path / "r")])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "apply: -m longrope:long_factors=" in text
    assert json.loads((tmp_path / "r" / "factors.json").read_text())["long_factors"] == LONG
