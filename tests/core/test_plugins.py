"""Plugin loading: entry points one distribution at a time, failures recorded, clashes named, blocking."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from adaptkit.cli import main
from adaptkit.errors import ConfigError, PluginError
from adaptkit.plugins import DEFAULT_PLUGINS, get_plugin_manager
from tests.core.fakedist import make_dist

GOOD = """
    from adaptkit import hookimpl
    from adaptkit.registry import MergeMethod, Param

    @hookimpl
    def adaptkit_register_mergers(registry):
        registry.register(MergeMethod(name="{name}", impl="{mod}:impl", params=(Param("w", float, default=1.0),)))

    def impl(inputs):
        return inputs.tensors[0]
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("ADAPTKIT_PLUGINS", raising=False)
    yield root
    for name in list(sys.modules):
        if name.startswith("fake_"):
            del sys.modules[name]


def record(host, name):
    return host.records[name]


def test_builtins_are_registered_like_plugins():
    host = get_plugin_manager(load_entrypoints=False)
    for mod in DEFAULT_PLUGINS:
        assert mod in host.records and host.records[mod].builtin
    assert host.loaders.get("safetensors").name == "safetensors"


def test_good_outside_plugin_registers_with_owner(site):
    make_dist(site, "fake-good", {"fake_good": GOOD.format(name="goodmethod", mod="fake_good")},
              {"good": "fake_good"}, version="2.3")
    host = get_plugin_manager()
    rec = record(host, "good")
    assert rec.status == "loaded" and rec.distribution == "fake-good" and rec.version == "2.3"
    entry = host.mergers.entry("goodmethod")
    assert entry.owner.distribution == "fake-good"
    assert host.mergers.get("fake-good:goodmethod") is entry.component
    assert rec.registered == {"merger": ["goodmethod"]}


def test_plugin_raising_on_import_is_reported_not_fatal(site):
    make_dist(site, "fake-broken", {"fake_broken": "raise RuntimeError('boom at import')\n"}, {"broken": "fake_broken"})
    make_dist(site, "fake-good", {"fake_good": GOOD.format(name="goodmethod", mod="fake_good")}, {"good": "fake_good"})
    host = get_plugin_manager()
    rec = record(host, "broken")
    assert rec.status == "failed" and "boom at import" in rec.errors[0]
    assert "goodmethod" in host.mergers  # the other plugin still works
    r = CliRunner().invoke(main, ["plugins"])
    assert r.exit_code == 0, r.output
    assert "broken" in r.output and "boom at import" in r.output


def test_plugin_raising_on_registration_is_reported_and_rolled_back(site):
    code = """
        from adaptkit import hookimpl
        from adaptkit.registry import MergeMethod
        @hookimpl
        def adaptkit_register_mergers(registry):
            registry.register(MergeMethod(name="half_done", impl="x:y"))
            raise ValueError("registration exploded")
    """
    make_dist(site, "fake-regfail", {"fake_regfail": code}, {"regfail": "fake_regfail"})
    host = get_plugin_manager()
    assert "half_done" not in host.mergers
    rec = record(host, "regfail")
    assert rec.status == "failed" and "registration exploded" in rec.errors[0]


def test_misspelt_hook_is_caught(site):
    code = """
        from adaptkit import hookimpl
        @hookimpl
        def adaptkit_register_merger(registry):
            pass
    """
    make_dist(site, "fake-typo", {"fake_typo": code}, {"typo": "fake_typo"})
    host = get_plugin_manager()
    rec = record(host, "typo")
    assert rec.status == "failed"
    assert "unknown hook 'adaptkit_register_merger'" in rec.errors[0]
    assert "adaptkit_register_mergers" in rec.errors[0]  # the suggestion
    host.check_pending()  # the bad plugin was unregistered, so the host itself is consistent


def test_check_pending_raises_for_in_process_typo():
    import pluggy

    class Typo:
        @staticmethod
        @pluggy.HookimplMarker("adaptkit")
        def adaptkit_registr_quantizers(registry):
            pass

    host = get_plugin_manager(load_entrypoints=False)
    host.pm.register(Typo(), name="typo-direct")
    with pytest.raises(PluginError, match="adaptkit_registr_quantizers"):
        host.check_pending()


def test_duplicate_names_across_distributions_name_both_owners(site):
    make_dist(site, "fake-one", {"fake_one": GOOD.format(name="clash", mod="fake_one")}, {"one": "fake_one"})
    make_dist(site, "fake-two", {"fake_two": GOOD.format(name="clash", mod="fake_two")}, {"two": "fake_two"})
    host = get_plugin_manager()
    with pytest.raises(PluginError) as err:
        host.mergers.get("clash")
    msg = str(err.value)
    assert "fake-one" in msg and "fake-two" in msg and "qualified" in msg
    assert host.mergers.get("fake-one:clash").impl == "fake_one:impl"
    assert host.mergers.get("fake-two:clash").impl == "fake_two:impl"
    doc = host.describe()
    assert {"kind": "merger", "name": "clash", "owners": ["fake-one:clash", "fake-two:clash"]} in doc["conflicts"]


def test_duplicate_name_within_one_distribution_is_an_error(site):
    code = """
        from adaptkit import hookimpl
        from adaptkit.registry import MergeMethod
        @hookimpl
        def adaptkit_register_mergers(registry):
            registry.register(MergeMethod(name="twice", impl="x:y"))
            registry.register(MergeMethod(name="twice", impl="x:z"))
    """
    make_dist(site, "fake-twice", {"fake_twice": code}, {"twice": "fake_twice"})
    host = get_plugin_manager()
    assert "twice" not in host.mergers  # registries fill on first use; the failed plugin's entries are dropped
    rec = record(host, "twice")
    assert rec.status == "failed" and "registered twice by fake-twice" in rec.errors[0]


