"""Every RoPE causal-LM type the installed transformers registers: each method served (and checked) or refused in one
line naming the feature; never silently wrong. docs/compatibility.md's table is this walk (on the release it names)."""

import re
from pathlib import Path

import pytest
import torch
import transformers

from lengthwise import walk, zoo

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "compatibility.md"


@pytest.fixture(scope="module")
def outcomes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits for its share of the cores (3-10x slower)
    try:
        return walk.walk()
    finally:
        torch.set_num_threads(threads)


def test_every_type_is_walked_with_every_method(outcomes):
    types = zoo.rope_causal_lm_types()
    assert len(types) > 100 and {"llama", "mistral", "gemma2", "gpt_oss", "qwen3_next"} <= set(types)
    for method in walk.METHODS:
        assert {o.model_type for o in outcomes if o.method in (method, "-")} == set(types), method


def test_nothing_is_silently_wrong(outcomes):
    wrong = [f"{o.model_type} {o.method}: {o.detail}" for o in outcomes if o.silent_wrong]
    assert not wrong, "\n".join(wrong)


def test_every_refusal_is_one_line_that_names_what_is_refused(outcomes):
    for outcome in outcomes:
        if outcome.status in ("refused", "not buildable", "unverified"):
            assert "\n" not in outcome.detail and len(outcome.detail) > 30, (outcome.model_type, outcome.detail)


def test_the_families_users_bring_are_served(outcomes):
    served = {(o.model_type, o.method) for o in outcomes if o.status == "served"}
    for model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2",
                       "gemma3_text", "olmo2", "olmo3", "smollm3", "cohere2", "gpt_oss", "granite", "starcoder2",
                       "deepseek_v3", "qwen3_next", "falcon_h1", "ministral"):
        assert (model_type, "lm-infinite") in served, model_type
    for model_type in ("llama", "mistral", "qwen2", "phi3", "gpt_neox", "deepseek_v3", "gpt_oss"):
        assert (model_type, "yarn") in served or model_type == "gpt_oss", model_type


def _page_version() -> str:
    found = re.search(r"walk --markdown` on transformers ([0-9.]+)", PAGE.read_text())
    assert found, "docs/compatibility.md holds no generated walk section"
    return found.group(1)


def test_the_compatibility_page_is_this_walk(outcomes):
    page = PAGE.read_text()
    section = page[page.index(walk.BEGIN):page.index(walk.END) + len(walk.END)]
    if transformers.__version__ != _page_version():  # another release registers other types: no table to compare
        counts = walk.summary(outcomes)
        assert counts["lm-infinite"]["wrong"] == 0 and counts["lm-infinite"]["served"] > 80
        return
    assert section == walk.markdown(outcomes), "regenerate: python -m lengthwise.walk --markdown docs/compatibility.md"


def test_the_readme_states_the_walks_counts(outcomes):
    counts = walk.summary(outcomes)["lm-infinite"]
    types = len({o.model_type for o in outcomes})
    readme = (ROOT / "README.md").read_text()
    if transformers.__version__ == _page_version():
        assert f"{counts['served']} of the {types} RoPE causal-LM types of transformers {transformers.__version__}" \
            in readme


@pytest.mark.slow
def test_the_full_walk_with_the_eager_reference_kernel_too():
    outcomes = walk.walk(methods=("lm-infinite",), full=True)
    assert not [o for o in outcomes if o.silent_wrong]
