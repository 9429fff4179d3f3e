"""ppl, passkey and RULER cells on a local Ray instance give the serial run's records (every field but the
machine, the versions and the time), and stream them into the same resumable file."""

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lengthwise[ray]'); the serial path is "
                                        "tested in the default tier")

import torch  # noqa: E402

from lengthwise.api import load_model  # noqa: E402
from lengthwise.data.corpus import load_corpus  # noqa: E402
from lengthwise.eval.cells import RayPool  # noqa: E402
from lengthwise.eval.passkey import passkey  # noqa: E402
from lengthwise.eval.perplexity import perplexity  # noqa: E402
from lengthwise.eval.results import ResultsFile  # noqa: E402
from lengthwise.eval.ruler import ruler  # noqa: E402

MODEL = "llama-rope-256"
VOLATILE = ("machine", "versions", "time")
METHODS = ["vanilla", "lm-infinite", "yarn:factor={s}"]


def _stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one start (about a minute) for the module
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: equal arithmetic, equal records
    yield load_model(MODEL)
    torch.set_num_threads(threads)


TASKS = {
    "ppl": lambda lm, tok, **kw: perplexity(lm, tok, load_corpus("stdlib"), [256, 512],
                                            ["vanilla", "lm-infinite", "yarn:factor=2", "sliding-window"],
                                            max_docs=2, model_name=MODEL, data_name="stdlib", progress=False, **kw),
    "passkey": lambda lm, tok, **kw: passkey(lm, tok, [256, 512], [0, 100], METHODS, trials=2, model_name=MODEL,
                                             progress=False, **kw),
    "ruler": lambda lm, tok, **kw: ruler(lm, tok, ["niah_single", "variable_tracking"], [256, 512], [50], METHODS,
                                         samples=1, model_name=MODEL, progress=False, **kw),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("task", list(TASKS))
def test_ray_cells_equal_the_serial_run(task, local_ray, model, tmp_path):
    lm, tok = model
    serial = TASKS[task](lm, tok, results=ResultsFile(tmp_path / "serial.jsonl"))
    out = tmp_path / "ray.jsonl"
    first = TASKS[task](lm, tok, results=ResultsFile(out), pool=RayPool(MODEL, workers=2, threads=1))
    assert _stable(first) == _stable(serial)
    stored = ResultsFile(out).records
    assert sorted(r["key"] for r in stored) == sorted(r["key"] for r in serial)  # every cell appended, once
    # resumable: a rerun finds every cell done and asks Ray for nothing
    again = TASKS[task](lm, tok, results=ResultsFile(out), pool=RayPool("no-such-model", workers=1))
    assert _stable(again) == _stable(serial)
