"""The CLI starts light, reports its version, and lists the installed example plugin."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import adaptkit
from adaptkit.cli import main
from adaptkit.plugins import get_plugin_manager


def test_help_and_plugins_do_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from adaptkit.cli import main\n"
        "r1 = CliRunner().invoke(main, ['--help'])\n"
        "r2 = CliRunner().invoke(main, ['plugins'])\n"
        "r3 = CliRunner().invoke(main, ['plugins', '--json'])\n"
        "assert r1.exit_code == 0 and r2.exit_code == 0 and r3.exit_code == 0, (r1.output, r2.output)\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY=\n" in out, out


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"adaptkit {adaptkit.__version__}"


def test_help_lists_commands_and_exit_codes():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    assert "plugins" in r.output and "Exit codes" in r.output


def test_unknown_command_is_a_usage_error():
    r = CliRunner().invoke(main, ["no-such-command"])
    assert r.exit_code == 2 and "No such command" in r.output


def test_example_outside_plugin_is_listed_and_resolves():
    pytest.importorskip("adaptkit_example_merge", reason="run `make test` (it installs the example plugin)")
    r = CliRunner().invoke(main, ["plugins", "--json"])
    assert r.exit_code == 0, r.output
    plugin = [p for p in json.loads(r.output)["plugins"] if p["distribution"] == "adaptkit-example-merge"][0]
    assert plugin["status"] == "loaded" and plugin["registered"] == {"merger": ["median"]}

    host = get_plugin_manager()
    method = host.mergers.get("adaptkit-example-merge:median")
    assert host.mergers.get("median") is method
    import torch

    from adaptkit.merge.api import MergeInputs

    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 5))
    models = [base + rng.standard_normal((8, 5)) * 0.1 for _ in range(3)]
    inputs = MergeInputs(name="w", tensors=[torch.tensor(m) for m in models], base=torch.tensor(base),
                         params=[{}, {}, {}], global_params={"scale": 0.5})
    out = method.load()(inputs).numpy()
    expected = base + 0.5 * np.median(np.stack(models) - base, axis=0)  # independent numpy reference
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
