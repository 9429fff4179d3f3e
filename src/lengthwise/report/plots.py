"""PNG plots from results records (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from lengthwise.registry import split_options


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write a figure atomically (temporary file, then rename)."""
    import os  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)


def legend_label(method: str, width: int = 48) -> str:
    """A method spec as a legend entry: an option value that is a file path is shortened to the file's name (the
    tables keep the whole spec), and the spec is wrapped between its options (at a ',' or a '+', never inside a
    `[..]` list) to `width` characters, so that a long spec (a LongRoPE factors file, a middle-retrieval setting)
    cannot cover the plot. Options are split as `registry.parse_method_spec` splits them."""
    tokens = []  # (separator before it, text): one per option, the method name riding on its first option
    for index, piece in enumerate(method.split("+")):
        name, colon, options = piece.partition(":")
        items = [f"{key}{eq}{value.rsplit('/', 1)[-1]}"
                 for key, eq, value in (item.partition("=") for item in split_options(options))] or [""]
        tokens.append(("+" if index else "", f"{name}{colon}{items[0]}"))
        tokens += [(",", item) for item in items[1:]]
    lines = [tokens[0][1]]
    for separator, text in tokens[1:]:
        if len(lines[-1]) + len(separator) + len(text) > width:
            lines[-1] += separator
            lines.append(text)
        else:
            lines[-1] += separator + text
    return "\n".join(lines)


def plot_nll_by_position(records: list[dict], path: str | Path, title: str = "") -> None:
    """NLL by position at the longest length of each (model, data, method); a dashed line at the training length."""
    plt = _pyplot()
    longest: dict = {}
    for record in records:
        if record.get("task") != "ppl":
            continue
        key = (record["model"], record["data"], record["method"])
        if key not in longest or record["length"] > longest[key]["length"]:
            longest[key] = record
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pretrain = None
    for (model, data, method), record in longest.items():
        buckets = record["nll_by_position"]
        edges, values = buckets["edges"], buckets["mean_nll"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])][: len(values)]
        ax.plot(centres, values, marker=".", label=legend_label(method))
        pretrain = record.get("pretrain_length", pretrain)
    if pretrain:
        ax.axvline(pretrain, color="grey", linestyle="--", linewidth=1, label=f"training length {pretrain}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title(title or "NLL by position")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never over a curve
    ax.grid(alpha=0.3)
    save_figure(fig, path)
