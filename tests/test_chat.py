"""`lengthwise.chat.Conversation`, sessions (`lengthwise.session`) and `lengthwise chat` (docs/chat.md).

The bundled tiny model (its tokenizer has no chat template: the plain format) and the same tokenizer with a ChatML
template (the format SmolLM2 uses), so both paths run in seconds."""

import copy
import json
from pathlib import Path

import pytest
import torch

from lengthwise import load_model
from lengthwise.chat import DOCUMENT_ACK, Conversation
from lengthwise.cli import main
from lengthwise.errors import UserError
from lengthwise.temp_lora import TempLoraConfig

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
BOUNDED = "lm-infinite:n_local=64,distance_limit=64"
RETRIEVAL = "lm-infinite:n_local=64,distance_limit=64,top_blocks=2,retrieval_block=16,middle_queries=last"
QUESTIONS = ["What does this file define?", "Which function comes first?", "Why?", "And then?", "Anything else?"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("llama-rope-256")
    return model, tokenizer


@pytest.fixture(scope="module")
def chatml(tiny):
    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def document():
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text(encoding="utf-8")
    return text[:3000] + "\nThe secret code of the vault is 4729.\n" + text[3000:6000]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("template", [False, True], ids=["plain", "chatml"])
def test_read_then_ask_grows_one_cache_as_the_rendered_conversation(tiny, chatml, document, template, one_thread):
    model, plain = tiny
    tokenizer = chatml if template else plain
    before = _weights(model)
    with Conversation(model, tokenizer, BOUNDED, chunk_size=256) as chat:
        read = chat.read(document)
        assert chat.document_role == "system" and read.tokens == chat.tokens_seen() > 1000
        assert chat.rendered.startswith("<|im_start|>system\n" if template else "You are a helpful")
        for question in QUESTIONS[:2]:
            pieces = list(chat.stream(question, max_new_tokens=6))
            turn = chat.last_turn()
            assert "".join(pieces) == chat.messages[-1]["content"] or not template
            assert 1 <= turn.answer_tokens <= 6 and turn.ttft_s > 0 and turn.rss_mib > 0
            # the cache holds every token of the conversation but the last generated one (fed with the next turn)
            assert chat.tokens_seen() + len(chat.pending) == turn.tokens_seen
        if template:
            rendered = tokenizer.apply_chat_template(chat.messages, tokenize=False)
            assert rendered.startswith(chat.rendered[: chat.committed])
        with pytest.raises(UserError, match="read its document already"):
            chat.read("another document")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # patch removed, nothing written
    assert model.config._attn_implementation != "lengthwise_lambda"


def test_a_template_without_a_system_role_gets_the_document_in_the_first_user_turn(tiny, document, one_thread):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = NO_SYSTEM
    with Conversation(model, tokenizer, "vanilla") as chat:
        chat.read(document[:500])
        assert chat.document_role == "user" and chat.messages[1]["content"] == DOCUMENT_ACK
        assert chat.ask("What?", max_new_tokens=3) is not None


def test_greedy_answers_equal_a_greedy_continuation_of_the_same_tokens(tiny, chatml, document, one_thread):
    """The conversation's cache is the conversation: a vanilla chat answers as a one-pass greedy decode of the
    tokens it fed (the rendered prompt, then the question's turn) does."""
    from lengthwise.generation import generate

    model, _ = tiny
    question = "What does this file define?"
    with Conversation(model, chatml, "vanilla", chunk_size=300) as chat:
        chat.read(document[:2000])
        fed = chatml(chat.rendered, add_special_tokens=False)["input_ids"]
        full = chatml.apply_chat_template(chat.messages + [{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
        fed += chatml(full[len(chat.rendered):], add_special_tokens=False)["input_ids"]
        chat.ask(question, max_new_tokens=8)
        answer = chat.answer_ids
    expected = generate(model, torch.tensor([fed]), "vanilla", max_new_tokens=8).tolist()
    assert answer == expected[: len(answer)] and 1 <= len(answer) <= 8


@pytest.mark.parametrize("method", ["vanilla", BOUNDED, RETRIEVAL], ids=["vanilla", "lm-infinite", "blocks"])
def test_a_restored_session_gives_identical_logits_and_answers(tiny, chatml, document, method, tmp_path, one_thread):
    model, _ = tiny
    probe = chatml("<|im_start|>user\nWhat is the code?<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False)["input_ids"]
    with Conversation(model, chatml, method, chunk_size=200) as chat:
        chat.read(document)
        chat.ask(QUESTIONS[0], max_new_tokens=4)
        chat.save(tmp_path / "s")
        expected_logits = [chat._feed(probe), chat._feed(probe[:3]), chat._feed(probe[:1])]
        expected = chat.ask(QUESTIONS[1], max_new_tokens=6)
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["cache.safetensors", "conversation.json", "manifest.json"]
    with Conversation.load(tmp_path / "s", model, chatml) as again:
        assert again.tokens_seen() == json.loads((tmp_path / "s" / "manifest.json").read_text())["tokens_seen"]
        got_logits = [again._feed(probe), again._feed(probe[:3]), again._feed(probe[:1])]
        got = again.ask(QUESTIONS[1], max_new_tokens=6)
    for want, have in zip(expected_logits, got_logits):
        assert torch.equal(want, have)
    assert got == expected


def test_the_bounded_cache_stays_within_its_bound_over_turns(tiny, chatml, document, one_thread):
    from lengthwise.eval.speed import cache_bytes

    model, _ = tiny
    with Conversation(model, chatml, BOUNDED, chunk_size=128) as chat:
        bound = chat.memory_bound()
        assert bound["bounded"] and bound["max_keys_per_layer"] == 10 + 64 + 8 + 128
        chat.read(document)
        sizes = []
        for question in QUESTIONS:
            chat.ask(question, max_new_tokens=5)
            assert chat.kept_tokens() <= bound["max_keys_per_layer"]
            assert cache_bytes(chat.cache) <= bound["max_mib"] * 2**20
            sizes.append(chat.last_turn().cache_mib)
        assert max(sizes) <= bound["max_mib"]
    with Conversation(model, chatml, RETRIEVAL) as chat:  # middle retrieval keeps every key: said so
        bound = chat.memory_bound()
        assert not bound["bounded"] and bound["growing_layers"] and "keep every key" in bound["text"]
    with Conversation(model, chatml, "vanilla") as chat:
        assert not chat.memory_bound()["bounded"] and "unbounded" in chat.memory_bound()["text"]


def test_bfloat16_conversation_with_bounded_and_retrieving_caches(document, tmp_path, one_thread):
    model, tokenizer = load_model("llama-rope-256", dtype="bfloat16")
    for method in (BOUNDED, RETRIEVAL):
        with Conversation(model, tokenizer, method, chunk_size=256) as chat:
            chat.read(document)
            logits = chat._feed(tokenizer("Question: what?", add_special_tokens=False)["input_ids"])
            assert torch.isfinite(logits).all()
            assert chat.cache.layers[0].keys.dtype == torch.bfloat16
            chat.ask("What?", max_new_tokens=3)
            chat.save(tmp_path / method.split(",")[-1])
        with Conversation.load(tmp_path / method.split(",")[-1], model, tokenizer) as again:
            assert again.cache.layers[0].keys.dtype == torch.bfloat16


def test_temp_lora_reads_the_document_into_an_adapter_and_is_removed_after(tiny, chatml, document, tmp_path,
                                                                          one_thread):
    model, _ = tiny
    before = _weights(model)
    config = TempLoraConfig(chunk_size=64, window=128, lr=1e-3)
    with Conversation(model, chatml, "vanilla", temp_lora=config) as chat:
        chat.read(document[:1500])
        assert chat.session.meter.train_steps > 0
        assert chat.memory_bound()["max_keys_per_layer"] == 128
        answer = chat.ask("What does this file define?", max_new_tokens=4)
        assert isinstance(answer, str) and chat.last_turn().answer_tokens >= 1
        with pytest.raises(UserError, match="Temp-LoRA conversation cannot be saved"):
            chat.save(tmp_path / "s")
    assert not (tmp_path / "s").exists()
    after = model.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- bad sessions
@pytest.fixture(scope="module")
def saved(tiny, chatml, document, tmp_path_factory):
    folder = tmp_path_factory.mktemp("session") / "s"
    with Conversation(tiny[0], chatml, BOUNDED, chunk_size=256, model_name="llama-rope-256") as chat:
        chat.read(document[:2000])
        chat.save(folder)
    return folder


def test_a_session_for_another_model_method_dtype_or_format_is_refused(tiny, chatml, saved, tmp_path):
    from lengthwise.testing import tiny_model

    model, plain = tiny
    other = tiny_model("llama")
    with pytest.raises(UserError, match="was saved for model .*config .*load it with --model"):
        Conversation.load(saved, other, chatml)
    fine_tuned = copy.deepcopy(model)
    with torch.no_grad():
        next(fine_tuned.parameters()).add_(0.01)
    with pytest.raises(UserError, match="same config but other weights"):
        Conversation.load(saved, fine_tuned, chatml)
    with pytest.raises(UserError, match="in float32; this model is loaded in bfloat16: load it with --dtype float32"):
        Conversation.load(saved, copy.deepcopy(model).to(torch.bfloat16), chatml)
    for method in ("vanilla", "lm-infinite:n_local=32,distance_limit=64"):
        with pytest.raises(UserError, match="was saved with method 'lm-infinite:n_local=64"):
            Conversation.load(saved, model, chatml, method=method)
    assert model.config._attn_implementation != "lengthwise_lambda"  # the refused patch was removed
    with pytest.raises(UserError, match="plain format|chat-template format"):
        Conversation.load(saved, model, plain)
    with pytest.raises(UserError, match="holds no manifest.json: not a lengthwise session"):
        Conversation.load(tmp_path, model, chatml)


def test_damaged_or_foreign_sessions_are_refused_in_one_line(tiny, chatml, saved, tmp_path):
    import shutil

    model, _ = tiny
    for damage, expected in [
        (lambda f: (f / "cache.safetensors").write_bytes((f / "cache.safetensors").read_bytes()[:100]),
         "cache.safetensors cannot be read"),
        (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json is not JSON"),
        (lambda f: (f / "manifest.json").write_text(json.dumps({**json.loads((f / "manifest.json").read_text()),
                                                                "version": 99})), "format version 99"),
        (lambda f: (f / "manifest.json").write_text('{"format": "pickle"}'), "not a lengthwise session manifest"),
        (lambda f: (f / "conversation.json").unlink(), "conversation.json cannot be read"),
    ]:
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved, folder)
        damage(folder)
        with pytest.raises(UserError, match=expected):
            Conversation.load(folder, model, chatml)
    assert model.config._attn_implementation != "lengthwise_lambda"


def test_a_save_is_whole_or_absent(tiny, chatml, document, tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = tiny
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with Conversation(model, chatml, BOUNDED) as chat:
        chat.read(document[:800])
        with pytest.raises(UserError, match="holds files but no manifest.json"):
            chat.save(tmp_path / "mine")
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
        chat.save(tmp_path / "s")
        first = (tmp_path / "s" / "manifest.json").read_text()

        def torn(tensors, path, metadata=None):
            Path(path).write_bytes(b"half")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", torn)
        chat.ask("What?", max_new_tokens=2)
        with pytest.raises(OSError, match="No space left"):
            chat.save(tmp_path / "s")
        with pytest.raises(OSError):
            chat.save(tmp_path / "new")
    assert (tmp_path / "s" / "manifest.json").read_text() == first  # the previous session, intact
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "s"]  # no temporary folder left


# ------------------------------------------------------------------------------------------------------ the CLI
def test_cli_reads_saves_loads_and_answers_each_question(document, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text(document[:2500], encoding="utf-8")
    base = ["chat", "--model", "llama-rope-256", "--threads", "1", "--max-new-tokens", "5"]
    with pytest.raises(SystemExit) as stop:
        main(base + ["-m", BOUNDED, "--document", str(tmp_path / "doc.txt"), "-q", "What?", "-q", "Why?",
                     "--save-session", str(tmp_path / "s"), "--stats", str(tmp_path / "stats.json")])
    out = capsys.readouterr()
    assert stop.value.code == 0, out.err
    asked = [line for line in out.out.splitlines() if line.startswith("> ")]
    assert asked == ["> What?", "> Why?"]
    assert "cache: bounded" in out.err and "read " in out.err and "[turn 2] first token" in out.err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["read"]["tokens"] > 500 and len(stats["turns"]) == 2 and stats["memory_bound"]["bounded"]
    with pytest.raises(SystemExit) as stop:
        main(base + ["--load-session", str(tmp_path / "s"), "-q", "What?", "--stats", str(tmp_path / "again.json")])
    out = capsys.readouterr()
    assert stop.value.code == 0, out.err
    assert "no prefill" in out.err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["turns"][0]["answer"] == stats["turns"][0]["answer"]  # greedy: the same first answer


@pytest.mark.parametrize(("args", "expected"), [
    (["--document", "{tmp}/binary.txt"], "--document {tmp}/binary.txt is not text (it holds NUL bytes)"),
    (["--document", "{tmp}/empty.txt"], "--document {tmp}/empty.txt is empty"),
    (["--document", "{tmp}/missing.txt"], "does not exist"),
    ([], "give exactly one of --document (read it) or --load-session"),
    (["--document", "{tmp}/doc.txt", "-m", "sliding-window"], "is a scoring strategy"),
    (["--document", "{tmp}/doc.txt", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["--document", "{tmp}/doc.txt", "--device", "cuda"], "sees no CUDA device"),
    (["--load-session", "{tmp}"], "holds no manifest.json: not a lengthwise session"),
    (["--load-session", "{session}", "--model", "bloom-alibi-256"], "was saved for model 'llama-rope-256'"),
    (["--load-session", "{session}", "-m", "vanilla"], "was saved with method 'lm-infinite:n_local=64"),
    (["--document", "{tmp}/doc.txt", "--save-session", "{tmp}/mine"], "holds files but no manifest.json"),
    (["--document", "{tmp}/doc.txt", "--save-session", "{tmp}/doc.txt"], "is a file; give a folder"),
])
def test_cli_bad_input_gets_one_line_and_writes_nothing(args, expected, saved, tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01" * 100)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "doc.txt").write_text("Some text to read.\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = [a.format(tmp=tmp_path, session=saved) for a in args]
    model = [] if "--model" in line else ["--model", "llama-rope-256"]
    with pytest.raises(SystemExit) as stop:
        main(["chat", *model, *line, "-q", "What?", "--quiet"])
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip() and not text.startswith("Loading")]
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(tmp=tmp_path) in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing half-written


def test_cli_refuses_a_dtype_the_device_cannot_run(tmp_path, capsys, monkeypatch):
    """torch 2.13 on this CPU runs float16 and bfloat16 (docs/chat.md); a device that cannot (older CPU builds raised
    `"addmm_impl_cpu_" not implemented for 'Half'`) is simulated by the probe's matmul failing."""
    import torch.nn.functional as F

    real = F.rms_norm

    def no_half(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError('"rms_norm_impl" not implemented for \'Half\'')
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "rms_norm", no_half)
    (tmp_path / "doc.txt").write_text("Some text.\n")
    with pytest.raises(SystemExit) as stop:
        main(["chat", "--model", "llama-rope-256", "--document", str(tmp_path / "doc.txt"), "-q", "x", "--dtype",
              "float16", "--save-session", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--dtype float16 does not run on cpu" in err and "use --dtype float32 or bfloat16" in err
    assert not (tmp_path / "s").exists()
