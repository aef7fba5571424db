"""The ``wtacrs`` command. Each subcommand lives in its own module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("wtacrs.app.demo", "exact vs CRS vs WTA-CRS on heavy-tailed data: error and stored rows"),
    "finetune": ("wtacrs.app.finetune", "fine-tune a local Hugging Face model on a GLUE-format or built-in task"),
    "compare": ("wtacrs.app.report", "paper-style table and plot from finetune results files"),
    "memory": ("wtacrs.app.memory_report", "saved-activation bytes by kind (linear, relu, dropout, attention...) per arm"),
}

#: What a user's input can cause: the library's and the commands' checks raise ValueError (with the argument, the
#: allowed values and the value got), files that cannot be read or written raise OSError, and a NaN or Inf in
#: training (e.g. from a learning rate that is too large) raises wtacrs.NonFiniteInputError.
EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..health import NonFiniteInputError

    return ValueError, OSError, NonFiniteInputError


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a mistake in the user's input prints ``wtacrs COMMAND: error: MESSAGE`` on stderr and
    returns ``EXIT_USER_ERROR`` (as argparse does for a malformed command line), never a traceback."""
    parser = argparse.ArgumentParser(prog="wtacrs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except _user_errors() as e:
        message = f"{e.strerror or e}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"wtacrs {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
