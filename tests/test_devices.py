"""Device and precision everywhere (docs/chat.md, "Devices and precision"): `load_model(device=, dtype=,
device_map=)`, `--device` / `--dtype` on every command that loads a model, one line for a device or dtype that cannot
run, bfloat16 on the CPU for the bounded caches, the kernels and Temp-LoRA, a hub id from the local HF cache, and
benchmarks/gpu.sh --smoke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lengthwise import api
from lengthwise.cli import app, main
from lengthwise.errors import UserError
from lengthwise.testing import random_ids, random_qkv, tiny_model

ROOT = Path(__file__).resolve().parents[1]
MODEL_COMMANDS = ["ppl", "passkey", "gen-quality", "bench", "ruler", "generate", "search", "chat", "demo",
                  ("temp-lora", "eval")]


# ------------------------------------------------------------------------------------------- load_model, checks
def test_dtype_names_and_aliases_resolve_and_others_are_refused():
    assert api.resolve_dtype(None) is torch.float32
    for name, dtype in [("float32", torch.float32), ("bf16", torch.bfloat16), ("torch.float16", torch.float16),
                        ("BFLOAT16", torch.bfloat16), (torch.float16, torch.float16)]:
        assert api.resolve_dtype(name) is dtype
    for bad in ("int8", "float64", torch.int64):
        with pytest.raises(UserError, match="accepted: float32, bfloat16, float16"):
            api.resolve_dtype(bad)


def test_devices_torch_does_not_see_are_one_line():
    assert api.check_device("cpu", "bfloat16") == "cpu"
    for device, expected in [("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device 'cuda:x'")]:
        with pytest.raises(UserError, match=expected):
            api.check_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="sees no CUDA device here; accepted here: cpu"):
            api.check_device("cuda:0")


def test_this_cpu_runs_every_served_dtype_and_a_failing_one_is_refused(monkeypatch):
    """torch 2.13 on this x86-64 CPU runs float16 and bfloat16 matmul, softmax, RMS norm and SDPA (the probe passes
    for all three); where torch cannot (older CPU builds: `"addmm_impl_cpu_" not implemented for 'Half'`), the
    probe's error becomes one line naming the dtypes that remain."""
    for dtype in api.DTYPES:
        api.check_device("cpu", dtype)
    real = torch.Tensor.__matmul__

    def no_half(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_half)
    with pytest.raises(UserError, match=r"--dtype float16 does not run on cpu with torch .*addmm_impl_cpu_.*use "
                                        r"--dtype float32 or bfloat16"):
        api.load_model("llama-rope-256", dtype="float16")


def test_load_model_in_bfloat16_and_through_device_map(monkeypatch):
    model, _ = api.load_model("llama-rope-256", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = api.load_model("llama-rope-256", device="auto")  # accelerate is installed here
    assert next(model.parameters()).device.type == "cpu"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UserError, match="needs accelerate: pip install accelerate"):
        api.load_model("llama-rope-256", device_map="auto")


# ---------------------------------------------------------------------------------------------------- the CLI
def _command(path):
    import typer.main

    group = typer.main.get_command(app)
    for name in (path if isinstance(path, tuple) else (path,)):
        group = group.commands[name]
    return group


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=lambda p: " ".join(p) if isinstance(p, tuple) else p)
def test_every_command_that_loads_a_model_takes_device_and_dtype(path):
    options = {opt for param in _command(path).params for opt in getattr(param, "opts", [])}
    assert {"--device", "--dtype"} <= options


@pytest.mark.parametrize(("line", "expected"), [
    ("ppl --dtype float8", "unknown dtype 'float8'; accepted: float32, bfloat16, float16"),
    ("passkey --device tpu", "unknown device 'tpu'"),
    ("gen-quality --device cuda:3", "no CUDA device" if not torch.cuda.is_available() else "CUDA device(s)"),
    ("generate --prompt hi --dtype int4", "unknown dtype 'int4'"),
    ("ruler --dtype bfloat16 --ray local", "--ray workers load their own float32 copy"),
    ("ppl --device mps", "mps"),
    ("temp-lora eval --dtype fp8", "unknown dtype 'fp8'"),
    ("search --scale 2 --dtype x", "unknown dtype 'x'"),
    ("bench --model llama --device auto", "--device auto places a loaded model"),
])
def test_bad_device_or_dtype_is_one_line_before_anything_loads(line, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(line.split() + (["--out", str(tmp_path / "o.jsonl")] if line.split()[0] in ("ppl", "ruler") else []))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_runs_in_bfloat16_from_the_command_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", "llama-rope-256", "-m", "lm-infinite", "--prompt", "def main():",
              "--max-new-tokens", "4", "--dtype", "bfloat16"])
    assert stop.value.code == 0


# ---------------------------------------------------------------------------- bfloat16 on the CPU, short inputs
def test_bounded_caches_in_bfloat16_generate_like_float32_and_stay_bf16(one_thread):
    from lengthwise.generation import generate

    model = tiny_model("llama", length=32)
    half = tiny_model("llama", length=32).to(torch.bfloat16)
    ids = random_ids(96)
    for method in ("lm-infinite:n_local=16", "streaming:window=12",
                   "lm-infinite:n_local=16,top_blocks=1,retrieval_block=8"):
        with api.patch(half, method) as handle:
            cache = handle.new_cache()
            from lengthwise.models.compat import cache_kwargs

            with torch.no_grad():
                logits = half(input_ids=ids[:, :64], **cache_kwargs(half, cache), use_cache=True).logits
                step = half(input_ids=ids[:, 64:65], **cache_kwargs(half, cache), use_cache=True).logits
            assert torch.isfinite(logits.float()).all() and torch.isfinite(step.float()).all()
            assert all(layer.keys.dtype == torch.bfloat16 for layer in cache.layers)
        out = generate(half, ids, method, max_new_tokens=4)
        assert out.shape == (4,)
        reference = generate(model, ids, method, max_new_tokens=1)  # float32 runs the same path
        assert reference.shape == (1,)


