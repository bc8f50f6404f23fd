"""Merge inputs go through the loader registry: a GPTQ checkpoint (dequantized on load) is a merge input like
any other, the plan names each input's loader, the merge runs as a step that wrapper plugins see, and the
output records its inputs (path, loader, source format, files) through the one publisher."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from adaptkit import hookimpl  # noqa: E402


@pytest.fixture
def quantized(adaptkit_cli, tiny_llama, tmp_path):
    """(float model M, its RTN/GPTQ-quantized copy Q, Q's dequantized copy D, a float fine-tune F of M)."""
    m = tiny_llama(seed=5)
    f = tiny_llama.perturbed(m, scale=0.05, seed=3)
    q, d = tmp_path / "q", tmp_path / "d"
    r = adaptkit_cli("quantize", m, q, "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 0, r.stderr
    r = adaptkit_cli("quantize", q, d, "--method", "dequantize")
    assert r.exit_code == 0, r.stderr
    return m, q, d, f


def _write(path: Path, first: Path, second: Path) -> Path:
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(first), "parameters": {"weight": 0.25}},
        {"model": str(second), "parameters": {"weight": 0.75}}]}))
    return path


def test_gptq_input_merges_exactly_like_its_dequantized_copy(adaptkit_cli, quantized, tmp_path):
    _, q, d, f = quantized
    for name, src in (("from_q", q), ("from_d", d)):
        r = adaptkit_cli("merge", _write(tmp_path / f"{name}.yml", src, f), tmp_path / name, "-q")
        assert r.exit_code == 0, r.stderr
    from_q, from_d = load_file(str(tmp_path / "from_q" / "model.safetensors")), \
        load_file(str(tmp_path / "from_d" / "model.safetensors"))
    assert set(from_q) == set(from_d)
    assert (tmp_path / "from_q" / "model.safetensors").read_bytes() == \
        (tmp_path / "from_d" / "model.safetensors").read_bytes()
    # and both are the float64 formula over the dequantized weights (fp32 math, rounded once)
    D, F = load_file(str(d / "model.safetensors")), load_file(str(f / "model.safetensors"))
    for name, o in from_q.items():
        ref = (0.25 * D[name].double() + 0.75 * F[name].double()) / 1.0
        bound = 4 * 2.0**-24 * (D[name].double().abs() + F[name].double().abs()) + 1e-30
        assert ((o.double() - ref).abs() <= bound).all(), name
    # the quantized weights really were dequantized: q stores no '<module>.weight' for quantized linears
    with open(q / "model.safetensors", "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        stored = set(json.loads(fh.read(n)))
    assert "model.layers.0.mlp.up_proj.weight" not in stored and "model.layers.0.mlp.up_proj.weight" in from_q
    # the config of the output is a float model's
    assert "quantization_config" not in json.loads((tmp_path / "from_q" / "config.json").read_text())


def test_dry_run_reports_the_loader_of_each_model(adaptkit_cli, quantized, tmp_path):
    _, q, _, f = quantized
    cfg = _write(tmp_path / "m.yml", q, f)
    r = adaptkit_cli("merge", cfg, tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    by_path = {m["path"]: m for m in doc["models"]}
    assert by_path[str(q.resolve())]["loader"] == "adaptkit:quantized"
    assert by_path[str(q.resolve())]["dequantized"] is True
    assert by_path[str(q.resolve())]["source_format"] == "gptq"
    assert by_path[str(f.resolve())]["loader"] == "adaptkit:safetensors"
    assert by_path[str(f.resolve())]["dequantized"] is False and by_path[str(f.resolve())]["source_format"] is None
    r = adaptkit_cli("merge", cfg, tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "adaptkit:quantized, dequantized from gptq" in r.stdout and "adaptkit:safetensors" in r.stdout
    assert not (tmp_path / "out").exists()


def test_merge_is_a_step_and_records_its_inputs(adaptkit_cli, tiny_llama, tmp_path):
    seen = []

    @hookimpl(wrapper=True)
    def adaptkit_run_step(step):
        seen.append((step.kind, step.name, step.info.get("output")))
        result = yield
        step.metrics["wrapped"] = True
        return result

    spy = types.SimpleNamespace(__name__="merge_step_spy", ADAPTKIT_DISTRIBUTION="merge-step-spy",
                                adaptkit_run_step=adaptkit_run_step)
    a = tiny_llama(seed=9)
    b = tiny_llama.perturbed(a, seed=4)
    out = tmp_path / "out"
    r = adaptkit_cli("merge", _write(tmp_path / "m.yml", a, b), out, "--seed", "5", extra_plugins=[spy])
    assert r.exit_code == 0, r.stderr
    assert seen == [("merge", "linear", str(out))]
    assert "merging" in r.stderr and "tensors" in r.stderr  # the one progress bar
    prov = json.loads((out / "adaptkit.json").read_text())
    assert prov["kind"] == "merge" and prov["method"] == "linear" and prov["seed"] == 5
    assert prov["method_qualified"] == "adaptkit:linear"
    assert [i["path"] for i in prov["inputs"]] == [str(a.resolve()), str(b.resolve())]
    for i, folder in zip(prov["inputs"], (a, b)):
        assert i["loader"] == "adaptkit:safetensors" and i["source_format"] is None
        assert i["files"] == [{"name": "model.safetensors", "size": (folder / "model.safetensors").stat().st_size}]
        assert "sha256" not in json.dumps(i)  # inputs are not hashed
    assert prov["config"]["models"][0]["model"] == str(a.resolve())
    manifest = json.loads((out / "adaptkit-manifest.json").read_text())
    assert "model.safetensors" in json.dumps(manifest)
    card = (out / "README.md").read_text()
    assert "loader adaptkit:safetensors" in card and "merge_method: linear" in card


def test_gguf_file_is_a_merge_input(adaptkit_cli, tiny_llama, tmp_path):
    """A ``.gguf`` file named directly in the config: an F32 GGUF round-trips exactly, so merging it gives the
    same tensors as merging the safetensors model it was written from; its tokenizer files are written by
    the GGUF loader (the GGUF carries them inside) when it is the first model."""
    pytest.importorskip("gguf")
    try:
        from tests.formats.test_gguf import write_gguf
    except ImportError:  # pragma: no cover - the GGUF writer of the format tests is not there
        pytest.skip("tests/formats/test_gguf.py:write_gguf not available")
    a = tiny_llama(seed=13)
    b = tiny_llama.perturbed(a, seed=6, scale=0.1)
    g = write_gguf(a, tmp_path / "a.gguf")
    for name, first in (("from_gguf", g), ("from_st", a)):
        r = adaptkit_cli("merge", _write(tmp_path / f"{name}.yml", first, b), tmp_path / name, "-q")
        assert r.exit_code == 0, r.stderr
    assert (tmp_path / "from_gguf" / "model.safetensors").read_bytes() == \
        (tmp_path / "from_st" / "model.safetensors").read_bytes()
    assert (tmp_path / "from_gguf" / "tokenizer.json").is_file()
    prov = json.loads((tmp_path / "from_gguf" / "adaptkit.json").read_text())
    first = prov["inputs"][0]
    assert first["loader"] == "adaptkit:gguf" and first["path"] == str(g.resolve())
    assert first["source_format"] is None and first["dequantized"] is False  # F32 tensors: nothing dequantized
    assert first["files"] == [{"name": "a.gguf", "size": g.stat().st_size}]
