"""``adaptkit plugins``: list every plugin, what it registered, and any load errors."""
from __future__ import annotations

import json

import click


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema in specs/plugin-contract.md).")
def plugins(as_json: bool) -> None:
    """List plugins (built-in and installed), the names they registered, and load errors."""
    from adaptkit.cli import get_host

    doc = get_host().describe()
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for p in doc["plugins"]:
        origin = "built-in" if p["builtin"] else f"{p['distribution']} {p['version']}".strip()
        click.echo(f"{p['name']}  ({origin})  [{p['status']}]")
        for kind, names in p["registered"].items():
            click.echo(f"    {kind}: {', '.join(names)}")
        for err in p["errors"]:
            click.echo(f"    error: {err}")
    for c in doc["conflicts"]:
        click.echo(f"conflict: {c['kind']} {c['name']!r} registered by {' and '.join(c['owners'])}; "
                   "use the qualified name")
