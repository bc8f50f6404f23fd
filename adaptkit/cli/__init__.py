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


def _on_sigterm(signum: int, frame: Any) -> None:
    from adaptkit.errors import Terminated, note_signal

    note_signal(signum)
    raise Terminated()


def _on_sigint(signum: int, frame: Any) -> None:
    from adaptkit.errors import note_signal

    note_signal(signum)
    raise KeyboardInterrupt()


def _install_signal_handlers() -> None:
    """SIGTERM (``kill``, ``timeout``) unwinds like Ctrl-C, so temporary outputs are removed. Both handlers
    also record the signal, so an interrupt raised where Python ignores exceptions is raised again at the
    next progress update or before publishing (``adaptkit.errors.raise_if_signalled``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when SIGINT is ignored
                signal.signal(signal.SIGINT, _on_sigint)
        except (ValueError, OSError):  # pragma: no cover - embedded interpreters
            pass


def _quiet_stdout() -> None:
    """After a broken pipe (``adaptkit plugins | head``) send further output, and the interpreter's final
    flush, to /dev/null so the pipe's reader closing early is not an error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # CliRunner's captured stdout has no file descriptor
        pass


def _hoist_global_flags(args: list[str]) -> list[str]:
    """``--traceback`` is accepted anywhere before ``--`` (the error hint says "rerun with --traceback")."""
    if "--traceback" not in args:
        return args
    cut = args.index("--") if "--" in args else len(args)
    if "--traceback" not in args[:cut]:
        return args
    rest = [a for i, a in enumerate(args) if not (i < cut and a == "--traceback")]
    return ["--traceback", *rest]


class AdaptkitGroup(click.Group):
    """Commands from ``adaptkit_register_commands`` (built-ins and plugins alike) + one-line errors."""

    def main(self, args: Any = None, *a: Any, **kw: Any) -> Any:  # type: ignore[override]
        if args is None:
            args = sys.argv[1:]
        return super().main(_hoist_global_flags(list(args)), *a, **kw)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(get_host(ctx).plugin_commands()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        return get_host(ctx).plugin_commands().get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        _install_signal_handlers()
        try:
            return super().invoke(ctx)
        except AdaptkitError as exc:
            if ctx.params.get("traceback"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(int(exc.exit_code))
        except BrokenPipeError:
            _quiet_stdout()
            ctx.exit(0)
        except KeyboardInterrupt as exc:
            from adaptkit.errors import Terminated

            if isinstance(exc, Terminated):
                click.echo("error: terminated (SIGTERM); nothing was left behind", err=True)
                ctx.exit(int(ExitCode.TERMINATED))
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
    "7 quality gate, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."
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
    sys.exit(main(prog_name="adaptkit"))
