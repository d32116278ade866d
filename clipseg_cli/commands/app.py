"""The ``clipseg`` command line: one Typer app, one module per command.

| command | module |
|---|---|
| ``segment``, ``matte`` | :mod:`.segment` |
| ``watch`` | :mod:`.watch` |
| ``models`` | :mod:`.models` |
| ``tune`` | :mod:`.tune` |
| ``eval``, ``calibrate`` | :mod:`.eval` |
| ``train``, ``synthetic`` | :mod:`.train` |
| ``serve`` | :mod:`.serve` |

The commands package is the only one that imports Typer or rich, prints or exits; exit codes
and the exception -> exit code table are in :mod:`.console`, shared options in :mod:`.options`.
"""

from __future__ import annotations

import sys

import typer

from clipseg_cli.commands import eval as eval_commands
from clipseg_cli.commands import models, segment, serve, tune, watch
from clipseg_cli.commands import train as train_commands
from clipseg_cli.commands.console import ExitCode

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Segment image collections from free-form text or image prompts with CLIPSeg.",
)
app.command()(segment.segment)
app.command()(segment.matte)
app.command()(watch.watch)
app.command()(models.models)
app.command()(tune.tune)
app.command("eval")(eval_commands.eval_command)
app.command("calibrate")(eval_commands.calibrate_command)
app.command("train", help=train_commands.TRAIN_HELP)(train_commands.train_command)
app.command("synthetic")(train_commands.synthetic_command)
app.command()(serve.serve)


def main() -> None:
    """Console-script entry point.

    Usage errors that Typer finds (an unknown option, a value of the wrong type or not among
    the choices) are printed as one ``clipseg: error:`` line, like every other error, instead of
    Typer's framed box.
    """
    try:
        code = app(prog_name="clipseg", standalone_mode=False)
    except typer.TyperException as error:  # click's UsageError and its kin
        message = " ".join(str(getattr(error, "format_message", error.__str__)()).split())
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        if message:  # none when the help was shown instead (no arguments at all)
            typer.echo(f"clipseg: error: {message}{hint}", err=True)
        sys.exit(getattr(error, "exit_code", int(ExitCode.USAGE)))
    except typer.Abort:
        sys.exit(int(ExitCode.INTERRUPTED))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
