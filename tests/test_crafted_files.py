"""Files that could run code: every file lengthwise reads back is loaded without unpickling objects.

Each kind of checkpoint is replaced by a crafted pickle (an object whose __reduce__ creates a marker file when it is
unpickled) and resumed: the run refuses it with one line and the marker is never written (docs/reliability.md).
Torch files are read with `torch.load(weights_only=True)` (lengthwise.io.load_torch_file), search checkpoints are
JSON, adapters safetensors.
"""

import hashlib
import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from lengthwise.cli import app, main

LAB_TRAIN = ["lab", "train", "--pe", "rope", "--context", "32", "--d-model", "32", "--layers", "1", "--heads", "2",
             "--steps", "4", "--batch", "2", "--max-chars", "4000", "--checkpoint-every", "2", "--threads", "1"]


class Planted:
    """Unpickling this opens (creates) `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "payload": Planted(marker)}, path)


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith("Loading weights")]  # transformers' progress bar
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_the_plant_would_run_under_a_plain_unpickler(tmp_path):
    """The control: the crafted file does run code when loaded the old way."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)  # noqa: S614 - on purpose, to show the plant works
    assert marker.exists()


def test_a_crafted_streaming_checkpoint_is_refused(tmp_path, capsys):
    out, marker = tmp_path / "s.jsonl", tmp_path / "marker"
    args = ["ppl", "--stream-tokens", "600", "-m", "lm-infinite", "--chunk-size", "64", "--buckets", "4", "--quiet",
            "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--stop-after-chunks", "1"])
    assert result.exit_code == 0, result.output
    [checkpoint] = (tmp_path / "s.stream").glob("*.pt")
    assert isinstance(torch.load(checkpoint, weights_only=True), dict)  # what lengthwise writes is plain data
    _plant(checkpoint, marker, version=2)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    line = _one_error_line(capsys)
    assert f"checkpoint {checkpoint}" in line and "does not unpickle" in line and "delete it" in line, line
    assert not marker.exists()


def test_a_crafted_lab_checkpoint_and_token_cache_are_refused(tmp_path, capsys):
    from lengthwise.lab.train import default_tokenizer  # noqa: PLC0415

    marker = tmp_path / "marker"
    _plant(tmp_path / "runs" / "rope" / "checkpoint.pt", marker, step=2)
    with pytest.raises(SystemExit) as stop:
        main([*LAB_TRAIN, "--out", str(tmp_path / "runs")])
    assert stop.value.code == 2
    line = _one_error_line(capsys)
    assert "checkpoint.pt" in line and "does not unpickle" in line, line
    assert not marker.exists()

    tag = hashlib.sha1(f"stdlib|4000|{len(default_tokenizer())}".encode()).hexdigest()[:10]
    cache = tmp_path / "runs2" / "_data" / f"tokens-stdlib-{tag}.pt"
    _plant(cache, marker)
    with pytest.raises(SystemExit) as stop:
        main([*LAB_TRAIN, "--out", str(tmp_path / "runs2")])
    assert stop.value.code == 2
    line = _one_error_line(capsys)
    assert f"token cache {cache}" in line and "does not unpickle" in line, line
    assert not marker.exists()


def test_a_real_lab_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    """What `lab train` saves as its checkpoint (config, state dicts, the RNG state as a tensor, losses) is read
    back under weights_only=True."""
    import shutil  # noqa: PLC0415

    from lengthwise.io import load_torch_file  # noqa: PLC0415
    from lengthwise.lab import train as lab_train  # noqa: PLC0415

    real_save = lab_train.atomic_torch_save

    def save_and_keep(obj, path):
        real_save(obj, path)
        if path.name == "checkpoint.pt":  # removed when the run finishes: keep a copy
            shutil.copy(path, tmp_path / "kept.pt")

    monkeypatch.setattr(lab_train, "atomic_torch_save", save_and_keep)
    cfg = lab_train.TrainConfig(pe="rope", context=32, d_model=32, layers=1, heads=2, steps=4, batch=2,
                                max_chars=4000, checkpoint_every=2, threads=1)
    lab_train.train(cfg, tmp_path / "rope", cache_dir=tmp_path / "_data", progress=False, log=lambda m: None)
    state = load_torch_file(tmp_path / "kept.pt")
    assert state["step"] == 2 and state["rng"].dtype == torch.uint8 and state["config"]["pe"] == "rope"


def test_a_crafted_lab_model_file_is_refused(tmp_path):
    from lengthwise.lab.model import InferenceOptions, LabConfig, LabModel, load_lab_model, save_lab_model  # noqa

    model = LabModel(LabConfig(pe="rope", vocab_size=97, d_model=32, num_hidden_layers=1, heads=2, ffn=64,
                               max_position_embeddings=16, inference=InferenceOptions()))
    folder = save_lab_model(model, None, tmp_path / "lab")
    marker = tmp_path / "marker"
    _plant(folder / "model.pt", marker)
    with pytest.raises(ValueError, match="lab model weights .* does not unpickle code") as err:
        load_lab_model(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_crafted_reference_training_state_is_refused(tmp_path):
    from lengthwise.training.reference import load_resume_state  # noqa: PLC0415

    marker = tmp_path / "marker"
    _plant(tmp_path / "state.pt", marker, step=3)
    with pytest.raises(ValueError, match="training state .* does not unpickle code") as err:
        load_resume_state(tmp_path / "state.pt")
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # what the training saves (state dicts and the step) is read back
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))],
                                                                            lr=0.1).state_dict(), "step": 3},
               tmp_path / "good.pt")
    assert load_resume_state(tmp_path / "good.pt")["step"] == 3


def test_a_pickle_in_place_of_a_search_checkpoint_is_refused(tmp_path):
    """Search checkpoints are JSON: a pickle there is not read as one, and nothing is unpickled."""
    from lengthwise.search.checkpoint import load_checkpoint  # noqa: PLC0415

    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint-long.json"
    path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match="is not a JSON search checkpoint") as err:
        load_checkpoint(path, {"a": 1})
    assert "\n" not in str(err.value)
    assert not marker.exists()
    path.write_text(json.dumps({"version": 1, "fingerprint": {"a": 2}, "state": {}}))
    with pytest.raises(ValueError, match="belongs to another search"):
        load_checkpoint(path, {"a": 1})


def test_no_weights_only_false_and_no_pickle_load_in_the_package():
    """The rule, checked on the source: no torch.load without weights_only=True, no pickle.load(s)."""
    import re  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import lengthwise  # noqa: PLC0415

    root = Path(lengthwise.__file__).parent
    offenders = []
    for path in [*root.rglob("*.py"), *(root.parents[1] / "benchmarks").glob("*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        if re.search(r"\bpickle\.loads?\(|weights_only=False", text):
            offenders.append(f"{path.name}: pickle.load / weights_only=False")
    assert not offenders, offenders
