import pytest
from typer.testing import CliRunner

from lengthwise.cli import app
from dataclasses import dataclass

from lengthwise.methods.middle import MiddleConfig
from lengthwise.registry import (check_combination, config_options, get_entry, get_method, method_names, option,
                                 option_group, option_rows, parse_method_spec, register, spec_names)


def test_unknown_method_lists_accepted():
    with pytest.raises(ValueError, match="accepted: .*vanilla"):
        get_method("no-such-method")


def test_parse_spec_values_and_lists():
    parts = parse_method_spec("sliding-window:window=128,stride=16+vanilla")
    assert parts == [("sliding-window", {"window": 128, "stride": 16}), ("vanilla", {})]


def test_parse_spec_rejects_bad_option():
    with pytest.raises(ValueError, match="not key=value"):
        parse_method_spec("sliding-window:window")


def test_unknown_option_lists_accepted():
    with pytest.raises(ValueError, match="accepted: window, stride"):
        get_entry("sliding-window").make_config(windw=3)


def test_a_group_is_its_own_config_spelled_flat():
    """Middle retrieval is a config object of its own inside lm-infinite's, its options spelled beside the Λ's."""
    spec = get_method("lm-infinite")
    config = spec.make_config(n_local=64, top_blocks=2, retrieval_block=32)
    assert config.n_local == 64 and config.middle == MiddleConfig(top_blocks=2, retrieval_block=32)
    assert spec.make_config().middle == MiddleConfig() and not MiddleConfig().enabled
    options = config_options(config)
    assert spec.make_config(**options) == config and options["top_blocks"] == 2 and "middle" not in options
    names = [row[0] for row in option_rows(spec.config_cls)]
    assert names[:5] == ["n_global", "n_local", "distance_limit", "impl", "block"] and "middle_order" in names
    with pytest.raises(ValueError, match="accepted: n_global, .*top_k, top_blocks"):
        spec.make_config(top_kk=2)
    with pytest.raises(ValueError, match="lm-infinite top_blocks must be a non-negative integer"):
        spec.make_config(top_blocks=-2)


def test_an_option_declared_twice_is_refused_at_registration():
    @dataclass(frozen=True)
    class Clashing:
        top_k: int = option(0, "clashes with the group's top_k")
        middle: MiddleConfig = option_group(MiddleConfig, "the group")

    with pytest.raises(TypeError, match="'top_k' of Clashing is declared twice"):
        register("clashing-test-method", Clashing, role="attention", summary="-")(lambda model, config: None)
    assert "clashing-test-method" not in method_names()


def test_invalid_value_is_named():
    with pytest.raises(ValueError, match="stride"):
        get_entry("sliding-window").make_config(stride=0)


def test_reference_methods_do_not_combine():
    with pytest.raises(ValueError, match="cannot be combined"):
        check_combination(["vanilla", "sliding-window"])
    with pytest.raises(ValueError, match="cannot be combined"):
        check_combination(["sliding-window", "yarn"])


def test_a_scoring_strategy_is_not_a_patch():
    from lengthwise.registry import ScorerSpec, is_scorer  # noqa: PLC0415

    scorer = get_entry("sliding-window")
    assert isinstance(scorer, ScorerSpec) and not hasattr(scorer, "apply")  # nothing to apply, no Undo to fake
    assert "sliding-window" not in method_names() and "sliding-window" in spec_names()
    assert is_scorer("sliding-window:stride=4") and not is_scorer("yarn:factor=2+lm-infinite")
    with pytest.raises(ValueError, match="'sliding-window' is a scoring strategy, not a patch"):
        get_method("sliding-window")


def test_cli_lists_every_registered_method():
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"], terminal_width=200)
    assert listed.exit_code == 0
    help_text = runner.invoke(app, ["ppl", "--help"], terminal_width=400).output
    flat = " ".join(help_text.replace("│", " ").split())
    for name in spec_names():
        assert name in listed.output
        assert name in flat


def test_cli_rejects_unknown_method():
    result = CliRunner().invoke(app, ["ppl", "--method", "bogus", "--lengths", "64"])
    assert result.exit_code != 0
    assert "unknown method 'bogus'" in result.output


def test_methods_page_matches_registry():
    """docs/methods.md is generated from the registry; regenerate it when a method or option changes."""
    from pathlib import Path

    from lengthwise.registry import registry_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert page.rstrip("\n") == registry_markdown().rstrip("\n"), "run: lengthwise methods --markdown > docs/methods.md"
    assert all(f"## `{name}`" in page for name in spec_names())


def test_every_option_of_every_method_has_help():
    """Each config field carries its help in its metadata; the CLI and docs/methods.md read it from there."""
    import dataclasses

    from lengthwise.registry import option_help
    from lengthwise.temp_lora import TempLoraConfig

    configs = {name: get_entry(name).config_cls for name in spec_names()} | {"temp-lora": TempLoraConfig}
    missing = [f"{name}.{f.name}" for name, cls in configs.items() for f in dataclasses.fields(cls)
               if not option_help(f).strip()]
    assert not missing, f"options without help: {', '.join(missing)}"


def test_cli_shows_a_methods_options_with_defaults_and_help():
    import dataclasses

    from lengthwise.registry import option_help

    result = CliRunner().invoke(app, ["methods", "yarn"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for f in dataclasses.fields(get_method("yarn").config_cls):
        row = next(line for line in lines if f"│ {f.name} " in line)
        assert repr(f.default) in row and option_help(f) in row, row
    assert "role rope" in result.output and "0.1 ln s + 1" in result.output
    unknown = CliRunner().invoke(app, ["methods", "yarn", "bogus"])
    assert unknown.exit_code != 0 and "unknown method 'bogus'" in unknown.output