@pytest.mark.parametrize("middle", [False, True], ids=["lambda", "blocks"])
def test_the_blocked_kernel_in_bfloat16_matches_the_float32_reference(middle):
    from lengthwise.attention import LambdaPattern, RopeEncoding, lambda_attention_blocked, lambda_attention_reference
    from lengthwise.attention.middle import MiddleRetrieval

    q, k, v = random_qkv(B=1, H=4, Hk=2, T=96, D=16)
    pos = torch.arange(96)[None]
    retrieval = MiddleRetrieval(16, top_blocks=1, block_size=8, representatives=4, query_group=8) if middle else None
    pattern = LambdaPattern(4, 16, 32, middle=retrieval)
    encoding = RopeEncoding(1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16), "half")
    want = lambda_attention_reference(q, k, v, pos, pos, None, pattern, encoding, 0.25)
    got = lambda_attention_blocked(*(x.to(torch.bfloat16) for x in (q, k, v)), pos, pos, None, pattern, encoding,
                                   0.25, block=32)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()
    assert (got.float() - want).abs().max() < 0.05


def test_temp_lora_in_bfloat16_reads_and_generates_finite(one_thread):
    from lengthwise.temp_lora import TempLoraConfig, TempLoraSession

    model = tiny_model("llama", length=64).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with TempLoraSession(model, TempLoraConfig(chunk_size=16, window=32), method="lm-infinite:n_local=16") as s:
        nll = s.process(random_ids(80)[0])
        new = s.generate(4)
        assert torch.isfinite(nll).all() and new.shape == (4,) and all(p.dtype == torch.float32 for p in s.params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ a hub id, from the cache
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(home: Path, repo: str = "org/tiny") -> Path:
    """The layout huggingface_hub writes (`hf_hub_download`): HF_HOME/hub/models--ORG--NAME/ with blobs/ (files by
    hash), snapshots/COMMIT/ (links to the blobs, by file name) and refs/main (the commit)."""
    import hashlib
    import shutil

    source = api.REFERENCE_MODELS_DIR / "llama-rope-256"
    cache = home / "hub" / ("models--" + repo.replace("/", "--"))
    (cache / "blobs").mkdir(parents=True)
    (cache / "refs").mkdir()
    snapshot = cache / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        blob = cache / "blobs" / hashlib.sha256((source / name).read_bytes()).hexdigest()
        shutil.copyfile(source / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (cache / "refs" / "main").write_text(COMMIT)
    return cache


def _run(code: str, home: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9", **env}
    environment.pop("HF_HUB_OFFLINE", None) if "HF_HUB_OFFLINE" not in env else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=environment)


LOAD = """
import sys
import lengthwise
from lengthwise.cli import main
model, tokenizer = lengthwise.load_model("org/tiny")
print("loaded", type(model).__name__, tokenizer("def main():")["input_ids"][:3])
main(["generate", "--model", "org/missing", "--prompt", "hi"])
"""


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_a_hub_id_loads_from_the_local_cache_or_says_where_it_looked(tmp_path, offline):
    cache = _fake_hub_cache(tmp_path)
    done = _run(LOAD, tmp_path, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    assert "loaded LlamaForCausalLM" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(cache.parent / "models--org--missing") in line
    assert ("HF_HUB_OFFLINE is set" if offline else "is unreachable") in line


# -------------------------------------------------------------------------------------------- benchmarks/gpu.sh
def test_gpu_benchmark_smoke_runs_in_process_and_writes_bench_records(tmp_path, one_thread):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "gpu.jsonl"
    assert gpu_speed.main(["--smoke", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["length"]) for r in records] == [
        (m, n) for n in (256, 512) for m in ("vanilla", "lm-infinite:n_local=64,distance_limit=64")]
    for record in records:
        assert record["task"] == "bench" and record["benchmark"] == "gpu_speed" and record["chunk_size"] == 128
        assert {"prefill_s", "prefill_tokens_per_s", "decode_s_per_token", "peak_memory_mib", "cache_mib"} <= set(
            record["metrics"])
    bounded = [r["metrics"]["cache_bytes"] for r in records if r["method"].startswith("lm-infinite")]
    assert bounded[0] == bounded[1]  # flat from 256 to 512 tokens
    assert "| vanilla | sdpa | 512 |" in out.with_suffix(".md").read_text()
    assert gpu_speed.main(["--smoke", "--out", str(out)]) == 0  # a rerun resumes: nothing new
    assert len(out.read_text().splitlines()) == len(records)


@pytest.mark.slow
def test_gpu_sh_smoke_runs_end_to_end_on_the_cpu(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path / "g.jsonl")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 4 and "records:" in done.stdout


def test_gpu_sh_without_a_gpu_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})  # this interpreter, not .venv's
    assert done.returncode == 2 and done.stderr.strip().startswith("error: torch sees no CUDA device")
