"""``quantize`` is a kind like ``merge``: a third-party quantizer runs through the core runner and formats, the
CLI runs it as a step, declared capabilities are enforced, quantized inputs need --requantize, and the group
size is chosen from the model when not given."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.quant.thirdparty_plugin import StepSpy, ThirdPartyQuant  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _err(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _unpack_ref(words: list[int], bits: int, n: int) -> list[int]:
    """Independent reader of a little-endian bit stream over int32 words (Python ints)."""
    big = 0
    for k, w in enumerate(words):
        big |= (w & 0xFFFFFFFF) << (32 * k)
    return [(big >> (j * bits)) & (2**bits - 1) for j in range(n)]


def test_thirdparty_plugin_imports_adaptkit_only() -> None:
    code = ("import sys, tests.quant.thirdparty_plugin; "
            "print(sorted(m for m in sys.modules if m.startswith('adaptkit_quant') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_thirdparty_quantizer_through_cli_step_and_gptq_format(adaptkit_cli, tiny_llama, tmp_path, adaptkit_pm_factory) -> None:
    from safetensors import safe_open

    from adaptkit.io import open_checkpoint

    src = tiny_llama(attention_bias=True)
    out = tmp_path / "q"
    spy = StepSpy()
    r = adaptkit_cli("quantize", src, out, "--method", "sym4", "--group-size", "32", "--json",
                     extra_plugins=[ThirdPartyQuant(), spy])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["method"] == "sym4" and doc["format"] == "gptq" and doc["quantized_modules"] == 14
    # the CLI ran it as a step of kind "quantize" through adaptkit_run_step
    assert [(k, n) for k, n, _ in spy.seen] == [("quantize", "sym4")]
    assert spy.seen[0][2]["model"] == str(src) and spy.seen[0][2]["output"] == str(out)
    prov = json.loads((out / "adaptkit.json").read_text())
    assert prov["kind"] == "quantize" and prov["quantizer"] == "thirdparty-quant 9.9" and prov["format"] == "gptq"
    assert prov["input"]["loader"] == "adaptkit:safetensors" and prov["input"]["sha256"]
    assert "sym4" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"]) == ("gptq", 4, 32, True)

    # independent reference: read the GPTQ v1 bits back by hand and compare with the float64 formula
    m = "model.layers.1.mlp.down_proj"  # [64, 128]
    with safe_open(str(out / "model.safetensors"), "pt") as raw, open_checkpoint(src) as orig:
        qweight, qzeros = raw.get_tensor(m + ".qweight"), raw.get_tensor(m + ".qzeros")
        scales = raw.get_tensor(m + ".scales").double()
        out_f = qweight.shape[1]
        in_f = qweight.shape[0] * 8
        zeros = [[z + 1 for z in _unpack_ref(row, 4, out_f)] for row in qzeros.tolist()]
        w = orig.get(m + ".weight").double()
        for o in (0, 17, 63):
            codes = _unpack_ref(qweight[:, o].tolist(), 4, in_f)
            for i in range(0, in_f, 7):
                g = i // 32
                s = float(torch.tensor(float(w[o, g * 32:(g + 1) * 32].abs().max()) / 7).half())
                expect_code = min(max(round(float(w[o, i]) / s) + 8, 0), 15)
                assert codes[i] == expect_code and zeros[g][o] == 8
                assert float(scales[g, o]) == s
        # and the core loader dequantizes it to (code - 8) * scale
        host = adaptkit_pm_factory()
        qc = host.open_model(out)
        assert qc.source_format == "gptq" and qc.loader == "adaptkit:quantized"
        got = qc.get(m + ".weight").double()
        codes = torch.tensor([_unpack_ref(qweight[:, o].tolist(), 4, in_f) for o in range(out_f)], dtype=torch.float64)
        ref = (codes - 8) * scales[torch.arange(in_f) // 32].T
        assert torch.equal(got, ref.float().double())
        qc.close()

    # declared capabilities are enforced: sym4 accepts --bits and --group-size only
    r = adaptkit_cli("quantize", src, tmp_path / "x", "--method", "sym4", "--asym", extra_plugins=[ThirdPartyQuant()])
    assert r.exit_code == 3 and "--sym/--asym: quantizer 'sym4' does not use it" in _err(r)
    assert "--bits, --group-size, -o unused=1" in _err(r)
    # and the dequantize step is a step too
    spy2 = StepSpy()
    r = adaptkit_cli("quantize", out, tmp_path / "d", "--method", "dequantize", extra_plugins=[spy2])
    assert r.exit_code == 0, r.stderr
    assert [(k, n) for k, n, _ in spy2.seen] == [("dequantize", "dequantize")]


@pytest.mark.parametrize("args,flag", [(["--group-size", "64"], "--group-size"), (["--act-order"], "--act-order"),
                                       (["--asym"], "--sym/--asym"), (["--damp", "0.1"], "--damp")])
def test_nf4_refuses_options_it_does_not_use(adaptkit_cli, tiny_llama, tmp_path, args, flag) -> None:
    out = tmp_path / "q"
    r = adaptkit_cli("quantize", tiny_llama(), out, "--method", "nf4", *args)
    assert r.exit_code == 3
    msg = _err(r)
    assert f"{flag}: quantizer 'nf4' does not use it" in msg
    assert "-o blocksize=64" in msg  # what it uses instead
    assert not out.exists()


def test_requantize_equals_quantizing_the_dequantized_copy(adaptkit_cli, tiny_llama, tmp_path) -> None:
    from adaptkit.io import open_checkpoint

    src = tiny_llama(attention_bias=True)
    q = tmp_path / "q"
    assert adaptkit_cli("quantize", src, q, "--method", "rtn", "--group-size", "32").exit_code == 0
    r = adaptkit_cli("quantize", q, tmp_path / "x", "--method", "rtn", "--group-size", "32", "--bits", "3", "--asym")
    assert r.exit_code == 4
    assert _err(r).startswith(f"error: {q}: already quantized (gptq); quantizing again compounds the error: pass "
                              "--requantize")
    assert not (tmp_path / "x").exists()

    rq = tmp_path / "rq"
    r = adaptkit_cli("quantize", q, rq, "--method", "rtn", "--group-size", "32", "--bits", "3", "--asym",
                     "--requantize", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["input"] == {"loader": "adaptkit:quantized", "source_format": "gptq"}
    assert json.loads((rq / "adaptkit.json").read_text())["input"]["source_format"] == "gptq"
    d = tmp_path / "d"
    assert adaptkit_cli("quantize", q, d, "--method", "dequantize").exit_code == 0
    dq = tmp_path / "dq"
    assert adaptkit_cli("quantize", d, dq, "--method", "rtn", "--group-size", "32", "--bits", "3", "--asym").exit_code == 0
    with open_checkpoint(rq) as a, open_checkpoint(dq) as b:
        assert sorted(a.names()) == sorted(b.names())
        for n in a.names():
            ta, tb = a.get(n), b.get(n)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, n
            assert torch.equal(ta.contiguous().view(torch.uint8), tb.contiguous().view(torch.uint8)), n
    assert (rq / "config.json").read_bytes() == (dq / "config.json").read_bytes()


def test_group_size_default_follows_the_model(adaptkit_cli, tiny_llama, tmp_path) -> None:
    """hidden 96 (not a multiple of 128): the default group size is 32, announced on stderr; an explicit one
    that does not fit names the module and in_features and suggests one that does."""
    from adaptkit.io import open_checkpoint

    src = tiny_llama(hidden_size=96, num_heads=3, num_kv_heads=3)
    out = tmp_path / "q"
    r = adaptkit_cli("quantize", src, out, "--method", "rtn")
    assert r.exit_code == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "--group-size 32" in notes[0] and "in_features 96" in notes[0]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    with open_checkpoint(out) as raw:
        assert tuple(raw.info("model.layers.0.self_attn.q_proj.scales").shape) == (3, 96)  # 96 / 32 groups
        assert tuple(raw.info("model.layers.0.mlp.down_proj.scales").shape) == (4, 96)  # 128 / 32
        assert torch.equal(raw.get("model.layers.0.mlp.down_proj.g_idx"), torch.arange(128, dtype=torch.int32) // 32)

    r = adaptkit_cli("quantize", src, tmp_path / "b", "--method", "rtn", "--group-size", "64")
    assert r.exit_code == 3
    msg = _err(r)
    assert re.search(r"--group-size 64: model\.layers\.0\.\S+\.weight \[\d+, 96\]: in_features 96 is not a multiple "
                     r"of group size 64", msg), msg
    assert "--group-size 32 works for every target" in msg and "--partial-groups" in msg

    # a model whose in_features are all multiples of 128 keeps 128, silently
    big = tiny_llama(hidden_size=128, num_heads=4, num_kv_heads=4, intermediate_size=256)
    r = adaptkit_cli("quantize", big, tmp_path / "c", "--method", "rtn", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["spec"]["group_size"] == 128 and "note:" not in r.stderr
    assert "smaller" not in r.stdout  # --json prints JSON only


def test_summary_line_says_smaller(adaptkit_cli, tiny_llama, tmp_path) -> None:
    src = tiny_llama(hidden_size=128, num_heads=4, num_kv_heads=4, intermediate_size=256)
    out = tmp_path / "q"
    r = adaptkit_cli("quantize", src, out, "--method", "nf4")
    assert r.exit_code == 0, r.stderr
    ratio = (sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
             / sum(p.stat().st_size for p in out.glob("*.safetensors")))
    assert ratio > 1 and f"{ratio:.2f}x smaller" in r.stdout


def test_loader_dispatches_through_format_modules(tmp_path, monkeypatch, adaptkit_pm_factory) -> None:
    """A new format module with the reading API plugs into the ``quantized`` loader without a change there
    (how ``bnb-int8`` joins): detection, names, dequantization and ``source_format`` all come from it."""
    import types

    from safetensors.torch import save_file

    import adaptkit.formats as formats
    from adaptkit.errors import CheckpointError
    from adaptkit.formats.quantized import StoredWeight

    toy = types.ModuleType("toy_format_for_tests")
    toy.detect_config = lambda qc: qc.get("quant_method") == "toy"
    toy.source_format = lambda qc: "toy"

    def scan(raw, qc, cfg):
        return [StoredWeight(name=n[: -len(".q")] + ".weight", shape=tuple(raw.info(n).shape), dtype="F32", anchor=n,
                             hidden=(n, n[: -len(".q")] + ".s"), state=n[: -len(".q")])
                for n in raw.names() if n.endswith(".q")]

    toy.scan = scan
    toy.read = lambda raw, s, qc: raw.get(s.state + ".q").float() * raw.get(s.state + ".s").float()[:, None]
    monkeypatch.setitem(sys.modules, "toy_format_for_tests", toy)
    monkeypatch.setitem(formats.FORMATS, "toy", "toy_format_for_tests")

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (4, 6), generator=g, dtype=torch.int8)
    s = torch.rand(4, generator=g)
    d = tmp_path / "toy"
    d.mkdir()
    save_file({"model.layers.0.mlp.up_proj.q": q, "model.layers.0.mlp.up_proj.s": s, "model.norm.weight": torch.ones(6)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "toy"}}))
    host = adaptkit_pm_factory()
    ck = host.open_model(d)
    assert (ck.loader, ck.source_format) == ("adaptkit:quantized", "toy")
    assert sorted(ck.names()) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    ref = q.double() * s.double()[:, None]  # the toy format's definition, in float64
    assert torch.allclose(ck.get("model.layers.0.mlp.up_proj.weight").double(), ref, rtol=1e-6, atol=0)
    assert "quantization_config" not in ck.config
    ck.close()
    from adaptkit.quantize.runner import run_quantize

    with pytest.raises(CheckpointError, match=r"already quantized \(toy\)"):
        run_quantize(d, tmp_path / "out", method="rtn", host=host, show_progress=False)
