"""The `lengthwise` command line. Each module of this package adds its commands to `app`; `main` is the entry point.

Bad input gets one line on stderr (`error: ...`, what was wrong and what is accepted) and exit code 2, never a
traceback: typer answers malformed options itself, and `main` turns the errors lengthwise raises for bad input
(`lengthwise.errors.UserError`, FileNotFoundError, ...) into that line; any other exception keeps its traceback.
`--debug` (anywhere on the command line) or
`LENGTHWISE_DEBUG=1` shows the traceback instead.
"""

import importlib
import os
import pkgutil
import sys

try:
    import typer
except ModuleNotFoundError as missing:  # the core installs without the harness: say which extra brings the CLI
    sys.exit(f"error: the lengthwise command line needs the harness extra ({missing.name} is not installed): "
             f"pip install 'lengthwise[harness]'")

from lengthwise.cli.app import app  # noqa: E402

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "app":
        importlib.import_module(f"{__name__}.{_module.name}")

from lengthwise.errors import UserError  # noqa: E402
from lengthwise.models.compat import PatchNotInForce  # noqa: E402

USAGE_ERROR = typer.BadParameter.__bases__[0]  # click's UsageError, as typer ships it
# what bad input raises (UserError, raised where input is validated); anything else is a defect and keeps its
# traceback (OSError: a missing, unreadable or unwritable path, a full disk, a model that does not load, ...)
USER_ERRORS = (UserError, OSError, ModuleNotFoundError, MemoryError, PatchNotInForce)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LENGTHWISE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="lengthwise", standalone_mode=False)
    except USAGE_ERROR as err:  # typer's own checks and lengthwise's BadParameter: the same one line, not a framed box
        if debug:
            raise
        print(f"error: {' '.join(err.format_message().split())} ({err.ctx.command_path if err.ctx else 'lengthwise'}"
              f" --help lists what is accepted)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
