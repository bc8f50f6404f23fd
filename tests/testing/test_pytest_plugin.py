"""The opt-in pytest plugin: fixtures behave as documented, directly and in an outside project."""
from __future__ import annotations

import json
import os
import types

import pytest

import adaptkit
from adaptkit.registry import MergeMethod, Param


def _merge_plugin(name: str = "tk_probe") -> types.SimpleNamespace:
    @adaptkit.hookimpl
    def adaptkit_register_mergers(registry):
        registry.register(MergeMethod(name=name, impl="tests.testing.test_pytest_plugin:_impl",
                                      params=(Param("w", float, default=1.0),)))

    plugin = types.SimpleNamespace(adaptkit_register_mergers=adaptkit_register_mergers)
    plugin.__name__ = f"{name}_plugin"
    return plugin


def _impl(inputs):  # pragma: no cover - resolved, never called here
    return inputs.tensors[0]


PROBE = _merge_plugin()


def test_offline_environment_is_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_tiny_llama_gives_private_copies(tiny_llama, tmp_path):
    a = tiny_llama(num_layers=1)
    b = tiny_llama(num_layers=1)
    c = tiny_llama(name="named", num_layers=1, seed=5)
    assert a.parent == b.parent == c.parent == tmp_path and a != b and c.name == "named"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    (a / "model.safetensors").write_bytes(b"clobbered")  # a test may damage its copy ...
    d = tiny_llama(num_layers=1)
    assert (d / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()  # ... not others'
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(FileExistsError):
        tiny_llama(name="named")


def test_tiny_llama_family(tiny_llama):
    base, variants = tiny_llama.family(3, num_layers=1, scale=0.02)
    names = [p.name for p in (base, *variants)]
    assert len(set(names)) == 4
    blobs = {(p / "model.safetensors").read_bytes() for p in (base, *variants)}
    assert len(blobs) == 4
    assert all((v / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes() for v in variants)


def test_adaptkit_pm_default_has_builtins(adaptkit_pm):
    from adaptkit.plugins import DEFAULT_PLUGINS, PluginHost

    assert isinstance(adaptkit_pm, PluginHost)
    assert all(adaptkit_pm.records[m].status == "loaded" for m in DEFAULT_PLUGINS)


@pytest.mark.parametrize("adaptkit_pm", [{"extra_plugins": [PROBE], "load_entrypoints": False}], indirect=True)
def test_adaptkit_pm_indirect_extra_plugins(adaptkit_pm):
    assert adaptkit_pm.mergers.get("tk_probe").name == "tk_probe"


def test_adaptkit_pm_factory_is_fresh_and_ignores_allow_env(request, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_PLUGINS", "")  # "no third-party plugins" in the caller's shell
    adaptkit_pm_factory = request.getfixturevalue("adaptkit_pm_factory")
    assert adaptkit_pm_factory().allow is None  # the fixture's hosts load every installed plugin
    with_probe = adaptkit_pm_factory(extra_plugins=[PROBE], load_entrypoints=False)
    without = adaptkit_pm_factory(load_entrypoints=False)
    assert "tk_probe" in with_probe.mergers and with_probe.mergers.get("tk_probe").name == "tk_probe"
    assert "tk_probe" not in without.mergers
    assert "ADAPTKIT_PLUGINS" not in os.environ  # an outer allow-list cannot hide plugins from the fixture


def test_adaptkit_cli_version_and_separate_stderr(adaptkit_cli, tmp_path):
    r = adaptkit_cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"adaptkit {adaptkit.__version__}"
    missing = tmp_path / "nope"
    r = adaptkit_cli("inspect", missing)  # Path arguments are fine
    assert r.exit_code == 4
    assert r.stderr.startswith("error: ") and str(missing) in r.stderr
    assert "error:" not in r.stdout


def test_adaptkit_cli_extra_plugins_and_real_checkpoint(adaptkit_cli, tiny_llama):
    r = adaptkit_cli("plugins", "--json", extra_plugins=[_merge_plugin("tk_cli_probe")])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    probe = [p for p in doc["plugins"] if p["name"] == "tk_cli_probe_plugin"]
    assert probe and probe[0]["registered"] == {"merger": ["tk_cli_probe"]}
    r = adaptkit_cli("plugins", "--json")  # the extra plugin was for that one invocation only
    assert "tk_cli_probe_plugin" not in r.stdout
    r = adaptkit_cli("inspect", tiny_llama(num_layers=1), "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tensors"] == 3 + 9 and info["architecture"] == "LlamaForCausalLM"


def test_plugin_works_in_an_outside_project(pytester):
    """A plugin author's project: only `-p adaptkit.testing.pytest_plugin`, strict markers, no conftest."""
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")
    pytester.makepyfile(
        test_author="""
        import json, os
        import pytest

        def test_fixtures(tiny_llama, adaptkit_pm, adaptkit_cli):
            path = tiny_llama(num_layers=1, hidden_size=32)
            assert json.loads((path / "config.json").read_text())["hidden_size"] == 32
            assert adaptkit_pm.loaders.get("safetensors")
            assert adaptkit_cli("--version").exit_code == 0
            assert os.environ["HF_HUB_OFFLINE"] == "1"

        @pytest.mark.realmodel
        def test_marker_is_registered():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "adaptkit.testing.pytest_plugin", "-q")
    result.assert_outcomes(passed=2)
