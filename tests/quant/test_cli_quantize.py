"""``adaptkit quantize``: happy path, JSON summary, and one-line errors with nothing half-written."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def model(tiny_llama):
    return tiny_llama()


def _err(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_rtn_json_and_progress(adaptkit_cli, model, tmp_path) -> None:
    out = tmp_path / "q"
    r = adaptkit_cli("quantize", model, out, "--method", "rtn", "--bits", "4", "--group-size", "32", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "gptq" and doc["quantized_modules"] == 14
    assert doc["quantization_config"]["bits"] == 4
    assert doc["input"] == {"loader": "adaptkit:safetensors", "source_format": None}
    assert set(doc["timings"]) >= {"open", "plan", "quantize", "write", "publish"}
    # one progress bar (not a line per module): its final state counts every target linear
    assert "quantize rtn [" in r.stderr and "14/14 linears" in r.stderr
    assert len(r.stderr.splitlines()) <= 3, r.stderr
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "quantize_config.json"} <= files


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--bits", "5"], 3, "--bits 5: quantizer 'rtn' produces 2, 3, 4, 8-bit weights"),
        (["--group-size", "128"], 3, "not a multiple of group size 128"),
        (["--group-size", "48"], 3, "--group-size 48 is out of range"),
        (["--method", "nope"], 3, "unknown quantizer 'nope'"),
        (["--act-order"], 3, "--act-order: quantizer 'rtn' does not use it"),
        (["--damp", "0.05"], 3, "--damp: quantizer 'rtn' does not use it"),
        (["--method", "gptq", "--damp", "0"], 3, "--damp 0.0 is out of range"),
    ],
)
def test_bad_options(adaptkit_cli, model, tmp_path, args, code, needle) -> None:
    out = tmp_path / "q"
    base = ["quantize", model, out, "--method", "rtn", "--group-size", "32"]
    r = adaptkit_cli(*base, *args)
    assert r.exit_code == code, r.stderr
    assert needle in _err(r)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]  # no temp folder left behind


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_file_errors(adaptkit_cli, model, tmp_path, method) -> None:
    out = tmp_path / "q"
    base = ["quantize", model, out, "--method", method, "--group-size", "32", "--seqlen", "64"]
    r = adaptkit_cli(*base, "--calib", tmp_path / "missing.jsonl")
    assert r.exit_code == 3 and "calibration file not found" in _err(r)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = adaptkit_cli(*base, "--calib", empty)
    assert r.exit_code == 3 and "calibration file is empty" in _err(r)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short"}) + "\n")
    r = adaptkit_cli(*base, "--calib", short)
    assert r.exit_code == 3 and "too short" in _err(r)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    r = adaptkit_cli(*base, "--calib", bad)
    assert r.exit_code == 3 and "bad.jsonl:1" in _err(r)
    assert not out.exists()


def test_already_quantized_and_dequantize(adaptkit_cli, model, tmp_path) -> None:
    q = tmp_path / "q"
    assert adaptkit_cli("quantize", model, q, "--method", "rtn", "--group-size", "32").exit_code == 0
    r = adaptkit_cli("quantize", q, tmp_path / "q2", "--method", "nf4")
    assert r.exit_code == 4
    msg = _err(r)
    assert "already quantized (gptq)" in msg and "--requantize" in msg and "--method dequantize" in msg
    d = tmp_path / "d"
    r = adaptkit_cli("quantize", q, d, "--method", "dequantize", "--json")
    assert r.exit_code == 0, r.stderr
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    prov = json.loads((d / "adaptkit.json").read_text())
    assert prov["kind"] == "dequantize" and prov["input"]["source_format"] == "gptq"
    r = adaptkit_cli("quantize", model, tmp_path / "x", "--method", "dequantize")
    assert r.exit_code == 4 and "not a quantized checkpoint adaptkit can dequantize" in _err(r)
    # the summary line says a dequantized copy is larger, never "0.25x smaller"
    r = adaptkit_cli("quantize", q, tmp_path / "d2", "--method", "dequantize")
    assert r.exit_code == 0 and "larger than the input" in r.stdout and "smaller" not in r.stdout


def test_output_exists_needs_force(adaptkit_cli, model, tmp_path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = adaptkit_cli("quantize", model, out, "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 5
    assert (out / "keep.txt").exists()
    r = adaptkit_cli("quantize", model, out, "--method", "rtn", "--group-size", "32", "--force")
    assert r.exit_code == 0 and not (out / "keep.txt").exists()


def test_nf4_option_validation(adaptkit_cli, model, tmp_path) -> None:
    r = adaptkit_cli("quantize", model, tmp_path / "q", "--method", "nf4", "-o", "blocksize=100")
    assert r.exit_code == 3 and "blocksize" in _err(r)
    r = adaptkit_cli("quantize", model, tmp_path / "q", "--method", "nf4", "-o", "bogus=1")
    assert r.exit_code == 3 and "nf4 has no option 'bogus'" in _err(r)
    r = adaptkit_cli("quantize", model, tmp_path / "q", "--method", "nf4", "--bits", "8")
    assert r.exit_code == 3 and "--bits 8: quantizer 'nf4' produces 4-bit weights" in _err(r)
    r = adaptkit_cli("quantize", model, tmp_path / "q", "--method", "nf4", "-o", "blocksize=32", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "bnb-nf4"


def test_quantize_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from adaptkit.cli import main; import adaptkit.cli.quantize, adaptkit_quant.plugin, "
            "adaptkit.quantize.runner, adaptkit.formats.quantized; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("source", ["builtin-news", "builtin-wiki", "builtin-pydoc"])
def test_builtin_sources_are_not_taken_for_a_file(adaptkit_cli, model, tmp_path, source) -> None:
    out = tmp_path / "q"
    r = adaptkit_cli("quantize", model, out, "--method", "gptq", "--group-size", "32", "--seqlen", "64",
                     "--nsamples", "2", "--calib", source)
    assert r.exit_code == 0, r.stderr
    prov = json.loads((out / "adaptkit.json").read_text())
    assert prov["calibration"] == {"source": source, "nsamples": 2, "seqlen": 64, "seed": 0}


def test_partial_groups_opt_in(adaptkit_cli, model, tmp_path) -> None:
    """hidden 64 at --group-size 128: refused by default (vLLM could not load it); --partial-groups writes one
    64-column group per row for q/k/v/o/gate/up, and the file reads back as RTN of those groups."""
    from adaptkit.io import open_checkpoint
    from adaptkit.quantize.api import QuantSpec
    from adaptkit.formats.quantized import open_quantized
    from adaptkit_quant.rtn import quantize_weight

    out = tmp_path / "q"
    r = adaptkit_cli("quantize", model, out, "--method", "rtn", "--group-size", "128")
    assert r.exit_code == 3 and "--partial-groups" in _err(r) and not out.exists()
    r = adaptkit_cli("quantize", model, out, "--method", "rtn", "--group-size", "128", "--partial-groups")
    assert r.exit_code == 0, r.stderr
    assert "end with a group of 64 columns" in r.stderr
    name = "model.layers.0.self_attn.q_proj.weight"
    with open_checkpoint(model) as src, open_quantized(out) as q:
        w = src.get(name).float()
        assert q.raw.info("model.layers.0.self_attn.q_proj.scales").shape == (1, w.shape[0])
        ref = quantize_weight(w, QuantSpec(bits=4, group_size=64)).dequantize()  # one group of 64 = the same
        assert torch.equal(q.get(name).float(), ref)
    r = adaptkit_cli("quantize", model, tmp_path / "a", "--method", "awq", "--group-size", "128", "--partial-groups")
    assert r.exit_code == 3 and "--partial-groups: quantizer 'awq' does not use it" in _err(r)


def test_gptq_group_order_option(adaptkit_cli, model, tmp_path) -> None:
    """-o group_order=gar: salient groups first, groups kept contiguous (g_idx = i // group, desc_act false)."""
    from adaptkit.formats.quantized import open_quantized

    out = tmp_path / "q"
    r = adaptkit_cli("quantize", model, out, "--method", "gptq", "--group-size", "32", "--seqlen", "64",
                     "--nsamples", "2", "-o", "group_order=gar")
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is False
    with open_quantized(out) as q:
        g = q.raw.get("model.layers.0.mlp.down_proj.g_idx")
        assert torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // 32)
    r = adaptkit_cli("quantize", model, tmp_path / "b", "--method", "gptq", "--group-size", "32", "-o", "group_order=random")
    assert r.exit_code == 3 and "group_order" in _err(r)


def _cores() -> int:
    from adaptkit.quantize.runner import available_cores

    return available_cores()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bad_threads(adaptkit_cli, model, tmp_path, method) -> None:
    out = tmp_path / "q"
    base = ["quantize", model, out, "--method", method, "--group-size", "32", "--seqlen", "64", "--nsamples", "2"]
    r = adaptkit_cli(*base, "--threads", "0")
    assert r.exit_code == 3 and "--threads 0: use a whole number from 1 to" in _err(r)
    too_many = str(_cores() + 1)
    r = adaptkit_cli(*base, "--threads", too_many)
    assert r.exit_code == 3 and f"--threads {too_many}: this machine has {_cores()} cores" in _err(r)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


def test_device_cuda_without_cuda(adaptkit_cli, model, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "q"
    r = adaptkit_cli("quantize", model, out, "--method", "gptq", "--group-size", "32", "--seqlen", "64",
                     "--nsamples", "2", "--device", "cuda")
    assert r.exit_code == 3 and "CUDA is not available" in _err(r)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_shorter_than_one_group(adaptkit_cli, model, tmp_path, method) -> None:
    out = tmp_path / "q"
    # 2 x 8 = 16 tokens < one group of 32
    r = adaptkit_cli("quantize", model, out, "--method", method, "--group-size", "32", "--seqlen", "8",
                     "--nsamples", "2")
    assert r.exit_code == 3 and "16 calibration tokens is shorter than one group (--group-size 32)" in _err(r)
    # a calibration text of a few tokens: enough for --seqlen 8, fewer tokens than one group
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "The cat sat on the warm mat today."}) + "\n")
    r = adaptkit_cli("quantize", model, out, "--method", method, "--group-size", "32", "--seqlen", "8",
                     "--nsamples", "8", "--calib", short)
    assert r.exit_code == 3 and "calibration text is shorter than one group" in _err(r)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


def test_gptq_output_does_not_depend_on_threads(adaptkit_cli, model, tmp_path) -> None:
    if _cores() < 2:
        pytest.skip("needs 2 cores")
    digests = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        r = adaptkit_cli("quantize", model, out, "--method", "gptq", "--group-size", "32", "--seqlen", "64",
                         "--nsamples", "4", "--threads", threads, "--json")
        assert r.exit_code == 0, r.stderr
        assert {"forward", "hessian", "solve", "cholesky", "pack"} <= set(json.loads(r.stdout)["phases"])
        digests.append((out / "model.safetensors").read_bytes())
    assert digests[0] == digests[1]
