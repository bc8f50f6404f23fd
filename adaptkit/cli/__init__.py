"""The ``adaptkit`` command line: a Click group whose commands load lazily.

Start-up stays light: this module imports click and pluggy only; each command module imports torch and
friends inside its body. Errors from the :mod:`adaptkit.errors` hierarchy print as one line
(``error: ...``) and exit with the class's documented code; ``--traceback`` shows the full traceback.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from adaptkit import __version__
from adaptkit.errors import AdaptkitError, ExitCode

#: built-in commands: name -> "module:attribute" (imported only when the command is used or listed)
BUILTIN_COMMANDS: dict[str, str] = {
    "merge": "adaptkit.cli.merge:merge",
    "quantize": "adaptkit.cli.quantize:quantize",
    "plugins": "adaptkit.cli.plugins_cmd:plugins",
    "inspect": "adaptkit.cli.inspect_cmd:inspect",
}

_HOST_KEY = "adaptkit.host"


def get_host(ctx: click.Context | None = None) -> Any:
    """The plugin host for this invocation (built once per CLI run, honouring ``-p no:NAME``)."""
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    host = root.meta.get(_HOST_KEY)
    if host is None:
        from adaptkit.plugins import get_plugin_manager

        blocked = root.params.get("plugin_options") or ()
        host = get_plugin_manager(blocked=[b for b in blocked if b.startswith("no:")])
        root.meta[_HOST_KEY] = host
    return host


def _module_available(ref: str) -> bool:
    import importlib.util

    module = ref.partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class AdaptkitGroup(click.Group):
    """Lazy built-in commands + plugin commands + one-line errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = {n for n, ref in BUILTIN_COMMANDS.items() if _module_available(ref)}
        plugin_commands = get_host(ctx).plugin_commands(reserved=BUILTIN_COMMANDS)
        return sorted(names | set(self.commands) | set(plugin_commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in BUILTIN_COMMANDS and _module_available(BUILTIN_COMMANDS[cmd_name]):
            import importlib

            module, _, attr = BUILTIN_COMMANDS[cmd_name].partition(":")
            return getattr(importlib.import_module(module), attr)
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        return get_host(ctx).plugin_commands(reserved=BUILTIN_COMMANDS).get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdaptkitError as exc:
            if ctx.params.get("traceback"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(int(ExitCode.INTERRUPTED))
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: one line unless --traceback
            if ctx.params.get("traceback"):
                raise
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            click.echo(f"error: internal error: {message} (rerun with --traceback and report it)", err=True)
            ctx.exit(int(ExitCode.INTERNAL))


EPILOG = (
    "Exit codes: 0 ok, 1 internal error, 2 usage, 3 config, 4 input checkpoint, 5 output, 6 plugin, "
    "7 quality gate, 130 interrupted."
)


@click.group(cls=AdaptkitGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="adaptkit", message="%(prog)s %(version)s")
@click.option("--traceback", is_flag=True, help="Show the full traceback of an error instead of one line.")
@click.option("-p", "plugin_options", multiple=True, metavar="no:NAME",
              help="Block the plugin NAME (entry-point, distribution or built-in module name). Repeatable.")
def main(traceback: bool, plugin_options: tuple[str, ...]) -> None:
    """adaptkit: train, merge, quantize and verify language-model checkpoints."""
    for opt in plugin_options:
        if not opt.startswith("no:") or len(opt) <= 3:
            raise click.BadParameter(f"expected no:NAME, got {opt!r}", param_hint="-p")


def run() -> None:  # pragma: no cover - console entry point alias
    sys.exit(main())
