"""Produce a fixed set of merge and quantize outputs on tiny models and hash every output file.

Recorded once before the four-kinds refactor (``python tests/golden/produce.py --write``); the test
``test_golden_outputs.py`` reproduces them through the CLI and requires byte-identical files. Files that a
change is *meant* to alter are not hashed: the model card (``README.md``), the manifest and ``adaptkit.json``
(provenance added by the publisher). Everything else -- every safetensors shard, the index, ``config.json``,
``quantize_config.json``, tokenizer files, ``mergekit_config.yml`` -- must come out identical (the
``transformers_version`` stamp in JSON files is masked: it names the installed transformers, not our output).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HASHES = HERE / "output_hashes.json"
UNHASHED = {"README.md", "adaptkit-manifest.json", "adaptkit.json"}

MERGES: dict[str, dict] = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}],
        "dtype": "bfloat16"},
    "slerp": {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "a"}],
              "parameters": {"t": [0.2, 0.8]}},
    "nuslerp": {"merge_method": "nuslerp", "models": [
        {"model": "a", "parameters": {"weight": 0.4}}, {"model": "b", "parameters": {"weight": 0.6}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.9}},
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "b", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}],
        "parameters": {"normalize": True}, "dtype": "bfloat16"},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.4}}]},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.4}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}}]},
    "della": {"merge_method": "della", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}}]},
    "della_linear": {"merge_method": "della_linear", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": [
        {"model": "a"}, {"model": "b"}]},
    "passthrough": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "b", "layer_range": [1, 2]}]}], "dtype": "float16"},
}

QUANTS: dict[str, list[str]] = {
    "rtn": ["--method", "rtn", "--group-size", "32"],
    "rtn-asym": ["--method", "rtn", "--group-size", "32", "--asym", "--bits", "3"],
    "nf4": ["--method", "nf4"],  # blocksize 64 (the default; nf4 refuses --group-size)
    "gptq": ["--method", "gptq", "--group-size", "32", "--calib", "builtin-pydoc", "--nsamples", "4",
             "--seqlen", "64"],
    "gptq-act": ["--method", "gptq", "--group-size", "32", "--act-order", "--calib", "builtin-pydoc",
                 "--nsamples", "4", "--seqlen", "64"],
    "awq": ["--method", "awq", "--group-size", "32", "--calib", "builtin-pydoc", "--nsamples", "4",
            "--seqlen", "64", "-o", "n_grid=5"],
}


def _hash_tree(root: Path, work: Path) -> dict[str, str]:
    """sha256 of every file under ``root``; in the resolved recipe (``mergekit_config.yml``) the temporary
    work folder is replaced by ``<work>`` first, since it names the input models by absolute path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in UNHASHED:
            data = p.read_bytes()
            if p.suffix == ".yml":
                data = data.replace(str(work).encode(), b"<work>")
            elif p.suffix == ".json":
                # transformers stamps its own version into config.json / generation_config.json: the installed
                # version is not an output of adaptkit (CI may resolve a newer transformers than the recording)
                data = re.sub(rb'"transformers_version": "[^"]*"', b'"transformers_version": "<any>"', data)
            out[p.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def _cli(*args: object) -> None:
    from click.testing import CliRunner

    from adaptkit.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if r.exit_code != 0:
        raise RuntimeError(f"adaptkit {' '.join(map(str, args))} failed ({r.exit_code}): {r.output}")


def produce(work: Path) -> dict[str, dict[str, str]]:
    """Build the tiny models under ``work``, run every case, return {case: {file: sha256}}."""
    import yaml

    from adaptkit.testing import make_tiny_llama, perturbed_copy

    work = work.resolve()
    models = work / "models"
    base = make_tiny_llama(models / "base", hidden_size=64, num_layers=2, attention_bias=True, seed=7)
    perturbed_copy(base, models / "a", scale=0.05, seed=1)
    perturbed_copy(base, models / "b", scale=0.05, seed=2)
    results: dict[str, dict[str, str]] = {}
    for name, cfg in MERGES.items():
        cfg_path = models / f"{name}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = work / "merge" / name
        _cli("merge", cfg_path, out, "--seed", "3", "--quiet")
        results[f"merge/{name}"] = _hash_tree(out, work)
    for name, args in QUANTS.items():
        out = work / "quant" / name
        _cli("quantize", base, out, *args)
        results[f"quantize/{name}"] = _hash_tree(out, work)
    out = work / "quant" / "dequantize-gptq"
    _cli("quantize", work / "quant" / "gptq", out, "--method", "dequantize")
    results["quantize/dequantize-gptq"] = _hash_tree(out, work)
    return results


if __name__ == "__main__":  # pragma: no cover - recording tool
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = produce(Path(d))
    if "--write" in sys.argv:
        HASHES.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HASHES} ({sum(len(v) for v in res.values())} files in {len(res)} cases)")
    else:
        print(json.dumps(res, indent=1, sort_keys=True))
