"""adaptkit's own commands, added through ``adaptkit_register_commands`` exactly like a plugin's.

Each command module imports only click at module level (torch and friends are imported inside the command
body), so registering them keeps ``adaptkit --help`` instant. Built-in commands are added before any
plugin's, so a plugin command with a taken name is the one reported and dropped.
"""
from __future__ import annotations

from typing import Any

from adaptkit import hookimpl
from adaptkit.registry import resolve_impl

#: name -> "module:attribute" of every built-in command
BUILTIN_COMMANDS: dict[str, str] = {
    "eval": "adaptkit.cli.eval_cmd:eval_cmd",
    "extract-lora": "adaptkit.cli.extract_lora:extract_lora",
    "inspect": "adaptkit.cli.inspect_cmd:inspect",
    "merge": "adaptkit.cli.merge:merge",
    "merge-adapter": "adaptkit.cli.merge_adapter:merge_adapter",
    "plugins": "adaptkit.cli.plugins_cmd:plugins",
    "quantize": "adaptkit.cli.quantize:quantize",
    "run": "adaptkit.cli.run:run",
    "train": "adaptkit.cli.train:train",
    "verify": "adaptkit.cli.verify_cmd:verify",
}


def _present(ref: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(ref.partition(":")[0]) is not None
    except (ImportError, ValueError):
        return False


@hookimpl
def adaptkit_register_commands(cli: Any) -> None:
    for name, ref in BUILTIN_COMMANDS.items():
        if _present(ref):  # a command module not present in this install is simply not offered
            cli.add_command(resolve_impl(ref), name)
