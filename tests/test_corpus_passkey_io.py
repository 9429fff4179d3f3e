import pytest

from lengthwise.data.corpus import Document, documents_of_length, load_corpus, stdlib_files
from lengthwise.data.passkey import make_passkey_prompt
from lengthwise.io import append_jsonl, atomic_write_json, read_jsonl
from lengthwise.testing import tiny_tokenizer


def test_stdlib_split_is_fixed_and_disjoint():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert train and held and not set(train) & set(held)
    assert stdlib_files("heldout") == held
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15


def test_unknown_corpus_and_split_errors():
    with pytest.raises(ValueError, match="accepted: stdlib"):
        load_corpus("nonsense-corpus")
    with pytest.raises(ValueError, match="accepted: 'train', 'heldout'"):
        stdlib_files("dev")


def test_local_folder_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.bin").write_bytes(b"\x00")
    docs = load_corpus(str(tmp_path))
    assert [d.name for d in docs] == ["a.txt"]


def test_short_documents_are_skipped_and_counted():
    tok = tiny_tokenizer()
    docs = [Document("short", "hi"), Document("long", "The grass is green. " * 50)]
    result = documents_of_length(docs, tok, 40)
    assert result.skipped == 1 and [name for name, _ in result.docs] == ["long"]
    assert len(result.docs[0][1]) == 40


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_has_exact_length_and_the_key(depth):
    tok = tiny_tokenizer()
    prompt = make_passkey_prompt(tok, 200, depth, "12345")
    assert len(prompt.input_ids) == 200
    text = tok.decode(prompt.input_ids)
    assert "The pass key is 12345." in text and text.endswith("The pass key is")
    assert tok.decode(prompt.answer_ids).strip() == "12345"
    from lengthwise.data.passkey import INSTRUCTION, NEEDLE, QUESTION

    def n_tokens(t):
        return len(tok(t, add_special_tokens=False)["input_ids"])

    head, needle = n_tokens(INSTRUCTION), n_tokens(NEEDLE.format(key="12345"))
    filler = 200 - head - needle - n_tokens(QUESTION)
    start = next(i for i in range(200) if tok.decode(prompt.input_ids[i : i + needle]) == NEEDLE.format(key="12345"))
    assert abs((start - head) / filler - depth) <= n_tokens("The grass is green. The sky is blue. ") / filler + 0.2


def test_passkey_prompt_too_short():
    with pytest.raises(ValueError, match="at least"):
        make_passkey_prompt(tiny_tokenizer(), 10, 0.5, "12345")


def test_jsonl_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"b": ')  # a writer killed mid-line
    assert read_jsonl(path) == [{"a": 1}]
    atomic_write_json(tmp_path / "x.json", {"k": 2})
    assert (tmp_path / "x.json").read_text().strip().startswith("{")
    assert not list(tmp_path.glob(".*tmp"))
