"""Non-text inputs: files whose bytes are not text (random bytes named .txt, NUL bytes) are skipped with one warning
line naming them; a corpus with no text left is refused in one line (lengthwise.data.corpus, docs/reliability.md)."""

import random

import pytest

from lengthwise.data.corpus import NON_TEXT_SHARE, load_corpus, non_text_reason
from lengthwise.eval.streaming import stream_sources

TEXT = "It was the best of times, it was the worst of times.\n" * 200


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def mixed(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_book.txt").write_text(TEXT)
    (folder / "b_noise.txt").write_bytes(_random_bytes(20000, 1).replace(b"\x00", b"\x01"))  # no NUL: not UTF-8
    (folder / "c_nul.md").write_bytes(TEXT.encode()[:5000] + b"\x00" + TEXT.encode()[:5000])
    return folder


def test_non_text_files_are_skipped_with_one_warning_naming_them(mixed, capsys):
    docs = load_corpus(str(mixed))
    assert [d.name for d in docs] == ["a_book.txt"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: "), lines
    assert "skipped 2 files that are not text" in lines[0]
    assert "b_noise.txt (" in lines[0] and "not UTF-8" in lines[0] and "c_nul.md (it holds NUL bytes)" in lines[0]


def test_a_corpus_with_no_text_left_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "noise"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_bytes(_random_bytes(4096, i))
    with pytest.raises(ValueError) as err:
        load_corpus(str(folder))
    message = str(err.value)
    assert "\n" not in message and f"folder {folder} holds no text: its 3 files are not text" in message, message
    (tmp_path / "nul.txt").write_bytes(b"ab\x00cd")
    with pytest.raises(ValueError, match=r"nul.txt is not text \(it holds NUL bytes\)"):
        load_corpus(str(tmp_path / "nul.txt"))


def test_text_with_a_few_odd_bytes_stays_text():
    latin1 = ("Caf\xe9 au lait. " + "plain words here " * 40).encode("latin-1")  # one bad byte in ~700
    assert non_text_reason(latin1) is None
    assert non_text_reason(("A literal \ufffd replacement character. " * 50).encode()) is None
    assert non_text_reason(b"") is None
    assert non_text_reason("tabs\tand\r\nform feeds\x0c are text\n".encode() * 30) is None
    noisy = ("word " * 100).encode() + bytes(range(0x80, 0x80 + 20))  # 20 bad bytes in 520: over 1%
    assert 20 / len(noisy) > NON_TEXT_SHARE and "not UTF-8" in non_text_reason(noisy)
    assert "control characters" in non_text_reason(("word " * 100).encode() + b"\x01" * 10)


def test_the_streaming_mode_skips_them_too(mixed, tmp_path, capsys):
    sources = stream_sources(str(mixed))
    assert [s.name for s in sources] == ["a_book.txt"]
    assert "skipped 2 files that are not text" in capsys.readouterr().err
    (tmp_path / "noise.txt").write_bytes(_random_bytes(4096, 7))
    with pytest.raises(ValueError, match="noise.txt is not text"):
        stream_sources(str(tmp_path / "noise.txt"))


def test_the_cli_refuses_a_folder_of_noise_before_loading_the_model(tmp_path, capsys):
    from lengthwise.cli import main  # noqa: PLC0415

    folder = tmp_path / "noise"
    folder.mkdir()
    (folder / "x.txt").write_bytes(_random_bytes(4096, 3))
    with pytest.raises(SystemExit) as stop:
        main(["ppl", "--data", str(folder), "--lengths", "64", "--out", str(tmp_path / "r.jsonl")])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: folder {folder} holds no text: its one file is not text (x.txt: "), lines