def test_clash_with_builtin_is_ambiguous_not_silent(site):
    make_dist(site, "fake-shadow", {"fake_shadow": GOOD.format(name="safetensors", mod="fake_shadow")},
              {"shadow": "fake_shadow"})
    host = get_plugin_manager()
    # a merger called 'safetensors' does not clash with the *loader* of that name: registries are per kind
    assert host.mergers.get("safetensors").impl == "fake_shadow:impl"
    assert host.loaders.get("safetensors").impl == "adaptkit.io:open_checkpoint"


def test_allow_list_and_block_list(site, monkeypatch):
    make_dist(site, "fake-one", {"fake_one": GOOD.format(name="m_one", mod="fake_one")}, {"one": "fake_one"})
    make_dist(site, "fake-two", {"fake_two": GOOD.format(name="m_two", mod="fake_two")}, {"two": "fake_two"})
    monkeypatch.setenv("ADAPTKIT_PLUGINS", "one")
    host = get_plugin_manager()
    assert record(host, "one").status == "loaded" and record(host, "two").status == "blocked"
    assert "m_two" not in host.mergers
    monkeypatch.setenv("ADAPTKIT_PLUGINS", "")
    host = get_plugin_manager()
    assert record(host, "one").status == "blocked"
    monkeypatch.delenv("ADAPTKIT_PLUGINS")
    host = get_plugin_manager(blocked=["no:two", "no:adaptkit.builtins.loaders"])
    assert record(host, "two").status == "blocked" and record(host, "one").status == "loaded"
    assert record(host, "adaptkit.builtins.loaders").status == "blocked"
    with pytest.raises(ConfigError):
        host.loaders.get("safetensors")


def test_cli_block_option(site):
    make_dist(site, "fake-one", {"fake_one": GOOD.format(name="m_one", mod="fake_one")}, {"one": "fake_one"})
    r = CliRunner().invoke(main, ["-p", "no:one", "plugins", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    one = [p for p in doc["plugins"] if p["name"] == "one"][0]
    assert one["status"] == "blocked" and one["registered"] == {}
    r = CliRunner().invoke(main, ["-p", "one", "plugins"])
    assert r.exit_code == 2 and "no:NAME" in r.output


def test_plugins_json_schema(site):
    make_dist(site, "fake-good", {"fake_good": GOOD.format(name="goodmethod", mod="fake_good")}, {"good": "fake_good"})
    r = CliRunner().invoke(main, ["plugins", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert set(doc) == {"schema", "adaptkit_version", "plugins", "conflicts"} and doc["schema"] == 1
    good = [p for p in doc["plugins"] if p["name"] == "good"][0]
    assert set(good) == {"name", "distribution", "version", "module", "builtin", "status", "hooks",
                         "registered", "errors"}
    assert good["registered"] == {"merger": ["goodmethod"]} and good["hooks"] == ["adaptkit_register_mergers"]
    assert good["builtin"] is False and good["distribution"] == "fake-good"
    # built-ins come first
    assert doc["plugins"][0]["builtin"] is True


def test_plugin_commands_and_clashes(site):
    code = """
        import click
        from adaptkit import hookimpl
        from adaptkit.errors import ConfigError

        @click.command()
        def hello():
            click.echo("hello from plugin")

        @click.command()
        def failing():
            raise ConfigError("bad value for 'x' in cfg.yml")

        @click.command()
        def crash():
            raise ZeroDivisionError("oops")

        @click.command("plugins")
        def evil():
            click.echo("hijacked")

        @hookimpl
        def adaptkit_register_commands(cli):
            cli.add_command(hello)
            cli.add_command(failing)
            cli.add_command(crash)
            cli.add_command(evil)
    """
    make_dist(site, "fake-cmd", {"fake_cmd": code}, {"cmd": "fake_cmd"})
    runner = CliRunner()
    r = runner.invoke(main, ["hello"])
    assert r.exit_code == 0 and "hello from plugin" in r.output
    r = runner.invoke(main, ["failing"])
    assert r.exit_code == 3
    assert r.output.strip() == "error: bad value for 'x' in cfg.yml"
    r = runner.invoke(main, ["crash"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "ZeroDivisionError: oops" in r.output and "--traceback" in r.output
    r = runner.invoke(main, ["--traceback", "crash"])
    assert isinstance(r.exception, ZeroDivisionError)
    r = runner.invoke(main, ["plugins", "--json"])  # the built-in command is not hijacked
    assert r.exit_code == 0 and "hijacked" not in r.output
    cmd = [p for p in json.loads(r.output)["plugins"] if p["name"] == "cmd"][0]
    assert "plugins" in " ".join(cmd["errors"]) and "already taken" in " ".join(cmd["errors"])


def test_step_wrappers_wrap_steps():
    import pluggy

    hookimpl = pluggy.HookimplMarker("adaptkit")
    seen = []

    class Timer:
        @hookimpl(wrapper=True)
        def adaptkit_run_step(self, step):
            seen.append(("before", step.kind, step.name))
            result = yield
            step.metrics["timer.seen"] = True
            seen.append(("after", result))
            return result

    host = get_plugin_manager(load_entrypoints=False, extra_plugins=[Timer()])
    assert host.run_step("merge", "ties", lambda: 42, out="x") == 42
    assert seen == [("before", "merge", "ties"), ("after", 42)]
    assert host.last_step.metrics == {"timer.seen": True} and host.last_step.info == {"out": "x"}

    with pytest.raises(ValueError, match="inner"):
        host.run_step("merge", "ties", lambda: (_ for _ in ()).throw(ValueError("inner")))
