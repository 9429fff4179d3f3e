"""Fitness evaluations on a local Ray instance give exactly the serial search's result."""

import random

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'lengthwise[ray]'); the serial search is tested elsewhere")

from lengthwise.data.corpus import Document  # noqa: E402
from lengthwise.search import EvolutionConfig, longrope  # noqa: E402
from lengthwise.testing import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.mark.slow  # a local Ray instance takes about a minute to start on the 2-core machine
@pytest.mark.timeout(300)
def test_ray_search_equals_serial(tmp_path):
    model = tiny_model("llama", length=32)
    rng = random.Random(0)
    words = "the grass is green sky blue sun yellow pass key here we go there and back again".split()
    docs = [Document(f"d{i}", " ".join(rng.choice(words) for _ in range(300))) for i in range(2)]
    kw = dict(scale=3.0, evolution=EvolutionConfig(population=6, parents=3, mutations=2, crossovers=2, iterations=3),
              max_docs=2, n_hat_choices=(0, 2, 4), threads=1)
    serial = longrope(model, tiny_tokenizer(), docs, **kw)
    counted = []
    parallel = longrope(model, tiny_tokenizer(), docs, ray_address="local", workers=2, out_dir=tmp_path,
                        on_evaluation=lambda: counted.append(1), **kw)
    assert parallel.long_factors == serial.long_factors and parallel.n_hat == serial.n_hat
    assert parallel.long.ppl == serial.long.ppl  # bit-identical fitness values
    assert [r["best"] for r in parallel.long.log] == [r["best"] for r in serial.long.log]
    assert len(counted) == parallel.long.evaluations
    assert (tmp_path / "generations.jsonl").read_text().count('"backend": "ray"') == 3
