"""Entry point of the `ballast` command: registers the command groups and turns errors into one line."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ballast import __version__
from ballast.cli import (
    async_cmds,
    cache_cmds,
    chains_cmds,
    chat_cmds,
    datasets_cmds,
    evals_cmds,
    finetune_cmds,
    keys_cmds,
    package_cmds,
    platform_cmds,
    pools_cmds,
    profiles,
    serve_cmds,
    simulate_cmds,
    up_cmds,
)
from ballast.cli import models as models_cmds
from ballast.cli.options import make_console

# Plain (click) help: rich's help panels label every flag `<bool>` and wrap at 80 columns when piped.
app = typer.Typer(
    name="ballast",
    help="Package, deploy, serve and scale models. Files (caches, state, credentials) live in $BALLAST_HOME, "
    "default ~/.ballast; see `ballast cache list`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ballast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print Ballast's version and exit.",
                                          callback=_print_version, is_eager=True)] = False,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Saved profile to use (`ballast profiles list`); also BALLAST_PROFILE. "
        "Accepted after any command too.")] = None,
) -> None:
    """Package, deploy, serve and scale models."""
    if profile:
        os.environ["BALLAST_PROFILE"] = profile


package_cmds.register(app)
serve_cmds.register(app)
up_cmds.register(app)
platform_cmds.register(app)
chat_cmds.register(app)
keys_cmds.register(app)
cache_cmds.register(app)
profiles.register(app)
chains_cmds.register(app)
async_cmds.register(app)
pools_cmds.register(app)
datasets_cmds.register(app)
evals_cmds.register(app)
finetune_cmds.register(app)
simulate_cmds.register(app)
app.add_typer(models_cmds.app, name="models", help="Make and import LLM checkpoints (offline).")

err_console = make_console(stderr=True)


def take_profile(argv: list[str]) -> list[str]:
    """`--profile NAME` is accepted anywhere on the line (every command): it becomes BALLAST_PROFILE."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a == "--profile" and i + 1 < len(argv):
            os.environ["BALLAST_PROFILE"] = argv[i + 1]
            i += 2
            continue
        if a.startswith("--profile="):
            os.environ["BALLAST_PROFILE"] = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out


def main() -> None:
    """Run the CLI; errors print one clear line (a traceback only with --debug or BALLAST_DEBUG=1)."""
    argv = sys.argv[1:]
    debug = "--debug" in argv or os.environ.get("BALLAST_DEBUG") == "1"
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["BALLAST_DEBUG"] = "1"
    argv = take_profile(argv)
    try:
        app(args=argv, prog_name="ballast", standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # the one place that turns any failure into a line for a person
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if debug:
            raise
        from rich.markup import escape  # the message's own brackets (`ballast[postgres]`) are text, not markup

        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
